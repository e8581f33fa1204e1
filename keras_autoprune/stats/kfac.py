"""K-FAC curvature factors of Dense, Conv1D, Conv2D and DepthwiseConv2D layers.

(And of the query/key/value/output projections of a MultiHeadAttention,
read as Dense layers on their flattened feature axes: `taps`.)

A layer computes ``s_t = W̃ᵀ a_t`` at each of its ``T`` output locations,
with ``W̃ = [kernel.reshape(-1, Cout); bias]`` of shape ``(D, Cout)`` and
``a_t`` the im2col patch ordered ``(kh, kw, Cin)`` followed by a constant 1
when the layer has a bias (``D = kh·kw·Cin [+1]``). With
``δ_t = ∂(−log p(y|x))/∂s_t`` (before the built-in activation, before any
following BatchNorm) and sample weights ``w_b`` (1 by default):

    A = Σ_{b,t} w_b a_bt a_btᵀ / Σ_b w_b T_b      (mean over examples and locations)
    G = Σ_{b,t} w_b δ_bt δ_btᵀ / Σ_b w_b           (= T · Σ δδᵀ/(B·T))
    F ≈ A ⊗ G                                     (no further scaling)

over the row-major ``vec(W̃)`` (``W̃.ravel()``, so ``np.kron(A, G)``). This is
the convention of tensorflow/kfac and kfac-jax (both factors averaged over
``B·T`` rows, the block scaled by ``T``), with the ``T`` kept inside ``G``;
it is the same for every layer, so saliencies are comparable across layers.
For Dense layers ``T`` is the product of the input's middle axes (1 for 2-D
inputs); a layer called several times (shared) counts each call's locations.

The channel-only factor used by EigenDamage reads the patches as rows of
length ``Cin``: ``A_c = Σ_{b,t,k} w_b x_btk x_btkᵀ / (K Σ_b w_b T_b)``, i.e.
the mean of the ``K = kh·kw`` diagonal ``Cin×Cin`` blocks of ``A``; the bias
is not included.

DepthwiseConv2D (depth multiplier ``M``): input channel ``c`` feeds outputs
``c·M … c·M+M-1`` only, so its Fisher is block-diagonal over channels and
each block is factored on its own: ``A[c]`` is ``(K[+1])×(K[+1])`` over the
channel's patches ``(kh, kw)`` (+1), ``G[c]`` is ``M×M``, and
``W̃[c] = [kernel[:, :, c, :].reshape(K, M); bias[c·M:(c+1)·M]]``; there is
no ``A_c``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.stats.curvature import symmetrize
from keras_autoprune.stats.engine import StatisticsResult, run_statistics
from keras_autoprune.stats.taps import Tap, weight_matrix


@dataclasses.dataclass(frozen=True)
class KFACFactors:
    """K-FAC factors of one layer (see the module docstring for the formulas).

    Attributes:
        layer_name: qualified layer name (``outer/inner`` in nested models).
        kind: ``"dense"``, ``"conv1d"``, ``"conv2d"``, ``"depthwise_conv2d"``
            or ``"einsum_dense"`` (a MultiHeadAttention projection).
        A: input factor ``(D, D)``, ``D = K·Cin [+1]``, bias row last; depthwise:
            ``(Cin, K[+1], K[+1])``; None when only ``A_channel`` was collected.
        A_channel: channel-only factor ``(Cin, Cin)``; None for depthwise.
        G: output factor ``(Cout, Cout)``; depthwise: ``(Cin, M, M)``.
        num_locations: mean output locations per example ``T``.
        num_examples: examples seen (sum of sample weights).
        has_bias: whether ``A`` has the trailing bias row/column.
        kernel_shape: the layer's kernel shape.
        fisher: ``"true"`` or ``"empirical"``.
    """

    layer_name: str
    kind: str
    A: np.ndarray | None
    A_channel: np.ndarray | None
    G: np.ndarray
    num_locations: float
    num_examples: float
    has_bias: bool
    kernel_shape: tuple[int, ...]
    fisher: str

    @property
    def depthwise(self) -> bool:
        return self.kind == "depthwise_conv2d"

    def weight_matrix(self, kernel: Any, bias: Any = None) -> np.ndarray:
        """``W̃`` in the layout of the factors (float64).

        Args:
            kernel: the layer's kernel (shape `kernel_shape`).
            bias: its bias, required when `has_bias`.

        Returns:
            ``(D, Cout)``; depthwise: ``(Cin, K[+1], M)``.
        """
        kernel = np.asarray(kernel)
        if kernel.shape != self.kernel_shape:
            raise ValueError(f"Expected a kernel of shape {self.kernel_shape}. Received: shape {kernel.shape}.")
        if self.has_bias and bias is None:
            raise ValueError(f"Expected the bias of layer '{self.layer_name}'. Received: bias=None.")
        out_channels = None if self.depthwise else self.G.shape[0]
        return weight_matrix(kernel, bias if self.has_bias else None, self.depthwise, out_channels)

    @property
    def patch_layout(self) -> tuple[int, int]:
        """``(K, Cin)``: kernel positions and input channels of a patch (rows of ``W̃`` are ``k·Cin + c``)."""
        if self.kind == "einsum_dense":  # a MultiHeadAttention projection: one position, flattened inputs
            return 1, int(np.prod(self.kernel_shape)) // self.G.shape[0]
        return int(np.prod(self.kernel_shape[:-2])), self.kernel_shape[-2]

    def fisher_block(self) -> np.ndarray:
        """``A ⊗ G`` over the row-major ``vec(W̃)``; depthwise: one block per channel."""
        if self.A is None:
            raise ValueError(
                f"Expected the full input factor A of layer '{self.layer_name}'. Received: A=None "
                "(collected with full_input_factor=False). Fix: collect_kfac(..., full_input_factor=True)."
            )
        if self.depthwise:
            return np.stack([np.kron(a, g) for a, g in zip(self.A, self.G)])
        return np.kron(self.A, self.G)


PRECISIONS = ("auto", "float32", "float64")
"""Dtypes of the per-chunk K-FAC products (`collect_kfac`'s ``precision``)."""

APPROXIMATIONS = ("expand", "reduce")
"""How K-FAC treats the locations of a layer with weight sharing (`collect_kfac`'s ``approximation``)."""


class KFACStatistic:
    """The K-FAC sums of the calibration pass (see `engine.Statistic`)."""

    def __init__(self, full_input_factor: bool = True, precision: str = "auto", approximation: str = "expand"):
        if precision not in PRECISIONS:
            raise ValueError(f"Expected precision to be one of {PRECISIONS}. Received: precision={precision!r}")
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"Expected approximation to be one of {APPROXIMATIONS}. Received: approximation={approximation!r}")
        self.full_input_factor = full_input_factor
        self.dtype = None if precision == "auto" else tf.as_dtype(precision)
        self.approximation = approximation

    def elements_per_example(self, tap: Tap) -> int:
        return (tap.locations or 1) * (tap.taps + 1) * tap.in_channels

    def contributions(self, tap: Tap, patches: tf.Tensor, deltas: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        if self.approximation == "reduce":  # one row per example: the mean patch, the summed δ
            patches = tf.reduce_mean(patches, axis=1, keepdims=True)
            deltas = tf.reduce_sum(deltas, axis=1, keepdims=True)
        rows = tf.cast(tf.shape(patches)[1], tf.float64)
        sums = {"rows": tf.reduce_sum(weights) * rows}
        dtype = self.dtype or patches.dtype  # "auto": the layer's own float32 (float64 for float64 layers)
        patches, deltas = tf.cast(patches, dtype), tf.cast(deltas, dtype)
        root = tf.sqrt(tf.cast(weights, dtype))
        shape = tf.shape(patches)
        row_root = tf.reshape(tf.broadcast_to(root[:, None], shape[:2]), [-1, 1])
        patches = patches * root[:, None, None, None]
        deltas = deltas * root[:, None, None]
        if tap.depthwise:
            x = tf.reshape(patches, [-1, tap.taps, tap.in_channels])
            if tap.has_bias:
                x = tf.concat([x, tf.broadcast_to(row_root[:, :, None], [tf.shape(x)[0], 1, tap.in_channels])], axis=1)
            d = tf.reshape(deltas, [-1, tap.in_channels, tap.multiplier])
            sums["A"] = tf.einsum("nkc,nlc->ckl", x, x)
            sums["G"] = tf.einsum("ncm,ncl->cml", d, d)
            return sums
        d = tf.reshape(deltas, [-1, tap.out_channels])
        sums["G"] = tf.matmul(d, d, transpose_a=True)
        if self.full_input_factor:
            x = tf.reshape(patches, [-1, tap.taps * tap.in_channels])
            if tap.has_bias:
                x = tf.concat([x, row_root], axis=1)
            sums["A"] = tf.matmul(x, x, transpose_a=True)
        else:
            x = tf.reshape(patches, [-1, tap.in_channels])
            sums["A_channel"] = tf.matmul(x, x, transpose_a=True)
        return sums

    def finalize(self, tap: Tap, sums: dict[str, np.ndarray], num_examples: float, fisher: str) -> KFACFactors:
        rows, examples = float(sums["rows"]), num_examples
        A = sums["A"] / rows if "A" in sums else None
        if tap.depthwise:
            A_channel = None
        elif A is not None:
            c = tap.in_channels
            blocks = A[: tap.taps * c, : tap.taps * c].reshape(tap.taps, c, tap.taps, c)
            A_channel = np.einsum("kikj->ij", blocks) / tap.taps
        else:
            A_channel = sums["A_channel"] / (rows * tap.taps)
        return KFACFactors(
            layer_name=tap.name,
            kind=tap.kind,
            A=_symmetric(A),
            A_channel=_symmetric(A_channel),
            G=_symmetric(sums["G"] / examples),
            num_locations=rows / examples,
            num_examples=examples,
            has_bias=tap.has_bias,
            kernel_shape=tuple(int(d) for d in tap.layer.kernel.shape),
            fisher=fisher,
        )


def _symmetric(matrix: np.ndarray | None) -> np.ndarray | None:
    return None if matrix is None else symmetrize(matrix)


def collect_kfac(
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
    full_input_factor: bool = True,
    precision: str = "auto",
    approximation: str = "expand",
    chunk_size: int | None = None,
    graph: DependencyGraph | None = None,
    verbose: int = 1,
) -> StatisticsResult:
    """K-FAC factors of a model's layers from one calibration pass.

    Args:
        model: a built Sequential or Functional model (nested models, several
            outputs and `tf.distribute` strategies are fine), run in inference
            mode.
        data: calibration batches, see `keras_autoprune.stats.calibration`.
        layers: qualified names or layer objects; None: every Dense, Conv1D,
            Conv2D and DepthwiseConv2D layer (grouped/quantized ones skipped).
        fisher: ``"true"`` (labels sampled from the model, seeded; labels in
            ``data`` are optional and ignored) or ``"empirical"`` (the labels
            in ``data``). A loss that defines no distribution (not a
            cross-entropy, MSE or MAE: `keras_autoprune.stats.loss`) always
            gives the empirical Fisher; the result's ``fisher`` says which.
        num_batches: stop after this many batches (None: all of ``data``).
        batch_size: batch size for in-memory arrays.
        loss: the loss defining ``p(y|x)``, as `keras.Model.compile` takes
            it (per output for several); None reads the compiled loss.
        loss_weights: per-output weights; None: the compiled ones (with
            ``loss=None``) or 1.
        seed: seed of the label sampling (true Fisher).
        full_input_factor: also compute the full ``A``; False computes only
            ``A_channel`` (saves memory for wide convolutions; depthwise layers
            keep their small per-channel ``A``).
        precision: dtype of the per-chunk products ``Σ aaᵀ``, ``Σ δδᵀ``:
            ``"auto"`` (default: the layers' own precision, float32 for
            float32 and mixed-precision models, float64 for float64 models),
            ``"float32"`` or ``"float64"`` (exact sums of float32
            activations; 1.8-3.1x slower on CPU: 113 vs 63 s on the
            benchmark's MobileNetV2, 44 vs 14 s on its ResNet-20, 1,024
            images, with NAP saliencies within 6e-6 relative of each other);
            sums across chunks and batches are float64 either way.
        approximation: how the ``T`` locations of a convolution (or of a
            Dense on sequences) enter the factors (Eschenhagen et al., 2023).
            ``"expand"`` (default; the classic KFC): every location is a
            row, ``A = E_b[(1/T) Σ_t a_bt a_btᵀ]``, ``G = E_b[Σ_t δ_bt δ_btᵀ]``,
            which treats the locations as independent. ``"reduce"``: one row
            per example, ``A = E_b[ā_b ā_bᵀ]`` with ``ā_b = (1/T) Σ_t a_bt``
            and ``G = E_b[(Σ_t δ_bt)(Σ_t δ_bt)ᵀ]``, exact for one example
            when ``a_bt`` does not depend on ``t``; it keeps the coherent
            (mean) part of a change over the locations that "expand" loses
            (docs/methods/eigendamage.md). ``num_locations`` is then 1.
        chunk_size: examples per forward/backward call; None picks it from a
            256 MiB budget for the im2col patches.
        graph: ``DependencyGraph(model)`` if already built.
        verbose: 0 silent, 1 progress bar, 2 one line at the end.

    Returns:
        A `StatisticsResult` (a dict ``{qualified layer name: KFACFactors}``,
        in topological order, with ``seconds``, ``num_examples``,
        ``num_batches``).

    Example:

    >>> factors = collect_kfac(model, dataset, num_batches=10)  # doctest: +SKIP
    >>> f = factors["conv1"]; f.A.shape, f.G.shape                # doctest: +SKIP
    ((28, 28), (16, 16))
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "data", "full_input_factor", "precision", "approximation")}
    return run_statistics(model, data, [KFACStatistic(full_input_factor, precision, approximation)], **options)[0]
