"""`RankedPruningCallback`: the base of the callbacks that rank channels over the whole model.

A subclass scores every channel (`scores`); each round removes the lowest
scored until the round's target holds (`allocation.global_ranking_plan`),
never taking a layer below its floor: at most ``max_layer_ratio`` of its
original channels go (1.0: down to one channel).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_autoprune.allocation.ranking import check_max_layer_ratio, global_ranking_plan
from keras_autoprune.budget import Budget
from keras_autoprune.callbacks.base import PruningCallback
from keras_autoprune.surgery.plan import PrunePlan


class RankedPruningCallback(PruningCallback):
    """A `PruningCallback` whose plans come from one global ranking of channel scores.

    Args:
        budget: a `kap.Budget`.
        max_layer_ratio: the largest fraction of any layer's channels removed,
            in (0, 1]. Default 1.0 (down to one channel); 0.9 keeps at least
            a tenth of every layer, a guard against layer collapse.
        **kwargs: schedule arguments of `PruningCallback`.
    """

    def __init__(self, budget: Budget, *, max_layer_ratio: float = 1.0, **kwargs: Any):
        super().__init__(budget, **kwargs)
        check_max_layer_ratio(max_layer_ratio)
        self.max_layer_ratio = max_layer_ratio

    def scores(self) -> dict[str, np.ndarray]:
        """``{group_id: per-channel score}`` of the current model (higher = keep)."""
        raise NotImplementedError

    def compute_plan(self, target: float, removed: PrunePlan | None) -> PrunePlan:
        return self.ranked_plan(self.scores(), target, removed)

    def ranked_plan(self, scores: dict[str, np.ndarray], target: float, removed: PrunePlan | None) -> PrunePlan:
        """The global ranking of ``scores`` down to ``target``, with this callback's layer floor."""
        return global_ranking_plan(self.model, self.graph, scores, self.budget, target, removed, self.max_layer_ratio)

    def smallest_plan(self) -> PrunePlan:
        """Every prunable group at its floor (``ceil((1 - max_layer_ratio) * size)`` channels, at least one)."""
        return PrunePlan.uniform(self.graph, min(self.max_layer_ratio, 1.0 - 1e-9), importance="last")
