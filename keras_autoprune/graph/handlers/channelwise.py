"""Layers that transform each channel on its own, with per-channel weights.

Weights whose last axis has one entry per channel (BatchNormalization's
``gamma``/``beta``/``moving_*``, GroupNormalization's ``gamma``/``beta``,
Normalization's ``mean``/``variance``, PReLU's ``alpha``) are sliced on that
axis; weights with a size-1 last axis are shared and kept whole.
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.handlers.base import CallInfo, LayerHandler, LayerKeep


def channel_axis_is_last(axis, rank: int) -> bool:
    """Whether ``axis`` (an int or a list of ints) is exactly the last axis."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    return len(axes) == 1 and axes[0] % rank == rank - 1


def includes_last_axis(axis, rank: int) -> bool:
    """Whether ``axis`` (None = all axes, an int or a list) covers the last axis."""
    if axis is None:
        return True
    axes = [axis] if isinstance(axis, int) else list(axis)
    return any(a % rank == rank - 1 for a in axes)


class ChannelwiseHandler(LayerHandler):
    """A layer that keeps its channels and may hold per-channel weights.

    Args:
        zeroed: names of the weights set to zero for removed channels in the
            masked model, chosen so that a removed channel outputs exactly 0
            (e.g. BatchNormalization: gamma, beta and the moving mean).
    """

    has_channel_weights = True

    def __init__(self, zeroed: tuple[str, ...] = ()):
        self.zeroed = zeroed

    def blocked_reason(self, layer, call: CallInfo) -> str | None:
        """Why this call cannot pass channels through (None if it can)."""
        return None

    def propagate(self, layer, call, ctx):
        reason = self.blocked_reason(layer, call)
        if reason:
            ctx.fix(call.in_layouts[0], f"layer '{layer.name}' {reason}")
        return [call.in_layouts[0]]

    def constants(self, layer, call, in_values):
        # A removed channel outputs 0 when a zeroed scale kills its input;
        # otherwise 0 stays 0 and any other value is not tracked.
        if "gamma" in self.zeroed and _has(layer, "gamma"):
            return [np.zeros_like(in_values[0])]
        return [np.where(in_values[0] == 0, 0.0, np.nan)]

    def prune(self, layer, config, weights, keep: LayerKeep):
        keep_channels = keep.inputs[0]
        n = len(keep_channels)
        sliced = {
            name: (w[..., keep_channels] if w.ndim and w.shape[-1] == n else w)
            for name, w in weights.items()
        }
        return self.prune_config(layer, config, keep_channels), sliced

    def prune_config(self, layer, config: dict, keep_channels: np.ndarray) -> dict:
        return config

    def mask(self, layer, weights, keep: LayerKeep):
        removed = ~keep.inputs[0]
        weights = {k: np.array(v) for k, v in weights.items()}
        for name in self.zeroed:
            if name in weights and weights[name].ndim and weights[name].shape[-1] == len(removed):
                weights[name][..., removed] = 0
        return weights


def _has(layer, weight_name: str) -> bool:
    return any(w.path.rsplit("/", 1)[-1] == weight_name for w in layer.weights)


class BatchNormHandler(ChannelwiseHandler):
    """BatchNormalization over the channel axis: ``y = γ (x − μ)/√(σ² + ε) + β``.

    Masked channels get ``γ = β = μ = 0`` so they output exactly 0.
    """

    def __init__(self):
        super().__init__(zeroed=("gamma", "beta", "moving_mean"))

    def blocked_reason(self, layer, call):
        if not channel_axis_is_last(layer.get_config()["axis"], len(call.in_shapes[0])):
            return "normalizes over an axis other than the last one"
        return None


class GroupNormHandler(ChannelwiseHandler):
    """GroupNormalization: statistics over groups of ``C/G`` adjacent channels.

    Removing part of a group would change the statistics of the rest, so only
    whole groups can go (each group is a chunk); the pruned layer has one
    group fewer per group removed. With ``groups=1`` (layer norm) nothing can
    be removed.
    """

    def __init__(self):
        super().__init__(zeroed=("gamma", "beta"))

    def blocked_reason(self, layer, call):
        config = layer.get_config()
        if not channel_axis_is_last(config["axis"], len(call.in_shapes[0])):
            return "normalizes over an axis other than the last one"
        if config["groups"] == 1:
            return "normalizes all channels together (groups=1)"
        return None

    def propagate(self, layer, call, ctx):
        layout = super().propagate(layer, call, ctx)[0]
        groups = layer.get_config()["groups"]
        for chunk in np.split(layout, groups):
            ctx.chunk(chunk)
        return [layout]

    def prune_config(self, layer, config, keep_channels):
        per_group = len(keep_channels) // config["groups"]
        return dict(config, groups=int(keep_channels.sum()) // per_group)


class StatisticsBlockingHandler(ChannelwiseHandler):
    """LayerNormalization / UnitNormalization over the channel axis.

    Their statistics mix all channels, so removing one changes the others:
    the channels crossing them cannot be pruned. Over other axes they pass
    channels through untouched.
    """

    def blocked_reason(self, layer, call):
        if includes_last_axis(layer.get_config()["axis"], len(call.in_shapes[0])):
            return "normalizes across channels (its statistics would change)"
        return None

    def constants(self, layer, call, in_values):
        # Over other axes a constant channel normalizes to 0 at every position, then LayerNormalization's
        # beta adds a per-position offset: no constant per channel. Without beta, 0 stays 0.
        if getattr(layer, "center", False):
            return [np.full_like(in_values[0], np.nan, dtype=np.float64)]
        return [np.where(in_values[0] == 0, 0.0, np.nan)]

    def prune(self, layer, config, weights, keep: LayerKeep):
        return config, weights  # its weights span the normalized axes, never the channels


class NormalizationHandler(ChannelwiseHandler):
    """The preprocessing Normalization layer: ``(x − mean)/√var``.

    Masked channels get ``mean = 0``, so a removed channel stays 0. Layers
    built with ``mean=``/``variance=`` constructor arguments keep them in their
    config and are treated as blocking.
    """

    def __init__(self):
        super().__init__(zeroed=("mean",))

    def blocked_reason(self, layer, call):
        config = layer.get_config()
        if config.get("mean") is not None:
            return "stores mean/variance in its config"
        return None
