"""Callbacks that prune during `model.fit`."""

from keras_autoprune.callbacks.base import PruningCallback
from keras_autoprune.callbacks.magnitude import MagnitudeCallback

__all__ = ["MagnitudeCallback", "PruningCallback"]
