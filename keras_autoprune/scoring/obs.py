"""Optimal Brain Surgeon saliencies under a Kronecker-factored Fisher.

A layer computes ``s = Wᵀ a`` with ``W`` of shape ``(P, C_out)`` (rows in the
order of the patch vector ``a``: ``(kh, kw, C_in)``, plus a last row for the
bias when ``a`` carries a constant 1). K-FAC approximates the Fisher of
``vec(W)`` by ``F = A ⊗ G`` with ``A = E[a aᵀ]`` (P×P) and ``G = E[δ δᵀ]``
(C_out×C_out).

OBS: removing a set S of weights (setting them to 0 and letting the others
compensate optimally) increases the loss by
``ΔL = ½ w_Sᵀ [(F⁻¹)_SS]⁻¹ w_S``. With ``F⁻¹ = A⁻¹ ⊗ G⁻¹``:

- one weight (NAP fine-grained): ``ΔL_pi = W_pi² / (2 [A⁻¹]_pp [G⁻¹]_ii)``;
- output channel i, all its weights (NAP structured):
  ``(F⁻¹)_SS = A⁻¹ [G⁻¹]_ii`` so ``ΔL_i = w_iᵀ A w_i / (2 [G⁻¹]_ii)``;
- input channel j, the rows R_j of its taps for every output:
  ``(F⁻¹)_SS = (A⁻¹)_{R_j R_j} ⊗ G⁻¹`` so
  ``ΔL_j = ½ tr([(A⁻¹)_{R_j R_j}]⁻¹ W_{R_j} G W_{R_j}ᵀ)``.

The optimal compensation of the other weights after removing output i is
``ΔW = −W G⁻¹ e_i e_iᵀ / [G⁻¹]_ii`` restricted to the kept outputs (columns),
see `out_channel_update`.
"""

from __future__ import annotations

import numpy as np


def weight_saliency(weights: np.ndarray, a_inv_diag: np.ndarray, g_inv_diag: np.ndarray) -> np.ndarray:
    """``W_pi² / (2 [A⁻¹]_pp [G⁻¹]_ii)`` for every weight, shape ``(P, C_out)``.

    Stacks ``(..., P, C_out)`` with diagonals ``(..., P)`` and ``(..., C_out)``
    are scored block by block.
    """
    a_inv_diag, g_inv_diag = np.asarray(a_inv_diag), np.asarray(g_inv_diag)
    return weights**2 / (2.0 * a_inv_diag[..., :, None] * g_inv_diag[..., None, :])


def output_set_saliency(weights: np.ndarray, a: np.ndarray, g_inv: np.ndarray, columns: np.ndarray) -> float:
    """Removing output columns S: ``½ tr(W_{:,S}ᵀ A W_{:,S} [(G⁻¹)_SS]⁻¹)``.

    For one channel i this is NAP's ``w_iᵀ A w_i / (2 [G⁻¹]_ii)``.

    Args:
        weights: ``(P, C_out)``.
        a: the ``(P, P)`` input factor.
        g_inv: the (damped) inverse output factor.
        columns: the output channels (columns of ``weights``) removed.
    """
    w_s = weights[:, columns]
    return 0.5 * float(np.trace(w_s.T @ a @ w_s @ np.linalg.inv(g_inv[np.ix_(columns, columns)])))


def input_set_saliency(weights: np.ndarray, g: np.ndarray, a_inv: np.ndarray, rows: np.ndarray) -> float:
    """Removing input rows R (every tap of some input channels): ``½ tr(W_R G W_Rᵀ [(A⁻¹)_RR]⁻¹)``.

    Args:
        weights: ``(P, C_out)``.
        g: the ``(C_out, C_out)`` output factor.
        a_inv: the (damped) inverse input factor.
        rows: the patch rows removed.
    """
    w_r = weights[rows]
    return 0.5 * float(np.trace(w_r @ g @ w_r.T @ np.linalg.inv(a_inv[np.ix_(rows, rows)])))


def out_channel_update(weights: np.ndarray, g_inv: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """OBS compensation of the kept outputs after removing output channels.

    For a set R of removed outputs, the minimiser of the quadratic model is
    ``W ← W − W_R [(G⁻¹)_RR]⁻¹ (G⁻¹)_{R,:}`` (applied to every row of W),
    which zeroes the removed columns exactly and moves the kept ones.

    Args:
        weights: ``(P, C_out)``.
        g_inv: the (damped) inverse output factor ``(C_out, C_out)``.
        removed: indices of removed output channels.

    Returns:
        The updated weights, same shape; removed columns are 0.
    """
    if len(removed) == 0:
        return weights.copy()
    block = np.linalg.inv(g_inv[np.ix_(removed, removed)])
    updated = weights - weights[:, removed] @ block @ g_inv[removed, :]
    updated[:, removed] = 0.0
    return updated
