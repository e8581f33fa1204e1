"""`PrunePlan`: which channels of which groups survive.

A plan maps group ids (see `DependencyGraph.groups`) to the sorted indices of
the channels to keep. Groups it does not name are kept whole. Plans are plain
data: they serialise to JSON and can be replayed on the same architecture.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from keras_autoprune.errors import PlanError
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.surgery.importance import channel_l1

_FORMAT = "keras_autoprune.PrunePlan/1"


class PrunePlan:
    """Kept channel indices per channel group.

    Args:
        kept: ``{group_id: kept_indices}``; indices are channel numbers of
            the group (0 .. size-1).

    Example:

    >>> plan = PrunePlan({"conv1": [0, 2, 3]})
    >>> PrunePlan.from_json(plan.to_json()) == plan
    True
    """

    def __init__(self, kept: Mapping[str, Sequence[int]] | None = None):
        if kept is None:
            kept = {}
        if not isinstance(kept, Mapping):
            raise PlanError(
                "Expected a mapping {group_id: kept_indices}. "
                f"Received: kept of type {type(kept).__name__}"
            )
        self._kept: dict[str, np.ndarray] = {}
        for group_id, indices in kept.items():
            if not isinstance(group_id, str):
                raise PlanError(f"Group ids are strings (see `graph.groups`). Received: group_id={group_id!r}")
            array = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
            if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
                raise PlanError(
                    f"Kept indices of group '{group_id}' must be a 1-D sequence of integers. "
                    f"Received: {indices!r}"
                )
            self._kept[group_id] = array.astype(np.int64)

    # -- construction ---------------------------------------------------
    @classmethod
    def uniform(
        cls,
        graph: DependencyGraph,
        ratio: float,
        round_to: int = 1,
        importance: str = "l1",
    ) -> "PrunePlan":
        """Removes the fraction ``ratio`` of the channels of every prunable group.

        In each group, ``floor(ratio * size)`` channels go (counted in whole
        chunks for GroupNormalization groups), the number kept is rounded up
        to a multiple of ``round_to``, and at least one channel stays.

        Args:
            graph: the model's `DependencyGraph`.
            ratio: fraction removed, in ``[0, 1)``.
            round_to: keep a multiple of this many channels (hardware-friendly
                widths such as 8).
            importance: which channels go: ``"l1"`` (the smallest L1 norm of
                the weights creating them, summed over the group's layers) or
                ``"last"`` (the highest indices).
        """
        _check_graph(graph)
        _check_ratio(ratio)
        if not isinstance(round_to, int) or round_to < 1:
            raise PlanError(f"`round_to` must be a positive integer. Received: round_to={round_to!r}")
        if importance not in ("l1", "last"):
            raise PlanError(f"`importance` must be 'l1' or 'last'. Received: importance={importance!r}")
        if importance == "l1":
            scores = channel_l1(graph)
        else:
            scores = {g.id: -np.arange(g.size, dtype=float) for g in graph.prunable_groups}
        return cls.from_ratios(graph, {g.id: ratio for g in graph.prunable_groups}, scores, round_to)

    @classmethod
    def from_ratios(
        cls,
        graph: DependencyGraph,
        ratios: Mapping[str, float],
        scores: Mapping[str, np.ndarray],
        round_to: int = 1,
    ) -> "PrunePlan":
        """Removes ``floor(ratio * size)`` lowest-scored channels of each named group.

        Counted in whole chunks (GroupNormalization groups); the number kept
        is rounded up to a multiple of ``round_to``; at least one channel
        stays, and no layer of the group is left without channels.

        Args:
            graph: the model's `DependencyGraph`.
            ratios: ``{group_id: fraction removed}`` for prunable groups.
            scores: ``{group_id: per-channel score}``, higher = keep.
            round_to: keep a multiple of this many channels.

        Raises:
            PlanError: a ratio outside ``[0, 1)``, a group that is not a
                prunable group of ``graph``, or scores of the wrong length.
        """
        _check_graph(graph)
        prunable = {g.id: g for g in graph.prunable_groups}
        for group_id, ratio in ratios.items():
            if group_id not in prunable:
                known = graph.group_index(group_id) is not None
                why = f"blocked ({graph.group(group_id).reason})" if known else "not a group of the graph"
                raise PlanError(f"Expected ratios of prunable groups. Received: '{group_id}', {why}. "
                                "Fix: see graph.summary() for the prunable groups.")
            _check_ratio(ratio)
            if np.shape(scores[group_id]) != (prunable[group_id].size,):
                raise PlanError(f"Expected one score per channel of group '{group_id}' ({prunable[group_id].size}). "
                                f"Received: scores of shape {np.shape(scores[group_id])}")
        kept = {}
        for group_id, ratio in ratios.items():
            group = prunable[group_id]
            n_chunks = int(group.chunks.max()) + 1
            chunk_size = group.size // n_chunks
            keep_chunks = max(1, n_chunks - math.floor(ratio * n_chunks + 1e-9))  # 0.29 * 100 = 28.999...: 29
            if round_to > 1:
                rounded = math.ceil(keep_chunks * chunk_size / round_to) * round_to
                keep_chunks = min(n_chunks, math.ceil(rounded / chunk_size))
            if keep_chunks == n_chunks:
                continue
            score = np.zeros(n_chunks)
            np.add.at(score, group.chunks, scores[group_id])
            best = np.argsort(-score, kind="stable")[:keep_chunks]
            kept_channels = np.flatnonzero(np.isin(group.chunks, best))
            kept[group.id] = cover_members(group, kept_channels, score)
        return cls(kept)

    # -- access ---------------------------------------------------------
    @property
    def kept(self) -> dict[str, np.ndarray]:
        """``{group_id: kept indices}`` (a copy)."""
        return {k: v.copy() for k, v in self._kept.items()}

    def __eq__(self, other) -> bool:
        return isinstance(other, PrunePlan) and self._kept.keys() == other._kept.keys() and all(
            np.array_equal(v, other._kept[k]) for k, v in self._kept.items()
        )

    def __repr__(self) -> str:
        return f"PrunePlan({len(self._kept)} groups)"

    # -- validation -----------------------------------------------------
    def validate(self, graph: DependencyGraph) -> None:
        """Raises `PlanError` unless the plan fits ``graph``."""
        for group_id, indices in self._kept.items():
            if graph.group_index(group_id) is None:
                prunable = [g.id for g in graph.prunable_groups]
                raise PlanError(
                    f"The plan names group '{group_id}', which is not in this model's graph. "
                    f"Prunable groups: {prunable[:12]}{' ...' if len(prunable) > 12 else ''}. "
                    "Fix: build the plan from `DependencyGraph(model).groups` of this model."
                )
            group = graph.group(group_id)
            if not group.prunable:
                raise PlanError(
                    f"Group '{group_id}' cannot be pruned because {group.reason}. "
                    "Fix: leave it out of the plan (or register a handler for the blocking layer)."
                )
            if indices.size == 0:
                raise PlanError(
                    f"The plan keeps zero channels of group '{group_id}' (size {group.size}); "
                    "at least one must stay. Fix: keep at least one index."
                )
            bad = indices[(indices < 0) | (indices >= group.size)]
            if bad.size:
                raise PlanError(
                    f"Kept indices of group '{group_id}' must lie in [0, {group.size}). "
                    f"Received out-of-range indices: {bad.tolist()}"
                )
            values, counts = np.unique(indices, return_counts=True)
            if (counts > 1).any():
                raise PlanError(
                    f"Kept indices of group '{group_id}' contain duplicates: {values[counts > 1].tolist()}"
                )
            for member in group.members:
                if not np.isin(member.channels, indices).any():
                    raise PlanError(
                        f"The plan removes every channel that layer '{member.layer}' holds in group "
                        f"'{group_id}' ({member.side} positions {member.positions.tolist()[:8]}): a layer "
                        "cannot be left with zero channels. Fix: keep at least one of its channels "
                        f"{np.unique(member.channels).tolist()[:8]}."
                    )
            kept_chunks = np.unique(group.chunks[indices])
            if np.isin(group.chunks, kept_chunks).sum() != indices.size:
                raise PlanError(
                    f"Group '{group_id}' goes through a GroupNormalization: channels can only be "
                    "removed in whole normalization groups (chunks: "
                    f"{group.chunks.tolist()}). Received kept indices: {indices.tolist()}"
                )

    def removed_atoms(self, graph: DependencyGraph) -> np.ndarray:
        """Boolean array over the graph's atoms: True where the channel goes."""
        self.validate(graph)
        removed = np.zeros(len(graph.atom_group), bool)
        for group_id, indices in self._kept.items():
            g = graph.group_index(group_id)
            gone = np.setdiff1d(np.arange(graph.groups[g].size), indices)
            removed |= (graph.atom_group == g) & np.isin(graph.atom_channel, gone)
        return removed

    # -- serialisation --------------------------------------------------
    def to_json(self) -> str:
        """JSON text: ``{"format": ..., "kept": {group_id: [indices]}}``."""
        return json.dumps({"format": _FORMAT, "kept": {k: v.tolist() for k, v in self._kept.items()}})

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        """Inverse of `to_json`."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as error:
            raise PlanError(f"Expected the JSON text written by `PrunePlan.to_json()`. Received: {text!r:.80}") from error
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("kept"), dict):
            raise PlanError(
                f"Expected JSON with format '{_FORMAT}' and a 'kept' mapping, as written by "
                f"`PrunePlan.to_json()`. Received: {text!r:.80}"
            )
        return cls(data["kept"])


def cover_members(group, kept: np.ndarray, chunk_score: np.ndarray) -> np.ndarray:
    """Adds back the best chunk of any member left with no channel.

    A group may span layers that each hold only some of its channels (a
    concatenation added to a wider convolution); none of them may end up
    empty.
    """
    kept_set = set(kept.tolist())
    for member in group.members:
        if kept_set.isdisjoint(member.channels.tolist()):
            chunks = np.unique(group.chunks[member.channels])
            best = chunks[np.argmax(chunk_score[chunks])]
            kept_set.update(np.flatnonzero(group.chunks == best).tolist())
    return np.array(sorted(kept_set), np.int64)


def _check_graph(graph) -> None:
    if not isinstance(graph, DependencyGraph):
        raise PlanError(f"Expected a kap.DependencyGraph. Received: {type(graph).__name__}. "
                        "Fix: pass kap.DependencyGraph(model), not the model.")


def _check_ratio(ratio) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio < 1:
        raise PlanError(f"`ratio` is the fraction of channels removed, in [0, 1). Received: ratio={ratio!r}")
