"""`GeneSpace`: channel configurations of a model as integer genes.

A gene vector holds one integer per prunable channel group of the model's
`kap.DependencyGraph` (channels tied by a residual Add are one group, so they
share one gene). Gene ``i = k`` keeps the first

``max(1, round(scales[k] * chunks))``

chunks of group ``i`` in the space's channel order, where a chunk is one
channel, or one normalisation group where a GroupNormalization normalises
the channels (channels can only be removed in whole groups there); a chunk
comes in the order of its first channel. A layer holding only some of the
group's channels (a concatenation added to a wider convolution) keeps its
first chunk even when the width would leave it none. The order is index order by default,
or any permutation per group (`PruningNet(channel_order="l1")` puts the
channels of largest L1 norm first, so that a warm-started PruningNet starts
every gene from the strongest trained channels). For a PruningNet trained
from scratch the order is arbitrary: it generates weights for whatever
channels a configuration keeps. Every configuration is a `kap.PrunePlan`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.surgery.plan import PrunePlan, cover_members

#: The paper's 31 width scales: 0.10, 0.13, ..., 1.00.
DEFAULT_SCALES: tuple[float, ...] = tuple(round(0.1 + 0.03 * i, 2) for i in range(31))

Gene = tuple[int, ...]


class GeneSpace:
    """The genes of one model: which groups, which widths each may take.

    Args:
        graph: the model's dependency graph; one gene per prunable group.
        scales: the width choices, increasing fractions in ``(0, 1]``; the
            last one should be 1.0 so that the full model is a gene
            (`full`).
        channel_order: ``{group_id: permutation of range(group.size)}``,
            the order in which a group's channels are kept (groups left
            out, or ``None``: index order).

    Attributes:
        groups: the prunable `kap.ChannelGroup`s, one per gene.
        scales: the width choices.
        widths: ``widths[i][k]``: channels kept by group ``i`` at choice ``k``
            (whole chunks, see the module docstring).
        channel_order: one permutation per group, in ``groups`` order.

    Example:

    >>> space = GeneSpace(kap.DependencyGraph(model))    # doctest: +SKIP
    >>> plan = space.plan(space.full)                    # doctest: +SKIP
    """

    def __init__(self, graph: DependencyGraph, scales: Sequence[float] = DEFAULT_SCALES,
                 channel_order: Mapping[str, np.ndarray] | None = None):
        scales = tuple(float(s) for s in scales)
        if not scales or any(not 0 < s <= 1 for s in scales) or list(scales) != sorted(set(scales)):
            raise ValueError(
                "`scales` are the width choices of every gene: strictly increasing fractions in (0, 1], "
                f"e.g. (0.25, 0.5, 0.75, 1.0). Received: scales={scales}"
            )
        self.graph = graph
        self.groups = tuple(graph.prunable_groups)
        if not self.groups:
            raise ValueError(
                f"Model '{graph.model.name}' has no prunable channel group, so MetaPruning has nothing to "
                "search. Check `kap.DependencyGraph(model).summary()` for why every group is blocked."
            )
        self.scales = scales
        self.channel_order = _check_order(self.groups, channel_order or {})
        self._kept = tuple(tuple(_kept_channels(g, order, s) for s in scales)
                           for g, order in zip(self.groups, self.channel_order))
        self.widths = tuple(tuple(kept.size for kept in choices) for choices in self._kept)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def full(self) -> Gene:
        """The largest choice everywhere: every channel when the last scale is 1.0."""
        return (len(self.scales) - 1,) * len(self.groups)

    def uniform(self, choice: int) -> Gene:
        """Every group at choice ``choice`` (uniform widths)."""
        self._check_choice(choice)
        return (int(choice),) * len(self.groups)

    def plan(self, gene: Sequence[int]) -> PrunePlan:
        """The `kap.PrunePlan` of ``gene``: group ``i`` keeps its ``widths[i][gene[i]]`` first channels (in order)."""
        gene = self.check(gene)
        return PrunePlan({g.id: self._kept[i][k].copy()
                          for i, (g, k) in enumerate(zip(self.groups, gene)) if self.widths[i][k] < g.size})

    def group_widths(self, gene: Sequence[int]) -> dict[str, int]:
        """``{group_id: channels kept}`` for ``gene``."""
        gene = self.check(gene)
        return {g.id: self.widths[i][k] for i, (g, k) in enumerate(zip(self.groups, gene))}

    def random(self, rng: np.random.Generator) -> Gene:
        """A gene with every choice drawn uniformly."""
        return tuple(int(k) for k in rng.integers(0, len(self.scales), size=len(self.groups)))

    def mutate(self, gene: Sequence[int], rng: np.random.Generator, probability: float = 0.1) -> Gene:
        """Each choice replaced by a uniform random one with ``probability``."""
        gene = self.check(gene)
        redraw = rng.random(len(gene)) < probability
        fresh = rng.integers(0, len(self.scales), size=len(gene))
        return tuple(int(f if r else k) for k, r, f in zip(gene, redraw, fresh))

    def crossover(self, first: Sequence[int], second: Sequence[int], rng: np.random.Generator) -> Gene:
        """Uniform crossover: each choice taken from either parent with probability 1/2."""
        first, second = self.check(first), self.check(second)
        pick = rng.random(len(first)) < 0.5
        return tuple(int(a if p else b) for a, b, p in zip(first, second, pick))

    def check(self, gene: Sequence[int]) -> Gene:
        """``gene`` as a tuple of ints, or a ValueError saying what is wrong."""
        gene = tuple(int(k) for k in gene)
        if len(gene) != len(self.groups):
            raise ValueError(
                f"A gene has one choice per prunable group ({len(self.groups)} here). "
                f"Received: a gene of length {len(gene)}"
            )
        for k in gene:
            self._check_choice(k)
        return gene

    def _check_choice(self, choice: int) -> None:
        if not 0 <= int(choice) < len(self.scales):
            raise ValueError(
                f"A gene's choices index `scales` (0 to {len(self.scales) - 1}). Received: choice={choice}"
            )


def _kept_channels(group, order: np.ndarray, scale: float) -> np.ndarray:
    """The sorted channels ``group`` keeps at ``scale``: its first whole chunks in ``order``, every member covered."""
    chunks = group.chunks[order]
    _, first = np.unique(chunks, return_index=True)
    chunk_order = chunks[np.sort(first)]  # each chunk at its first channel in `order`
    count = max(1, int(round(scale * chunk_order.size)))
    kept = np.flatnonzero(np.isin(group.chunks, chunk_order[:count]))
    rank = np.empty(chunk_order.size)
    rank[chunk_order] = -np.arange(chunk_order.size)  # earlier in the order: a better chunk to add back
    return cover_members(group, kept, rank)


def _check_order(groups: Sequence, channel_order: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """One permutation per group (index order where ``channel_order`` has none), or a ValueError."""
    known = {g.id for g in groups}
    unknown = sorted(set(channel_order) - known)
    if unknown:
        raise ValueError(f"`channel_order` names groups that are not prunable groups of the model: {unknown}. "
                         f"Expected some of: {sorted(known)}")
    orders = []
    for group in groups:
        order = np.asarray(channel_order.get(group.id, np.arange(group.size)))
        if order.shape != (group.size,) or not np.array_equal(np.sort(order), np.arange(group.size)):
            raise ValueError(f"`channel_order['{group.id}']` must be a permutation of range({group.size}). "
                             f"Received: {order!r}")
        orders.append(order.astype(np.int64))
    return tuple(orders)
