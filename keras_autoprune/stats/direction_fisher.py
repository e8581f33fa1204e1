"""The exact Fisher of removing one eigen-direction of a layer (EigenDamage's ``scorer="fisher"``).

EigenDamage writes a layer's kernel in bases ``Q_in`` (``Cin × n_in``) and
``Q_out`` (``Cout × n_out``) with orthonormal columns: the core kernel is
``W*_k = Q_inᵀ W_k Q_out`` per tap ``k``, and removing in-direction ``j``
(out-direction ``i``) zeroes row ``j`` (column ``i``) of every ``W*_k``.
Put a gate ``m_j`` on that row; for one example ``b`` the change of the loss
to first order is ``−D_bj`` with

    D_bj = ∂ℓ_b/∂m_j = Σ_k Σ_i (Q_inᵀ Γ_bk Q_out)_ji W*_kji,
    Γ_bk = Σ_t a_btk δ_btᵀ      (the example's kernel gradient at tap k)

and likewise ``D_bi = Σ_k Σ_j (Q_inᵀ Γ_bk Q_out)_ji W*_kji`` for an
out-direction. The score is the exact Fisher quadratic form along the
removal, ``S = ½ E_b[D_b²]`` (true Fisher: labels sampled from the model;
empirical: the real ones), the locations summed **before** squaring, as
the channel Fisher does for channels (`stats.channel_fisher`). K-FAC's
eigenbasis importance ``Σ (W*_kji)² s_A,j s_G,i`` is the same quantity
under K-FAC's factorisation (locations independent, ``a`` independent of
``δ``); this one makes neither assumption.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from keras_autoprune.stats.engine import StatisticsResult, run_statistics
from keras_autoprune.stats.taps import Tap

_KINDS = ("dense", "conv1d", "conv2d")


class DirectionFisherStatistic:
    """``Σ_b w_b D_b²`` for every in- and out-direction of the layers in ``bases`` (`engine.Statistic`).

    Args:
        bases: ``{layer name: (Q_in, Q_out)}``, orthonormal columns (a layer not in it is not scored).
    """

    def __init__(self, bases: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.bases = bases

    def elements_per_example(self, tap: Tap) -> int:
        return 2 * tap.taps * tap.in_channels * tap.out_channels + (tap.locations or 1) * tap.out_channels

    def contributions(self, tap: Tap, patches: tf.Tensor, deltas: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        if tap.kind not in _KINDS or tap.name not in self.bases:
            return {}
        q_in, q_out = (tf.constant(q, patches.dtype) for q in self.bases[tap.name])
        kernel = tf.cast(tf.reshape(tap.layer.kernel, [tap.taps, tap.in_channels, tap.out_channels]), patches.dtype)
        core = tf.einsum("kco,cj,oi->kji", kernel, q_in, q_out)
        gradient = tf.einsum("btkc,bto->bkco", patches, deltas)  # Γ_bk, every example's own kernel gradient
        gated = tf.einsum("bkco,cj,oi->bkji", gradient, q_in, q_out) * core[None]
        into = tf.cast(tf.reduce_sum(gated, axis=[1, 3]), tf.float64)  # D_bj, in-directions
        out = tf.cast(tf.reduce_sum(gated, axis=[1, 2]), tf.float64)  # D_bi, out-directions
        return {"in": tf.reduce_sum(weights[:, None] * into**2, axis=0),
                "out": tf.reduce_sum(weights[:, None] * out**2, axis=0)}

    def finalize(self, tap: Tap, sums: dict[str, np.ndarray], num_examples: float, fisher: str):
        if "in" not in sums:
            return None
        return 0.5 * sums["in"] / num_examples, 0.5 * sums["out"] / num_examples


def collect_direction_fisher(model: Any, data: Any, bases: dict[str, tuple[np.ndarray, np.ndarray]],
                             **options: Any) -> StatisticsResult:
    """``{layer: (S_in (n_in,), S_out (n_out,))}``: the Fisher of removing each direction (module docstring).

    Args:
        model: the model whose kernels the bases rotate (during fit: the projected model).
        data: calibration data, as for `collect_kfac`.
        bases: ``{layer name: (Q_in, Q_out)}`` of Dense, Conv1D or Conv2D layers.
        **options: `collect_kfac`'s ``fisher``, ``num_batches``, ``batch_size``, ``seed``, ``graph``, ``verbose``.
    """
    statistic = DirectionFisherStatistic({name: (np.asarray(a), np.asarray(b)) for name, (a, b) in bases.items()})
    result = run_statistics(model, data, [statistic], layers=list(bases), **options)[0]
    return StatisticsResult({name: value for name, value in result.items() if value is not None},
                            num_examples=result.num_examples, num_batches=result.num_batches,
                            seconds=result.seconds, fisher=result.fisher, likelihood=result.likelihood)
