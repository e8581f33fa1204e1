"""Flatten and Reshape: channel-to-feature index maps.

For an input of static shape ``(d_1, ..., d_k, C)`` every element carries the
channel of its last index. Reshaping that array of channel ids the way the
layer reshapes the tensor gives, for each position of the output's last
axis, the channel it holds, provided that this is the same along all other
output axes (true for Flatten, for ``(H, W, C) -> (H*W, C)`` or
``(C,) -> (1, 1, C)``). Otherwise (the reshape splits the channel axis) the
layer blocks pruning.

Flatten of ``(H, W, C)``: output feature ``(h*W + w)*C + c`` holds channel c,
so removing channel c removes ``H*W`` inputs of the Dense layer after it.
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.handlers.base import LayerHandler


def map_channel_axis(values: np.ndarray, in_shape: tuple, out_shape: tuple) -> np.ndarray | None:
    """Per-position array of the output's last axis, or None if undefined.

    Args:
        values: one channel id per input channel position.
        in_shape: input shape without the batch axis.
        out_shape: output shape without the batch axis.
    """
    if any(d is None for d in tuple(in_shape) + tuple(out_shape)):
        return None
    grid = np.broadcast_to(values, tuple(in_shape)).reshape((-1, out_shape[-1]))
    return grid[0] if np.all(grid == grid[:1]) else None


class ReshapeHandler(LayerHandler):
    """Flatten and Reshape layers (channels_last)."""

    has_channel_weights = True  # Reshape's `target_shape` counts the channels: every call must keep the same ones

    def propagate(self, layer, call, ctx):
        config = layer.get_config()
        layout = call.in_layouts[0]
        mapped = None
        if config.get("data_format", "channels_last") == "channels_last":
            mapped = map_channel_axis(layout, call.in_shapes[0][1:], call.out_shapes[0][1:])
        if mapped is None:
            reason = f"layer '{layer.name}' reshapes the channel axis in a way that cannot be mapped"
            ctx.fix(layout, reason)
            width = call.out_shapes[0][-1] or 0
            return [ctx.fix(ctx.new_space(width), reason)]
        return [mapped.copy()]

    def constants(self, layer, call, in_values):
        in_shape, out_shape = call.in_shapes[0][1:], call.out_shapes[0][1:]
        grid = np.broadcast_to(in_values[0], tuple(in_shape)).reshape((-1, out_shape[-1]))
        same = np.all(grid == grid[:1], axis=0)
        return [np.where(same, grid[0], np.nan)]

    def prune(self, layer, config, weights, keep):
        if "target_shape" not in config:
            return config, weights
        kept = int(keep.outputs[0].sum())
        target = tuple(config["target_shape"])
        return dict(config, target_shape=target[:-1] + (kept,)), weights
