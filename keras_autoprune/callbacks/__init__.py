"""Callbacks that prune during `model.fit`."""

from keras_autoprune.callbacks.base import PruningCallback
from keras_autoprune.callbacks.magnitude import MagnitudeCallback
from keras_autoprune.callbacks.nap import NAPCallback

__all__ = ["MagnitudeCallback", "NAPCallback", "PruningCallback"]
