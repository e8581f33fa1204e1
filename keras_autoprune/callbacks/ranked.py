"""`RankedPruningCallback`: the base of the callbacks that rank channels over the whole model.

A subclass scores every channel (`scores`); each round removes the lowest
scored until the round's target holds (`allocation.global_ranking_plan`),
never taking a layer below its floor: at most ``max_layer_ratio`` of its
original channels go (`DEFAULT_MAX_LAYER_RATIO` = 0.9: every layer keeps at
least a tenth; 1.0: down to one channel).

Why 0.9 (issue 12, protocol 1 of Benchmark v2, docs/methods/nap.md "Layer
floor"): without a floor the ranking empties layers whose channels each look
cheap (MobileNetV2 at 50% FLOPs: its last 1x1 convolution cut from 1,280
channels to 1, every entry near chance). With 0.9, on both converged models,
no ranked entry lost accuracy at any target and every one gained where the
floor binds (MobileNetV2 at 50%: NAP 9.6 -> 37.5, global L1 58.9 -> 65.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_autoprune.allocation.ranking import check_max_layer_ratio, global_ranking_plan, plan_from_prefix, removal_order
from keras_autoprune.budget import Budget
from keras_autoprune.callbacks.base import PruningCallback
from keras_autoprune.surgery.plan import PrunePlan


DEFAULT_MAX_LAYER_RATIO = 0.9
"""The callbacks' layer floor: at most 90% of any layer's channels are removed."""


class RankedPruningCallback(PruningCallback):
    """A `PruningCallback` whose plans come from one global ranking of channel scores.

    Args:
        budget: a `kap.Budget`.
        max_layer_ratio: the largest fraction of any layer's channels removed,
            in (0, 1]. Default 0.9: every layer keeps at least a tenth of its
            channels, a guard against layer collapse; 1.0: down to one channel.
        **kwargs: schedule arguments of `PruningCallback`.
    """

    decision_settings = ("max_layer_ratio",)

    def __init__(self, budget: Budget, *, max_layer_ratio: float = DEFAULT_MAX_LAYER_RATIO, **kwargs: Any):
        super().__init__(budget, **kwargs)
        check_max_layer_ratio(max_layer_ratio)
        self.max_layer_ratio = max_layer_ratio

    def scores(self) -> dict[str, np.ndarray]:
        """``{group_id: per-channel score}`` of the current model (higher = keep)."""
        raise NotImplementedError

    def compute_plan(self, target: float, removed: PrunePlan | None) -> PrunePlan:
        """The global ranking of `scores` down to ``target``, with this callback's layer floor."""
        return global_ranking_plan(self.model, self.graph, self.scores(), self.budget, target, removed,
                                   self.max_layer_ratio, self.plan_cost())

    def smallest_plan(self) -> PrunePlan:
        """Every prunable group and layer at its floor (`allocation.ranking.layer_floor`), as the ranking removes.

        The whole removal order of any scores: the ranking skips exactly the
        chunks that would cross a floor, so its last prefix is the most it
        can remove.
        """
        scores = {group.id: np.zeros(group.size) for group in self.graph.prunable_groups}
        order = removal_order(self.graph, scores, None, self.max_layer_ratio)
        return plan_from_prefix(self.graph, order, len(order))
