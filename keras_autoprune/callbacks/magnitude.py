"""`MagnitudeCallback`: global L1-norm channel pruning, the data-free baseline."""

from __future__ import annotations

import numpy as np

from keras_autoprune.callbacks.ranked import RankedPruningCallback
from keras_autoprune.surgery.importance import channel_l1


class MagnitudeCallback(RankedPruningCallback):
    """Prunes the channels whose creating filters have the smallest L1 norm.

    Score of channel c: ``sum over layers creating c of sum |W[..., c]|``,
    ranked over the whole model (per-layer ratios follow from the ranking).
    Needs no data; the usual baseline for the curvature-based callbacks.

    Args:
        budget: a `kap.Budget`.
        max_layer_ratio: the largest fraction of any layer's channels removed,
            in (0, 1]. Default 0.9: every layer keeps at least a tenth of its
            channels (a guard against layer collapse); 1.0: down to one channel.
        **kwargs: schedule arguments of `PruningCallback` (``start_epoch``,
            ``end_epoch``, ``rounds``, ``verbose``, ...).

    Example:

    >>> cb = MagnitudeCallback(kap.Budget(flops=0.5), rounds=2)   # doctest: +SKIP
    >>> model.fit(x, y, epochs=4, callbacks=[cb])                  # doctest: +SKIP
    >>> slim = cb.pruned_model                                     # doctest: +SKIP
    """

    def scores(self) -> dict[str, np.ndarray]:
        return channel_l1(self.graph)
