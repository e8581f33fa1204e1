"""Classic curvature baselines for output channels (EigenDamage paper, §5).

A layer computes ``s = W̃ᵀ a`` with ``W̃`` of shape ``(D, C_out)``, the
layout of `stats.weight_matrix` and `scoring.obs`: rows follow the K-FAC input
``a`` (the im2col patch ``(kh, kw, C_in)``, plus a last row for the bias when
``a`` carries a constant 1), column ``i`` is output channel ``i``'s weights
``w_i``. K-FAC gives ``F ≈ A ⊗ G`` over ``vec(W̃)`` (``A`` is ``D×D``, ``G``
is ``C_out×C_out``). The score of output channel ``i`` (all of column ``i``):

======== ================================================= =====================
name     score of channel i                                Fisher / removal
======== ================================================= =====================
C-OBD    ``½ Σ_j W_ji² F_ji``, ``F_ji = A_jj G_ii``          diagonal, no compensation
C-OBS    ``½ Σ_j W_ji² / ([A⁻¹]_jj [G⁻¹]_ii)``               diagonal of ``F⁻¹``, per weight
Kron-OBD ``½ G_ii · w_iᵀ A w_i``                             Kronecker, no compensation
Kron-OBS ``½ w_iᵀ A w_i / [G⁻¹]_ii``                         Kronecker, OBS on the channel
======== ================================================= =====================

Decisions:

- **Units.** Every score carries the ``½`` of the quadratic model
  ``ΔL = ½ ΔwᵀFΔw``, as NAP's saliencies do (`scoring.obs`), so all scorers
  estimate a loss increase and rank consistently across layers; Kron-OBS is
  exactly NAP's output-side saliency ``w_iᵀ A w_i / (2 [G⁻¹]_ii)``, and
  C-OBS is the column sum of NAP's per-weight saliency (`weight_saliency`).
- **Diagonal Fisher of C-OBD.** The diagonal of the K-FAC block,
  ``diag(A ⊗ G)_{ji} = A_jj G_ii``: it needs no statistic beyond the
  factors, and the four scorers then differ only in how much of the same
  ``A ⊗ G`` they use. (The exact diagonal ``E[(∂L/∂W_ji)²]`` would need
  per-example squared gradients, a different calibration statistic.)
- **Inverses.** The OBS scorers take the inverses they are given (NAP passes
  its damped ``A'⁻¹, G'⁻¹``, `stats.damped_inverses`); the OBD scorers use the
  undamped factors, as there is nothing to invert.

With diagonal ``A`` and ``G`` (and exact inverses) the four coincide:
``[A⁻¹]_jj = 1/A_jj`` and ``w_iᵀ A w_i = Σ_j A_jj W_ji²``.

Every function accepts stacks ``(..., D, C_out)`` with factors
``(..., D, D)`` and ``(..., C_out, C_out)`` (the per-channel blocks of
depthwise layers) and returns ``(..., C_out)``.
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.scoring.obs import weight_saliency


def c_obd(weights: np.ndarray, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """C-OBD: ``½ Σ_j W_ji² A_jj G_ii`` (OBD with the K-FAC diagonal Fisher).

    Args:
        weights: ``W̃``, ``(D, C_out)``.
        a: the ``(D, D)`` input factor ``A``.
        g: the ``(C_out, C_out)`` output factor ``G``.

    Returns:
        ``(C_out,)`` scores, higher = more important.
    """
    return 0.5 * np.einsum("...ji,...j,...i->...i", weights**2, _diagonal(a), _diagonal(g))


def c_obs(weights: np.ndarray, a_inv: np.ndarray, g_inv: np.ndarray) -> np.ndarray:
    """C-OBS: ``½ Σ_j W_ji² / ([A⁻¹]_jj [G⁻¹]_ii)``, the sum of per-weight OBS saliencies.

    Args:
        weights: ``W̃``, ``(D, C_out)``.
        a_inv: the (damped) inverse input factor, ``(D, D)``.
        g_inv: the (damped) inverse output factor, ``(C_out, C_out)``.

    Returns:
        ``(C_out,)`` scores.
    """
    return weight_saliency(weights, _diagonal(a_inv), _diagonal(g_inv)).sum(axis=-2)


def kron_obd(weights: np.ndarray, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Kron-OBD: ``½ G_ii · w_iᵀ A w_i`` (OBD on the channel under ``F = A ⊗ G``).

    Args:
        weights: ``W̃``, ``(D, C_out)``.
        a: the ``(D, D)`` input factor ``A``.
        g: the ``(C_out, C_out)`` output factor ``G``.

    Returns:
        ``(C_out,)`` scores.
    """
    return 0.5 * _quadratic(weights, a) * _diagonal(g)


def kron_obs(weights: np.ndarray, a: np.ndarray, g_inv: np.ndarray) -> np.ndarray:
    """Kron-OBS: ``½ w_iᵀ A w_i / [G⁻¹]_ii`` (NAP's output-side saliency).

    Args:
        weights: ``W̃``, ``(D, C_out)``.
        a: the ``(D, D)`` input factor ``A``.
        g_inv: the (damped) inverse output factor, ``(C_out, C_out)``.

    Returns:
        ``(C_out,)`` scores.
    """
    return 0.5 * _quadratic(weights, a) / _diagonal(g_inv)


def _quadratic(weights: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``w_iᵀ A w_i`` for every column ``i``."""
    return np.einsum("...ji,...jk,...ki->...i", weights, a, weights)


def _diagonal(matrix: np.ndarray) -> np.ndarray:
    return np.diagonal(matrix, axis1=-2, axis2=-1)
