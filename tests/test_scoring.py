"""OBS saliencies against hand computation and against the exact quadratic."""

import numpy as np

from keras_autoprune.scoring import input_set_saliency, out_channel_update, output_set_saliency, weight_saliency


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
