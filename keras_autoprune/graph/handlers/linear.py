"""Layers that compute new channels as a linear map of their input channels.

Covers Conv1D/2D/3D, Conv1D/2D/3DTranspose and Dense (on 2-D or N-D inputs).
The kernel has one input-channel axis and one output-channel axis; everything
else (spatial taps) is left alone.

A convolution with ``groups`` equal to its input channels (kernel
``(*taps, 1, C*M)``, how ConvNeXt writes its depthwise convolutions) is a
depthwise convolution: input channel ``c`` owns outputs ``c*M .. c*M+M-1``
and pruning keeps ``groups`` equal to the channels kept. Other grouped
convolutions (``1 < groups < C``) block pruning.

Folding. When a removed input channel n carries a constant ``c_n`` in the
masked model, the pruned layer adds its contribution to the bias:
``b_o += sum_n c_n * sum_taps K[taps, n, o]``. This is exact when every output
position sees every tap (Dense, ``padding="valid"``, 1x1 kernels); for other
layers the masked model zeroes those kernel rows instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_autoprune.graph.handlers.base import (
    CallInfo,
    LayerHandler,
    LayerKeep,
    activation_at_zero,
    channels,
    mixes_channels,
    weights_format_problem,
)


class LinearHandler(LayerHandler):
    """A kernel of shape ``(*taps, in, out)`` (or ``(*taps, out, in)``).

    Args:
        units_key: config key holding the number of output channels.
        transposed: True for ``ConvXDTranspose`` kernels ``(*taps, out, in)``.
    """

    has_channel_weights = True

    def __init__(self, units_key: str, transposed: bool = False):
        self.units_key = units_key
        self.in_axis, self.out_axis = (-1, -2) if transposed else (-2, -1)
        self.transposed = transposed

    @staticmethod
    def is_depthwise(layer: Any) -> bool:
        """Whether this is a grouped convolution with one input channel per group."""
        return layer.get_config().get("groups", 1) > 1 and layer.kernel.shape[-2] == 1

    def _unsupported(self, layer: Any) -> str | None:
        """Why none of the layer's channels can be pruned (None: they can; a softmax keeps only its outputs)."""
        config = layer.get_config()
        if config.get("data_format", "channels_last") != "channels_last":
            return "data_format='channels_first'"
        if weights_format_problem(layer):
            return weights_format_problem(layer)
        if config.get("groups", 1) != 1 and not self.is_depthwise(layer):
            return f"groups={config['groups']} (grouped convolution)"
        if mixes_channels(layer) and self.is_depthwise(layer):  # its inputs are its outputs
            return "a softmax activation across its outputs"
        return None

    def keeps_rows(self, layer, call: CallInfo) -> bool:
        return self.units_key == "units" and len(call.in_shapes[0]) >= 3  # Dense: the same kernel on every row

    def propagate(self, layer, call: CallInfo, ctx):
        problem = self._unsupported(layer)
        if problem:
            reason = f"layer '{layer.name}' uses {problem}, which is not supported for pruning"
            for layout in call.in_layouts:
                ctx.fix(layout, reason)
            return [ctx.fix(ctx.new_space(channels(call.out_shapes[0])), reason)]
        if self.is_depthwise(layer):
            return [np.repeat(call.in_layouts[0], layer.get_config()["filters"] // layer.get_config()["groups"])]
        outputs = ctx.new_space(channels(call.out_shapes[0]))
        if mixes_channels(layer):  # a softmax mixes the outputs only: removed inputs fold into the bias before it
            return [ctx.fix(outputs, f"layer '{layer.name}' applies a softmax across its outputs")]
        return [outputs]

    def constants(self, layer, call, in_values):
        return [activation_at_zero(layer, channels(call.out_shapes[0]))]

    def can_fold(self, layer) -> bool:
        if self.transposed or self.is_depthwise(layer):
            return False
        config = layer.get_config()
        if "kernel_size" not in config:
            return True
        return config["padding"] == "valid" or all(k == 1 for k in config["kernel_size"])

    def prune(self, layer, config, weights, keep: LayerKeep):
        kernel = weights["kernel"]
        in_keep, out_keep = keep.inputs[0], keep.outputs[0]
        config = dict(config)
        weights = dict(weights)
        shift = self._folded_bias(kernel, keep.fold[0])
        if shift is not None:
            if "bias" not in weights:
                config["use_bias"] = True
                weights["bias"] = np.zeros(kernel.shape[self.out_axis], kernel.dtype)
            weights["bias"] = weights["bias"] + shift.astype(kernel.dtype)
        if not self.is_depthwise(layer):
            kernel = np.compress(in_keep, kernel, axis=self.in_axis)
        weights["kernel"] = np.compress(out_keep, kernel, axis=self.out_axis)
        if "bias" in weights:
            weights["bias"] = weights["bias"][out_keep]
        config[self.units_key] = int(out_keep.sum())
        if self.is_depthwise(layer):
            config["groups"] = int(in_keep.sum())
        return config, weights

    def _folded_bias(self, kernel: np.ndarray, fold: np.ndarray) -> np.ndarray | None:
        """``sum_n fold_n * sum_taps K[taps, n, :]``, or None if nothing folds."""
        if not np.any(fold):
            return None
        taps = tuple(range(kernel.ndim - 2))
        per_channel = kernel.astype(np.float64).sum(axis=taps)  # (in, out)
        return fold.astype(np.float64) @ per_channel

    def mask(self, layer, weights, keep: LayerKeep):
        weights = {k: np.array(v) for k, v in weights.items()}
        kernel = np.moveaxis(weights["kernel"], (self.in_axis, self.out_axis), (-2, -1))
        kernel[..., ~keep.outputs[0]] = 0
        if not self.is_depthwise(layer):  # depthwise: the removed input is the removed output
            kernel[..., keep.zero_rows[0], :] = 0
        weights["kernel"] = np.moveaxis(kernel, (-2, -1), (self.in_axis, self.out_axis))
        if "bias" in weights:
            weights["bias"][~keep.outputs[0]] = 0
        return weights

    def output_l1(self, layer, weights):
        kernel = np.moveaxis(np.abs(weights["kernel"]), self.out_axis, -1)
        return kernel.reshape(-1, kernel.shape[-1]).sum(axis=0)
