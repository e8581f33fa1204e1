"""Saliency functions: pure NumPy in, NumPy out."""

from keras_autoprune.scoring.baselines import c_obd, c_obs, kron_obd, kron_obs
from keras_autoprune.scoring.obs import input_set_saliency, out_channel_update, output_set_saliency, weight_saliency

__all__ = sorted(
    [
        "c_obd",
        "c_obs",
        "input_set_saliency",
        "kron_obd",
        "kron_obs",
        "out_channel_update",
        "output_set_saliency",
        "weight_saliency",
    ]
)
