"""Channels on the second-to-last axis: last-two-axes transposes and `keras.ops.matmul`.

Attention written with `keras.ops` (keras-hub's SegFormer/MiT attention,
most hand-written ones) splits heads with a reshape, then computes

    scores = q @ transpose(k, (..., -1, -2))      # contracts q's and k's channels
    out = softmax(scores) @ v                     # v's channels flow to the output

The transpose moves k's channel axis to the second-to-last position, where
a layout of the last axis alone cannot follow it. A `Layout` therefore may
carry ``rows``: the channels of the second-to-last axis. Only the handlers
of this module set or read them:

- a transpose, ``swapaxes`` or ``moveaxis`` that exchanges the last two axes
  and nothing else: the output's last axis is the input's ``rows`` (fresh,
  unprunable positions when the input has none: a sequence axis, say), its
  ``rows`` are the input's last axis;
- ``matmul(a, b)`` of two tensors of rank >= 2: ``a``'s last axis is
  contracted with ``b``'s rows, so they are tied (both blocked when ``b``
  has no rows or rows of another length); the output's last axis is
  ``b``'s last axis and its rows are ``a``'s rows.

Every other handler that receives a layout with rows blocks those rows
(`DependencyGraph` does it for handlers without ``reads_rows``), and so do
model outputs and the inputs of nested models (surgery rebuilds those with
their last axis only), so channels never move where nothing tracks them. With the
split reshape of `keras_autoprune.graph.handlers.shape_ops` (``(..., C) ->
(..., H, D)`` ties position ``d`` of every head), the prunable channels of
such an attention are the per-head dimensions: one group for the query and
key columns (``D`` channels, each ``H`` columns of both projections) and
one for the value columns and the output projection's rows.

Exactness. Removing contracted channel ``i`` drops the terms
``a[..., i] * b[..., i, :]``. In the masked model the removed query columns
are zeroed, so ``a[..., i] = 0`` and the pruned product equals the masked
one. Surgery checks that every removed contracted channel carries 0 in
``a`` (`keras_autoprune.surgery.keep`) and raises `SurgeryError` otherwise.
Output channel ``j`` carries 0 where ``b``'s channel ``j`` does (a zeroed
value column); other constants are unknown.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_autoprune.errors import SurgeryError
from keras_autoprune.graph.handlers.base import CallInfo, LayerHandler, LayerKeep, TensorRef, channels
from keras_autoprune.graph.handlers.indexmap import IndexMapHandler, run_on


class Layout(np.ndarray):
    """A layout (atom ids of the last axis) that may carry ``rows``, the second-to-last axis's atoms."""

    rows: np.ndarray | None = None


def with_rows(last: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """``last`` as a `Layout` carrying ``rows`` (``last`` itself when ``rows`` is None)."""
    if rows is None:
        return last
    layout = np.asarray(last).view(Layout)
    layout.rows = rows
    return layout


def rows_of(layout: np.ndarray) -> np.ndarray | None:
    """The second-to-last axis's atoms that ``layout`` carries, if any."""
    return getattr(layout, "rows", None)


def swaps_last_axes(op: Any, call: CallInfo) -> bool:
    """Whether the call exchanges the last two axes of its input and moves nothing else."""
    rank = len(call.in_shapes[0])
    if rank < 2 or len(call.in_layouts) != 1:
        return False
    primes = (2, 3, 5, 7, 11, 13, 17, 19)[:rank]
    if len(primes) < rank:
        return False
    grid = np.arange(int(np.prod(primes)), dtype=np.float64).reshape(primes)
    try:
        (out,) = run_on(op, call.args, call.kwargs, grid)
    except Exception:  # noqa: BLE001 - an op that cannot run on the grid is not a swap
        return False
    expected = np.swapaxes(grid, -1, -2)
    return out.shape == expected.shape and np.array_equal(out, expected)


class SwapLastAxesHandler(IndexMapHandler):
    """``transpose``/``swapaxes``/``moveaxis``: rows and last axis exchanged; otherwise an index map."""

    reads_rows = True

    def propagate(self, layer, call, ctx):
        rows = rows_of(call.in_layouts[0])
        if not swaps_last_axes(layer, call):
            if rows is not None:
                ctx.fix(rows, f"'{layer.name}' ({type(layer).__name__}) moves channels of the second-to-last axis")
            return super().propagate(layer, call, ctx)
        if rows is None:
            width = channels(call.out_shapes[0])
            rows = ctx.fix(ctx.new_space(width), f"'{layer.name}' makes a non-channel axis the last one")
        return [with_rows(rows, np.asarray(call.in_layouts[0]))]

    def constants(self, layer, call, in_values):
        if not swaps_last_axes(layer, call):
            return super().constants(layer, call, in_values)
        return [np.full(channels(call.out_shapes[0]), np.nan)]  # the input's rows: not tracked as constants

    def prune_operation(self, op, call, keep):
        if swaps_last_axes(op, call):
            return op  # the permutation does not depend on the sizes
        return super().prune_operation(op, call, keep)


def matmul_operands(call: CallInfo) -> list:
    """A ``keras.ops.matmul`` call's ``x1`` and ``x2`` in that order, positional or keyword
    (a tensor as its `TensorRef`, a constant as itself)."""
    return list(call.args) + [call.kwargs[name] for name in ("x1", "x2") if name in call.kwargs]


class MatmulHandler(LayerHandler):
    """``keras.ops.matmul(a, b)``: ``a``'s channels tied to ``b``'s rows; ``b``'s channels to the output."""

    reads_rows = True

    @staticmethod
    def _operands(call: CallInfo) -> tuple[int, int] | None:
        """Tensor indices of ``a`` and ``b`` when both are tensors of rank >= 2."""
        refs = [a for a in matmul_operands(call) if isinstance(a, TensorRef)]
        if len(refs) != 2 or len(call.in_layouts) != 2:
            return None
        a, b = refs[0].index, refs[1].index
        if min(len(call.in_shapes[a]), len(call.in_shapes[b])) < 2:
            return None
        return a, b

    def propagate(self, layer, call, ctx):
        operands = self._operands(call)
        if operands is None:
            for layout in call.in_layouts:
                if rows_of(layout) is not None:
                    ctx.fix(rows_of(layout), f"'{layer.name}' (Matmul) has an operand of rank < 2 or a constant one")
            return super().propagate(layer, call, ctx)
        a, b = (call.in_layouts[i] for i in operands)
        rows = rows_of(b)
        if rows is None or len(rows) != len(a) or len(a) < 2:
            reason = f"'{layer.name}' (Matmul) contracts these channels with an axis that carries no channels"
            for layout in (a, rows):
                if layout is not None:
                    ctx.fix(layout, reason)
        else:
            ctx.tie(np.asarray(a), rows)
        return [with_rows(np.asarray(b), rows_of(a))]

    def constants(self, layer, call, in_values):
        operands = self._operands(call)
        if operands is None:
            return super().constants(layer, call, in_values)
        b_values = in_values[operands[1]]
        return [np.where(b_values == 0, 0.0, np.nan)]

    def prune_operation(self, operation, call: CallInfo, keep: LayerKeep):
        operands = self._operands(call)
        if operands is not None and keep.zero_rows[operands[0]].any():
            raise SurgeryError(
                f"Expected every channel that '{operation.name}' (Matmul) contracts and the plan removes to be zero "
                f"in the masked model. Received: {int(keep.zero_rows[operands[0]].sum())} removed channel(s) of its "
                "first operand that carry another value. Fix: keep those channels (exclude their group from the plan)."
            )
        return operation
