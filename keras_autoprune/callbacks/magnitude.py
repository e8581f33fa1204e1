"""`MagnitudeCallback`: global L1-norm channel pruning, the data-free baseline."""

from __future__ import annotations

from keras_autoprune.allocation.ranking import global_ranking_plan
from keras_autoprune.callbacks.base import PruningCallback
from keras_autoprune.surgery.importance import channel_l1
from keras_autoprune.surgery.plan import PrunePlan


class MagnitudeCallback(PruningCallback):
    """Prunes the channels whose creating filters have the smallest L1 norm.

    Score of channel c: ``sum over layers creating c of sum |W[..., c]|``,
    ranked over the whole model (per-layer ratios follow from the ranking).
    Needs no data; the usual baseline for the curvature-based callbacks.

    Args:
        budget: a `kap.Budget`.
        **kwargs: schedule arguments of `PruningCallback` (``start_epoch``,
            ``end_epoch``, ``rounds``, ``verbose``, ...).

    Example:

    >>> cb = MagnitudeCallback(kap.Budget(flops=0.5), rounds=2)   # doctest: +SKIP
    >>> model.fit(x, y, epochs=4, callbacks=[cb])                  # doctest: +SKIP
    >>> slim = cb.pruned_model                                     # doctest: +SKIP
    """

    def compute_plan(self, target: float, removed: PrunePlan | None) -> PrunePlan:
        return global_ranking_plan(self.model, self.graph, channel_l1(self.graph), self.budget, target, removed)
