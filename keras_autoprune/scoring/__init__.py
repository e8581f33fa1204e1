"""Saliency functions: pure NumPy in, NumPy out."""

from keras_autoprune.scoring.obs import in_channel_saliency, out_channel_saliency, weight_saliency

__all__ = ["in_channel_saliency", "out_channel_saliency", "weight_saliency"]
