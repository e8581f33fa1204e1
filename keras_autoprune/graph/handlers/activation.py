"""Element-wise activations, as layers or as `keras.ops` nodes.

Activation, ReLU, LeakyReLU, ELU, Softmax (over a non-channel axis), PReLU,
Rescaling, and the unary `keras.ops` activations. A removed channel carrying
the constant ``c`` carries ``f(c)`` after the activation (``sigmoid(0) = 0.5``:
this is where constants that must be folded come from).

Softmax over the channel axis mixes channels and blocks pruning.
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.handlers.base import LayerHandler, evaluate_elementwise, TensorRef
from keras_autoprune.graph.handlers.channelwise import ChannelwiseHandler, includes_last_axis

_CHANNEL_MIXING = {"softmax", "log_softmax"}


class ActivationHandler(LayerHandler):
    """``y = f(x)`` applied to every value on its own."""

    def _mixing_reason(self, layer, call) -> str | None:
        config = layer.get_config() if hasattr(layer, "get_config") else {}
        activation = config.get("activation")
        name = activation if isinstance(activation, str) else getattr(activation, "__name__", None)
        rank = len(call.in_shapes[0])
        if name in _CHANNEL_MIXING:
            return f"layer '{layer.name}' applies {name} across channels"
        if type(layer).__name__ in ("Softmax", "LogSoftmax"):
            axis = config.get("axis", call.kwargs.get("axis", getattr(layer, "axis", -1)))
            if includes_last_axis(axis, rank):
                return f"'{layer.name}' applies softmax across channels"
        return None

    def keeps_rows(self, layer, call) -> bool:
        unary = not any(isinstance(a, TensorRef) for a in list(call.args[1:]) + list(call.kwargs.values()))
        return unary and self._mixing_reason(layer, call) is None and type(layer).__name__ not in ("Softmax", "LogSoftmax")

    def propagate(self, layer, call, ctx):
        reason = self._mixing_reason(layer, call)
        layout = call.in_layouts[0]
        if reason:
            ctx.fix(layout, reason)
            return [ctx.fix(ctx.new_space(len(layout)), reason)]
        for arg in list(call.args[1:]) + list(call.kwargs.values()):
            if isinstance(arg, TensorRef):  # a second tensor operand: not element-wise
                return super().propagate(layer, call, ctx)
        return [layout]

    def constants(self, layer, call, in_values):
        if type(layer).__name__ in ("Softmax", "LogSoftmax"):
            # It normalises over other axes (the channel axis is refused above): a constant channel's value
            # depends on their length and its other positions, not on the channel alone. Unknown: zero rows.
            return [np.full(len(in_values[0]), np.nan)]
        return [evaluate_elementwise(layer, call, in_values)]


class PReLUHandler(ChannelwiseHandler):
    """``y = max(x, 0) + α · min(x, 0)`` with a per-channel (or shared) α."""

    def constants(self, layer, call, in_values):
        return [evaluate_elementwise(_prelu_reference(layer), call, in_values)]


def _prelu_reference(layer):
    """PReLU on ``(1, C)`` constants; NaN where α varies over positions."""
    alpha = np.asarray(layer.alpha.numpy())
    alpha = alpha.reshape(-1, alpha.shape[-1])

    def prelu(x):
        out = np.maximum(x, 0) + alpha * np.minimum(x, 0)
        uniform = np.all(out == out[:1], axis=0)
        return np.where(uniform, out[0], np.nan)[None]

    return prelu


class RescalingHandler(ActivationHandler):
    """``y = x · scale + offset`` with scalar scale and offset.

    Per-channel scale/offset lists would need slicing of the config: the layer
    then blocks pruning.
    """

    def _mixing_reason(self, layer, call):
        config = layer.get_config()
        for key in ("scale", "offset"):
            value = config[key]
            if isinstance(value, dict) or np.size(value) != 1:
                return f"layer '{layer.name}' has a per-channel {key}"
        return None
