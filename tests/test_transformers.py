"""Transformers: MultiHeadAttention heads, token MLPs, Embedding, K-FAC head scores, NAP end to end.

The regression model pruned end to end by NAPCallback is
`tests/test_loss_callbacks.py::test_nap_prunes_a_regression_model_with_mse_during_fit`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_autoprune as kap
from keras_autoprune.allocation.cost import PlanCost
from keras_autoprune.methods import nap
from keras_autoprune.stats import collect_gradient_stats, collect_kfac
from tests.helpers import assert_contract, randomize

L = keras.layers
ops = keras.ops
# The tiny ViT's position ids come from `ones_like` and `cumsum` nodes, which have neither a pruning
# handler nor a FLOPs formula: they only carry the token axis, and these warnings say so.
pytestmark = pytest.mark.filterwarnings("ignore:.*'ones_like.*:UserWarning")


def tiny_vit(width=16, heads=4, key_dim=4, hidden=16, blocks=2, classes=10, seed=0):
    """Patch Conv2D, tokens, Embedding positions, pre-norm encoder blocks (MHA + gelu MLP), mean pooling."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = L.Conv2D(width, 8, strides=8, name="patch")(inputs)  # 4x4 patches of 8x8 pixels
    x = L.Reshape((16, width), name="tokens")(x)
    positions = ops.cumsum(ops.ones_like(x[..., 0], dtype="int32"), axis=1) - 1  # 0..15 for every image
    x = L.Add(name="add_pos")([x, L.Embedding(16, width, name="pos")(positions)])
    for b in range(blocks):
        y = L.LayerNormalization(name=f"ln{b}a")(x)
        y = L.MultiHeadAttention(heads, key_dim, name=f"mha{b}")(y, y)
        x = L.Add(name=f"add{b}a")([x, y])
        y = L.LayerNormalization(name=f"ln{b}b")(x)
        y = L.Dense(hidden, activation="gelu", name=f"mlp{b}_1")(y)
        y = L.Dense(width, name=f"mlp{b}_2")(y)
        x = L.Add(name=f"add{b}b")([x, y])
    x = L.GlobalAveragePooling1D(name="pool")(L.LayerNormalization(name="ln_out")(x))
    return keras.Model(inputs, L.Dense(classes, activation="softmax", name="head")(x))


@pytest.fixture(scope="module")
def vit():
    model = tiny_vit()
    randomize(model, kernels=False)
    return model, kap.DependencyGraph(model)


def test_heads_and_mlp_hidden_units_are_the_prunable_groups(vit):
    model, graph = vit
    prunable = {g.id: g for g in graph.prunable_groups}
    assert sorted(prunable) == ["mha0", "mha1", "mlp0_1", "mlp1_1"]
    heads = prunable["mha0"]
    assert heads.size == 4 and heads.chunks.tolist() == [0, 1, 2, 3]  # one channel per head
    assert [(m.layer, m.side, m.positions.tolist()) for m in heads.members] == [("mha0", "internal", [0, 1, 2, 3])]
    assert prunable["mlp0_1"].size == 16
    stream = graph.group("patch")  # the residual stream: tied by the Adds, read by LayerNormalization
    assert not stream.prunable and stream.size == 16
    assert {"mha0", "mha1", "pos", "mlp0_2", "mlp1_2"} <= {m.layer for m in stream.members}


def test_uniform_plan_removes_whole_heads_and_is_exact(vit):
    model, graph = vit
    plan = kap.PrunePlan.uniform(graph, 0.5)
    assert len(plan.kept["mha0"]) == 2 and len(plan.kept["mlp0_1"]) == 8
    slim, _ = assert_contract(model, plan, graph, tolerance=1e-5)
    mha = slim.get_layer("mha0")
    assert mha.num_heads == 2 and mha.key_dim == 4
    assert tuple(mha.query_dense.kernel.shape) == (16, 2, 4) and tuple(mha.query_dense.bias.shape) == (2, 4)
    assert tuple(mha.value_dense.kernel.shape) == (16, 2, 4)
    assert tuple(mha.output_dense.kernel.shape) == (2, 4, 16) and tuple(mha.output_dense.bias.shape) == (16,)
    assert slim.get_layer("mlp0_1").units == 8 and tuple(slim.get_layer("mlp0_2").kernel.shape) == (8, 16)
    # Removed: 2 heads x (3 projections x (16x4 + 4) + 4x16 rows) per block, 8 x (16 + 1 + 16) per MLP.
    assert kap.count_params(model) - kap.count_params(slim) == 2 * (2 * (3 * 68 + 64) + 8 * 33)
    assert PlanCost(model, graph)(plan) == kap.count_flops(slim)
    assert model.get_layer("mha0").num_heads == 4  # the input model is untouched


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_plans_keep_whole_heads_and_are_exact(vit, seed):
    model, graph = vit
    rng = np.random.default_rng(seed)
    kept = {g.id: np.sort(rng.choice(g.size, rng.integers(1, g.size + 1), replace=False)) for g in graph.prunable_groups}
    slim, masked = assert_contract(model, kap.PrunePlan(kept), graph, tolerance=1e-5)
    for b in range(2):
        assert slim.get_layer(f"mha{b}").num_heads == len(kept[f"mha{b}"])
        heads = kept[f"mha{b}"]
        np.testing.assert_array_equal(  # surviving heads keep their weights, in order
            slim.get_layer(f"mha{b}").output_dense.kernel.numpy(), model.get_layer(f"mha{b}").output_dense.kernel.numpy()[heads]
        )
        removed = np.setdiff1d(np.arange(4), heads)
        mha = masked.get_layer(f"mha{b}")
        assert not np.any(mha.value_dense.kernel.numpy()[:, removed]) and not np.any(mha.output_dense.kernel.numpy()[removed])


def test_a_head_with_zero_query_and_key_still_attends():
    """Why the mask zeroes the value columns and output rows: zero q/k give uniform, non-zero attention."""
    inputs = keras.Input((5, 4))
    mha = L.MultiHeadAttention(2, 3, name="mha")
    model = keras.Model(inputs, mha(inputs, inputs))
    randomize(model)
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype("float32")
    base = np.asarray(model(x))
    for projection in (mha.query_dense, mha.key_dense):
        kernel, bias = projection.kernel.numpy(), projection.bias.numpy()
        kernel[:, 1], bias[1] = 0, 0
        projection.kernel.assign(kernel)
        projection.bias.assign(bias)
    assert np.abs(np.asarray(model(x)) - base).max() > 1e-3  # head 1 still contributes
    graph = kap.DependencyGraph(model)
    slim, masked = assert_contract(model, kap.PrunePlan({"mha": [0]}), graph)
    assert slim.get_layer("mha").num_heads == 1


def attention_streams():
    """Cross-attention with a gate, a sigmoid value stream (folded), a shared layer, output_shape, scores."""
    queries, memory = keras.Input((5, 6)), keras.Input((7, 3))
    q = L.Dense(8, name="dq")(queries)
    v = L.Dense(6, activation="sigmoid", name="dv")(memory)  # removed channels carry 0.5: folded into biases
    k = L.Dense(4, name="dk")(memory)
    y = L.Dense(2, name="out")(L.MultiHeadAttention(3, 2, value_dim=3, use_gate=True, name="cross")(q, v, key=k))
    z, scores = L.MultiHeadAttention(2, 2, name="scored")(q, q, return_attention_scores=True)
    shared = L.MultiHeadAttention(2, 3, output_shape=5, name="shared")
    w = L.Add()([shared(q, q), shared(L.Dense(8, name="dq2")(q), q)])
    model = keras.Model([queries, memory], [y, L.Dense(2)(z), scores, L.Dense(2)(w)])
    randomize(model)
    return model


def test_attention_streams_heads_gate_fold_shared_and_scores():
    model = attention_streams()
    graph = kap.DependencyGraph(model)
    sizes = {g.id: g.size for g in graph.prunable_groups}
    assert sizes == {"dq": 8, "dv": 6, "dk": 4, "shared": 2, "shared#2": 5, "cross": 3, "cross#2": 8, "scored#2": 8}
    assert "attention scores" in graph.group("scored").reason  # returned scores carry the heads
    for ratio in (0.34, 0.5):
        slim, _ = assert_contract(model, kap.PrunePlan.uniform(graph, ratio), graph, tolerance=1e-5)
    assert slim.get_layer("shared").get_config()["output_shape"] == (3,)
    rng = np.random.default_rng(0)
    for _ in range(4):
        kept = {g.id: np.sort(rng.choice(g.size, rng.integers(1, g.size + 1), replace=False)) for g in graph.prunable_groups}
        assert_contract(model, kap.PrunePlan(kept), graph, tolerance=1e-5)


def test_embedding_output_channels_are_pruned():
    ids = keras.Input((6,), dtype="int32")
    x = L.Embedding(20, 8, name="emb")(ids)
    x = L.Dense(4, activation="relu", name="d")(x)
    model = keras.Model(ids, L.Dense(2)(L.GlobalAveragePooling1D()(x)))
    randomize(model)
    graph = kap.DependencyGraph(model)
    assert {g.id: g.size for g in graph.prunable_groups} == {"emb": 8, "d": 4}
    plan = kap.PrunePlan({"emb": [1, 4, 6], "d": [0, 3]})
    slim = kap.apply_plan(model, plan, graph)
    masked = kap.mask_plan(model, plan, graph)
    x = np.random.default_rng(0).integers(0, 20, (3, 6))
    np.testing.assert_allclose(np.asarray(slim(x)), np.asarray(masked(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(slim.get_layer("emb").embeddings.numpy(), model.get_layer("emb").embeddings.numpy()[:, [1, 4, 6]])


def test_attention_flops_formula(vit):
    model, _ = vit
    row = next(r for r in kap.flops_table(model) if r.layer == "mha0")
    t = s = 16
    projections = 4 * 2 * t * 16 * 16 + (t * 16 + s * 32 + t * 16)  # q, k, v, output + biases
    attention = t * 16 + 4 * t * s * (2 * 4 + 5 + 2 * 4)  # scaling, scores, softmax, weighted sum
    assert row.counted and row.flops == projections + attention
    assert row.params == 4 * (16 * 16 + 16)


def test_pruned_vit_saves_reloads_in_safe_mode_and_exports_to_tflite(vit, tmp_path):
    model, graph = vit
    slim = kap.apply_plan(model, kap.PrunePlan.uniform(graph, 0.5), graph)
    slim.save(tmp_path / "slim.keras")
    loaded = keras.saving.load_model(tmp_path / "slim.keras", safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(slim(x)), atol=1e-6)
    assert loaded.get_layer("mha1").num_heads == 2
    result = kap.export_tflite(slim, tmp_path / "slim.tflite")
    assert result.max_abs_error < 1e-5


# -- K-FAC of the projections ----------------------------------------------------------
F64 = "float64"


def attention_classifier():
    inputs = keras.Input((5, 4), dtype=F64)
    h = L.Dense(6, activation="tanh", dtype=F64, name="embed")(inputs)
    a = L.MultiHeadAttention(2, 3, value_dim=2, dtype=F64, name="mha")(h, h)
    model = keras.Model(inputs, L.Dense(3, dtype=F64, name="head")(L.Flatten(dtype=F64)(a)))
    randomize(model, seed=3)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_kfac_factors_and_gradients_of_attention_projections_match_oracle():
    model = attention_classifier()
    x = np.random.default_rng(1).normal(size=(4, 5, 4))
    y = np.array([0, 2, 1, 2])
    factors = collect_kfac(model, (x, y), fisher="empirical", verbose=0)
    grads = collect_gradient_stats(model, (x, y), fisher="empirical", verbose=0)
    mha = model.get_layer("mha")
    assert {n for n in factors if n.startswith("mha/")} == {"mha/query", "mha/key", "mha/value", "mha/attention_output"}
    assert factors["mha/query"].kind == "einsum_dense" and factors["mha/query"].G.shape == (6, 6)
    assert factors["mha/attention_output"].A.shape == (2 * 2 + 1, 2 * 2 + 1)

    probe = keras.Model(model.inputs, [model.get_layer("embed").output, mha.output, model.output])
    A, G = 0.0, 0.0
    projections = [mha.query_dense, mha.key_dense, mha.value_dense, mha.output_dense]
    per_example = {p.name: [] for p in projections}
    for b in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            h, out, logits = probe([x[b : b + 1]], training=False)
            loss = -tf.nn.log_softmax(logits)[0, y[b]]
        delta = tape.gradient(loss, out).numpy()[0]  # (T, D): ∂loss/∂(output projection's pre-activation)
        h1 = np.concatenate([h.numpy()[0], np.ones((5, 1))], axis=1)
        A = A + h1.T @ h1 / (len(x) * 5)
        G = G + delta.T @ delta / len(x)
        for p in projections:
            g_kernel, g_bias = tape.gradient(loss, [p.kernel, p.bias])
            per_example[p.name].append((g_kernel.numpy(), g_bias.numpy()))
    for name in ("query", "key", "value"):  # they all read h
        np.testing.assert_allclose(factors[f"mha/{name}"].A, A, atol=1e-12)
    np.testing.assert_allclose(factors["mha/attention_output"].G, G, atol=1e-12)
    for name, pairs in per_example.items():  # Σ_t a δᵀ of the replayed projections are the real gradients
        kernels = np.stack([k for k, _ in pairs])
        biases = np.stack([b for _, b in pairs])
        np.testing.assert_allclose(grads[f"mha/{name}"].kernel_grad, kernels.mean(0), atol=1e-12)
        np.testing.assert_allclose(grads[f"mha/{name}"].kernel_sq_grad, (kernels**2).mean(0), atol=1e-12)
        np.testing.assert_allclose(grads[f"mha/{name}"].bias_grad, biases.mean(0), atol=1e-12)


def test_nap_scores_a_head_as_the_sum_of_its_projection_saliencies():
    model = attention_classifier()
    mha = model.get_layer("mha")
    for projection in (mha.value_dense,):  # head 1 nearly silenced: its value columns are tiny
        kernel, bias = projection.kernel.numpy(), projection.bias.numpy()
        kernel[:, 1] *= 1e-3
        bias[1] *= 1e-3
        projection.kernel.assign(kernel)
        projection.bias.assign(bias)
    output = mha.output_dense.kernel.numpy()
    output[1] *= 1e-3
    mha.output_dense.kernel.assign(output)
    x = np.random.default_rng(1).normal(size=(16, 5, 4))
    graph = kap.DependencyGraph(model)
    factors = collect_kfac(model, x, verbose=0)
    scores = nap.channel_saliencies(model, graph, factors)["mha"]
    assert scores.shape == (2,) and np.all(np.isfinite(scores)) and np.all(scores >= 0)
    assert scores[1] < 0.01 * scores[0]
    saliency = kap.stats.GroupSaliency(graph, factors)
    group = graph.group("mha")
    sides = saliency.group(group, input_side=False) + saliency.group(group, output_side=False)
    np.testing.assert_allclose(scores, sides, rtol=1e-12)  # q/k/v columns (output side) + output rows (input side)
    for scorer in ("kron-obs", "c-obd"):
        baseline = nap.channel_saliencies(model, graph, factors, scorer=scorer)["mha"]
        assert np.all(np.isfinite(baseline)) and baseline[1] < baseline[0]


# -- NAPCallback end to end on CIFAR-10 ---------------------------------------------------
def cifar10_images(n_per_class=40):
    from benchmarks.converged import DEFAULT_SOURCE
    from keras_autoprune.datasets import load_images

    if not DEFAULT_SOURCE.is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not present")
    return load_images(DEFAULT_SOURCE, "test", max_per_class=n_per_class)[:2]


def test_nap_callback_prunes_heads_of_a_tiny_vit_on_cifar10():
    x, y = cifar10_images()  # 400 real 32x32 images in [0, 1]
    model = tiny_vit()
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    cb = kap.NAPCallback((x[:128], y[:128]), budget=kap.Budget(flops=0.8), start_epoch=1, verbose=0)
    history = model.fit(x, y, epochs=2, batch_size=32, callbacks=[cb], verbose=0)
    slim = cb.pruned_model
    heads = [slim.get_layer(f"mha{b}").num_heads for b in range(2)]
    assert sum(heads) < 8 and min(heads) >= 1  # fewer (whole) heads
    assert kap.count_flops(slim) <= 0.8 * kap.count_flops(model)
    assert history.history["flops_kept"][-1] <= 0.8
    masked = kap.mask_plan(model, cb.plan)
    np.testing.assert_allclose(np.asarray(slim(x[:16])), np.asarray(masked(x[:16])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(slim(x[:16])), np.asarray(model(x[:16])), rtol=1e-5, atol=1e-6)
