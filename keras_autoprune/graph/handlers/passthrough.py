"""Layers that move, pool or drop values but never mix channels.

Pooling and global pooling, cropping, up-sampling, resizing, the
dropout/noise family, Identity, and zero padding. A removed channel keeps
its (constant) value through all of them (interpolation weights sum to 1),
except padding, which turns a constant other than the padding value into a
non-constant map.
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.handlers.base import LayerHandler


class PassThroughHandler(LayerHandler):
    """Output channels are the input channels, in the same order."""

    def propagate(self, layer, call, ctx):
        # The attribute, not get_config(): some layers' configs do not serialise (keras-hub's Identity).
        if getattr(layer, "data_format", "channels_last") == "channels_first":
            reason = f"layer '{layer.name}' uses data_format='channels_first', which is not supported"
            ctx.fix(call.in_layouts[0], reason)
            return [ctx.fix(ctx.new_space(len(call.in_layouts[0])), reason)]
        return [call.in_layouts[0]]

    def constants(self, layer, call, in_values):
        return [in_values[0]]


class ZeroPaddingHandler(PassThroughHandler):
    """ZeroPadding1D/2D/3D: a constant ``c != 0`` stops being constant."""

    def constants(self, layer, call, in_values):
        return [np.where(in_values[0] == 0, 0.0, np.nan)]


class ResizingHandler(PassThroughHandler):
    """``keras.layers.Resizing``: per-channel interpolation; ``pad_to_aspect_ratio`` pads with ``fill_value``."""

    def constants(self, layer, call, in_values):
        if not getattr(layer, "pad_to_aspect_ratio", False):
            return [in_values[0]]
        fill = float(getattr(layer, "fill_value", 0.0))
        return [np.where(in_values[0] == fill, fill, np.nan)]
