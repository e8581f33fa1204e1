"""Callbacks that prune during `model.fit`."""

from keras_autoprune.callbacks.base import PruningCallback
from keras_autoprune.callbacks.eigendamage import EigenDamageCallback
from keras_autoprune.callbacks.magnitude import MagnitudeCallback
from keras_autoprune.callbacks.nap import NAPCallback
from keras_autoprune.callbacks.psap import PSAPCallback
from keras_autoprune.callbacks.ranked import RankedPruningCallback

__all__ = ["EigenDamageCallback", "MagnitudeCallback", "NAPCallback", "PSAPCallback", "PruningCallback", "RankedPruningCallback"]
