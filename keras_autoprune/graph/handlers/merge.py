"""Element-wise merges and concatenation.

Merges (Add, Subtract, Multiply, Average, Maximum, Minimum layers, and the
`keras.ops` / Python-operator nodes ``+ - * /``, maximum, minimum): position
``i`` of every input is the same channel, so the inputs' atoms are tied.
Broadcasting follows numpy: an input whose channel axis has size 1 (the gate
of a spatial attention, a scalar) is not tied. Squeeze-excite
``x * gate`` with ``gate`` of shape ``(B, 1, 1, C)`` ties x's channels to the
gate's.

Concatenate along the channel axis joins the layouts (the index map of input
k is an offset); along any other axis the inputs share their channels.
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.handlers.base import LayerHandler, TensorRef, evaluate_elementwise


def _constant_operands(call):
    """Non-tensor operands of a call (Python scalars, arrays)."""
    flat = list(call.args) + list(call.kwargs.values())
    out = []
    while flat:
        item = flat.pop()
        if isinstance(item, (list, tuple)):
            flat.extend(item)
        elif not isinstance(item, TensorRef) and item is not None and not isinstance(item, (str, bool)):
            out.append(item)
    return out


class MergeHandler(LayerHandler):
    """Inputs broadcast against each other position by position."""

    def propagate(self, layer, call, ctx):
        ranks = [len(s) for s in call.in_shapes]
        width = max(len(layout) for layout in call.in_layouts)
        sizes = {len(layout) for layout in call.in_layouts}
        wide_constant = any(np.ndim(c) and np.shape(c)[-1] != 1 for c in _constant_operands(call))
        if min(ranks) < 2 or not sizes <= {1, width} or wide_constant:
            reason = f"'{layer.name}' broadcasts over the channel axis in a way that is not supported"
            return self._block(call, ctx, reason)
        wide = [layout for layout in call.in_layouts if len(layout) == width]
        for other in wide[1:]:
            ctx.tie(wide[0], other)
        return [wide[0]]

    def _block(self, call, ctx, reason):
        for layout in call.in_layouts:
            ctx.fix(layout, reason)
        return [ctx.fix(ctx.new_space(len(call.in_layouts[0]) if call.in_layouts else 0), reason)]

    def constants(self, layer, call, in_values):
        return [evaluate_elementwise(layer, call, in_values)]


class ConcatenateHandler(LayerHandler):
    """Concatenate layer or `keras.ops.concatenate` node."""

    def propagate(self, layer, call, ctx):
        rank = len(call.in_shapes[0])
        if self._on_channels(layer, call, rank):
            return [np.concatenate(call.in_layouts)]
        for other in call.in_layouts[1:]:
            ctx.tie(call.in_layouts[0], other)
        return [call.in_layouts[0]]

    @staticmethod
    def _axis(layer, call) -> int:
        if "axis" in call.kwargs:
            return call.kwargs["axis"]
        return getattr(layer, "axis", 0)

    def _on_channels(self, layer, call, rank) -> bool:
        return self._axis(layer, call) % rank == rank - 1

    def constants(self, layer, call, in_values):
        rank = len(call.in_shapes[0])
        if self._on_channels(layer, call, rank):
            return [np.concatenate(in_values)]
        stacked = np.stack(in_values)
        same = np.all(stacked == stacked[:1], axis=0)
        return [np.where(same, stacked[0], np.nan)]
