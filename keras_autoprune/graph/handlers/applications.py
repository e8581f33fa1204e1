"""Custom layers that ship inside `keras.applications` models.

- ConvNeXt ``LayerScale``: ``y = x * gamma`` with a per-channel ``gamma`` and
  ``projection_dim = C`` in its config.
- ConvNeXt ``StochasticDepth``: drops whole residual branches while training,
  identity at inference: channels pass through.
- InceptionResNetV2 ``CustomScaleLayer``: ``y = x0 + x1 * scale`` (scalar), an
  element-wise merge.

They live in private Keras modules, so each is registered only if it can be
imported.
"""

from __future__ import annotations

import importlib

from keras_autoprune.graph.handlers.base import LayerHandler
from keras_autoprune.graph.handlers.channelwise import ChannelwiseHandler
from keras_autoprune.graph.handlers.merge import MergeHandler
from keras_autoprune.graph.handlers.passthrough import PassThroughHandler


class LayerScaleHandler(ChannelwiseHandler):
    """ConvNeXt's LayerScale: slices ``gamma`` and updates ``projection_dim``."""

    def prune_config(self, layer, config, keep_channels):
        return dict(config, projection_dim=int(keep_channels.sum()))


def application_handlers() -> dict[type, LayerHandler]:
    """``{class: handler}`` for the importable application layers."""
    wanted = [
        ("keras.src.applications.convnext", "LayerScale", LayerScaleHandler()),
        ("keras.src.applications.convnext", "StochasticDepth", PassThroughHandler()),
        ("keras.src.applications.inception_resnet_v2", "CustomScaleLayer", MergeHandler()),
    ]
    found = {}
    for module_name, class_name, handler in wanted:
        try:
            found[getattr(importlib.import_module(module_name), class_name)] = handler
        except (ImportError, AttributeError):
            continue
    return found
