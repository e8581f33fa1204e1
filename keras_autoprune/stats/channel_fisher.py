"""The channel-level Fisher of removing a channel, as its readers see it (Theis et al., 2018).

Removing channel ``c`` sets the input ``x_c`` of every layer that reads it
to 0. For one reader (Dense / Conv1D / Conv2D, not depthwise) and one
example ``b``, the change of the loss to first order is
``−D_bc`` with the directional derivative

    D_bc = Σ_p x_bpc · ∂ℓ_b/∂x_bpc = Σ_t Σ_k a_btkc · (W_k δ_bt)_c

summed over the input positions ``p`` (in im2col terms: over the output
locations ``t`` and kernel taps ``k``, ``W_k`` the tap's ``Cin × Cout``
kernel slice, ``δ_bt = ∂ℓ_b/∂s_bt``). Its second-order term is the exact
Fisher quadratic form along that removal,

    S_c = ½ E_b[D_bc²]

with labels sampled from the model (true Fisher) or the real ones
(empirical). Unlike K-FAC's ``A ⊗ G``, the sum over locations is taken
**before** squaring, so the coherent part of the change (a channel's mean,
added up by a later global pooling) is kept: on the benchmark's converged
networks K-FAC's saliency of a removal was 10 to 2,000 times below this
quadratic form (docs/methods/nap.md).

A removal is scored as a whole where one group channel (an *atom*) reaches
a reader at several input positions: ``D_b`` is summed over those positions
before squaring. So the ``H·W`` positions a channel occupies after a
Flatten count together, and a head of a MultiHeadAttention, read by the
attention output projection at its ``V`` value positions (tapped as
``mha/attention_output``), is one atom. Cross terms are left out between
atoms and between the readers of one atom (a residual stream read by
several blocks).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.stats.engine import StatisticsResult, run_statistics
from keras_autoprune.stats.groups import expanded_members, internal_members
from keras_autoprune.stats.taps import Tap

_READER_KINDS = ("dense", "conv1d", "conv2d", "einsum_dense")


@dataclasses.dataclass(frozen=True)
class ReaderAtoms:
    """The atoms one reader sees: input position ``p`` belongs to atom ``atom_of[p]``
    (absent: to no prunable channel); atom ``k`` is channel ``keys[k][1]`` of group ``keys[k][0]``."""

    atom_of: dict[int, int]
    keys: tuple[tuple[str, int], ...]

    def indicator(self, in_channels: int) -> np.ndarray:
        """``M`` of shape ``(Cin, atoms)``: ``M[p, k] = 1`` where position ``p`` belongs to atom ``k``."""
        matrix = np.zeros((in_channels, len(self.keys)))
        for position, atom in self.atom_of.items():
            matrix[position, atom] = 1.0
        return matrix


def reader_atoms(graph: DependencyGraph) -> dict[str, ReaderAtoms]:
    """``{reader: ReaderAtoms}`` from the input-side members of every prunable group (heads through their sublayers)."""
    internal, _ = internal_members(graph)
    positions: dict[str, dict[int, int]] = {}
    keys: dict[str, dict[tuple[str, int], int]] = {}
    for group in graph.prunable_groups:
        for member in expanded_members(group, internal):
            if member.side != "input" or member.tensor_index != 0:
                continue
            atoms = keys.setdefault(member.layer, {})
            for position, channel in zip(member.positions.tolist(), member.channels.tolist()):
                positions.setdefault(member.layer, {})[position] = atoms.setdefault((group.id, channel), len(atoms))
    return {reader: ReaderAtoms(positions[reader], tuple(keys[reader])) for reader in keys if keys[reader]}


class ChannelFisherStatistic:
    """``Σ_b w_b D_bk²`` per atom ``k`` of every reader (see the module docstring; `engine.Statistic`).

    Args:
        atoms: `reader_atoms` of the model's graph; readers absent from it are not scored.
    """

    def __init__(self, atoms: dict[str, ReaderAtoms]):
        self.atoms = atoms

    def elements_per_example(self, tap: Tap) -> int:
        return 2 * (tap.locations or 1) * tap.taps * tap.in_channels

    def contributions(self, tap: Tap, patches: tf.Tensor, deltas: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        atoms = self.atoms.get(tap.name)
        if tap.kind not in _READER_KINDS or atoms is None:
            return {}
        kernel = tf.cast(tf.reshape(tap.layer.kernel, [tap.taps, tap.in_channels, tap.out_channels]), patches.dtype)
        back = tf.einsum("bto,kco->btkc", deltas, kernel)
        per_position = tf.cast(tf.einsum("btkc,btkc->bc", patches, back), tf.float64)
        derivative = per_position @ tf.constant(atoms.indicator(tap.in_channels))  # (B, atoms): summed, then squared
        return {"squares": tf.reduce_sum(weights[:, None] * derivative**2, axis=0)}

    def finalize(self, tap: Tap, sums: dict[str, np.ndarray], num_examples: float, fisher: str) -> np.ndarray | None:
        return 0.5 * sums["squares"] / num_examples if "squares" in sums else None


def collect_channel_fisher(model: Any, data: Any, **options: Any) -> StatisticsResult:
    """``{reader: S (atoms,)}``, the channel Fisher of each atom of each reader (order: `reader_atoms`).

    Takes the arguments of `collect_kfac` except ``full_input_factor`` and
    ``precision`` (``fisher``, ``num_batches``, ``batch_size``, ``seed``,
    ``graph``, ``verbose``, ...), in one calibration pass.
    """
    if options.get("graph") is None:
        with warnings.catch_warnings():  # pruning-handler warnings do not concern statistics
            warnings.simplefilter("ignore")
            options["graph"] = DependencyGraph(model)
    statistic = ChannelFisherStatistic(reader_atoms(options["graph"]))
    result = run_statistics(model, data, [statistic], **options)[0]
    return StatisticsResult({name: value for name, value in result.items() if value is not None},
                            num_examples=result.num_examples, num_batches=result.num_batches,
                            seconds=result.seconds, fisher=result.fisher, likelihood=result.likelihood)


def group_channel_fisher(graph: DependencyGraph, result: StatisticsResult) -> dict[str, np.ndarray]:
    """``{group id: (size,)}``: each channel's ``S`` summed over the readers of its group.

    A group that no scored reader reads (its readers are layers the
    statistics cannot tap) has no score, so the ranking leaves it whole,
    with a warning: a zero would remove it first.
    """
    scores = {group.id: np.zeros(group.size) for group in graph.prunable_groups}
    measured = set()
    for reader, atoms in reader_atoms(graph).items():
        values = result.get(reader)
        if values is None:
            continue
        for (group_id, channel), value in zip(atoms.keys, values):
            scores[group_id][channel] += value
            measured.add(group_id)
    unmeasured = sorted(set(scores) - measured)
    if unmeasured:
        warnings.warn(
            f"keras_autoprune: the channel Fisher reaches no reader of group(s) {unmeasured} (read only by layers "
            "the statistics cannot tap); they are not pruned. scorer='nap' also reads their producers, which may be "
            "tapped.",
            stacklevel=2,
        )
    return {group_id: score for group_id, score in scores.items() if group_id in measured}
