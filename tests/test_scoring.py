"""OBS saliencies against hand computation and against the exact quadratic."""

import numpy as np
import pytest

from keras_autoprune.scoring import (
    c_obd,
    c_obs,
    input_set_saliency,
    kron_obd,
    kron_obs,
    out_channel_update,
    output_set_saliency,
    weight_saliency,
)
from keras_autoprune.stats import damp, damped_inverses


def _spd(n, rng):
    m = rng.normal(size=(n, n))
    return m @ m.T + n * np.eye(n)


def test_hand_computed_two_by_two():
    w = np.array([[1.0, 2.0], [3.0, -1.0]])  # P=2 rows, C_out=2 columns
    a = np.array([[2.0, 1.0], [1.0, 3.0]])
    g = np.array([[4.0, 0.0], [0.0, 0.5]])
    g_inv_diag = 1 / np.diag(g)
    # Column 0: [1, 3]: 1*2*1 + 2*1*3 + 3*3*3 = 2 + 6 + 27 = 35; / (2 * 0.25) = 70.
    # Column 1: [2, -1]: 4*2 + 2*2*(-1)*1 + 1*3 = 8 - 4 + 3 = 7; / (2 * 2) = 1.75.
    g_inv = np.linalg.inv(g)
    np.testing.assert_allclose([output_set_saliency(w, a, g_inv, np.array([i])) for i in (0, 1)], [70.0, 1.75])
    a_inv_diag = np.diag(np.linalg.inv(a))  # [3/5, 2/5]
    expected = w**2 / (2 * np.outer([0.6, 0.4], [0.25, 2.0]))
    np.testing.assert_allclose(weight_saliency(w, a_inv_diag, g_inv_diag), expected)


def test_structured_saliency_is_the_exact_obs_loss_increase():
    """For the quadratic model ½ ΔwᵀFΔw with F = A⊗G, removing a set S optimally
    costs ½ w_Sᵀ[(F⁻¹)_SS]⁻¹ w_S: compare with brute force on vec(W)."""
    rng = np.random.default_rng(0)
    p, c = 6, 4  # 2 input channels x 3 taps
    a, g = _spd(p, rng), _spd(c, rng)
    w = rng.normal(size=(p, c))
    fisher = np.kron(a, g)  # vec in row-major order of W (p, c): index p*c_out + i
    f_inv = np.linalg.inv(fisher)
    vec = w.reshape(-1)

    def brute(indices):
        block = np.linalg.inv(f_inv[np.ix_(indices, indices)])
        return 0.5 * vec[indices] @ block @ vec[indices]

    g_inv, a_inv = np.linalg.inv(g), np.linalg.inv(a)
    out = [output_set_saliency(w, a, g_inv, np.array([i])) for i in range(c)]
    for i in range(c):
        np.testing.assert_allclose(out[i], brute(np.arange(p) * c + i), rtol=1e-10)
    pair = np.array([0, 2])  # two output channels at once
    np.testing.assert_allclose(
        output_set_saliency(w, a, g_inv, pair), brute((np.arange(p)[:, None] * c + pair).reshape(-1)), rtol=1e-10
    )
    rows = [np.array([0, 2, 4]), np.array([1, 3, 5])]  # channel j owns taps j, j+2, j+4
    for r in rows:
        idx = (r[:, None] * c + np.arange(c)[None, :]).reshape(-1)
        np.testing.assert_allclose(input_set_saliency(w, g, a_inv, r), brute(idx), rtol=1e-10)
    # The OBS update reaches exactly that loss increase.
    removed = np.array([1])
    updated = out_channel_update(w, np.linalg.inv(g), removed)
    delta = (updated - w).reshape(-1)
    np.testing.assert_allclose(0.5 * delta @ fisher @ delta, out[1], rtol=1e-10)
    assert np.all(updated[:, 1] == 0)


# -- baseline scorers (scoring.baselines) ---------------------------------------
# W̃ is (D, C_out) = (3, 2): column i holds output channel i's weights w_i.
W_TINY = np.array([[1.0, 2.0], [1.0, -1.0], [3.0, 1.0]])  # w_0 = [1, 1, 3], w_1 = [2, -1, 1]
A_TINY = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 1.0]])
G_TINY = np.array([[4.0, 1.0], [1.0, 2.0]])
# By hand:
#   A w_0 = [3, 7, 4], w_0ᵀ A w_0 = 3 + 7 + 12 = 22;  A w_1 = [3, 0, 0], w_1ᵀ A w_1 = 6.
#   Σ_j A_jj W_ji² (diag A = [2, 3, 1]): column 0: 2 + 3 + 9 = 14; column 1: 8 + 3 + 1 = 12.
#   G⁻¹ = [[2, -1], [-1, 4]] / 7, diag(G⁻¹) = [2/7, 4/7].
#   det A = 3, diag(A⁻¹) = [2, 2, 5] / 3 (cofactors 3·1−1·1, 2·1−0, 2·3−1·1).


def test_kron_obd_by_hand():
    # ½ G_ii w_iᵀ A w_i = [½·4·22, ½·2·6]
    np.testing.assert_allclose(kron_obd(W_TINY, A_TINY, G_TINY), [44.0, 6.0])


def test_c_obd_by_hand():
    # ½ G_ii Σ_j A_jj W_ji² = [½·4·14, ½·2·12]
    np.testing.assert_allclose(c_obd(W_TINY, A_TINY, G_TINY), [28.0, 12.0])


def test_kron_obs_by_hand_is_nap_output_side():
    # ½ w_iᵀ A w_i / [G⁻¹]_ii = [½·22·7/2, ½·6·7/4]
    g_inv = np.linalg.inv(G_TINY)
    scores = kron_obs(W_TINY, A_TINY, g_inv)
    np.testing.assert_allclose(scores, [38.5, 5.25])
    np.testing.assert_allclose(scores, [output_set_saliency(W_TINY, A_TINY, g_inv, np.array([i])) for i in (0, 1)])


def test_c_obs_by_hand():
    # ½ Σ_j W_ji² / ([A⁻¹]_jj [G⁻¹]_ii):
    #   column 0: ½ (1·3/2 + 1·3/2 + 9·3/5) · 7/2 = ½ · 8.4 · 3.5 = 14.7
    #   column 1: ½ (4·3/2 + 1·3/2 + 1·3/5) · 7/4 = ½ · 8.1 · 1.75 = 7.0875
    scores = c_obs(W_TINY, np.linalg.inv(A_TINY), np.linalg.inv(G_TINY))
    np.testing.assert_allclose(scores, [14.7, 7.0875])
    a_inv, g_inv = np.diag(np.linalg.inv(A_TINY)), np.diag(np.linalg.inv(G_TINY))
    loops = [sum(W_TINY[j, i] ** 2 / (2 * a_inv[j] * g_inv[i]) for j in range(3)) for i in range(2)]
    np.testing.assert_allclose(scores, loops)


def test_baselines_score_stacks_block_by_block():
    """Depthwise layers pass per-channel blocks (C, D, M): each block is scored on its own."""
    rng = np.random.default_rng(1)
    w, a, g = rng.normal(size=(2, 3, 2)), np.stack([_spd(3, rng) for _ in range(2)]), np.stack([_spd(2, rng) for _ in range(2)])
    a_inv, g_inv = np.linalg.inv(a), np.linalg.inv(g)
    for fn, args in [(c_obd, (a, g)), (kron_obd, (a, g)), (kron_obs, (a, g_inv)), (c_obs, (a_inv, g_inv))]:
        stacked = fn(w, *args)
        assert stacked.shape == (2, 2)
        for c in range(2):
            np.testing.assert_allclose(stacked[c], fn(w[c], *(x[c] for x in args)), rtol=1e-12)


@pytest.mark.parametrize("damping", [None, 1e-2])
def test_baselines_coincide_on_diagonal_factors(damping):
    """Diagonal A, G: [A⁻¹]_jj = 1/A_jj and w_iᵀ A w_i = Σ_j A_jj W_ji², so C-OBD == Kron-OBD,
    C-OBS == Kron-OBS, and with exact inverses of the same (damped or not) factors all four agree."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 3))
    a, g = np.diag(rng.uniform(0.5, 2.0, 5)), np.diag(rng.uniform(0.5, 2.0, 3))
    if damping is None:
        a_inv, g_inv = np.linalg.inv(a), np.linalg.inv(g)
    else:  # the damped inverses NAP uses, and the damped factors they invert
        a_inv, g_inv = damped_inverses(a, g, damping)
        a_undamped, (a, g) = a, damp(a, g, damping)
        assert np.all(np.diag(a) > np.diag(a_undamped))
    reference = kron_obd(w, a, g)
    np.testing.assert_allclose(c_obd(w, a, g), reference, rtol=1e-12)
    np.testing.assert_allclose(kron_obs(w, a, g_inv), reference, rtol=1e-12)
    np.testing.assert_allclose(c_obs(w, a_inv, g_inv), reference, rtol=1e-12)
