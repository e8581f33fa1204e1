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
    assert set(result) == {"c1", "c2", "head"} and result["c1"].shape == (2,) and result["head"].shape == (4,)
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
