"""EigenDamage importance in the Kronecker-factored eigenbasis (pure NumPy).

In the eigenbasis of ``A = Q_A diag(s_A) Q_Aᵀ`` and ``G = Q_G diag(s_G) Q_Gᵀ``
the K-FAC Fisher ``A ⊗ G`` is diagonal, ``diag(s_A ⊗ s_G)``, so removing the
rotated weight ``W*_ijk`` (output direction ``i``, input direction ``j``,
kernel offset ``k``) raises the loss by ``½ (W*_ijk)² s_G,i s_A,j`` to second
order, without any cross terms. EigenDamage scores (dropping the common ½):

    I_ij = Σ_k (W*_ijk)² s_G,i s_A,j
    in-direction j:   Σ_i I_ij          out-direction i:   Σ_j I_ij
"""

from __future__ import annotations

import numpy as np


def kfe_importance(core_kernel: np.ndarray, s_in: np.ndarray, s_out: np.ndarray) -> np.ndarray:
    """``I[j, i] = Σ_k C[k, j, i]² · s_in[j] · s_out[i]``.

    Args:
        core_kernel: the rotated kernel in Keras layout, ``(*k, n_in, n_out)``
            (``C_k = Q_Aᵀ K_k Q_G``).
        s_in: eigenvalues of the input factor, ``(n_in,)``.
        s_out: eigenvalues of the output factor, ``(n_out,)``.

    Returns:
        ``(n_in, n_out)``; row sums are the in-direction scores, column sums
        the out-direction scores.
    """
    core = np.asarray(core_kernel, np.float64)
    squares = (core ** 2).reshape(-1, core.shape[-2], core.shape[-1]).sum(axis=0)
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    if s_in.shape != (core.shape[-2],) or s_out.shape != (core.shape[-1],):
        raise ValueError(
            f"Expected eigenvalues of shapes ({core.shape[-2]},) and ({core.shape[-1]},) for a core kernel "
            f"of shape {core.shape}. Received: {s_in.shape} and {s_out.shape}"
        )
    return squares * s_in[:, None] * s_out[None, :]


def direction_scores(importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(in-direction scores Σ_i I_ij, out-direction scores Σ_j I_ij)``."""
    return importance.sum(axis=1), importance.sum(axis=0)
