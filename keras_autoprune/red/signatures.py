"""What makes a channel of a `ChannelGroup` what it is, and who reads it.

Two channels ``i`` and ``j`` of a group carry identical values in every
tensor of the group when every layer of the group treats them alike:

- each layer that *creates* them (Conv, Dense, ConvTranspose, the pointwise
  part of SeparableConv) has identical kernel columns and biases for them
  (same input, same weights, same activation: same output);
- each layer that transforms them one channel at a time (a depthwise
  convolution, a BatchNormalization that was not folded, PReLU, LayerScale,
  the depthwise part of a SeparableConv, ...) has identical per-channel
  weights for them;
- weightless layers (activations, pooling, reductions over other axes such
  as ``keras.ops.mean(x, axis=(1, 2))``, merges such as a residual Add or a
  squeeze-excite Multiply, Concatenate, Flatten) apply the same function to
  both; the merge's other operands are channels of the same group, so they
  are covered by the two rules above.

The *signature* of a channel collects, member by member, those weights (and
how many positions the channel occupies in the member, e.g. ``H·W`` after a
Flatten). Equal signatures mean equal channels, so the check respects the
dependency graph by construction: channels tied by a residual Add or a
squeeze-excite gate are equal only if *every* producing branch agrees.

The layers that *read* a channel with a weight per input position (Conv,
Dense, ConvTranspose, SeparableConv's pointwise kernel) are the *readers*: a
merge adds the removed channel's rows of their kernels into the kept
channel's rows. A reader that is depthwise (one filter per channel) is not a
reader but a per-channel transform (its filters enter the signature), and a
SeparableConv reads through its depthwise filters, which therefore enter the
signature too.

A member whose layer has weights that none of these rules covers (a custom
layer with a custom handler) makes its group unmergeable, as does a
GroupNormalization (its statistics mix the channels of a normalisation
group).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_autoprune.graph.dependency import ChannelGroup
from keras_autoprune.graph.handlers import (
    ActivationHandler,
    ChannelwiseHandler,
    ConcatenateHandler,
    DepthwiseHandler,
    LinearHandler,
    MergeHandler,
    PassThroughHandler,
    ReductionHandler,
    ReshapeHandler,
    SeparableHandler,
)
from keras_autoprune.red.records import GraphIndex
from keras_autoprune.surgery.weights import layer_weights

_WEIGHTLESS = (ActivationHandler, ConcatenateHandler, MergeHandler, PassThroughHandler, ReductionHandler,
               ReshapeHandler)


@dataclasses.dataclass(frozen=True)
class Reader:
    """Rows of one reader's kernel that read a group's channels.

    Attributes:
        layer: the reading layer (the object of the analysed model).
        weight: kernel key (``"kernel"`` or ``"pointwise_kernel"``).
        axis: the kernel's input-channel axis.
        rows: ``{channel: kernel rows reading it}``, rows in a consistent
            order (the k-th row of ``i`` and of ``j`` read the same spatial
            position after a Flatten).
    """

    layer: object
    weight: str
    axis: int
    rows: dict[int, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a member layer keeps weights of its own for each channel.

    ``weights[key]``, its last two axes flattened into one when
    ``flatten_last_two`` (a depthwise kernel ``(..., C, M)`` holds output
    channel ``c·M + m``), indexed by the channel's positions along ``axis``.
    ``convex``: a per-channel transform's parameter (a normalisation's
    variance, a PReLU slope), which a merge may only average with
    non-negative weights (a variance must stay positive).
    """

    key: str
    axis: int
    flatten_last_two: bool = False
    convex: bool = False

    def _shaped(self, weights: dict) -> np.ndarray:
        value = weights[self.key]
        return value.reshape(value.shape[:-2] + (-1,)) if self.flatten_last_two else value

    def read(self, weights: dict, positions: np.ndarray) -> np.ndarray:
        """The weights at ``positions``, the channel axis first."""
        return np.moveaxis(self._shaped(weights), self.axis, 0)[positions]

    def write(self, weights: dict, positions: np.ndarray, values: np.ndarray) -> None:
        """Sets the weights at ``positions`` (``values`` as `read` returns them); replaces ``weights[key]``."""
        shaped = self._shaped(weights).copy()
        np.moveaxis(shaped, self.axis, 0)[positions] = values
        weights[self.key] = shaped.reshape(weights[self.key].shape)


@dataclasses.dataclass(frozen=True)
class MemberSlots:
    """A member layer's `Slot`s and each channel's positions in it (what a merge may rewrite)."""

    layer: object
    slots: tuple[Slot, ...]
    positions: dict[int, np.ndarray]


@dataclasses.dataclass
class GroupSignatures:
    """Per-channel signatures and readers of one group.

    Attributes:
        group: the group.
        pieces: per member, ``{channel: 1-D float64 array}``: how many
            positions the channel occupies in the member, then the member's
            weights for it (nothing more for a weightless member).
        readers: the group's readers.
        blocked: why the group cannot merge (None if it can).
        members: the members with weights per channel, as `MemberSlots`.
    """

    group: ChannelGroup
    pieces: list[dict[int, np.ndarray]]
    readers: list[Reader]
    blocked: str | None = None
    members: list[MemberSlots] = dataclasses.field(default_factory=list)

    def key(self, channel: int) -> bytes:
        """Exact signature: equal keys mean equal channels."""
        parts = []
        for member, pieces in enumerate(self.pieces):
            if channel in pieces:
                parts.append(member.to_bytes(4, "little") + pieces[channel].tobytes())
        return b"|".join(parts)

    def vectors(self, channel: int) -> dict[int, np.ndarray]:
        """``{member: weights}`` for ``channel``, without the position count (near-identical distances)."""
        return {m: p[channel][1:] for m, p in enumerate(self.pieces) if channel in p}

    def layout(self, channel: int) -> tuple[tuple[int, float], ...]:
        """``((member, positions), ...)`` for ``channel``: near-identical channels must match it exactly."""
        return tuple((m, float(p[channel][0])) for m, p in enumerate(self.pieces) if channel in p)


def group_signatures(index: GraphIndex, group: ChannelGroup, cache: dict | None = None) -> GroupSignatures:
    """Signatures and readers of ``group`` (see the module docstring).

    Args:
        index: lookups over the model's graph.
        group: a group of that graph.
        cache: ``{id(layer): weights}`` shared between calls (optional).
    """
    cache = {} if cache is None else cache
    pieces: list[dict[int, np.ndarray]] = []
    readers: list[Reader] = []
    members: list[MemberSlots] = []
    if not group.prunable:
        return GroupSignatures(group, [], [], f"the group is not prunable ({group.reason})")
    if len(np.unique(group.chunks)) != group.size:
        return GroupSignatures(group, [], [], "a GroupNormalization mixes its channels")
    for member in group.members:
        record = index.record(member.layer)
        layer, handler = record.operation, record.handler
        if id(layer) not in cache:
            cache[id(layer)] = layer_weights(layer) if getattr(layer, "weights", None) else {}
        weights = cache[id(layer)]
        positions = {int(c): member.positions[member.channels == c] for c in np.unique(member.channels)}
        found = _member(layer, handler, member.side, weights, positions, len(record.call.in_layouts[0]) if record.call.in_layouts else 0)
        if isinstance(found, str):
            return GroupSignatures(group, [], [], f"layer '{member.layer}' {found}")
        slots, reader = found
        pieces.append({c: np.concatenate([[float(len(p))]] + [s.read(weights, p).astype(np.float64).ravel()
                                                              for s in slots]) for c, p in positions.items()})
        if slots:
            members.append(MemberSlots(layer, slots, positions))
        if reader is not None:
            readers.append(reader)
    return GroupSignatures(group, pieces, readers, members=members)


def _member(layer, handler, side, weights, positions, in_width):
    """``(the member's Slots, Reader or None)`` or a reason string."""
    nothing = ((), None)
    if isinstance(handler, LinearHandler):
        kernel = weights["kernel"]
        if handler.is_depthwise(layer):
            return (_columns(weights, "kernel", -1), None) if side == "output" else nothing
        if side == "output":
            return _columns(weights, "kernel", handler.out_axis), None
        return (), Reader(layer, "kernel", handler.in_axis % kernel.ndim, positions)
    if isinstance(handler, DepthwiseHandler):
        if side == "input":
            return nothing
        return _columns(weights, "kernel", -1, flatten_last_two=True), None
    if isinstance(handler, SeparableHandler):
        if side == "output":
            return _columns(weights, "pointwise_kernel", -1), None
        multiplier = weights["depthwise_kernel"].shape[-1]
        rows = {c: (p[:, None] * multiplier + np.arange(multiplier)).ravel() for c, p in positions.items()}
        pointwise = weights["pointwise_kernel"]
        return (Slot("depthwise_kernel", -2),), Reader(layer, "pointwise_kernel", pointwise.ndim - 2, rows)
    if isinstance(handler, ChannelwiseHandler):
        if side == "output":
            return nothing
        return tuple(Slot(key, -1, convex=True) for key, w in weights.items() if w.ndim and w.shape[-1] == in_width), None
    if isinstance(handler, _WEIGHTLESS) and not weights:
        return nothing
    if not weights:
        return (f"({type(layer).__name__}, handler {type(handler).__name__}) is an operation RED does not know "
                "to treat two equal channels alike")
    return f"({type(layer).__name__}, handler {type(handler).__name__}) has weights RED cannot compare per channel"


def _columns(weights: dict, key: str, axis: int, flatten_last_two: bool = False) -> tuple[Slot, ...]:
    """The kernel slices at output positions along ``axis``, and the biases."""
    kernel = Slot(key, axis, flatten_last_two)
    return (kernel, Slot("bias", 0)) if weights.get("bias") is not None else (kernel,)
