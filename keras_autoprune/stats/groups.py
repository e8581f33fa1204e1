"""Structured saliencies of coupled channel groups from K-FAC factors.

Removing a set of weights ``S`` of a layer with Fisher ``F = A ⊗ G`` (over the
row-major ``vec(W̃)``, `kfac`), the rest of the layer compensating optimally
(OBS), costs ``ΔL = ½ vec(W_S)ᵀ [(F⁻¹)_SS]⁻¹ vec(W_S)``. For whole columns or
rows of ``W̃`` the Kronecker structure gives closed forms, with the damped
inverses of `curvature.damped_inverses`:

- output side, columns ``S`` (output channels) of ``W̃``:
  ``ΔL = ½ tr(W_{:,S}ᵀ A W_{:,S} [(G'⁻¹)_SS]⁻¹)``; for one channel ``i`` this
  is NAP's ``w_iᵀ A w_i / (2 [G'⁻¹]_ii)``;
- input side, rows ``S`` of ``W̃`` (every kernel position of the removed input
  channels; the bias row stays and compensates):
  ``ΔL = ½ tr(W_{S,:} G W_{S,:}ᵀ [(A'⁻¹)_SS]⁻¹)``;
- depthwise layers: channel ``c`` is a block of its own, removed whole
  (input and output together), ``ΔL = ½ tr(W̃[c]ᵀ A[c] W̃[c] G[c])``;
  it is counted with the output side.

Baseline scorers (`scoring.baselines`, via `GroupSaliency.output_scores`)
give one score per output column of each producer layer (depthwise layers:
per column of each channel's block, the Fisher being block-diagonal over
channels); a group channel gets the sum over its output positions.

A group channel gets the **sum** over the group's members (`ChannelMember`:
the positions of the channel in each layer); layers without factors (not
collected, or not Dense/Conv/Depthwise) add nothing.

Internal channels (the heads of a MultiHeadAttention, members with side
``"internal"``) are scored through the sublayers that hold them
(`LayerHandler.internal_members`): a head is the sum of the output-side
saliencies of its query, key and value columns and the input-side saliency
of its rows of the output projection (factors ``mha/query`` ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from keras_autoprune.graph.dependency import ChannelGroup, ChannelMember, DependencyGraph
from keras_autoprune.scoring.obs import input_set_saliency, output_set_saliency
from keras_autoprune.stats.curvature import damped_inverses
from keras_autoprune.stats.kfac import KFACFactors


LayerScores = Callable[[np.ndarray, KFACFactors, np.ndarray, np.ndarray], np.ndarray]


InternalMembers = dict[tuple[str, int], list[ChannelMember]]
"""``{(layer, internal space index): members in its sublayers}``, named ``layer/sublayer``."""


def internal_members(graph: DependencyGraph) -> tuple[InternalMembers, dict[str, object]]:
    """Where the internal channels of each layer sit in its sublayers, and those sublayers by qualified name.

    A MultiHeadAttention's heads (`LayerHandler.internal_members`) are output
    columns of ``mha/query``, ``mha/key``, ``mha/value`` and input rows of
    ``mha/attention_output``.
    """
    internal: InternalMembers = {}
    sublayers: dict[str, object] = {}
    for record in graph.records:
        if not record.first_call:
            continue
        for index in range(len(record.internal_layouts)):
            members = []
            for sub in record.handler.internal_members(record.operation, index):
                name = f"{record.name}/{sub.sublayer.name}"
                sublayers[name] = sub.sublayer
                members.append(ChannelMember(name, sub.side, 0, sub.positions, sub.channels))
            internal[(record.name, index)] = members
    return internal, sublayers


def expanded_members(group: ChannelGroup, internal: InternalMembers) -> list[ChannelMember]:
    """The group's members, internal ones replaced by their sublayer members (channels mapped to the group's)."""
    members = []
    for member in group.members:
        if member.side != "internal":
            members.append(member)
            continue
        for sub in internal.get((member.layer, member.tensor_index), []):
            channel_of = dict(zip(member.positions.tolist(), member.channels.tolist()))
            at = np.isin(sub.channels, member.positions)
            channels = np.array([channel_of[c] for c in sub.channels[at].tolist()], np.int64)
            members.append(ChannelMember(sub.layer, sub.side, 0, sub.positions[at], channels))
    return members


class GroupSaliency:
    """Per-channel OBS saliencies of channel groups (formulas in the module docstring).

    Args:
        graph: the model's dependency graph (gives the layers and groups).
        factors: `KFACFactors` by qualified layer name (`collect_kfac`),
            with the full input factor ``A``.
        damping: relative damping of the inverses (`curvature.damp`).

    Inverses are computed once per layer and cached.
    """

    def __init__(self, graph: DependencyGraph, factors: Mapping[str, KFACFactors], damping: float = 1e-3):
        self._layers = {record.name: record.operation for record in graph.records}
        self._internal, sublayers = internal_members(graph)
        self._layers.update(sublayers)
        self._factors = factors
        self._damping = damping
        self._cache: dict[str, tuple[np.ndarray, KFACFactors, np.ndarray, np.ndarray]] = {}

    def group(self, group: ChannelGroup, *, output_side: bool = True, input_side: bool = True) -> np.ndarray:
        """Saliency of each of the group's channels, ``(group.size,)``, summed over members."""
        total = np.zeros(group.size)
        for member in self._expanded(group):
            if (member.side == "output" and output_side) or (member.side == "input" and input_side):
                channels, values = self.member(member)
                np.add.at(total, channels, values)
        return total

    def _expanded(self, group: ChannelGroup) -> list[ChannelMember]:
        return expanded_members(group, self._internal)

    def output_scores(self, group: ChannelGroup, layer_scores: LayerScores) -> np.ndarray:
        """Per-channel sum of a per-output-column score over the group's producers.

        Args:
            group: the channel group.
            layer_scores: ``f(W̃, factors, A'⁻¹, G'⁻¹)`` returning one score per
                output column of ``W̃`` (``(C_out,)``; depthwise ``(C, M)``,
                read in the layer's output order ``c·M + m``).

        Returns:
            ``(group.size,)``: ``Σ`` over output-side members and positions of
            each channel; input-side members add nothing.
        """
        total = np.zeros(group.size)
        for member in self._expanded(group):
            factors = self._factors.get(member.layer)
            if factors is None or member.side != "output" or member.tensor_index != 0:
                continue
            columns = np.reshape(layer_scores(*self._prepared(member.layer, factors)), -1)
            np.add.at(total, member.channels, columns[member.positions])
        return total

    def member(self, member: ChannelMember) -> tuple[np.ndarray, np.ndarray]:
        """``(channels, saliencies)`` of one member (empty if it does not count)."""
        factors = self._factors.get(member.layer)
        empty = (np.zeros(0, np.int64), np.zeros(0))
        if factors is None or member.tensor_index != 0 or (factors.depthwise and member.side == "input"):
            return empty
        W, _, A_inv, G_inv = self._prepared(member.layer, factors)
        channels = np.unique(member.channels)
        if factors.depthwise:
            blocks = member.positions // factors.kernel_shape[-1]
            cost = 0.5 * np.einsum("ckm,ckl,cln,cmn->c", W, factors.A, W, factors.G)
            values = [cost[np.unique(blocks[member.channels == c])].sum() for c in channels]
        elif member.side == "output":
            values = [output_set_saliency(W, factors.A, G_inv, member.positions[member.channels == c]) for c in channels]
        else:
            taps, in_channels = factors.patch_layout
            offsets = np.arange(taps) * in_channels
            values = [
                input_set_saliency(W, factors.G, A_inv, (offsets[:, None] + member.positions[member.channels == c]).ravel())
                for c in channels
            ]
        return channels, np.asarray(values, np.float64)

    def _prepared(self, name: str, factors: KFACFactors):
        if name not in self._cache:
            if factors.A is None:
                raise ValueError(
                    f"Expected the full input factor A of layer '{name}'. Received: factors collected with "
                    "full_input_factor=False. Fix: collect_kfac(..., full_input_factor=True)."
                )
            layer = self._layers[name]
            W = factors.weight_matrix(np.asarray(layer.kernel), np.asarray(layer.bias) if factors.has_bias else None)
            self._cache[name] = (W, factors, *damped_inverses(factors.A, factors.G, self._damping))
        return self._cache[name]


def group_saliency(
    graph: DependencyGraph,
    group: ChannelGroup,
    factors: Mapping[str, KFACFactors],
    *,
    damping: float = 1e-3,
    output_side: bool = True,
    input_side: bool = True,
) -> np.ndarray:
    """Per-channel saliency of one group: `GroupSaliency` for a single group.

    For many groups build one `GroupSaliency` (it caches the inverses).

    Example:

    >>> factors = collect_kfac(model, data)                      # doctest: +SKIP
    >>> group_saliency(graph, graph.group("conv1"), factors)     # doctest: +SKIP
    array([0.013, 0.002, ...])
    """
    return GroupSaliency(graph, factors, damping).group(group, output_side=output_side, input_side=input_side)
