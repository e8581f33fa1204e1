"""Damping, inverses and eigendecompositions of K-FAC factors.

Every function symmetrises its input, ``(M + Mᵀ)/2``, first and accepts
stacks ``(..., n, n)`` (the per-channel factors of depthwise layers), treating
each block on its own.
"""

from __future__ import annotations

import numpy as np


def symmetrize(matrix: np.ndarray) -> np.ndarray:
    """``(M + Mᵀ)/2`` over the last two axes, as float64."""
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"Expected square matrices (..., n, n). Received: shape {matrix.shape}.")
    return (matrix + np.swapaxes(matrix, -1, -2)) / 2


def mean_eigenvalue(matrix: np.ndarray) -> np.ndarray:
    """``tr M / dim M`` (per block for stacks)."""
    matrix = np.asarray(matrix, np.float64)
    return np.trace(matrix, axis1=-2, axis2=-1) / matrix.shape[-1]


def symmetric_eigh(matrix: np.ndarray, zero_below: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition ``M = Q diag(s) Qᵀ`` of ``(M + Mᵀ)/2``.

    Args:
        matrix: ``(..., n, n)``.
        zero_below: eigenvalues ``≤ zero_below`` are set to 0 (EigenDamage's
            rule; rounding makes PSD factors slightly indefinite).

    Returns:
        ``(s, Q)``: eigenvalues ascending ``(..., n)`` and eigenvectors as
        columns ``(..., n, n)``.
    """
    values, vectors = np.linalg.eigh(symmetrize(matrix))
    return np.where(values <= zero_below, 0.0, values), vectors


def damp(A: np.ndarray, G: np.ndarray, damping: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Damped factors with tensorflow/kfac's π rule.

    With ``m_A = tr A/dim A`` and ``m_G = tr G/dim G``, the relative damping
    ``λ`` is scaled by the mean eigenvalue of ``A ⊗ G`` (``m_A·m_G``):

        π  = sqrt(m_A / m_G)
        A' = A + π·sqrt(λ·m_A·m_G)·I = A + sqrt(λ)·m_A·I
        G' = G + sqrt(λ·m_A·m_G)/π·I = G + sqrt(λ)·m_G·I

    so ``A' ⊗ G' ≈ A ⊗ G + λ·m_A·m_G·I + (cross terms)``. A factor whose
    trace is 0 (a channel or layer that never reaches the loss) has no scale
    of its own: in a stack of blocks (a depthwise layer's per-channel
    factors, the leading axes) it takes the mean ``m`` of the stack's other
    blocks, so its damping stays relative to its layer; a whole layer at 0
    takes a vanishing ``m`` (``sqrt`` of the smallest normal float), so
    that what it never changes scores (about) 0, not a constant.

    Args:
        A, G: the factors, ``(..., n, n)`` and ``(..., m, m)``.
        damping: ``λ``, relative to the mean eigenvalue; > 0.
    """
    A, G = symmetrize(A), symmetrize(G)
    shift_A, shift_G = _shifts(A, G, damping)
    return A + shift_A[..., None, None] * np.eye(A.shape[-1]), G + shift_G[..., None, None] * np.eye(G.shape[-1])


def damped_inverses(A: np.ndarray, G: np.ndarray, damping: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """``(A'⁻¹, G'⁻¹)`` of the damped factors of `damp`.

    Inverted through ``eigh``: ``Q diag(1/(max(s, 0) + shift)) Qᵀ``, where
    ``s`` are the undamped eigenvalues (clipped at 0 against rounding), so
    the inverses are symmetric and positive definite.
    """
    A, G = symmetrize(A), symmetrize(G)
    shift_A, shift_G = _shifts(A, G, damping)
    return _shifted_inverse(A, shift_A), _shifted_inverse(G, shift_G)


def _shifts(A: np.ndarray, G: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(damping, (int, float, np.floating)) or not np.isfinite(damping) or damping <= 0:
        raise ValueError(f"Expected a positive finite damping. Received: damping={damping!r}")
    root = np.sqrt(float(damping))
    return root * _scale(mean_eigenvalue(A)), root * _scale(mean_eigenvalue(G))


_VANISHING = float(np.sqrt(np.finfo(np.float64).tiny))
"""The scale of a layer whose factor is 0 everywhere: its inverse (about 6.7e153) is still finite."""


def _scale(means: np.ndarray) -> np.ndarray:
    """``means`` with each 0 replaced by the mean of the positive ones of its stack (or `_VANISHING`)."""
    means = np.asarray(means, np.float64)
    positive = means > 0
    if positive.all():
        return means
    fallback = float(means[positive].mean()) if positive.any() else _VANISHING
    return np.where(positive, means, fallback)


def _shifted_inverse(matrix: np.ndarray, shift: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    values = np.maximum(values, 0.0) + np.asarray(shift)[..., None]
    return (vectors / values[..., None, :]) @ np.swapaxes(vectors, -1, -2)
