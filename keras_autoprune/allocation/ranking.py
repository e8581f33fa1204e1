"""Global ranking: remove the least important channels, model-wide, until a budget holds.

All prunable channels (in whole chunks, see `ChannelGroup.chunks`) are put in
one list sorted by score, lowest first; per-layer ratios are whatever this
order implies. The plan removes the shortest prefix of the list whose pruned
model meets the target, found by bisection on the exact cost
(`kap.count_flops` / `kap.count_params` of the pruned model, computed without
building it by `allocation.cost.PlanCost`), so the result is never over
budget and at most one chunk past it.
"""

from __future__ import annotations

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
) -> list[Chunk]:
    """Chunks in the order they are removed.

    Channels already removed by ``removed`` come first. The others follow by
    increasing score (the sum of their channels' scores), skipping any chunk
    whose removal would leave a group or one of its layers without channels,
    so that every prefix of the order is a valid plan.

    Args:
        graph: the model's dependency graph.
        scores: ``{group_id: per-channel score}``; higher = more important.
            Groups absent from ``scores`` are not pruned.
        removed: a plan whose removed channels stay removed (earlier rounds).
    """
    forced, candidates = [], []
    already = removed.kept if removed is not None else {}
    for group in graph.prunable_groups:
        if group.id not in scores:
            continue
        score = np.asarray(scores[group.id], np.float64)
        if score.shape != (group.size,):
            raise ValueError(
                f"Scores of group '{group.id}' must have shape ({group.size},). Received: shape {score.shape}"
            )
        kept_before = already.get(group.id)
        for chunk in range(int(group.chunks.max()) + 1):
            channels = np.flatnonzero(group.chunks == chunk)
            if kept_before is not None and not np.isin(channels, kept_before).any():
                forced.append((group.id, channels))
            else:
                candidates.append((float(score[channels].sum()), len(candidates), group.id, channels))
    candidates.sort(key=lambda item: (item[0], item[1]))
    feasibility = _Feasibility(graph)
    order = []
    for group_id, channels in forced:
        feasibility.remove(group_id, channels)
        order.append((group_id, channels))
    for _, _, group_id, channels in candidates:
        if feasibility.can_remove(group_id, channels):
            feasibility.remove(group_id, channels)
            order.append((group_id, channels))
    return order


class _Feasibility:
    """Counts the channels left in every group member as chunks are removed."""

    def __init__(self, graph: DependencyGraph):
        self._left: dict[str, list[set[int]]] = {
            group.id: [set(np.unique(m.channels).tolist()) for m in group.members] + [set(range(group.size))]
            for group in graph.prunable_groups
        }

    def can_remove(self, group_id: str, channels: np.ndarray) -> bool:
        gone = set(channels.tolist())
        return all(not left or left - gone for left in self._left[group_id])

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

    Returns:
        The plan whose rebuilt model costs at most ``target`` of the original
        and removes as few chunks as possible. If even removing every
        removable channel does not reach the target, that maximal plan is
        returned with a warning.
    """
    target = budget.fraction if target is None else target
    order = removal_order(graph, scores, removed)
    forced = sum(1 for g, c in order if removed is not None and g in removed.kept and not np.isin(c, removed.kept[g]).any())
    cost = PlanCost(model, graph)
    limit = target * cost(PrunePlan({}), budget.metric)

    def fits(count: int) -> bool:
        return cost(plan_from_prefix(graph, order, count), budget.metric) <= limit

    low, high = forced, len(order)
    if not fits(high):
        warnings.warn(
            f"keras_autoprune: cannot reach {target:.1%} of the original {budget.metric}: removing every "
            "prunable channel (keeping one per layer) is not enough. Using that maximal plan.",
            stacklevel=2,
        )
        return plan_from_prefix(graph, order, high)
    return plan_from_prefix(graph, order, shortest_fitting_prefix(fits, low, high))
