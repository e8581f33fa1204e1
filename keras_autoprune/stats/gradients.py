"""Gradient statistics of layers, from the same calibration pass as K-FAC.

With ``ℓ_b = −log p(y_b|x_b)`` (labels sampled or real, as for K-FAC) and
the per-example gradient of the layer's parameters
``g_b = ∂ℓ_b/∂W̃ = Σ_t a_bt δ_btᵀ`` (`taps.weight_matrix` layout):

    kernel_sq_grad, bias_sq_grad = Σ_b w_b g_b² / Σ_b w_b   (diagonal Fisher, C-OBD's F_ij)
    kernel_grad, bias_grad       = Σ_b w_b g_b  / Σ_b w_b   (the full-data gradient)

Per-example gradients exist only transiently, one chunk of examples at a time
(the chunk size accounts for them); they are never stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.stats.engine import StatisticsResult, run_statistics
from keras_autoprune.stats.taps import Tap, split_weight_matrix


@dataclasses.dataclass(frozen=True)
class GradientStats:
    """Gradient statistics of one layer (formulas in the module docstring).

    Attributes:
        layer_name: qualified layer name.
        kind: the layer kind (as in `KFACFactors`).
        kernel_sq_grad: mean squared per-example gradient, kernel-shaped.
        bias_sq_grad: same for the bias (None without bias).
        kernel_grad: mean gradient, kernel-shaped.
        bias_grad: mean gradient of the bias (None without bias).
        num_examples: examples seen (sum of sample weights).
        fisher: ``"true"`` or ``"empirical"``.
    """

    layer_name: str
    kind: str
    kernel_sq_grad: np.ndarray
    bias_sq_grad: np.ndarray | None
    kernel_grad: np.ndarray
    bias_grad: np.ndarray | None
    num_examples: float
    fisher: str

    def filter_sq_grad_norm(self) -> np.ndarray:
        """``E_b ‖∂ℓ_b/∂w_i‖²`` per output channel ``i`` (kernel slice + bias)."""
        return self._per_filter(self.kernel_sq_grad, self.bias_sq_grad)

    def filter_grad_norm(self) -> np.ndarray:
        """``‖E_b ∂ℓ_b/∂w_i‖`` per output channel ``i`` (kernel slice + bias)."""
        squares = self._per_filter(self.kernel_grad**2, None if self.bias_grad is None else self.bias_grad**2)
        return np.sqrt(squares)

    def _per_filter(self, kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        if self.kind == "depthwise_conv2d":  # output channel c*M + m reads kernel[:, :, c, m]
            per = kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1]).sum(axis=0)
        else:
            per = kernel.reshape(-1, kernel.shape[-1]).sum(axis=0)
        return per + (bias if bias is not None else 0.0)


class GradientStatistic:
    """The gradient sums of the calibration pass (see `engine.Statistic`)."""

    def elements_per_example(self, tap: Tap) -> int:
        size = (tap.taps + 1) * tap.in_channels * tap.multiplier
        return size if tap.depthwise else (tap.taps * tap.in_channels + 1) * tap.out_channels

    def contributions(self, tap: Tap, patches: tf.Tensor, deltas: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        patches, deltas = tf.cast(patches, tf.float64), tf.cast(deltas, tf.float64)
        shape = tf.shape(patches)
        if tap.depthwise:
            x = patches
            if tap.has_bias:
                x = tf.concat([x, tf.ones([shape[0], shape[1], 1, tap.in_channels], x.dtype)], axis=2)
            d = tf.reshape(deltas, [shape[0], shape[1], tap.in_channels, tap.multiplier])
            per_example = tf.einsum("btkc,btcm->bckm", x, d)
            w = weights[:, None, None, None]
        else:
            x = tf.reshape(patches, [shape[0], shape[1], tap.taps * tap.in_channels])
            if tap.has_bias:
                x = tf.concat([x, tf.ones([shape[0], shape[1], 1], x.dtype)], axis=2)
            per_example = tf.einsum("btd,bto->bdo", x, deltas)
            w = weights[:, None, None]
        return {
            "sq": tf.reduce_sum(w * per_example**2, axis=0),
            "mean": tf.reduce_sum(w * per_example, axis=0),
        }

    def finalize(self, tap: Tap, sums: dict[str, np.ndarray], num_examples: float, fisher: str) -> GradientStats:
        examples = num_examples
        kernel_shape = tuple(int(d) for d in tap.layer.kernel.shape)
        sq_kernel, sq_bias = split_weight_matrix(sums["sq"] / examples, kernel_shape, tap.has_bias, tap.depthwise)
        kernel, bias = split_weight_matrix(sums["mean"] / examples, kernel_shape, tap.has_bias, tap.depthwise)
        if tap.has_bias:  # a MultiHeadAttention projection's bias has several axes
            bias_shape = tuple(tap.layer.bias.shape)
            sq_bias, bias = sq_bias.reshape(bias_shape), bias.reshape(bias_shape)
        return GradientStats(tap.name, tap.kind, sq_kernel, sq_bias, kernel, bias, examples, fisher)


def collect_gradient_stats(
    model: keras.Model,
    data: Any,
    *,
    layers: Sequence[Any] | None = None,
    fisher: str = "true",
    num_batches: int | None = None,
    batch_size: int = 32,
    loss: Any = None,
    loss_weights: Any = None,
    seed: int = 0,
    chunk_size: int | None = None,
    graph: DependencyGraph | None = None,
    verbose: int = 1,
) -> StatisticsResult:
    """Per-layer `GradientStats` from one calibration pass.

    Arguments are those of `keras_autoprune.stats.collect_kfac` (use
    ``fisher="empirical"`` for gradients of the real training loss).

    Returns:
        A `StatisticsResult`: ``{qualified layer name: GradientStats}``.
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "data")}
    return run_statistics(model, data, [GradientStatistic()], **options)[0]
