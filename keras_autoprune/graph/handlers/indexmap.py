"""Operations that only move values: channel maps read off an id grid.

`keras.ops.pad`, `split`, `slice`, `take`, `transpose`, `repeat`, `tile`,
`reshape` and ``x[...]`` (GetItem) copy input elements to output positions,
and pad may add constants. Which input channel lands on which output channel
position is found by running the operation on an *id grid*: a float64 array
of the input's static shape (batch 2) whose element ``e`` (in C order) holds
``e + 1``. Output element value ``v`` then came from input element ``v - 1``,
whose channel is ``(v - 1) % C``. The operation runs a second time on twice
the grid: a value the operation injects (padding with ``constant_values=k``)
is the same in both runs, a copied one doubles.

For every channel position ``j`` of an output, either

- every copied element holds the same input channel ``c``: position ``j``
  *is* channel ``c`` (padded rows, if any, only change which constant a
  removed channel carries);
- no element is copied: ``j`` is a constant channel the operation creates
  (padding along the channel axis); it is never pruned;
- elements of several input channels meet: the operation mixes the channel
  axis with another axis (a transpose that moves the channel axis, a
  reshape that splits it): the channels crossing it are blocked, unless a
  subclass knows better (`ReshapeOpHandler`).

Surgery rewrites the operation's channel arguments (a subclass's `rewrite`)
and checks the result on the id grid before using it:
``new_op(grid[..., kept_in]) == old_op(grid)[..., kept_out]`` element by
element, so a rewrite can never silently produce a different model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from keras_autoprune.errors import SurgeryError
from keras_autoprune.graph.handlers.base import CallInfo, LayerHandler, LayerKeep, TensorRef

#: Above this many elements the id grid is not built and the op blocks.
MAX_GRID_ELEMENTS = 2**26
#: Size given to unknown (``None``) non-batch dimensions in the id grid.
UNKNOWN_DIM = 5


@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """How one output's channel positions relate to the input channels.

    Attributes:
        source: input channel position held by each output position; -1
            where the operation creates the values (channel padding).
        injected: the constant the operation writes into some elements of
            each output position (NaN where it writes nothing or several
            values).
        padded: whether the operation writes constants into some elements of
            each position (spatial padding).
    """

    source: np.ndarray
    injected: np.ndarray
    padded: np.ndarray


def id_grid(shape: tuple) -> np.ndarray:
    """``arange(1, n + 1)`` in the given shape (unknown batch: 2, other unknown dims: `UNKNOWN_DIM`)."""
    dims = [2 if i == 0 and d is None else (UNKNOWN_DIM if d is None else int(d)) for i, d in enumerate(shape)]
    return (np.arange(int(np.prod(dims)), dtype=np.float64) + 1).reshape(dims)


def substitute(obj: Any, tensors: list) -> Any:
    """``obj`` (call arguments) with every ``TensorRef(i)`` replaced by ``tensors[i]``."""
    if isinstance(obj, TensorRef):
        return tensors[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(substitute(o, tensors) for o in obj)
    if isinstance(obj, dict):
        return {k: substitute(v, tensors) for k, v in obj.items()}
    return obj


def run_on(operation: Any, args: tuple, kwargs: dict, grid: np.ndarray) -> list[np.ndarray]:
    """The outputs of ``operation`` with tensor argument 0 replaced by ``grid``."""
    import keras  # local: keeps `import keras_autoprune.graph.handlers` light

    outputs = operation(*substitute(args, [grid]), **substitute(kwargs, [grid]))
    return [np.asarray(keras.ops.convert_to_numpy(o), np.float64) for o in keras.tree.flatten(outputs)]


def _column_range(values: np.ndarray, where: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column, min and max of ``values`` over the rows in ``where``."""
    low = np.where(where, values, np.inf).min(axis=0) if len(values) else np.full(values.shape[1:], np.inf)
    high = np.where(where, values, -np.inf).max(axis=0) if len(values) else np.full(values.shape[1:], -np.inf)
    return np.where(np.isfinite(low), low, fill), np.where(np.isfinite(high), high, fill)


def decode(once: np.ndarray, twice: np.ndarray, width: int) -> ChannelMap | None:
    """Reads one output's `ChannelMap` off its two id-grid runs.

    Returns None when elements of several input channels meet on one
    output channel position.
    """
    columns = once.shape[-1] if once.ndim else 0
    once = once.reshape(-1, columns) if once.ndim >= 2 else once.reshape(1, columns)
    twice = twice.reshape(once.shape)
    copied = (once >= 1) & (twice == 2 * once)
    channel = np.zeros(once.shape)
    channel[copied] = (np.round(once[copied]) - 1) % width  # the others may be inf or NaN
    low, high = _column_range(channel, copied, -1)
    if (low != high).any():
        return None
    value_low, value_high = _column_range(once, ~copied, np.nan)
    injected = np.where(value_low == value_high, value_low, np.nan)
    return ChannelMap(low.astype(np.int64), injected, (~copied).any(axis=0))


class IndexMapHandler(LayerHandler):
    """A `keras.ops` node that copies elements (and may add constants).

    Subclasses say which calls they cannot re-express after pruning
    (`blocked_reason`) and how to rewrite the operation for the kept
    channels (`rewrite`); the default rewrite keeps the operation as it is,
    right for operations whose arguments do not name channel positions.
    """

    #: The rewrite is made once per operation: all its calls are tied.
    has_channel_weights = True

    def blocked_reason(self, op: Any, call: CallInfo) -> str | None:
        """Why this call cannot be pruned through (None if it can)."""
        return None

    def rewrite(self, op: Any, call: CallInfo, keep: LayerKeep) -> tuple[Any, tuple, dict]:
        """``(operation, args, kwargs)`` computing the kept outputs from the kept inputs."""
        return op, call.args, call.kwargs

    # -- channel maps ---------------------------------------------------
    def channel_maps(self, op: Any, call: CallInfo) -> tuple[list[ChannelMap] | None, str | None]:
        """One `ChannelMap` per output, or ``(None, reason)``."""
        if len(call.in_layouts) != 1:
            return None, "takes a tensor argument besides its input (computed positions)"
        reason = self.blocked_reason(op, call)
        if reason:
            return None, reason
        width = len(call.in_layouts[0])
        if not width or any(len(s) < 2 or s[-1] is None for s in call.out_shapes):
            return None, "has an input or output without a known channel axis"
        grid = id_grid(call.in_shapes[0])
        if grid.size > MAX_GRID_ELEMENTS:
            return None, f"has {grid.size} input elements, too many to map its channels"
        outputs = list(zip(run_on(op, call.args, call.kwargs, grid), run_on(op, call.args, call.kwargs, 2 * grid)))
        if any(once.size == 0 for once, _ in outputs):
            return None, "has an empty output on a batch of 2 (it indexes the batch axis)"
        maps = [decode(once, twice, width) for once, twice in outputs]
        if any(m is None for m in maps):
            return None, "moves the channel axis or mixes it with another axis"
        return maps, None

    # -- graph ----------------------------------------------------------
    def propagate(self, layer, call, ctx):
        maps, reason = self.channel_maps(layer, call)
        if maps is None:
            return self._block(layer, call, ctx, reason)
        layout = call.in_layouts[0]
        outputs = []
        for index, channel_map in enumerate(maps):
            created = channel_map.source < 0
            out = layout[np.maximum(channel_map.source, 0)].copy()
            if created.any():
                fresh = ctx.new_space(int(created.sum()), index)
                out[created] = ctx.fix(fresh, f"'{layer.name}' creates these channels (constant padding)")
            outputs.append(out)
        return outputs

    def _block(self, layer, call, ctx, reason):
        reason = f"'{layer.name}' ({type(layer).__name__}) {reason}"
        for layout in call.in_layouts:
            ctx.fix(layout, reason)
        widths = [int(s[-1]) if len(s) >= 2 and s[-1] is not None else 0 for s in call.out_shapes]
        return [ctx.fix(ctx.new_space(w, i), reason) for i, w in enumerate(widths)]

    def constants(self, layer, call, in_values):
        maps, _ = self.channel_maps(layer, call)
        if maps is None:
            return super().constants(layer, call, in_values)
        return [_carried(in_values[0], m) for m in maps]

    # -- surgery --------------------------------------------------------
    def prune_operation(self, op, call, keep):
        new_op, args, kwargs = self.rewrite(op, call, keep)
        verify_rewrite(op, call, keep, new_op, args, kwargs)
        if new_op is op and args is call.args and kwargs is call.kwargs:
            return op  # nothing names channel positions: reused as is
        return OperationCall(new_op, args, kwargs)


def _carried(values: np.ndarray, channel_map: ChannelMap) -> np.ndarray:
    """What removed channels carry after the op (NaN: not a constant)."""
    carried = values[np.maximum(channel_map.source, 0)]
    carried = np.where(channel_map.source < 0, channel_map.injected, carried)
    keeps_constant = ~channel_map.padded | (carried == channel_map.injected)
    return np.where(keeps_constant, carried, np.nan)


def verify_rewrite(op, call: CallInfo, keep: LayerKeep, new_op, args, kwargs) -> None:
    """Raises `SurgeryError` unless the rewritten op computes the kept outputs exactly."""
    grid = id_grid(call.in_shapes[0])
    for scale in (1.0, 2.0):
        expected = run_on(op, call.args, call.kwargs, scale * grid)
        try:
            received = run_on(new_op, args, kwargs, scale * grid[..., keep.inputs[0]])
        except Exception as error:  # noqa: BLE001 - reported as a surgery bug
            raise SurgeryError(f"Rewriting '{op.name}' ({type(op).__name__}) for the kept channels failed: {error!r}") from error
        for e, r, kept in zip(expected, received, keep.outputs):
            if e[..., kept].shape != r.shape or not np.array_equal(e[..., kept], r):
                raise SurgeryError(
                    f"The rewritten '{op.name}' ({type(op).__name__}) does not reproduce the kept "
                    f"channels of the original (args {args!r}); please report this bug."
                )


class OperationCall:
    """Calls ``operation`` with stored arguments in place of the original ones.

    `keras.models.clone_model` calls the clone of each operation with the
    node's original arguments; this stands in for the clone of a rewritten
    operation and substitutes the new (non-tensor) arguments, keeping the
    tensors it receives (`TensorRef` i is the i-th tensor argument).
    """

    def __init__(self, operation: Any, args: tuple, kwargs: dict):
        self.operation = operation
        self.args = args
        self.kwargs = kwargs

    def __call__(self, *args, **kwargs):
        import keras

        tensors = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
        return self.operation(*substitute(self.args, tensors), **substitute(self.kwargs, tensors))
