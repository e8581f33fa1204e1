"""Global ranking: remove the least important channels, model-wide, until a budget holds.

All prunable channels (in whole chunks, see `ChannelGroup.chunks`) are put in
one list sorted by score, lowest first; per-layer ratios are whatever this
order implies. The plan removes the shortest prefix of the list whose pruned
model meets the target, found by bisection on the exact cost
(`kap.count_flops` / `kap.count_params` of the pruned model, computed without
building it by `allocation.cost.PlanCost`), so the result is never over
budget and at most one chunk past it.

Layer floor (``max_layer_ratio`` r): a chunk is skipped when its removal
would leave a group, or one of the layers it spans, with fewer than
``max(1, ceil((1 - r) * n))`` of its ``n`` original channels. ``r = 1``
only keeps one channel; ``r = 0.9`` keeps at least a tenth of every layer,
which stops a global ranking from emptying a layer whose channels all look
unimportant (layer collapse).
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np

from keras_autoprune.allocation.cost import PlanCost
from keras_autoprune.allocation.search import shortest_fitting_prefix
from keras_autoprune.budget import Budget
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.surgery.plan import PrunePlan

Chunk = tuple[str, np.ndarray]  # (group id, channels removed together)


def removal_order(
    graph: DependencyGraph,
    scores: dict[str, np.ndarray],
    removed: PrunePlan | None = None,
    max_layer_ratio: float = 1.0,
) -> list[Chunk]:
    """Chunks in the order they are removed.

    Channels already removed by ``removed`` come first. The others follow by
    increasing score (the sum of their channels' scores), skipping any chunk
    whose removal would take a group or one of its layers below its floor
    (one channel, or ``ceil((1 - max_layer_ratio) * n)`` of ``n``), so that
    every prefix of the order is a valid plan.

    Args:
        graph: the model's dependency graph.
        scores: ``{group_id: per-channel score}``, finite; higher = more
            important. Groups absent from ``scores`` lose no further channels
            (those ``removed`` already took stay removed).
        removed: a plan whose removed channels stay removed (earlier rounds).
        max_layer_ratio: the largest fraction of a group's (and a layer's)
            original channels the order removes, in (0, 1]; see the module
            docstring.

    Raises:
        ValueError: a score key that is not a group of ``graph``, or scores
            of a prunable group of the wrong shape or not finite.
    """
    check_max_layer_ratio(max_layer_ratio)
    check_scores(graph, scores)
    forced, candidates = [], []
    for group in graph.prunable_groups:
        score = np.asarray(scores[group.id], np.float64) if group.id in scores else None
        for chunk in range(int(group.chunks.max()) + 1):
            channels = np.flatnonzero(group.chunks == chunk)
            if is_removed(removed, group.id, channels):
                forced.append((group.id, channels))
            elif score is not None:
                candidates.append((float(score[channels].sum()), len(candidates), group.id, channels))
    candidates.sort(key=lambda item: (item[0], item[1]))
    feasibility = _Feasibility(graph, max_layer_ratio)
    order = []
    for group_id, channels in forced:
        feasibility.remove(group_id, channels)
        order.append((group_id, channels))
    for _, _, group_id, channels in candidates:
        if feasibility.can_remove(group_id, channels):
            feasibility.remove(group_id, channels)
            order.append((group_id, channels))
    return order


def is_removed(removed: PrunePlan | None, group_id: str, channels: np.ndarray) -> bool:
    """Whether ``removed`` (an earlier round's plan) took every channel of this chunk."""
    kept = None if removed is None else removed.kept.get(group_id)
    return kept is not None and not np.isin(channels, kept).any()


def check_scores(graph: DependencyGraph, scores: dict[str, np.ndarray]) -> None:
    """Raises ValueError unless every key of ``scores`` is a group of ``graph``, and the prunable ones' scores are
    finite, one per channel (scores of groups that cannot be pruned are ignored)."""
    known = {group.id for group in graph.groups}
    groups = {group.id: group for group in graph.prunable_groups}
    for group_id, values in scores.items():
        if group_id not in known:
            raise ValueError(f"Expected scores keyed by the group ids of the graph, e.g. {sorted(groups)[:4]}. "
                             f"Received: a score for {group_id!r}, which is not one. Fix: key the scores by group.id.")
        group = groups.get(group_id)
        if group is None:
            continue
        score = np.asarray(values, np.float64)
        if score.shape != (group.size,):
            raise ValueError(
                f"Scores of group '{group_id}' must have shape ({group.size},). Received: shape {score.shape}"
            )
        bad = np.flatnonzero(~np.isfinite(score))
        if bad.size:
            raise ValueError(f"Expected finite scores for group '{group_id}'. Received: {bad.size} NaN or infinite "
                             f"value(s), at channel(s) {bad[:6].tolist()}. Fix: check the statistics that produced "
                             "them (a NaN loss or an overflow), or give such channels a finite score.")


def check_max_layer_ratio(value: float) -> None:
    """Raises unless ``value`` is a fraction in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(
            "`max_layer_ratio` is the largest fraction of a layer's channels a plan removes, in (0, 1] "
            f"(1.0: down to one channel; 0.9: every layer keeps at least 10%). Received: max_layer_ratio={value!r}"
        )


def layer_floor(size: int, max_layer_ratio: float) -> int:
    """Fewest channels a layer of ``size`` channels keeps: ``max(1, ceil((1 - r) * size))``."""
    return max(1, math.ceil((1.0 - max_layer_ratio) * size - 1e-9))


class _Feasibility:
    """Counts the channels left in every group member as chunks are removed, against each member's floor."""

    def __init__(self, graph: DependencyGraph, max_layer_ratio: float = 1.0):
        self._left: dict[str, list[set[int]]] = {
            group.id: [set(np.unique(m.channels).tolist()) for m in group.members] + [set(range(group.size))]
            for group in graph.prunable_groups
        }
        self._floor = {
            group_id: [layer_floor(len(left), max_layer_ratio) if left else 0 for left in sets]
            for group_id, sets in self._left.items()
        }

    def can_remove(self, group_id: str, channels: np.ndarray) -> bool:
        gone = set(channels.tolist())
        return all(not left & gone or len(left - gone) >= floor
                   for left, floor in zip(self._left[group_id], self._floor[group_id]))

    def remove(self, group_id: str, channels: np.ndarray) -> None:
        gone = set(channels.tolist())
        for left in self._left[group_id]:
            left -= gone


def plan_from_prefix(graph: DependencyGraph, order: list[Chunk], count: int) -> PrunePlan:
    """The plan that removes the first ``count`` chunks of ``order``."""
    gone: dict[str, list[np.ndarray]] = {}
    for group_id, channels in order[:count]:
        gone.setdefault(group_id, []).append(channels)
    return PrunePlan(
        {
            group_id: np.setdiff1d(np.arange(graph.group(group_id).size), np.concatenate(chunks))
            for group_id, chunks in gone.items()
        }
    )


def global_ranking_plan(
    model: keras.Model,
    graph: DependencyGraph,
    scores: dict[str, np.ndarray],
    budget: Budget,
    target: float | None = None,
    removed: PrunePlan | None = None,
    max_layer_ratio: float = 1.0,
    plan_cost: PlanCost | None = None,
) -> PrunePlan:
    """The plan removing the lowest-scored channels until ``target`` is met.

    Args:
        model: the (unpruned-architecture) model the graph was built on.
        graph: its dependency graph.
        scores: ``{group_id: per-channel score}`` (higher = keep).
        budget: what is measured (FLOPs or parameters) and the final fraction.
        target: fraction of the original cost to keep in this step (defaults
            to ``budget.fraction``; iterative methods pass a ramp).
        removed: channels removed by earlier rounds, which stay removed.
        max_layer_ratio: the largest fraction of any layer's channels removed
            (1.0: down to one channel), see the module docstring.
        plan_cost: `PlanCost(model, graph)` if already built (a callback's, one per fit).

    Returns:
        The plan whose rebuilt model costs at most ``target`` of the original
        and removes as few chunks as possible. If even removing every
        removable channel does not reach the target, that maximal plan is
        returned with a warning.
    """
    budget.require_countable("global_ranking_plan")
    target = budget.fraction if target is None else target
    order = removal_order(graph, scores, removed, max_layer_ratio)
    forced = sum(1 for group_id, channels in order if is_removed(removed, group_id, channels))
    cost = plan_cost if plan_cost is not None else PlanCost(model, graph)
    limit = target * cost(PrunePlan({}), budget.metric)

    def fits(count: int) -> bool:
        return cost(plan_from_prefix(graph, order, count), budget.metric) <= limit

    low, high = forced, len(order)
    if not fits(high):
        warnings.warn(
            f"keras_autoprune: cannot reach {target:.1%} of the original {budget.metric}: removing every "
            "prunable channel (keeping the floor of every layer: max_layer_ratio="
            f"{max_layer_ratio}) is not enough. Using that maximal plan.",
            stacklevel=2,
        )
        return plan_from_prefix(graph, order, high)
    return plan_from_prefix(graph, order, shortest_fitting_prefix(fits, low, high))
