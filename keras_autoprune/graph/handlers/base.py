"""The handler interface: how channels flow through a layer and how to cut it.

A handler describes one layer family. The dependency graph calls
`LayerHandler.propagate` once per call of a layer, in topological order, to turn
the channel layouts of the inputs into the layouts of the outputs. Layer
surgery calls `prune` (physically remove channels) and `mask` (zero them in a
same-shape copy); both receive a `LayerKeep` describing, per channel position
of the layer's first call, what survives.

Handlers are stateless: one instance can serve any number of layers and
models.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from keras_autoprune.graph.context import WalkContext


@dataclasses.dataclass(frozen=True)
class CallInfo:
    """One call of an operation in a functional graph.

    Attributes:
        in_layouts: channel layout (atom ids along the last axis) of each
            tensor argument, in the order of `node.arguments.keras_tensors`.
        in_shapes: static shapes of those tensors, batch axis included.
        out_shapes: static shapes of the outputs.
        args: positional arguments of the call; tensors replaced by their
            index in `in_layouts` wrapped in `TensorRef`.
        kwargs: keyword arguments of the call, same convention.
    """

    in_layouts: list[np.ndarray]
    in_shapes: list[tuple]
    out_shapes: list[tuple]
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SublayerMember:
    """Where internal channels sit in one sublayer, read as a Dense layer.

    Attributes:
        sublayer: the sublayer object (its qualified name is
            ``layer/sublayer.name``).
        side: ``"output"`` (columns) or ``"input"`` (rows) of its kernel
            flattened to ``(inputs, outputs)``.
        positions: column or row positions.
        channels: the internal channel at each position.
    """

    sublayer: Any
    side: str
    positions: np.ndarray
    channels: np.ndarray


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Stands for the i-th tensor argument of a call in `CallInfo.args`."""

    index: int


@dataclasses.dataclass
class LayerKeep:
    """What survives of one layer, per channel position of its first call.

    Attributes:
        inputs: per tensor input, a bool array over the input's channel axis
            (True = kept).
        outputs: per output, a bool array over the output's channel axis.
        fold: per tensor input, the constant that each removed input channel
            carries in the masked model and that `prune` must fold into the
            bias (0 where nothing is to be folded).
        zero_rows: per tensor input, removed channels whose value in the masked
            model is not zero and cannot be folded: `mask` zeroes the weights
            that read them, so both models ignore them.
        internal: per internal space of the layer (`WalkContext.internal_space`,
            e.g. attention heads), a bool array (True = kept).
        call: the layer's first call (which tensor argument is which).
    """

    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    fold: list[np.ndarray]
    zero_rows: list[np.ndarray]
    internal: list[np.ndarray] = dataclasses.field(default_factory=list)
    call: CallInfo | None = None

    @property
    def changes_anything(self) -> bool:
        return not all(k.all() for k in self.inputs + self.outputs + self.internal)


class LayerHandler:
    """Base handler: blocks pruning of every channel that crosses the layer.

    Subclasses override what their family supports. The default behaviour is
    the safe one used for unknown layers: input channels become unprunable
    and the outputs get fresh, unprunable channels.
    """

    #: Whether the layer holds per-channel weights (or a configuration that
    #: counts channels, such as Reshape's ``target_shape``). Calls of a shared
    #: layer (a layer used more than once) then have their input layouts
    #: tied, because all calls read the same weights and configuration.
    has_channel_weights: bool = False

    def propagate(self, layer: Any, call: CallInfo, ctx: WalkContext) -> list[np.ndarray]:
        """Returns the output layouts of one call and records the ties."""
        reason = f"layer '{layer.name}' ({type(layer).__name__}) has no pruning handler"
        for layout in call.in_layouts:
            ctx.fix(layout, reason)
        return [ctx.fix(ctx.new_space(_channels(s), i), reason) for i, s in enumerate(call.out_shapes)]

    def constants(self, layer: Any, call: CallInfo, in_values: list[np.ndarray]) -> list[np.ndarray]:
        """Values removed channels carry at the outputs in the masked model.

        Args:
            in_values: per input, the value each channel position carries
                when it is removed (NaN = not a known constant).

        Returns:
            One array per output; NaN where the value is not a constant.
            Only positions of removed channels are ever read.
        """
        return [np.full(_channels(s), np.nan) for s in call.out_shapes]

    def can_fold(self, layer: Any) -> bool:
        """Whether a constant on a removed input channel folds into the bias."""
        return False

    def prune(self, layer: Any, config: dict, weights: dict[str, np.ndarray], keep: LayerKeep) -> tuple[dict, dict]:
        """Returns the config and weights of the layer with channels removed."""
        return config, weights

    def mask(self, layer: Any, weights: dict[str, np.ndarray], keep: LayerKeep) -> dict[str, np.ndarray]:
        """Returns the weights with the removed channels' parameters zeroed."""
        return weights

    def output_l1(self, layer: Any, weights: dict[str, np.ndarray]) -> np.ndarray | None:
        """L1 norm of the weights creating each output channel, if any."""
        return None

    def internal_l1(self, layer: Any, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Per internal space, the L1 norm of the weights of each internal channel."""
        return []

    def internal_members(self, layer: Any, index: int) -> list["SublayerMember"]:
        """Where the channels of internal space ``index`` sit in the layer's sublayers.

        Lets layer-level statistics (K-FAC factors of the sublayers, keyed
        ``layer/sublayer``) score internal channels: a head of a
        MultiHeadAttention is a set of output columns of the query, key and
        value projections and of input rows of the output projection.
        """
        return []

    def keeps_rows(self, layer: Any, call: CallInfo) -> bool:
        """Whether the call treats every position of its input's second-to-last axis alike and keeps it.

        Channels sitting on that axis (`keras_autoprune.graph.handlers.matmul`)
        then cross the layer unchanged; otherwise they are blocked. True for
        Dense layers and element-wise activations.
        """
        return False

    def prune_operation(self, operation: Any, call: CallInfo, keep: LayerKeep) -> Any:
        """What replaces a `keras.ops` node (not a layer) in the pruned model.

        Returns the operation itself (the default: its arguments do not name
        channel positions) or a callable that calls a rewritten operation
        with rewritten arguments (see
        `keras_autoprune.graph.handlers.indexmap.OperationCall`).
        """
        return operation


def _channels(shape: tuple) -> int:
    """Length of the channel (last) axis; 0 for tensors without one."""
    if len(shape) < 2 or shape[-1] is None:
        return 0
    return int(shape[-1])


channels = _channels


def activation_at_zero(layer: Any, width: int) -> np.ndarray:
    """Output of a layer's built-in ``activation`` for a zeroed channel.

    A convolution or Dense layer with zeroed kernel column and bias outputs
    ``activation(0)`` on that channel: 0 for relu/swish/tanh, 0.5 for sigmoid.
    """
    activation = getattr(layer, "activation", None)
    if activation is None:
        return np.zeros(width)
    import keras

    return np.asarray(keras.ops.convert_to_numpy(activation(np.zeros((1, width), np.float32))), np.float64)[0]


def weights_format_problem(layer: Any) -> str | None:
    """Why ``layer``'s weights cannot be sliced or masked per channel (quantized or LoRA-enabled), or None.

    A quantized layer keeps per-channel scales beside its integer kernel and
    a LoRA-enabled one computes ``kernel + A·B`` from two more matrices:
    surgery that slices or zeroes ``kernel`` alone would leave them
    inconsistent.
    """
    if getattr(layer, "quantization_mode", None):
        return f"quantization_mode={layer.quantization_mode!r}"
    if getattr(layer, "lora_enabled", False):
        return "LoRA (lora_enabled=True)"
    return None


def mixes_channels(layer: Any) -> bool:
    """Whether a layer's built-in activation normalises across channels."""
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") in ("softmax", "log_softmax")


def fill_values(call: CallInfo, values: list[np.ndarray]) -> tuple[tuple, dict]:
    """The call's arguments with each tensor replaced by a ``(1, C)`` array.

    Used to evaluate element-wise layers and ops on the constants carried by
    removed channels. NaN entries are replaced by 0 here; callers restore
    them (a NaN input makes the output NaN).
    """

    def fill(obj):
        if isinstance(obj, TensorRef):
            return np.nan_to_num(values[obj.index], nan=0.0).astype(np.float32)[None]
        if isinstance(obj, (list, tuple)):
            return type(obj)(fill(o) for o in obj)
        if isinstance(obj, dict):
            return {k: fill(v) for k, v in obj.items()}
        return obj

    return fill(call.args), fill(call.kwargs)


def evaluate_elementwise(operation: Any, call: CallInfo, values: list[np.ndarray]) -> np.ndarray:
    """Runs an element-wise layer/op on per-channel constants (NaN-aware)."""
    import keras  # local: keeps `import keras_autoprune.graph.handlers` light

    args, kwargs = fill_values(call, values)
    out = np.asarray(keras.ops.convert_to_numpy(operation(*args, **kwargs)), np.float64)
    out = out.reshape(-1)
    unknown = np.zeros(out.shape, bool)
    for v in values:
        unknown |= np.broadcast_to(np.isnan(v), out.shape)
    out[unknown | ~np.isfinite(out)] = np.nan
    return out
