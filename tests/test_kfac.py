"""K-FAC statistics against brute-force per-example gradients (the oracle).

Models are float64 so that the factors can be compared to 1e-10. The oracle
is independent of the implementation: its own NumPy im2col (loops, TF's
padding rule), per-example ``tf.GradientTape``s on the kernel and bias and on
the layer outputs, and the check that ``Σ_t a_t δ_tᵀ`` equals the kernel
gradient ties the patch layout to ``kernel.reshape(-1, Cout)``.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_autoprune import DependencyGraph
from keras_autoprune.scoring import kron_obs
from keras_autoprune.stats import (
    GroupSaliency,
    collect_gradient_stats,
    collect_kfac,
    damp,
    damped_inverses,
    group_saliency,
    symmetric_eigh,
)
from keras_autoprune.stats.taps import Tap
from tests.helpers import randomize

L = keras.layers
F64 = "float64"
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LABELS = np.array([0, 2, 1, 2])


def _compiled(inputs, outputs, seed=0):
    model = keras.Model(inputs, outputs)
    randomize(model, seed=seed)
    model.compile(loss=SCCE)
    return model


def dense_model():
    inputs = keras.Input((5,), dtype=F64)
    h = L.Dense(4, activation="tanh", dtype=F64, name="d1")(inputs)
    return _compiled(inputs, L.Dense(3, dtype=F64, name="d2")(h))


def conv_model():
    inputs = keras.Input((9, 9, 2), dtype=F64)
    h = L.Conv2D(3, 3, strides=2, padding="same", activation="relu", dtype=F64, name="conv")(inputs)
    h = L.BatchNormalization(dtype=F64, name="bn")(h)
    h = L.Dropout(0.5, dtype=F64)(h)
    h = L.Conv2D(2, (2, 3), dilation_rate=2, padding="valid", dtype=F64, name="conv2")(h)
    return _compiled(inputs, L.Dense(3, dtype=F64, name="head")(L.Flatten(dtype=F64)(h)))


def depthwise_model():
    inputs = keras.Input((5, 5, 2), dtype=F64)
    h = L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, activation="tanh", dtype=F64, name="dw")(inputs)
    return _compiled(inputs, L.Dense(3, dtype=F64, name="head")(L.Flatten(dtype=F64)(h)))


def sequence_model():
    inputs = keras.Input((6, 2), dtype=F64)
    h = L.Conv1D(3, 3, padding="causal", dilation_rate=2, activation="tanh", dtype=F64, name="c1d")(inputs)
    h = L.Dense(2, dtype=F64, name="nd_dense")(h)  # N-D input: T = 6 locations
    return _compiled(inputs, L.Dense(3, dtype=F64, name="head")(L.Flatten(dtype=F64)(h)))


def _x(model, n=4, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *model.inputs[0].shape[1:]))


# -- the oracle -----------------------------------------------------------------------
def _im2col(a, layer):
    """Patches ``(T, K·C)`` of one example, by loops (TF's padding rule)."""
    if isinstance(layer, L.Dense):
        return a.reshape(-1, a.shape[-1])
    if isinstance(layer, L.Conv1D):
        a = a[None]
        sizes, strides, rates = (1, *layer.kernel_size), (1, *layer.strides), (1, *layer.dilation_rate)
    else:
        sizes, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
    pads = []
    for axis in range(2):
        n, k, s, d = a.shape[axis], sizes[axis], strides[axis], rates[axis]
        if layer.padding == "causal":
            pads.append(((k - 1) * d, 0))
        elif layer.padding == "same":
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((0, 0))
    a = np.pad(a, [*pads, (0, 0)])
    rows = []
    for i in range(0, a.shape[0] - (sizes[0] - 1) * rates[0], strides[0]):
        for j in range(0, a.shape[1] - (sizes[1] - 1) * rates[1], strides[1]):
            taps = [a[i + p * rates[0], j + q * rates[1]] for p in range(sizes[0]) for q in range(sizes[1])]
            rows.append(np.concatenate(taps))
    return np.array(rows)


def oracle(model, name, x, y, approximation="expand"):
    """``(A, G, per-example W̃ gradients)`` by brute force, as defined in `kfac` (``"reduce"``: one row per example)."""
    layer = model.get_layer(name)
    tap = keras.Model(model.inputs, [layer.input, layer.output, model.output])
    depthwise = isinstance(layer, L.DepthwiseConv2D)
    A = G = 0.0
    grads = []
    for b in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            a, out, logits = tap([x[b : b + 1]], training=False)
            loss = -tf.nn.log_softmax(logits)[0, y[b]]
        g_out = tape.gradient(loss, out).numpy()[0]
        g_kernel, g_bias = (t.numpy() for t in tape.gradient(loss, [layer.kernel, layer.bias]))
        patches = _im2col(a.numpy()[0], layer)
        cout = layer.kernel.shape[-1] * (layer.kernel.shape[-2] if depthwise else 1)
        if depthwise:  # s[t, c*M+m] = Σ_k P[t, k, c] kernel[k, c, m]
            P = patches.reshape(len(patches), -1, a.shape[-1])
            s = np.einsum("tkc,kcm->tcm", P, layer.kernel.numpy().reshape(P.shape[1], *layer.kernel.shape[-2:]))
            s = s.reshape(len(P), -1) + layer.bias.numpy()
        else:
            s = patches @ layer.kernel.numpy().reshape(-1, cout) + layer.bias.numpy()
        s = tf.constant(s)
        with tf.GradientTape() as t2:
            t2.watch(s)
            activated = layer.activation(s)
        np.testing.assert_allclose(activated.numpy(), out.numpy().reshape(-1, cout), atol=1e-12)  # geometry
        delta = t2.gradient(activated, s, output_gradients=tf.constant(g_out.reshape(-1, cout))).numpy()
        ones = np.ones((len(patches), 1))
        if depthwise:
            M = layer.kernel.shape[-1]
            P1 = np.concatenate([P, np.ones((len(P), 1, P.shape[2]))], axis=1)
            D = delta.reshape(len(P), -1, M)
            if approximation == "reduce":
                mean, total = P1.mean(0, keepdims=True), D.sum(0, keepdims=True)
                A = A + np.einsum("tkc,tlc->ckl", mean, mean) / len(x)
                G = G + np.einsum("tcm,tcn->cmn", total, total) / len(x)
            else:
                A = A + np.einsum("tkc,tlc->ckl", P1, P1) / (len(x) * len(P))
                G = G + np.einsum("tcm,tcn->cmn", D, D) / len(x)
            grad = np.einsum("tkc,tcm->ckm", P1, D)
            expected = np.concatenate([np.moveaxis(g_kernel.reshape(-1, *g_kernel.shape[-2:]), 1, 0), g_bias.reshape(-1, 1, M)], 1)
        else:
            P1 = np.concatenate([patches, ones], axis=1)
            if approximation == "reduce":
                mean, total = P1.mean(0, keepdims=True), delta.sum(0, keepdims=True)
                A = A + mean.T @ mean / len(x)
                G = G + total.T @ total / len(x)
            else:
                A = A + P1.T @ P1 / (len(x) * len(P1))
                G = G + delta.T @ delta / len(x)
            grad = P1.T @ delta
            expected = np.concatenate([g_kernel.reshape(-1, cout), g_bias[None]])
        np.testing.assert_allclose(grad, expected, atol=1e-12)  # Σ_t a δᵀ is the kernel gradient
        grads.append(expected)
    return A, G, np.array(grads)


def _check_oracle(model, names, x=None, y=LABELS, approximation="expand"):
    x = _x(model) if x is None else x
    factors = collect_kfac(model, (x, y), fisher="empirical", approximation=approximation, verbose=0)
    for name in names:
        A, G, _ = oracle(model, name, x, y, approximation)
        np.testing.assert_allclose(factors[name].A, A, rtol=0, atol=1e-10 * np.abs(A).max())
        np.testing.assert_allclose(factors[name].G, G, rtol=0, atol=1e-10 * np.abs(G).max())
    return factors


def test_dense_factors_match_oracle_and_kronecker_identity():
    model = dense_model()
    x = _x(model)
    factors = _check_oracle(model, ["d1", "d2"], x)
    assert list(factors) == ["d1", "d2"] and factors["d1"].num_locations == 1.0
    assert factors.num_examples == 4 and factors.num_batches == 1
    # One example: K-FAC is exact, E[vec ∇W̃ vec ∇W̃ᵀ] = A ⊗ G (row-major vec).
    single = collect_kfac(model, (x[:1], LABELS[:1]), fisher="empirical", verbose=0)
    for name in ["d1", "d2"]:
        _, _, grads = oracle(model, name, x[:1], LABELS[:1])
        vec = grads[0].ravel()
        np.testing.assert_allclose(single[name].fisher_block(), np.outer(vec, vec), atol=1e-12)


def test_conv2d_factors_match_oracle_with_stride_padding_dilation_and_inference_bn():
    factors = _check_oracle(conv_model(), ["conv", "conv2", "head"])
    assert factors["conv"].A.shape == (3 * 3 * 2 + 1,) * 2 and factors["conv"].num_locations == 25.0
    assert factors["conv2"].num_locations == 3.0
    # A_c: the mean of the kh*kw diagonal Cin x Cin blocks of A (bias excluded).
    A = factors["conv"].A[:-1, :-1].reshape(9, 2, 9, 2)
    np.testing.assert_allclose(factors["conv"].A_channel, np.mean([A[k, :, k] for k in range(9)], axis=0), atol=1e-15)


def test_depthwise_per_channel_factors_match_oracle():
    model = depthwise_model()
    factors = _check_oracle(model, ["dw", "head"])
    dw = factors["dw"]
    assert dw.A.shape == (2, 10, 10) and dw.G.shape == (2, 2, 2) and dw.A_channel is None
    assert dw.fisher_block().shape == (2, 20, 20)


def test_conv1d_causal_and_nd_dense_match_oracle():
    factors = _check_oracle(sequence_model(), ["c1d", "nd_dense", "head"])
    assert factors["nd_dense"].num_locations == 6.0 and factors["c1d"].A.shape == (7, 7)


def test_reduce_approximation_matches_its_oracle_on_every_layer_kind():
    """K-FAC-reduce: one row per example, the mean patch and the δ summed over the locations."""
    conv = _check_oracle(conv_model(), ["conv", "conv2", "head"], approximation="reduce")
    assert conv["conv"].num_locations == 1.0 and conv["conv"].A.shape == (3 * 3 * 2 + 1,) * 2
    _check_oracle(depthwise_model(), ["dw", "head"], approximation="reduce")
    _check_oracle(sequence_model(), ["c1d", "nd_dense", "head"], approximation="reduce")
    with pytest.raises(ValueError, match="approximation to be one of"):
        collect_kfac(conv_model(), (_x(conv_model()), LABELS), approximation="mean", verbose=0)


def test_reduce_is_exact_for_one_example_whose_input_is_the_same_at_every_location():
    """Then ∇W̃ = Σ_t ā δ_tᵀ = ā (Σ_t δ_t)ᵀ, so E[vec ∇W̃ vec ∇W̃ᵀ] = A ⊗ G; "expand" is not exact there."""
    inputs = keras.Input((5, 3), dtype=F64)
    h = L.Dense(4, activation="tanh", dtype=F64, name="nd_dense")(inputs)  # T = 5 locations
    model = _compiled(inputs, L.Dense(3, dtype=F64, name="head")(L.Flatten(dtype=F64)(h)))
    x = np.repeat(_x(model, n=1)[:, :1], 5, axis=1)  # every location equals the first
    reduce = collect_kfac(model, (x, LABELS[:1]), fisher="empirical", approximation="reduce", verbose=0)
    expand = collect_kfac(model, (x, LABELS[:1]), fisher="empirical", verbose=0)
    _, _, grads = oracle(model, "nd_dense", x, LABELS[:1])
    exact = np.outer(grads[0].ravel(), grads[0].ravel())
    np.testing.assert_allclose(reduce["nd_dense"].fisher_block(), exact, atol=1e-12 * np.abs(exact).max())
    assert not np.allclose(expand["nd_dense"].fisher_block(), exact, atol=1e-6 * np.abs(exact).max())


def test_channel_only_factor_and_chunking_do_not_change_results():
    model = conv_model()
    x = _x(model)
    full = collect_kfac(model, (x, LABELS), fisher="empirical", verbose=0)
    light = collect_kfac(model, (x, LABELS), fisher="empirical", full_input_factor=False, chunk_size=1, batch_size=3, verbose=0)
    for name in full:
        np.testing.assert_allclose(light[name].A_channel, full[name].A_channel, atol=1e-12)
        np.testing.assert_allclose(light[name].G, full[name].G, atol=1e-12)
        assert light[name].A is None
    assert light.num_batches == 2


def test_true_fisher_samples_labels_by_inverse_cdf_from_seeded_uniforms():
    model = dense_model()
    x = _x(model, n=6)
    probs = tf.nn.softmax(model(x)).numpy()
    u = np.random.default_rng(7).random(6)
    cdf = np.cumsum(probs, axis=1)
    sampled = np.minimum((cdf <= u[:, None] * cdf[:, -1:]).sum(axis=1), 2)
    true = collect_kfac(model, x, seed=7, batch_size=4, verbose=0)  # no labels needed
    empirical = collect_kfac(model, (x, sampled), fisher="empirical", verbose=0)
    other = collect_kfac(model, (x, LABELS.repeat(2)[:6]), seed=8, verbose=0)  # labels ignored
    for name in true:
        np.testing.assert_allclose(true[name].G, empirical[name].G, atol=1e-14)
        np.testing.assert_allclose(true[name].A, other[name].A, atol=1e-14)
    assert true.fisher == "true" and not np.allclose(true["d2"].G, other["d2"].G)


def test_pre_activation_is_tapped_and_sample_weights_weight_examples():
    def build(split):
        inputs = keras.Input((5,), dtype=F64)
        if split:
            h = L.Activation("relu", dtype=F64)(L.Dense(4, dtype=F64, name="d1")(inputs))
        else:
            h = L.Dense(4, activation="relu", dtype=F64, name="d1")(inputs)
        return _compiled(inputs, L.Dense(3, dtype=F64, name="d2")(h))

    fused, split = build(False), build(True)
    x = _x(fused)
    a = collect_kfac(fused, (x, LABELS), fisher="empirical", verbose=0)
    b = collect_kfac(split, (x, LABELS), fisher="empirical", verbose=0)
    np.testing.assert_allclose(a["d1"].G, b["d1"].G, atol=1e-14)
    assert fused.get_layer("d1").activation is keras.activations.relu  # restored
    weighted = collect_kfac(fused, (x, LABELS, np.array([1.0, 0.0, 2.0, 1.0])), fisher="empirical", verbose=0)
    repeated = collect_kfac(fused, (x[[0, 2, 2, 3]], LABELS[[0, 2, 2, 3]]), fisher="empirical", verbose=0)
    for name in a:
        np.testing.assert_allclose(weighted[name].A, repeated[name].A, atol=1e-14)
        np.testing.assert_allclose(weighted[name].G, repeated[name].G, atol=1e-14)
    assert weighted.num_examples == 4.0


def test_nested_and_shared_layers_use_qualified_names():
    inner_in = keras.Input((7, 7, 2), dtype=F64)
    inner_out = L.Conv2D(3, 3, strides=2, padding="same", activation="relu", dtype=F64, name="conv")(inner_in)
    backbone = keras.Model(inner_in, inner_out, name="backbone")
    shared = L.Dense(3, dtype=F64, name="shared")
    inputs = keras.Input((7, 7, 2), dtype=F64)
    h = backbone(inputs)
    h = L.Flatten(dtype=F64)(shared(shared(h)))  # called twice: 2 x 16 locations
    nested = _compiled(inputs, L.Dense(3, dtype=F64, name="head")(h))
    flat_h = L.Conv2D(3, 3, strides=2, padding="same", activation="relu", dtype=F64, name="conv")(inputs)
    flat = keras.Model(inputs, L.Dense(3, dtype=F64, name="head")(L.Flatten(dtype=F64)(shared(shared(flat_h)))))
    flat.get_layer("conv").set_weights(backbone.get_layer("conv").get_weights())
    flat.get_layer("head").set_weights(nested.get_layer("head").get_weights())
    x = _x(nested)
    got = collect_kfac(nested, (x, LABELS), fisher="empirical", verbose=0)
    want = collect_kfac(flat, (x, LABELS), fisher="empirical", loss=SCCE, verbose=0)
    assert list(got) == ["backbone/conv", "shared", "head"]
    np.testing.assert_allclose(got["backbone/conv"].G, want["conv"].G, atol=1e-14)
    assert got["shared"].num_locations == 32.0
    only = collect_kfac(nested, x, layers=["backbone/conv", shared], verbose=0)
    assert list(only) == ["backbone/conv", "shared"]


def test_gradient_stats_match_per_example_gradients():
    model = depthwise_model()
    x = _x(model)
    stats = collect_gradient_stats(model, (x, LABELS), fisher="empirical", verbose=0)
    for name in ["dw", "head"]:
        _, _, grads = oracle(model, name, x, LABELS)
        layer = model.get_layer(name)
        from keras_autoprune.stats import split_weight_matrix

        depthwise = name == "dw"
        sq_kernel, sq_bias = split_weight_matrix((grads**2).mean(0), tuple(layer.kernel.shape), True, depthwise)
        kernel, bias = split_weight_matrix(grads.mean(0), tuple(layer.kernel.shape), True, depthwise)
        s = stats[name]
        np.testing.assert_allclose(s.kernel_sq_grad, sq_kernel, atol=1e-14)
        np.testing.assert_allclose(s.bias_sq_grad, sq_bias, atol=1e-14)
        np.testing.assert_allclose(s.kernel_grad, kernel, atol=1e-14)
        np.testing.assert_allclose(s.bias_grad, bias, atol=1e-14)
    dw_grads = np.stack([g.transpose(0, 2, 1).reshape(-1, 10) for g in oracle(model, "dw", x, LABELS)[2]])  # (B, 4, K+1)
    np.testing.assert_allclose(stats["dw"].filter_sq_grad_norm(), (dw_grads**2).sum(-1).mean(0), atol=1e-14)
    np.testing.assert_allclose(stats["dw"].filter_grad_norm(), np.linalg.norm(dw_grads.mean(0), axis=-1), atol=1e-14)


def test_damping_formula_and_inverses():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(6, 4)), rng.normal(size=(5, 3))
    A, G = X.T @ X, Y.T @ Y
    A_d, G_d = damp(A, G, damping=1e-2)
    np.testing.assert_allclose(A_d, A + 0.1 * np.trace(A) / 4 * np.eye(4), atol=1e-14)
    np.testing.assert_allclose(G_d, G + 0.1 * np.trace(G) / 3 * np.eye(3), atol=1e-14)
    pi = np.sqrt((np.trace(A) / 4) / (np.trace(G) / 3))
    lam = 1e-2 * (np.trace(A) / 4) * (np.trace(G) / 3)
    np.testing.assert_allclose(A_d, A + pi * np.sqrt(lam) * np.eye(4), atol=1e-14)
    np.testing.assert_allclose(G_d, G + np.sqrt(lam) / pi * np.eye(3), atol=1e-14)
    A_inv, G_inv = damped_inverses(A + 1e-9 * np.triu(np.ones((4, 4)), 1), G, damping=1e-2)
    np.testing.assert_allclose(A_inv @ A_d, np.eye(4), atol=1e-6)
    np.testing.assert_allclose(G_inv, np.linalg.inv(G_d), atol=1e-12)
    stacked, _ = damped_inverses(np.stack([A, 2 * A]), np.stack([G, G]))
    np.testing.assert_allclose(stacked[1], damped_inverses(2 * A, G)[0], atol=1e-12)
    values, vectors = symmetric_eigh(np.diag([1e-12, 2.0]))
    np.testing.assert_array_equal(values, [0.0, 2.0])
    with pytest.raises(ValueError, match="damping=0"):
        damp(A, G, damping=0)


def test_a_factor_at_zero_is_damped_relative_to_its_layer_and_scores_nothing_alone():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(40, 5)), rng.normal(size=(40, 4))
    A, G, W = X.T @ X / 40, Y.T @ Y / 40, rng.normal(size=(5, 4))
    # A layer that never reaches the loss (G = 0): no channel of it matters. Before: damped by sqrt(λ)·1 in absolute
    # units, it scored ½·sqrt(λ)·wᵀAw whatever the loss scale, above the live layers of a well-fitted model.
    _, dead_inverse = damped_inverses(A, np.zeros((4, 4)), damping=1e-3)
    assert np.all(kron_obs(W, A, dead_inverse) < 1e-100)
    # A dead block of a stack (a depthwise channel after a ReLU that never fires) takes its layer's scale.
    blocks = np.stack([G, 0 * G, 2 * G])
    _, inverses = damped_inverses(np.stack([A] * 3), blocks, damping=1e-3)
    mean = (np.trace(G) + 2 * np.trace(G)) / 2 / 4  # the positive blocks' mean eigenvalue
    np.testing.assert_allclose(inverses[1], np.eye(4) / (np.sqrt(1e-3) * mean), rtol=1e-12)
    scores = [kron_obs(W, A, inverse).sum() for inverse in inverses]
    assert scores[1] < 0.1 * min(scores[0], scores[2])  # and scales with the layer (x 1e-3 with G):
    _, smaller = damped_inverses(np.stack([A] * 3), 1e-3 * blocks, damping=1e-3)
    np.testing.assert_allclose(kron_obs(W, A, smaller[1]).sum(), 1e-3 * scores[1], rtol=1e-9)


def test_group_saliency_sums_members_with_the_obs_formulas():
    inputs = keras.Input((6, 6, 2), dtype=F64)
    a = L.Conv2D(3, 3, padding="same", dtype=F64, name="a")(inputs)
    b = L.Conv2D(3, 1, dtype=F64, name="b")(inputs)
    h = L.Add(dtype=F64)([a, b])  # a and b produce one group
    c = L.Conv2D(2, 3, dtype=F64, name="c")(h)
    model = _compiled(inputs, L.Dense(3, dtype=F64, name="head")(L.Flatten(dtype=F64)(c)))
    graph = DependencyGraph(model)
    factors = collect_kfac(model, (_x(model), LABELS), fisher="empirical", graph=graph, verbose=0)
    group = graph.group("a")
    saliency = GroupSaliency(graph, factors, damping=1e-3)

    def out_side(name, i):
        f, layer = factors[name], model.get_layer(name)
        W = f.weight_matrix(layer.kernel.numpy(), layer.bias.numpy())
        _, G_inv = damped_inverses(f.A, f.G, 1e-3)
        return W[:, i] @ f.A @ W[:, i] / (2 * G_inv[i, i])

    def in_side(name, p):
        f, layer = factors[name], model.get_layer(name)
        W = f.weight_matrix(layer.kernel.numpy(), layer.bias.numpy())
        A_inv, _ = damped_inverses(f.A, f.G, 1e-3)
        rows = np.arange(9) * 3 + p
        return 0.5 * np.trace(W[rows] @ f.G @ W[rows].T @ np.linalg.inv(A_inv[np.ix_(rows, rows)]))

    expected_out = np.array([out_side("a", i) + out_side("b", i) for i in range(3)])
    expected_in = np.array([in_side("c", p) for p in range(3)])
    np.testing.assert_allclose(saliency.group(group, input_side=False), expected_out, rtol=1e-10)
    np.testing.assert_allclose(group_saliency(graph, group, factors), expected_out + expected_in, rtol=1e-10)


def test_depthwise_group_saliency_is_the_whole_channel_block():
    model = depthwise_model()
    graph = DependencyGraph(model)
    factors = collect_kfac(model, (_x(model), LABELS), fisher="empirical", graph=graph, verbose=0)
    f, layer = factors["dw"], model.get_layer("dw")
    W = f.weight_matrix(layer.kernel.numpy(), layer.bias.numpy())  # (C, K+1, M)
    expected = [0.5 * np.trace(W[c].T @ f.A[c] @ W[c] @ f.G[c]) for c in range(2)]
    group = graph.groups[0]  # the input channels, tied to the depthwise outputs
    np.testing.assert_allclose(group_saliency(graph, group, factors, input_side=False), expected, rtol=1e-12)


def test_depthwise_baseline_scores_sum_the_channel_block_columns():
    """`output_scores` scores each output column c·M + m of a depthwise layer within its
    channel block (A[c], G[c]) and sums a group channel's columns."""
    model = depthwise_model()
    graph = DependencyGraph(model)
    factors = collect_kfac(model, (_x(model), LABELS), fisher="empirical", graph=graph, verbose=0)
    f, layer = factors["dw"], model.get_layer("dw")
    W = f.weight_matrix(layer.kernel.numpy(), layer.bias.numpy())  # (C, K+1, M)
    _, G_inv = damped_inverses(f.A, f.G, 1e-3)
    expected = [sum(0.5 * W[c][:, m] @ f.A[c] @ W[c][:, m] / G_inv[c][m, m] for m in range(2)) for c in range(2)]
    saliency = GroupSaliency(graph, factors, damping=1e-3)
    scores = saliency.output_scores(graph.groups[0], lambda w, fac, a_inv, g_inv: kron_obs(w, fac.A, g_inv))
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_float32_precision_is_close_to_float64():
    model = conv_model()
    x = _x(model)
    want = collect_kfac(model, (x, LABELS), fisher="empirical", verbose=0)
    fast = collect_kfac(model, (x, LABELS), fisher="empirical", precision="float32", verbose=0)
    for name in want:
        for key in ("A", "A_channel", "G"):
            expected = getattr(want[name], key)
            np.testing.assert_allclose(getattr(fast[name], key), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    # ... and float32 was used: the float64 model's factors are not reproduced bit for bit.
    assert any(not np.array_equal(fast[name].A, want[name].A) or not np.array_equal(fast[name].G, want[name].G)
               for name in want)


def test_auto_precision_is_the_layers_own():
    model = conv_model()  # float64 layers: auto computes in float64, exactly as precision="float64"
    x = _x(model)
    auto = collect_kfac(model, (x, LABELS), fisher="empirical", verbose=0)
    exact = collect_kfac(model, (x, LABELS), fisher="empirical", precision="float64", verbose=0)
    assert all(np.array_equal(auto[n].A, exact[n].A) and np.array_equal(auto[n].G, exact[n].G) for n in auto)
    inputs = keras.Input((9, 9, 2))  # float32 layers: auto computes in float32
    h = L.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    single = _compiled(inputs, L.Dense(3, name="head")(L.Flatten()(h)))
    x32 = x.astype("float32")
    auto = collect_kfac(single, (x32, LABELS), fisher="empirical", verbose=0)
    fast = collect_kfac(single, (x32, LABELS), fisher="empirical", precision="float32", verbose=0)
    assert all(np.array_equal(auto[n].A, fast[n].A) and np.array_equal(auto[n].G, fast[n].G) for n in auto)
    with pytest.raises(ValueError, match=r"one of \('auto', 'float32', 'float64'\)"):
        collect_kfac(single, (x32, LABELS), precision="float16")


def test_channels_first_taps_transpose_to_channels_last():
    # TF cannot run NCHW convolutions on CPU in graphs: check the im2col and δ layout directly.
    taps = {}
    for data_format in ("channels_last", "channels_first"):
        layer = L.Conv2D(3, 3, strides=2, padding="same", data_format=data_format)
        layer.build((None, 2, 5, 5) if data_format == "channels_first" else (None, 5, 5, 2))
        taps[data_format] = Tap("conv", layer, "conv2d", 9, 2, 3, True, 9)
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 2))
    d = np.random.default_rng(1).normal(size=(2, 3, 3, 3))
    first, last = taps["channels_first"], taps["channels_last"]
    np.testing.assert_array_equal(first.patches(x.transpose(0, 3, 1, 2)), last.patches(x))
    np.testing.assert_array_equal(first.deltas(d.transpose(0, 3, 1, 2)), last.deltas(d))
    assert last.patches(x).shape == (2, 9, 9, 2)


def test_mixed_float16_statistics_are_float64_and_close_to_float32():
    def build(dtype):
        inputs = keras.Input((7, 7, 2))
        h = L.Conv2D(4, 3, padding="same", activation="relu", dtype=dtype, name="conv")(inputs)
        h = L.Flatten(dtype=dtype)(h)
        return _compiled(inputs, L.Dense(3, dtype="float32", name="head")(h))

    fp32, mixed = build("float32"), build("mixed_float16")
    mixed.set_weights(fp32.get_weights())
    x = _x(fp32, n=8).astype("float32")
    y = np.arange(8) % 3
    want = collect_kfac(fp32, (x, y), fisher="empirical", verbose=0)
    got = collect_kfac(mixed, (x, y), fisher="empirical", verbose=0)
    for name in want:
        assert got[name].A.dtype == np.float64 and got[name].G.dtype == np.float64
        np.testing.assert_allclose(got[name].A, want[name].A, rtol=0, atol=5e-3 * np.abs(want[name].A).max())
        np.testing.assert_allclose(got[name].G, want[name].G, rtol=0, atol=2e-2 * np.abs(want[name].G).max())


MIRRORED = textwrap.dedent(
    """
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from keras_autoprune.stats import collect_kfac

    def build():
        inputs = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
        outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
        model = keras.Model(inputs, outputs)
        model.compile(loss="sparse_categorical_crossentropy")
        return model

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        distributed = build()
    plain = build()
    plain.set_weights(distributed.get_weights())
    x = np.random.default_rng(0).normal(size=(12, 6, 6, 2)).astype("float32")
    got = collect_kfac(distributed, x, batch_size=6, verbose=0)
    want = collect_kfac(plain, x, batch_size=6, verbose=0)
    error = max(np.abs(got[k].G - want[k].G).max() / np.abs(want[k].G).max() for k in want)
    error = max(error, max(np.abs(got[k].A - want[k].A).max() / np.abs(want[k].A).max() for k in want))
    print("REPLICAS", distributed.distribute_strategy.num_replicas_in_sync, "EXAMPLES", got.num_examples, "ERROR", error)
    """
)


def test_mirrored_strategy_with_two_logical_devices_matches_single_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", MIRRORED], cwd=root, capture_output=True, text=True, timeout=120)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("REPLICAS")]
    assert line, done.stderr[-3000:]
    _, replicas, _, examples, _, error = line[0].split()
    assert int(replicas) == 2 and float(examples) == 12.0
    assert float(error) < 1e-5
