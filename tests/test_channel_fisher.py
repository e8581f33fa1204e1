"""The channel-level Fisher (`stats.channel_fisher`) against per-example gradients, and NAP's ``scorer="fisher"``."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_autoprune as kap
from keras_autoprune.stats import collect_channel_fisher, group_channel_fisher

L = keras.layers
F64 = "float64"


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2), dtype=F64)
    h = L.Conv2D(3, 3, padding="same", activation="relu", dtype=F64, name="c1")(inputs)
    h = L.Conv2D(4, 3, strides=2, padding="same", dtype=F64, name="c2")(h)
    model = keras.Model(inputs, L.Dense(3, dtype=F64, name="head")(L.GlobalAveragePooling2D(dtype=F64)(h)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _oracle(model, x, y):
    """``½ mean_b (Σ_p x_bpc ∂ℓ_b/∂x_bpc)²`` at c2's input, from per-example gradients (examples are independent)."""
    reader_input = tf.constant(np.asarray(keras.Model(model.inputs, model.get_layer("c1").output)(x)))
    rest = keras.Input((6, 6, 3), dtype=F64)
    back = keras.Model(rest, model.get_layer("head")(L.GlobalAveragePooling2D(dtype=F64)(model.get_layer("c2")(rest))))
    with tf.GradientTape() as tape:
        tape.watch(reader_input)
        total = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, back(reader_input), from_logits=True))
    derivative = (reader_input.numpy() * tape.gradient(total, reader_input).numpy()).sum(axis=(1, 2))
    return 0.5 * np.mean(derivative**2, axis=0)


def test_channel_fisher_sums_over_locations_before_squaring_as_per_example_gradients_do():
    model = _model()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 6, 6, 2)), rng.integers(0, 3, 6)
    result = collect_channel_fisher(model, (x, y), fisher="empirical", batch_size=4, verbose=0)
    np.testing.assert_allclose(result["c2"], _oracle(model, x, y), rtol=1e-10)
    # Scored readers are those reading prunable channels (c1 reads the model's input).
    assert set(result) == {"c2", "head"} and result["head"].shape == (4,)
    scores = group_channel_fisher(kap.DependencyGraph(model), result)
    np.testing.assert_array_equal(scores["c1"], result["c2"])  # c1's channels are read by c2 only
    np.testing.assert_array_equal(scores["c2"], result["head"])  # c2's through the pool by the head


def test_nap_with_the_fisher_scorer_prunes_to_the_budget_and_refuses_what_it_cannot_do():
    model = _model()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 6, 6, 2)), rng.integers(0, 3, 16)
    callback = kap.NAPCallback((x, y), budget=kap.Budget(flops=0.6), scorer="fisher", cost_aware=True,
                               batch_size=8, verbose=0)
    slim = callback.prune(model)
    assert kap.count_flops(slim) <= 0.6 * kap.count_flops(model) and callback.statistics_seconds > 0
    with pytest.raises(ValueError, match="obs_update needs K-FAC factors"):
        kap.NAPCallback((x, y), budget=kap.Budget(flops=0.6), scorer="fisher", obs_update=True)
    with pytest.raises(ValueError, match="Leave `input_side` unset"):
        kap.NAPCallback((x, y), budget=kap.Budget(flops=0.6), scorer="fisher", input_side=True)


def test_a_channel_read_through_a_flatten_is_one_removal_summed_over_its_positions():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4, 4, 2), dtype=F64)
    h = L.Conv2D(3, 3, padding="same", activation="relu", dtype=F64, name="c1")(inputs)
    model = keras.Model(inputs, L.Dense(3, dtype=F64, name="head")(L.Flatten(dtype=F64)(h)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 4, 4, 2)), rng.integers(0, 3, 5)
    result = collect_channel_fisher(model, (x, y), fisher="empirical", batch_size=5, verbose=0)
    features = tf.constant(np.asarray(keras.Model(inputs, h)(x)))
    rest = keras.Input((4, 4, 3), dtype=F64)
    back = keras.Model(rest, model.get_layer("head")(L.Flatten(dtype=F64)(rest)))
    with tf.GradientTape() as tape:
        tape.watch(features)
        total = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, back(features), from_logits=True))
    derivative = (features.numpy() * tape.gradient(total, features).numpy()).sum(axis=(1, 2))  # all 16 positions
    np.testing.assert_allclose(result["head"], 0.5 * np.mean(derivative**2, axis=0), rtol=1e-10)
    scores = group_channel_fisher(kap.DependencyGraph(model), result)
    np.testing.assert_array_equal(scores["c1"], result["head"])


def test_an_attention_head_is_scored_as_one_removal_through_the_output_projection():
    """``D_bh`` = d loss_b / d s at s = 1 when head h's values are scaled by s (its output is linear in them)."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5, 6), dtype=F64)
    attended = L.MultiHeadAttention(num_heads=3, key_dim=2, dtype=F64, name="mha")(inputs, inputs)
    model = keras.Model(inputs, L.Dense(3, dtype=F64, name="head")(L.GlobalAveragePooling1D(dtype=F64)(attended)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 5, 6)), rng.integers(0, 3, 7)
    graph = kap.DependencyGraph(model)
    result = collect_channel_fisher(model, (x, y), fisher="empirical", batch_size=7, graph=graph, verbose=0)
    scores = group_channel_fisher(graph, result)
    value = model.get_layer("mha").value_dense
    kernel, bias = (w.numpy() for w in value.weights)

    def losses(head: int, scale: float) -> np.ndarray:
        k, b = kernel.copy(), bias.copy()
        k[:, head, :] *= scale
        b[head, :] *= scale
        value.kernel.assign(k)
        value.bias.assign(b)
        return keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True).numpy()

    step = 1e-5
    oracle = [0.5 * np.mean(((losses(h, 1 + step) - losses(h, 1 - step)) / (2 * step)) ** 2) for h in range(3)]
    losses(0, 1.0)  # restore
    assert scores["mha"].shape == (3,) and scores["mha"].min() > 0
    np.testing.assert_allclose(scores["mha"], oracle, rtol=1e-6)


def test_a_group_no_scored_layer_reads_is_left_whole_with_a_warning():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inputs)
    h = L.SeparableConv2D(5, 3, padding="same", name="sep")(h)  # reads c1; not a layer the statistics tap
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(h)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    graph = kap.DependencyGraph(model)
    rng = np.random.default_rng(4)
    result = collect_channel_fisher(model, (rng.normal(size=(8, 6, 6, 2)), rng.integers(0, 3, 8)), graph=graph, verbose=0)
    with pytest.warns(UserWarning, match=r"no reader of group\(s\) \['c1'\]"):
        scores = group_channel_fisher(graph, result)
    assert "c1" not in scores and scores["sep"].shape == (5,)
