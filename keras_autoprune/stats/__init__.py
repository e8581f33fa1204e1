"""Calibration statistics: K-FAC factors, gradient statistics, group saliencies.

One calibration pass (`engine.run_statistics`) replays the model in inference
mode over calibration data and feeds every statistic; `collect_kfac`,
`collect_gradient_stats`, `collect_channel_fisher` and `collect_direction_fisher` are its recipes.
"""

from keras_autoprune.stats.calibration import CalibrationBatch, CalibrationData
from keras_autoprune.stats.channel_fisher import ChannelFisherStatistic, collect_channel_fisher, group_channel_fisher
from keras_autoprune.stats.direction_fisher import DirectionFisherStatistic, collect_direction_fisher
from keras_autoprune.stats.curvature import damp, damped_inverses, mean_eigenvalue, symmetric_eigh, symmetrize
from keras_autoprune.stats.engine import StatisticsResult, run_statistics
from keras_autoprune.stats.gradients import GradientStatistic, GradientStats, collect_gradient_stats
from keras_autoprune.stats.groups import GroupSaliency, group_saliency
from keras_autoprune.stats.kfac import KFACFactors, KFACStatistic, collect_kfac
from keras_autoprune.stats.loss import SUPPORTED_LOSSES, Likelihood, OutputLikelihood, resolve_likelihood
from keras_autoprune.stats.taps import SUPPORTED_LAYERS, split_weight_matrix, weight_matrix

__all__ = sorted(
    [
        "CalibrationBatch",
        "CalibrationData",
        "ChannelFisherStatistic",
        "DirectionFisherStatistic",
        "GradientStatistic",
        "GradientStats",
        "GroupSaliency",
        "KFACFactors",
        "KFACStatistic",
        "Likelihood",
        "OutputLikelihood",
        "SUPPORTED_LAYERS",
        "SUPPORTED_LOSSES",
        "StatisticsResult",
        "collect_channel_fisher",
        "collect_direction_fisher",
        "group_channel_fisher",
        "collect_gradient_stats",
        "collect_kfac",
        "damp",
        "damped_inverses",
        "group_saliency",
        "mean_eigenvalue",
        "resolve_likelihood",
        "run_statistics",
        "split_weight_matrix",
        "symmetric_eigh",
        "symmetrize",
        "weight_matrix",
    ]
)
