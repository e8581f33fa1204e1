"""RED stage 3, approximate (``separation_tolerance > 0``): low-rank depthwise separation.

For input channel ``c`` of a convolution with ``K`` taps, the kernels it
sends to the ``C_out`` outputs form a matrix

    A_c[t, o] = W[t, c, o],      A_c ∈ R^(K × C_out).

Stage 3's block (a depthwise convolution applying ``M`` kernels to each
channel, then a 1×1 convolution; `keras_autoprune.red.separation`) computes
the kernel

    W̃[t, c, o] = Σ_{m<M} D[t, c, m] · P[c, m, o],

whose every ``Ã_c`` has rank at most ``M``. The exact separation finds it
when hashing left at most ``M`` distinct kernels per channel; here it is
the closest such kernel (Eckart–Young): the SVD ``A_c = Σ_j s_cj u_cj v_cjᵀ``
truncated to its ``M`` largest terms, ``D[:, c, m] = s_cm u_cm`` and
``P[c, m, :] = v_cm``, with the relative squared error

    ε(M) = Σ_c Σ_{j≥M} s_cj² / Σ_c Σ_j s_cj².

Decision (rank per layer): one ``M`` per layer, the smallest with
``ε(M) ≤ tolerance``, kept only where its block costs fewer FLOPs than the
convolution (``M·(K + C_out) < K·C_out``, counted by
`keras_autoprune.flops_formulas.call_flops`). One ``M`` because the block
has one multiplier; allocating ranks greedily by the least error per FLOP
saved instead landed on the same accuracy-FLOPs curve on the converged
ResNet-20 (docs/methods/red.md). The 1×1 part is then usually refitted on
synthesized images (`keras_autoprune.red.reconstruction`).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.graph.handlers import CallInfo
from keras_autoprune.red.separation import Separation, replace_candidates, separated_block
from keras_autoprune.surgery import LayerReplacement
from keras_autoprune.surgery.weights import layer_weights


def channel_svd(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SVD of every input channel's ``K × C_out`` kernel matrix ``A_c``, in float64.

    Args:
        kernel: ``(*taps, C_in, C_out)``.

    Returns:
        ``(u, s, vt)`` of shapes ``(C_in, K, r)``, ``(C_in, r)``,
        ``(C_in, r, C_out)`` with ``r = min(K, C_out)``, singular values in
        decreasing order: ``A_c = u[c] @ diag(s[c]) @ vt[c]``.
    """
    taps = int(np.prod(kernel.shape[:-2]))
    matrices = np.moveaxis(kernel.reshape((taps,) + kernel.shape[-2:]), 1, 0).astype(np.float64)  # (C_in, K, C_out)
    return np.linalg.svd(matrices, full_matrices=False)


def relative_errors(singular: np.ndarray) -> np.ndarray:
    """``ε(M)`` for ``M = 0 … r``: the energy of the dropped singular values over the total (0 for a zero kernel).

    >>> relative_errors(np.array([[2.0, 1.0], [1.0, 0.0]])).round(3).tolist()
    [1.0, 0.167, 0.0]
    """
    energy = (singular**2).sum(axis=0)  # per rank position, summed over channels
    total = energy.sum()
    if total == 0:
        return np.zeros(len(energy) + 1)
    dropped = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # exactly 0 at full rank
    return np.clip(dropped / total, 0.0, 1.0)


def low_rank_layer(layer: keras.layers.Layer, name: str, call: CallInfo, calls: int,
                   tolerance: float) -> tuple[LayerReplacement, Separation] | None:
    """The rank-``M`` depthwise + 1×1 replacement of ``layer`` (smallest ``M`` with ``ε(M) ≤ tolerance``), or None.

    None when even that ``M`` costs at least the convolution's FLOPs.
    """
    weights = layer_weights(layer)
    kernel = weights["kernel"]
    u, s, vt = channel_svd(kernel)
    errors = relative_errors(s)
    rank = max(1, int(np.argmax(errors <= tolerance)))  # errors[-1] == 0, so some M qualifies
    depthwise, pointwise = block_factors((u, s, vt), rank, kernel.shape, kernel.dtype)
    found = separated_block(layer, depthwise, pointwise, weights.get("bias"), call, calls)
    if found is None:
        return None
    replacement, before, after = found
    c_in = kernel.shape[-2]
    return replacement, Separation(name, rank, rank * c_in, before, after, kernel_error=float(errors[rank]))


def block_factors(svd: tuple[np.ndarray, np.ndarray, np.ndarray], rank: int, kernel_shape: tuple[int, ...],
                  dtype) -> tuple[np.ndarray, np.ndarray]:
    """The block's ``(depthwise, pointwise)`` kernels of the rank-``rank`` truncation of `channel_svd`'s ``svd``.

    ``depthwise`` is ``(*taps, M·C_in, 1)`` and ``pointwise`` ``(1, …, M·C_in, C_out)``: slot ``(c, m)`` is
    channel ``m·C_in + c`` of the tiled input, with ``D[:, c, m] = s_cm u_cm`` and ``P[c, m, :] = v_cm``.
    """
    u, s, vt = svd
    c_in, c_out = kernel_shape[-2:]
    taps_shape = tuple(kernel_shape[:-2])
    depthwise = (u[:, :, :rank] * s[:, None, :rank]).transpose(2, 0, 1).reshape(rank * c_in, -1)  # (M·C_in, K)
    depthwise = depthwise.T.reshape(taps_shape + (rank * c_in, 1)).astype(dtype)
    pointwise = vt[:, :rank, :].transpose(1, 0, 2).reshape(rank * c_in, c_out)
    pointwise = pointwise.reshape((1,) * len(taps_shape) + (rank * c_in, c_out)).astype(dtype)
    return depthwise, pointwise


def separate_low_rank(model: keras.Model, tolerance: float, graph: DependencyGraph | None = None,
                      keep=None) -> tuple[keras.Model, list[Separation]]:
    """Separates every candidate convolution of ``model`` at the lowest rank within ``tolerance`` that lowers FLOPs.

    Args:
        model: a built Sequential or Functional model (left unchanged);
            blocks separated exactly before are no longer convolutions and
            stay as they are.
        tolerance: the largest relative squared kernel error ``ε(M)`` a
            layer may take, in ``[0, 1]``.
        graph: ``DependencyGraph(model)`` if already built.
        keep: as in `keras_autoprune.red.separation.separate_depthwise`.

    Returns:
        ``(new_model, separations)``; ``Separation.kernel_error`` is each
        layer's ``ε(M)``.
    """
    return replace_candidates(
        model, graph, lambda layer, name, call, calls: low_rank_layer(layer, name, call, calls, tolerance), keep)
