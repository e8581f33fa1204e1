"""Depthwise and separable convolutions.

DepthwiseConv1D/2D: kernel ``(*taps, C, M)`` (M = ``depth_multiplier``);
output channel ``c * M + m`` is computed from input channel ``c`` only, so the
M outputs of an input channel are the same channel for pruning: removing input
channel ``c`` removes its M outputs.

SeparableConv1D/2D: a depthwise kernel ``(*taps, C, M)``, then a pointwise
kernel ``(1, [1,] C*M, F)`` and a bias ``(F,)``. Input channels pass through the
depthwise part; the pointwise part creates F new channels.
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.handlers.base import CallInfo, LayerHandler, LayerKeep, activation_at_zero, channels
from keras_autoprune.graph.handlers.base import mixes_channels, weights_format_problem


def _multiplier(layer) -> int:
    return int(layer.get_config()["depth_multiplier"])


def _unsupported(layer) -> str | None:
    if layer.get_config().get("data_format", "channels_last") != "channels_last":
        return "data_format='channels_first'"
    if weights_format_problem(layer):
        return weights_format_problem(layer)
    if mixes_channels(layer):
        return "a softmax activation across its outputs"
    return None


def _block(layer, call: CallInfo, ctx):
    reason = f"layer '{layer.name}' uses {_unsupported(layer)}, which is not supported for pruning"
    for layout in call.in_layouts:
        ctx.fix(layout, reason)
    return [ctx.fix(ctx.new_space(channels(call.out_shapes[0])), reason)]


class DepthwiseHandler(LayerHandler):
    """Input channel ``c`` and output channels ``c*M .. c*M+M-1`` are one channel."""

    has_channel_weights = True

    def propagate(self, layer, call, ctx):
        if _unsupported(layer):
            return _block(layer, call, ctx)
        return [np.repeat(call.in_layouts[0], _multiplier(layer))]

    def constants(self, layer, call, in_values):
        # Removed channels have their kernel slice and bias zeroed.
        return [activation_at_zero(layer, channels(call.out_shapes[0]))]

    def prune(self, layer, config, weights, keep: LayerKeep):
        weights = dict(weights)
        weights["kernel"] = weights["kernel"][..., keep.inputs[0], :]
        if "bias" in weights:
            weights["bias"] = weights["bias"][keep.outputs[0]]
        return config, weights

    def mask(self, layer, weights, keep: LayerKeep):
        weights = {k: np.array(v) for k, v in weights.items()}
        weights["kernel"][..., ~keep.inputs[0], :] = 0
        if "bias" in weights:
            weights["bias"][~keep.outputs[0]] = 0
        return weights

    def output_l1(self, layer, weights):
        return np.abs(weights["kernel"]).reshape(-1, weights["kernel"].shape[-2] * weights["kernel"].shape[-1]).sum(0)


class SeparableHandler(LayerHandler):
    """Depthwise pass-through of the inputs, then a pointwise map to F outputs.

    A removed input channel that carries a non-zero value in the masked model
    cannot be folded into the bias (the depthwise taps see zero padding), so
    `mask` zeroes its depthwise slice instead.
    """

    has_channel_weights = True

    def propagate(self, layer, call, ctx):
        if _unsupported(layer):
            return _block(layer, call, ctx)
        return [ctx.new_space(channels(call.out_shapes[0]))]

    def constants(self, layer, call, in_values):
        return [activation_at_zero(layer, channels(call.out_shapes[0]))]

    def prune(self, layer, config, weights, keep: LayerKeep):
        weights = dict(weights)
        in_keep, out_keep = keep.inputs[0], keep.outputs[0]
        mid_keep = np.repeat(in_keep, _multiplier(layer))
        weights["depthwise_kernel"] = weights["depthwise_kernel"][..., in_keep, :]
        weights["pointwise_kernel"] = weights["pointwise_kernel"][..., mid_keep, :][..., out_keep]
        if "bias" in weights:
            weights["bias"] = weights["bias"][out_keep]
        config = dict(config, filters=int(out_keep.sum()))
        return config, weights

    def mask(self, layer, weights, keep: LayerKeep):
        weights = {k: np.array(v) for k, v in weights.items()}
        weights["depthwise_kernel"][..., keep.zero_rows[0], :] = 0
        weights["pointwise_kernel"][..., ~keep.outputs[0]] = 0
        if "bias" in weights:
            weights["bias"][~keep.outputs[0]] = 0
        return weights

    def output_l1(self, layer, weights):
        pointwise = np.abs(weights["pointwise_kernel"])
        return pointwise.reshape(-1, pointwise.shape[-1]).sum(0)
