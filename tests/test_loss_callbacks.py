"""The curvature callbacks with any loss: regression, segmentation, several outputs, custom losses."""

import keras
import numpy as np
import pytest

import keras_autoprune as kap

L = keras.layers


def _outputs(model, x):
    return [np.asarray(o) for o in keras.tree.flatten(model(x, training=False))]


def assert_pruned_equals_masked(cb, model, x):
    """The slim model computes what the masked model computes, output by output."""
    masked = kap.mask_plan(model, cb.plan)
    for slim, trained, mask in zip(_outputs(cb.pruned_model, x), _outputs(model, x), _outputs(masked, x)):
        np.testing.assert_allclose(slim, trained, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(slim, mask, rtol=1e-5, atol=1e-5)


def regression_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = np.stack([np.sin(x[:, 0]) + x[:, 1] * x[:, 2], x[:, 3] - 0.5 * x[:, 4] ** 2], axis=1).astype("float32")
    return x, y


def regression_model(loss="mse"):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = L.Dense(16, activation="relu", name="d1")(inputs)
    h = L.Dense(16, activation="relu", name="d2")(h)
    model = keras.Model(inputs, L.Dense(2, name="out")(h))
    model.compile(keras.optimizers.Adam(1e-2), loss)
    return model


def test_nap_prunes_a_regression_model_with_mse_during_fit():
    x, y = regression_data()
    model = regression_model()
    baseline = float(np.mean((y - y.mean(0)) ** 2))
    cb = kap.NAPCallback((x[:128], y[:128]), budget=kap.Budget(flops=0.5), start_epoch=2, verbose=0)
    history = model.fit(x, y, epochs=5, batch_size=32, callbacks=[cb], verbose=0)
    flops = kap.count_flops(model)
    assert kap.count_flops(cb.pruned_model) <= 0.5 * flops
    assert history.history["flops_kept"][-1] <= 0.5
    assert_pruned_equals_masked(cb, model, x[:16])
    error = float(np.mean((np.asarray(cb.pruned_model(x)) - y) ** 2))
    assert error < 0.5 * baseline, (error, baseline)  # still a regressor after pruning
    assert cb.report.extra["fisher"] == "true"
    assert "gaussian, y ~ N(f(x), I)" in cb.report.extra["likelihood"]


def test_nap_prunes_a_segmentation_model_with_per_pixel_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = (x[..., 0] > 0).astype("int64") + (x[..., 1] > 0.5)  # 3 classes per pixel
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="c2")(h)
    model = keras.Model(inputs, L.Conv2D(3, 1, activation="softmax", name="pixels")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    cb = kap.NAPCallback((x, y), budget=kap.Budget(flops=0.6), verbose=0)
    model.fit(x, y, epochs=2, batch_size=16, callbacks=[cb], verbose=0)
    assert kap.count_flops(cb.pruned_model) <= 0.6 * kap.count_flops(model)
    assert_pruned_equals_masked(cb, model, x[:4])
    assert "categorical, a class per position" in cb.report.extra["likelihood"]


def test_nap_prunes_a_two_output_model_with_loss_weights():
    x, y = regression_data(128)
    labels = {"kind": (y[:, 0] > 0).astype("int64"), "value": y}
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = L.Dense(16, activation="relu", name="trunk")(inputs)
    h2 = L.Dense(12, activation="relu", name="branch")(h)
    model = keras.Model(inputs, {"kind": L.Dense(2, name="kind")(h), "value": L.Dense(2, name="value")(h2)})
    model.compile(
        "adam", {"kind": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "value": "mse"},
        loss_weights={"kind": 1.0, "value": 0.5},
    )
    cb = kap.NAPCallback((x, labels), budget=kap.Budget(params=0.6), fisher="empirical", verbose=0)
    model.fit(x, labels, epochs=2, batch_size=32, callbacks=[cb], verbose=0)
    assert kap.count_params(cb.pruned_model) <= 0.6 * kap.count_params(model)
    assert_pruned_equals_masked(cb, model, x[:8])
    facts = cb.report.extra
    assert facts["fisher"] == "empirical" and "empirical Fisher (requested" in facts["likelihood"]
    assert "output 'kind': categorical" in facts["likelihood"] and "loss weight 0.5" in facts["likelihood"]


def huber_cubed(y_true, y_pred):
    return keras.ops.mean(keras.ops.abs(y_true - y_pred) ** 3, axis=-1)


def test_a_custom_loss_falls_back_to_the_empirical_fisher_and_says_so(capsys):
    x, y = regression_data(128)
    model = regression_model(huber_cubed)
    cb = kap.NAPCallback((x, y), budget=kap.Budget(flops=0.6), verbose=1)
    model.fit(x, y, epochs=1, batch_size=32, callbacks=[cb], verbose=0)
    printed = capsys.readouterr().out
    assert (
        "NAPCallback: empirical Fisher (squared gradients of the loss at the real labels), because "
        "loss=huber_cubed of output 'out' defines no distribution to sample labels from" in printed
    )
    assert cb.report.extra["fisher"] == "empirical"
    assert kap.count_flops(cb.pruned_model) <= 0.6 * kap.count_flops(model)
    model = regression_model(huber_cubed)
    with pytest.raises(ValueError, match="NAPCallback `data` does not fit .*defines no distribution.*give labels"):
        model.fit(x, y, epochs=1, callbacks=[kap.NAPCallback(x, budget=kap.Budget(flops=0.6), verbose=0)], verbose=0)
    assert model.optimizer.iterations.numpy() == 0  # failed before the first step


@pytest.mark.parametrize("loss", ["mae", huber_cubed], ids=["mae", "custom"])
def test_eigendamage_and_psap_prune_regression_models(loss):
    x, y = regression_data(64)
    model = regression_model(loss)
    eigen = kap.EigenDamageCallback((x, y), budget=kap.Budget(params=0.8), verbose=0)
    slim = eigen.prune(model)
    np.testing.assert_allclose(np.asarray(slim(x[:8])), np.asarray(eigen.model(x[:8])), rtol=1e-4, atol=1e-4)
    assert eigen.plan.layers and kap.count_params(slim) <= 0.8 * kap.count_params(model)
    assert eigen.report.extra["fisher"] == ("true" if loss == "mae" else "empirical")
    psap = kap.PSAPCallback(kap.Budget(flops=0.6), (x, y), verbose=0)
    assert kap.count_flops(psap.prune(model)) <= 0.6 * kap.count_flops(model)
    assert psap.report.extra["fisher"] == "empirical"  # PSAP's gradients are the loss's, at the real labels


def test_surgery_compiles_the_slim_model_with_an_unregistered_custom_loss():
    """Keras clones a compiled model from its compile config, which cannot name an unregistered
    function: the slim model gets the same loss object and a fresh optimizer of the same config."""
    x, y = regression_data(32)
    model = regression_model(huber_cubed)
    slim = kap.apply_plan(model, kap.PrunePlan.uniform(kap.DependencyGraph(model), 0.5))
    assert slim.loss is huber_cubed and slim.optimizer is not model.optimizer
    assert float(slim.optimizer.learning_rate) == pytest.approx(0.01)
    slim.fit(x, y, epochs=1, verbose=0)
    assert model.compiled and model.optimizer.iterations.numpy() == 0  # the input model is untouched
