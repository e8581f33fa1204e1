"""Reductions over non-channel axes: ``keras.ops.mean``, ``max`` and ``min``.

``keras.ops.mean(x, axis=(1, 2), keepdims=True)`` is how custom
squeeze-excite blocks pool; over axes that leave the channel (last) axis
alone, a reduction keeps every channel where it is, and a removed channel's
constant value stays the same constant. A reduction over the channel axis
(or over all axes) mixes channels and blocks pruning.
"""

from __future__ import annotations

from keras_autoprune.graph.handlers.base import LayerHandler
from keras_autoprune.graph.handlers.channelwise import includes_last_axis


class ReductionHandler(LayerHandler):
    """``y = reduce(x, axis)``, channel axis untouched: channels pass through."""

    def propagate(self, layer, call, ctx):
        rank = len(call.in_shapes[0])
        if includes_last_axis(getattr(layer, "axis", None), rank):
            return super().propagate(layer, call, ctx)
        return [call.in_layouts[0]]

    def constants(self, layer, call, in_values):
        return [in_values[0]]
