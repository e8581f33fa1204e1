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

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import DependencyGraph, graph_of
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

    Raises:
        ValueError: a base that `check_bases` refuses (before any batch is read).
    """
    graph = graph_of(model, options.pop("graph", None))
    statistic = DirectionFisherStatistic(check_bases(model, bases, graph=graph))
    result = run_statistics(model, data, [statistic], layers=list(bases), graph=graph, **options)[0]
    return StatisticsResult({name: value for name, value in result.items() if value is not None},
                            num_examples=result.num_examples, num_batches=result.num_batches,
                            seconds=result.seconds, fisher=result.fisher, likelihood=result.likelihood)


def check_bases(model: Any, bases: dict[str, tuple[Any, Any]], tolerance: float = 1e-4,
                graph: DependencyGraph | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``bases`` as float64 arrays, after checking each against its layer.

    A base belongs to a Dense, Conv1D or Conv2D layer of ``model`` (not
    grouped), named as the dependency graph names it (``outer/inner`` inside
    nested models and traced custom layers) with kernel ``(..., C_in, C_out)``; ``Q_in`` is ``C_in × n_in``
    and ``Q_out`` is ``C_out × n_out``, finite, with orthonormal columns
    (``|QᵀQ − I| ≤ tolerance``): the scores are those of removing directions
    of an orthonormal basis, and any other matrix scores something else.

    Raises:
        ValueError: the first base that does not meet this, with its layer and what to pass instead.
    """
    layers = {record.name: record.operation for record in graph_of(model, graph).records}
    checked = {}
    for name, pair in bases.items():
        layer = layers.get(name)
        if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D)) or getattr(layer, "groups", 1) != 1:
            found = "no layer of that name" if layer is None else f"a {type(layer).__name__}" + (
                f" with groups={layer.groups}" if getattr(layer, "groups", 1) != 1 else "")
            raise ValueError(f"Expected bases of Dense, Conv1D or Conv2D layers (not grouped) of model {model.name!r}. "
                             f"Received: a base for {name!r}, {found}. Fix: key the bases by such layers' names.")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"Expected bases[{name!r}] to be a pair (Q_in, Q_out). Received: {type(pair).__name__}.")
        channels = tuple(int(d) for d in layer.kernel.shape[-2:])
        arrays = []
        for side, q, rows in zip(("Q_in", "Q_out"), pair, channels):
            q = np.asarray(q, np.float64)
            if q.ndim != 2 or q.shape[0] != rows or not 0 < q.shape[1] <= rows or not np.all(np.isfinite(q)):
                raise ValueError(f"Expected {side} of layer {name!r} to be a finite {rows} x n matrix with "
                                 f"1 <= n <= {rows}. Received: shape {q.shape}"
                                 + ("" if q.ndim != 2 or np.all(np.isfinite(q)) else " with NaN or inf entries") + ".")
            error = float(np.max(np.abs(q.T @ q - np.eye(q.shape[1]))))
            if error > tolerance:
                raise ValueError(f"Expected {side} of layer {name!r} to have orthonormal columns. Received: "
                                 f"max |QᵀQ - I| = {error:.3g}. Fix: orthonormalise it (np.linalg.qr(Q)[0]).")
            arrays.append(q)
        checked[name] = tuple(arrays)
    return checked
