"""EigenDamage on the models and data users bring: architectures, data sources, precision, misuse.

Each test fits a small model for a few epochs on synthetic data and checks
values: the budget is met counting the rotation layers, the three-layer
model equals the live (projected) model, and misuse fails before training
with a message saying what was expected.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.surgery.factorization import LayerFactorization
from tests.helpers import relative_error


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))[0][:, :k]


# -- bases on wide layers ---------------------------------------------------------
def test_core_kernel_and_projection_are_batched_matmuls_fast_on_wide_layers():
    """A 1×1 conv 112 -> 1280 (MobileNetV2's last conv): a three-operand einsum took minutes per round."""
    rng = np.random.default_rng(0)
    small = LayerFactorization(orthonormal(7, 3, 1), orthonormal(5, 2, 2))
    kernel = rng.normal(size=(3, 3, 7, 5))
    np.testing.assert_allclose(small.core_kernel(kernel), np.einsum("ji,...jk,kl->...il", small.q_in, kernel, small.q_out), atol=1e-12)
    p_in, p_out = small.q_in @ small.q_in.T, small.q_out @ small.q_out.T
    np.testing.assert_allclose(small.project(kernel), np.einsum("ij,...jk,kl->...il", p_in, kernel, p_out), atol=1e-12)

    wide = LayerFactorization(orthonormal(112, 40, 3), orthonormal(1280, 300, 4))
    kernel = rng.normal(size=(1, 1, 112, 1280))
    start = time.perf_counter()
    core, projected = wide.core_kernel(kernel), wide.project(kernel)
    assert time.perf_counter() - start < 2.0  # about 0.01 s; the einsum took over a minute
    assert core.shape == (1, 1, 40, 300)
    np.testing.assert_allclose(wide.project(projected), projected, atol=1e-10)  # a projection
    np.testing.assert_allclose(wide.core_kernel(projected), core, atol=1e-10)
