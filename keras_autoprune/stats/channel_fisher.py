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
quadratic form (docs/methods/nap.md). Cross terms are left out between
channels, between readers of one channel (a residual stream read by several
blocks) and between the positions of a Flatten.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.stats.engine import StatisticsResult, run_statistics
from keras_autoprune.stats.taps import Tap

_READER_KINDS = ("dense", "conv1d", "conv2d")


class ChannelFisherStatistic:
    """``Σ_b w_b D_bc²`` per input channel of every reader (see the module docstring; `engine.Statistic`)."""

    def elements_per_example(self, tap: Tap) -> int:
        return 2 * (tap.locations or 1) * tap.taps * tap.in_channels

    def contributions(self, tap: Tap, patches: tf.Tensor, deltas: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        if tap.kind not in _READER_KINDS:
            return {}
        kernel = tf.cast(tf.reshape(tap.layer.kernel, [tap.taps, tap.in_channels, tap.out_channels]), patches.dtype)
        back = tf.einsum("bto,kco->btkc", deltas, kernel)
        derivative = tf.cast(tf.einsum("btkc,btkc->bc", patches, back), tf.float64)
        return {"squares": tf.reduce_sum(weights[:, None] * derivative**2, axis=0)}

    def finalize(self, tap: Tap, sums: dict[str, np.ndarray], num_examples: float, fisher: str) -> np.ndarray | None:
        return 0.5 * sums["squares"] / num_examples if "squares" in sums else None


def collect_channel_fisher(model: Any, data: Any, **options: Any) -> StatisticsResult:
    """``{reader layer name: S (Cin,)}``, the channel Fisher of each input channel of each reader.

    Takes the arguments of `collect_kfac` except ``full_input_factor`` and
    ``precision`` (``fisher``, ``num_batches``, ``batch_size``, ``seed``,
    ``graph``, ``verbose``, ...), in one calibration pass.
    """
    result = run_statistics(model, data, [ChannelFisherStatistic()], **options)[0]
    return StatisticsResult({name: value for name, value in result.items() if value is not None},
                            num_examples=result.num_examples, num_batches=result.num_batches,
                            seconds=result.seconds, fisher=result.fisher, likelihood=result.likelihood)


def group_channel_fisher(graph: DependencyGraph, result: StatisticsResult) -> dict[str, np.ndarray]:
    """``{group id: (size,)}``: each channel's ``S_c`` summed over the readers of its group."""
    scores = {}
    for group in graph.prunable_groups:
        total = np.zeros(group.size)
        for member in group.members:
            per_channel = result.get(member.layer)
            if member.side != "input" or member.tensor_index != 0 or per_channel is None:
                continue
            np.add.at(total, member.channels, per_channel[member.positions])
        scores[group.id] = total
    return scores
