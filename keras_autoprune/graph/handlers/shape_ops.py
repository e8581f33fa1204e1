"""`keras.ops` shape and indexing nodes: pad, split, slice, GetItem, take,
transpose, repeat, tile, reshape (and expand_dims, squeeze, swapaxes,
moveaxis).

How channels flow through each is read off an id grid (see
`keras_autoprune.graph.handlers.indexmap`); this module says, per operation,
which arguments name channel positions and how they change when channels
go. ``new_position[c]`` below is the index of kept input channel ``c`` in the
pruned input (the number of kept channels before it).

| op | along the channel axis | after pruning |
|---|---|---|
| ``pad`` (constant) | new constant channels at both ends | same ``pad_width`` |
| ``pad`` (reflect, symmetric) | blocks | |
| ``split`` | output k holds a range of channels | split points = kept channels before each point |
| ``slice`` / ``x[..., a:b]`` | a range of channels | start and size (bounds) re-counted |
| ``x[..., i]`` / ``take(x, i, axis=-1)`` | one channel on every position | ``new_position[i]`` |
| ``x[..., a:b:s]`` with ``s != 1`` | blocks (not a slice after pruning) | |
| ``take(x, [i, ...], axis=-1)`` | listed channels | kept entries, ``new_position`` |
| ``repeat(x, r, axis=-1)`` | channel c repeated ``r[c]`` times | ``r`` of the kept channels |
| ``tile`` | the channel axis repeated | same |
| ``transpose`` / ``swapaxes`` / ``moveaxis`` | pass-through if the channel axis stays last; exchanging the last two axes moves the channels to the second-to-last axis (`keras_autoprune.graph.handlers.matmul`); else blocks | same |
| ``matmul`` | contracts ``a``'s channels with ``b``'s second-to-last axis; ``b``'s channels pass (`keras_autoprune.graph.handlers.matmul`) | same |
| ``reshape`` ``(..., C) -> (..., A, B)`` | position j ties channels ``j, B + j, ...`` | last dim = kept positions |
| ``reshape`` (flatten-like) | index map (as `Flatten`) | last dim = kept positions |

Along any other axis these operations pass channels through unchanged.
Operations whose positions or indices are tensors (``take(x, idx_tensor)``,
``slice`` with tensor starts) block.
"""

from __future__ import annotations

import math

import numpy as np

from keras_autoprune.graph.handlers.indexmap import IndexMapHandler
from keras_autoprune.graph.handlers.matmul import MatmulHandler, SwapLastAxesHandler


def _on_channels(axis, rank: int) -> bool:
    return axis is not None and int(axis) % rank == rank - 1


def _new_positions(in_keep: np.ndarray) -> np.ndarray:
    """Index of every input channel in the pruned input (valid where kept)."""
    return np.cumsum(in_keep) - 1


def copy_operation(op, **changes):
    """A new operation of ``op``'s class (a `keras.ops` node), with some config entries changed.

    Surgery always calls a new operation, rewritten or not, so that the input
    model's operations do not gain nodes of the pruned model.
    """
    return type(op).from_config(dict(op.get_config(), **changes))


def _argument(call, name: str):
    """The operation's second call argument (after the tensor), positional or ``name=``."""
    return call.args[1] if len(call.args) > 1 else call.kwargs[name]


def _with_argument(call, name: str, value) -> tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` with its second argument replaced by ``value``."""
    if len(call.args) > 1:
        return (call.args[0], value) + tuple(call.args[2:]), call.kwargs
    return call.args, dict(call.kwargs, **{name: value})


class PadOpHandler(IndexMapHandler):
    """``keras.ops.pad``: padding the channel axis adds constant channels."""

    def blocked_reason(self, op, call):
        rank = len(call.in_shapes[0])
        widths = np.broadcast_to(np.asarray(op.pad_width), (rank, 2))
        if op.mode != "constant" and widths[-1].any():
            return f"pads the channel axis in mode '{op.mode}' (copies depend on channel positions)"
        return None


class SplitHandler(IndexMapHandler):
    """``keras.ops.split``: new split points along the channel axis."""

    def rewrite(self, op, call, keep):
        rank, width = len(call.in_shapes[0]), len(keep.inputs[0])
        if not _on_channels(op.axis, rank):
            return op, call.args, call.kwargs
        sections = op.indices_or_sections
        points = range(width // sections, width, width // sections) if isinstance(sections, int) else sections
        in_keep = keep.inputs[0]
        return copy_operation(op, indices_or_sections=[int(in_keep[: int(p)].sum()) for p in points]), call.args, call.kwargs


class SliceHandler(IndexMapHandler):
    """``keras.ops.slice(x, start_indices, shape)``: channel bounds re-counted."""

    def rewrite(self, op, call, keep):
        start = list(_argument(call, "start_indices"))
        shape = list(op.shape)
        in_keep = keep.inputs[0]
        begin = int(start[-1])
        end = len(in_keep) if shape[-1] == -1 else begin + int(shape[-1])
        start[-1] = int(in_keep[:begin].sum())
        if shape[-1] != -1:
            shape[-1] = int(in_keep[begin:end].sum())
        return (copy_operation(op, shape=shape), *_with_argument(call, "start_indices", start))


def _channel_entry(key, rank: int) -> int | None:
    """Index, in the key tuple, of the entry that indexes the last axis."""
    entries = list(key) if isinstance(key, (tuple, list)) else [key]
    consuming = [i for i, e in enumerate(entries) if e is not None and e is not Ellipsis]
    ellipsis = [i for i, e in enumerate(entries) if e is Ellipsis]
    if ellipsis:
        after = [i for i in consuming if i > ellipsis[0]]
        return after[-1] if after else None
    return consuming[-1] if len(consuming) == rank else None


class GetItemHandler(IndexMapHandler):
    """``x[key]``: an integer or a step-1 slice on the channel axis is re-counted."""

    def blocked_reason(self, op, call):
        key = _argument(call, "key")
        entry = _channel_entry(key, len(call.in_shapes[0]))
        if entry is None:
            return None
        item = (list(key) if isinstance(key, (tuple, list)) else [key])[entry]
        if isinstance(item, slice) and item.step in (None, 1):
            return None
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            return None
        return f"indexes the channel axis with {item!r}, which cannot be re-expressed after pruning"

    def rewrite(self, op, call, keep):
        key = _argument(call, "key")
        entry = _channel_entry(key, len(call.in_shapes[0]))
        if entry is None:
            return op, call.args, call.kwargs
        entries = list(key) if isinstance(key, (tuple, list)) else [key]
        in_keep = keep.inputs[0]
        new = _new_positions(in_keep)
        item = entries[entry]
        if isinstance(item, slice):
            selected = np.arange(len(in_keep))[item]
            kept = new[selected[in_keep[selected]]]
            entries[entry] = slice(int(kept[0]), int(kept[-1]) + 1) if len(kept) else slice(0, 0)
        else:
            entries[entry] = int(new[int(item) % len(in_keep)])
        new_key = type(key)(entries) if isinstance(key, (tuple, list)) else entries[0]
        return (copy_operation(op), *_with_argument(call, "key", new_key))


class _AlongAxisHandler(IndexMapHandler):
    """An operation with an ``axis``; ``axis=None`` flattens the input and blocks."""

    def blocked_reason(self, op, call):
        return "works on the flattened input (axis=None)" if op.axis is None else None


class TakeHandler(_AlongAxisHandler):
    """``keras.ops.take(x, indices, axis)``: indices of the kept channels."""

    def rewrite(self, op, call, keep):
        if not _on_channels(op.axis, len(call.in_shapes[0])):
            return op, call.args, call.kwargs
        in_keep = keep.inputs[0]
        indices = np.asarray(_argument(call, "indices")) % len(in_keep)
        if indices.ndim:
            indices = indices[..., keep.outputs[0]]
        new = _new_positions(in_keep)[indices]
        return (copy_operation(op), *_with_argument(call, "indices", new.tolist() if new.ndim else int(new)))


class RepeatHandler(_AlongAxisHandler):
    """``keras.ops.repeat``: per-channel repeat counts of the kept channels."""

    def rewrite(self, op, call, keep):
        repeats = np.asarray(op.repeats)
        if not _on_channels(op.axis, len(call.in_shapes[0])) or repeats.size == 1:
            return op, call.args, call.kwargs
        return copy_operation(op, repeats=repeats.reshape(-1)[keep.inputs[0]].tolist()), call.args, call.kwargs


class ReshapeOpHandler(IndexMapHandler):
    """``keras.ops.reshape``: an index map, or a split of the channel axis.

    ``(..., C) -> (..., A, B)`` with ``A·B = C`` holds channels ``j, B + j,
    ..., (A-1)·B + j`` at position ``j`` of the new last axis: they are tied
    into one channel, and pruning it keeps the reshape ``(..., A, B')``.
    """

    def blocked_reason(self, op, call):
        before, after = tuple(call.in_shapes[0][1:]), tuple(call.out_shapes[0][1:])
        if None in before or None in after or math.prod(after) <= math.prod(before):
            return None  # fewer elements per example out: rows split off an example, mapped on the id grid
        return (f"gathers the rows of several batch entries into one ({math.prod(before)} elements per entry in, "
                f"{math.prod(after)} out)")

    @staticmethod
    def _split(call) -> tuple[int, int] | None:
        before, after = tuple(call.in_shapes[0][1:]), tuple(call.out_shapes[0][1:])
        if len(after) != len(before) + 1 or after[:-2] != before[:-1] or None in after[-2:]:
            return None
        a, b = after[-2:]
        return (a, b) if b > 1 and a * b == before[-1] else None

    def propagate(self, layer, call, ctx):
        split = self._split(call)
        if split is None or self.channel_maps(layer, call)[0] is not None:
            return super().propagate(layer, call, ctx)
        blocks = call.in_layouts[0].reshape(split)
        for block in blocks[1:]:
            ctx.tie(blocks[0], block)
        return [blocks[0].copy()]

    def constants(self, layer, call, in_values):
        split = self._split(call)
        if split is None or self.channel_maps(layer, call)[0] is not None:
            return super().constants(layer, call, in_values)
        blocks = in_values[0].reshape(split)
        return [np.where(np.all(blocks == blocks[:1], axis=0), blocks[0], np.nan)]

    def rewrite(self, op, call, keep):
        newshape = list(op.newshape) if not isinstance(op.newshape, int) else [op.newshape]
        if newshape[-1] != -1:
            newshape[-1] = int(keep.outputs[0].sum())
        return copy_operation(op, newshape=tuple(newshape)), call.args, call.kwargs


def operation_handlers() -> dict[type, IndexMapHandler]:
    """``{keras.ops class: handler}`` for the shape and indexing operations."""
    from keras.src.ops import core, numpy as ops

    same, swap = IndexMapHandler(), SwapLastAxesHandler()
    return {
        ops.Pad: PadOpHandler(),
        ops.Split: SplitHandler(),
        core.Slice: SliceHandler(),
        ops.GetItem: GetItemHandler(),
        ops.Take: TakeHandler(),
        ops.Repeat: RepeatHandler(),
        ops.Reshape: ReshapeOpHandler(),
        ops.Tile: same,
        ops.Transpose: swap,
        ops.Swapaxes: swap,
        ops.Moveaxis: swap,
        ops.Matmul: MatmulHandler(),
        ops.ExpandDims: same,
        ops.Squeeze: same,
    }


__all__ = [
    "GetItemHandler", "IndexMapHandler", "PadOpHandler", "RepeatHandler", "ReshapeOpHandler",
    "SliceHandler", "SplitHandler", "TakeHandler", "operation_handlers",
]
