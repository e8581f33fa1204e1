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
from keras_autoprune.red.low_rank import separate_low_rank
from keras_autoprune.red.merging import MergeResult, merge_neurons
from keras_autoprune.red.reconstruction import reconstruct_layers, reconstruct_pointwise
from keras_autoprune.red.separation import Separation, separate_depthwise
from keras_autoprune.red.synthesis import synthesize_images

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
    "reconstruct_layers",
    "reconstruct_pointwise",
    "separate_depthwise",
    "separate_low_rank",
    "silverman_bandwidth",
    "synthesize_images",
]
