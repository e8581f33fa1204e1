"""Saliency functions: pure NumPy in, NumPy out."""

from keras_autoprune.scoring.obs import input_set_saliency, out_channel_update, output_set_saliency, weight_saliency

__all__ = ["input_set_saliency", "out_channel_update", "output_set_saliency", "weight_saliency"]
