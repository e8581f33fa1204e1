"""RED: data-free structured compression (Yvinec, Dapogny, Cord, Bailly, NeurIPS 2021).

>>> result = kap.red.compress(model)          # doctest: +SKIP
>>> result.model, result.report               # doctest: +SKIP

See `keras_autoprune.red.compress` and docs/methods/red.md.
"""

from keras_autoprune.red.batchnorm import FoldedNorm, fold_batchnorm
from keras_autoprune.red.compress import RedResult, StageFigures, compress
from keras_autoprune.red.correction import ChannelStatistics, folded_statistics
from keras_autoprune.red.hashing import HashedTensor, hash_values, hash_weights
from keras_autoprune.red.kde import DensityModes, density_modes, silverman_bandwidth
from keras_autoprune.red.merging import MergeResult, merge_neurons
from keras_autoprune.red.separation import Separation, separate_depthwise

__all__ = [
    "ChannelStatistics",
    "DensityModes",
    "FoldedNorm",
    "HashedTensor",
    "MergeResult",
    "RedResult",
    "Separation",
    "StageFigures",
    "compress",
    "density_modes",
    "fold_batchnorm",
    "folded_statistics",
    "hash_values",
    "hash_weights",
    "merge_neurons",
    "separate_depthwise",
    "silverman_bandwidth",
]
