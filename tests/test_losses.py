"""Fisher statistics for every loss: Gaussian (MSE), Laplace (MAE), Bernoulli (BCE, multi-label,
per pixel), per-pixel softmax, several outputs with loss weights, and the empirical fallback.

Models are float64 so that statistics can be compared to 1e-10. "Exact" tests reproduce
the seeded draws (example k takes the next n draws of ``default_rng(seed).random``, one
per position of each output with a loss) and compute the factors by hand; "closed form"
tests compare with the expectation within Monte-Carlo tolerance.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_autoprune.stats import collect_gradient_stats, collect_kfac, resolve_likelihood
from tests.helpers import randomize

L = keras.layers
F64 = "float64"


def _x(n, shape, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *shape))


def _with_bias(a):
    return np.concatenate([a, np.ones((len(a), 1))], axis=1)


def linear_model(loss="mse", units=3, seed=0):
    """Two linear Dense layers: for a Gaussian likelihood the true Fisher is known in closed form."""
    inputs = keras.Input((4,), dtype=F64)
    h = L.Dense(5, dtype=F64, name="hidden")(inputs)
    model = keras.Model(inputs, L.Dense(units, dtype=F64, name="out")(h))
    randomize(model, seed=seed)
    model.compile(loss=loss)
    return model


def _hidden(model, x):
    return keras.Model(model.inputs[0], model.get_layer("hidden").output)(x).numpy()


# -- Gaussian and Laplace -----------------------------------------------------------
def test_gaussian_true_fisher_is_exact_for_the_seeded_draws():
    """y ~ N(f, I): δ_out = (f - y)/√D = -ε/√D, ε = ndtri(u); δ_hidden = W₂ δ_out (linear model)."""
    model = linear_model()
    x = _x(8, (4,))
    factors = collect_kfac(model, x, seed=3, batch_size=3, verbose=0)  # no labels needed
    eps = tf.math.ndtri(np.random.default_rng(3).random((8, 3))).numpy()
    G_out = eps.T @ eps / (3 * 8)
    h = _with_bias(_hidden(model, x))
    np.testing.assert_allclose(factors["out"].G, G_out, atol=1e-12)
    np.testing.assert_allclose(factors["out"].A, h.T @ h / 8, atol=1e-12)
    W2 = model.get_layer("out").kernel.numpy()
    np.testing.assert_allclose(factors["hidden"].G, W2 @ G_out @ W2.T, atol=1e-12)
    assert factors.fisher == "true" and factors.likelihood.kind == "gaussian"


def test_gaussian_true_fisher_of_a_linear_model_is_A_kron_identity():
    """The exact Fisher of the last layer of f = W̃ᵀa under N(f, I), per unit of the mean loss: A ⊗ I/D."""
    model = linear_model(units=2)
    x = _x(4000, (4,))
    factors = collect_kfac(model, x, batch_size=1000, verbose=0)
    G = factors["out"].G
    np.testing.assert_allclose(G, np.eye(2) / 2, atol=4 * np.sqrt(2 / 4000) / 2)  # 4 standard errors
    h = _with_bias(_hidden(model, x))
    expected = np.kron(h.T @ h / 4000, np.eye(2) / 2)
    block = factors["out"].fisher_block()
    assert np.abs(block - expected).max() <= 0.05 * np.abs(expected).max()


def test_laplace_fisher_of_mae_has_exactly_one_over_d_on_the_diagonal():
    """y ~ Laplace(f, 1): δ = ±1/√D per unit, so diag(G) = 1/D whatever the draws."""
    model = linear_model(loss="mae")
    x = _x(6, (4,))
    factors = collect_kfac(model, x, seed=5, verbose=0)
    signs = np.sign(np.random.default_rng(5).random((6, 3)) - 0.5)
    np.testing.assert_allclose(factors["out"].G, signs.T @ signs / (3 * 6), atol=1e-12)
    np.testing.assert_allclose(np.diag(factors["out"].G), np.full(3, 1 / 3), atol=1e-12)
    assert factors.likelihood.kind == "laplace"


# -- Bernoulli ------------------------------------------------------------------------
def multilabel_model(from_logits, seed=0):
    inputs = keras.Input((4,), dtype=F64)
    h = L.Dense(5, activation="tanh", dtype=F64, name="hidden")(inputs)
    out = L.Dense(3, activation=None if from_logits else "sigmoid", dtype=F64, name="out")(h)
    model = keras.Model(inputs, out)
    randomize(model, seed=seed)
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=from_logits))
    return model


def test_sigmoid_fisher_is_exact_for_the_draws_and_logits_or_probabilities_agree():
    probs, logits = multilabel_model(False), multilabel_model(True)
    x = _x(10, (4,))
    got = collect_kfac(probs, x, seed=2, batch_size=4, verbose=0)
    same = collect_kfac(logits, x, seed=2, batch_size=10, verbose=0)
    p = probs(x).numpy()
    t = (np.random.default_rng(2).random((10, 3)) >= 1 - p).astype(float)
    delta = (p - t) / np.sqrt(3)
    for factors in (got, same):
        np.testing.assert_allclose(factors["out"].G, delta.T @ delta / 10, atol=1e-12)
    np.testing.assert_allclose(got["hidden"].G, same["hidden"].G, atol=1e-12)
    empirical = collect_kfac(logits, (x, t), fisher="empirical", verbose=0)  # δ = (p - y)/D
    np.testing.assert_allclose(empirical["out"].G, (p - t).T @ (p - t) / (9 * 10), atol=1e-12)


def test_sigmoid_fisher_matches_the_closed_form_p_one_minus_p():
    """E_y[(p - y)(p - y)ᵀ] = diag(p(1 - p)) for independent sigmoid units."""
    model = multilabel_model(True)
    x = _x(6000, (4,))
    p = tf.sigmoid(model(x)).numpy()
    weight = p * (1 - p)
    factors = collect_kfac(model, x, batch_size=2000, verbose=0)
    np.testing.assert_allclose(factors["out"].G, np.diag(weight.mean(0)) / 3, atol=0.006)
    stats = collect_gradient_stats(model, x, batch_size=2000, verbose=0)
    h = _hidden(model, x)  # the diagonal Fisher: E[g²] = a² p(1 - p)/D
    np.testing.assert_allclose(stats["out"].kernel_sq_grad, (h**2).T @ weight / 6000 / 3, rtol=0.1)
    np.testing.assert_allclose(stats["out"].bias_sq_grad, weight.mean(0) / 3, rtol=0.1)


# -- per-pixel softmax and sigmoid ----------------------------------------------------
def segmentation_model(activation="softmax", classes=3, loss=None, spatial=(4, 4)):
    inputs = keras.Input((*spatial, 2), dtype=F64)
    h = L.Conv2D(4, 3, padding="same", activation="relu", dtype=F64, name="conv")(inputs)
    model = keras.Model(inputs, L.Conv2D(classes, 1, activation=activation, dtype=F64, name="head")(h))
    randomize(model)
    model.compile(loss=loss or "sparse_categorical_crossentropy")
    return model


def test_per_pixel_softmax_samples_one_class_per_pixel():
    model = segmentation_model()
    x = _x(5, (4, 4, 2))
    factors = collect_kfac(model, x, seed=4, batch_size=2, verbose=0)
    p = model(x).numpy()  # (5, 4, 4, 3)
    u = np.random.default_rng(4).random((5, 16)).reshape(5, 4, 4)
    cdf = np.cumsum(p, axis=-1)
    classes = np.minimum((cdf <= u[..., None] * cdf[..., -1:]).sum(-1), 2)
    residual = (p - np.eye(3)[classes]).reshape(-1, 3) / np.sqrt(16)  # the mean over 16 pixels
    np.testing.assert_allclose(factors["head"].G, residual.T @ residual / 5, atol=1e-12)
    assert factors["head"].num_locations == 16.0
    empirical = collect_kfac(model, (x, classes), fisher="empirical", verbose=0)
    residual = residual / np.sqrt(16)  # δ = (p - y)/P
    np.testing.assert_allclose(empirical["head"].G, residual.T @ residual / 5, atol=1e-12)
    for labels in (classes[..., None], np.eye(3)[classes]):
        same = collect_kfac(model, (x, labels), fisher="empirical", verbose=0)
        np.testing.assert_allclose(same["conv"].G, empirical["conv"].G, atol=1e-14)


def test_ignored_pixels_add_nothing_to_the_empirical_fisher():
    model = segmentation_model(loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=255))
    x = _x(4, (4, 4, 2))
    y = np.random.default_rng(0).integers(0, 3, (4, 4, 4))
    ignored = y.copy()
    ignored[:, :2] = 255
    p = model(x).numpy()
    residual = np.where((ignored == 255)[..., None], 0.0, p - np.eye(3)[y]).reshape(-1, 3) / 16
    got = collect_kfac(model, (x, ignored), fisher="empirical", verbose=0)
    np.testing.assert_allclose(got["head"].G, residual.T @ residual / 4, atol=1e-12)
    with pytest.raises(ValueError, match=r"integer class labels in \[0, 3\) for output"):
        collect_kfac(segmentation_model(), (x, ignored), fisher="empirical", verbose=0)


def test_draws_do_not_depend_on_batching_or_on_known_spatial_sizes():
    """Per-pixel sigmoid on a fully convolutional model: the same draws per example whatever the
    batch, the chunk, or whether the input size is known in advance."""
    fixed = segmentation_model("sigmoid", classes=1, loss="binary_crossentropy")
    free = segmentation_model("sigmoid", classes=1, loss="binary_crossentropy", spatial=(None, None))
    free.set_weights(fixed.get_weights())
    x = _x(7, (4, 4, 2))
    want = collect_kfac(fixed, x, batch_size=7, verbose=0)
    for model, options in ((fixed, {"batch_size": 3}), (fixed, {"chunk_size": 2}), (free, {"batch_size": 4})):
        got = collect_kfac(model, x, verbose=0, **options)
        for name in want:
            np.testing.assert_allclose(got[name].G, want[name].G, atol=1e-13)
            np.testing.assert_allclose(got[name].A, want[name].A, atol=1e-13)


# -- several outputs ------------------------------------------------------------------
def two_output_model(loss_weights=None, loss=None):
    inputs = keras.Input((5,), dtype=F64)
    h = L.Dense(6, activation="tanh", dtype=F64, name="trunk")(inputs)
    cls = L.Dense(3, dtype=F64, name="cls")(h)
    reg = L.Dense(2, dtype=F64, name="reg")(h)
    model = keras.Model(inputs, [cls, reg])
    randomize(model)
    loss = loss or {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"}
    model.compile(loss=loss, loss_weights=loss_weights)
    return model


def test_loss_weights_scale_each_output_as_the_weighted_loss():
    """The true Fisher is the Gauss-Newton matrix of Σ_k w_k L_k: linear in w_k; the empirical
    Fisher squares the gradient of that loss: quadratic in w_k."""
    x = _x(6, (5,))
    y = [np.array([0, 2, 1, 1, 0, 2]), np.random.default_rng(0).normal(size=(6, 2))]
    plain, weighted = two_output_model(), two_output_model({"cls": 1.0, "reg": 0.25})
    listed = two_output_model([1.0, 0.25], loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"])
    a, b = collect_kfac(plain, x, seed=1, verbose=0), collect_kfac(weighted, x, seed=1, verbose=0)
    np.testing.assert_allclose(b["reg"].G, 0.25 * a["reg"].G, atol=1e-14)
    np.testing.assert_allclose(b["cls"].G, a["cls"].G, atol=1e-14)
    np.testing.assert_allclose(collect_kfac(listed, x, seed=1, verbose=0)["trunk"].G, b["trunk"].G, atol=1e-14)
    a = collect_kfac(plain, (x, y), fisher="empirical", verbose=0)
    b = collect_kfac(weighted, (x, {"cls": y[0], "reg": y[1]}), fisher="empirical", verbose=0)
    np.testing.assert_allclose(b["reg"].G, 0.0625 * a["reg"].G, atol=1e-14)
    only_reg = two_output_model(loss={"reg": "mse"})  # an output without a loss is left out
    zero = two_output_model({"cls": 0.0, "reg": 1.0})
    np.testing.assert_allclose(
        collect_kfac(only_reg, (x, [None, y[1]]), fisher="empirical", verbose=0)["trunk"].G,
        collect_kfac(zero, (x, y), fisher="empirical", verbose=0)["trunk"].G, atol=1e-14,
    )
    assert np.all(collect_kfac(only_reg, x, verbose=0)["cls"].G == 0)
    with pytest.raises(ValueError, match=r"labels for each of the model's 2 outputs.*one array"):
        collect_kfac(plain, (x, y[1]), fisher="empirical", verbose=0)


# -- any other loss: the empirical Fisher ---------------------------------------------
def squared_error(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


class BatchMeanSquaredError(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true - y_pred))  # a scalar: the batch mean


@pytest.mark.parametrize("loss", [squared_error, BatchMeanSquaredError()], ids=["function", "Loss subclass"])
def test_other_losses_use_the_squared_gradients_of_the_loss_itself(loss):
    """The custom loss is MSE = 2 × the Gaussian NLL: its empirical Fisher is exactly 4 × MSE's."""
    model = linear_model(loss=loss)
    x, y = _x(6, (4,)), np.random.default_rng(2).normal(size=(6, 3))
    got = collect_kfac(model, (x, y), chunk_size=2, verbose=0)  # fisher="true" requested
    mse = collect_kfac(model, (x, y), fisher="empirical", loss="mse", verbose=0)
    assert got.fisher == "empirical" and not got.likelihood.samplable
    assert "defines no distribution" in got.likelihood.describe(got.fisher)
    for name in mse:
        np.testing.assert_allclose(got[name].G, 4 * mse[name].G, atol=1e-12)
        np.testing.assert_allclose(got[name].A, mse[name].A, atol=1e-14)
    with pytest.raises(ValueError, match="defines no distribution to sample labels from.*Fix: give labels"):
        collect_kfac(model, x, verbose=0)


def test_resolved_kinds():
    kinds = {
        "mse": "gaussian", keras.losses.MeanSquaredError(): "gaussian", "mae": "laplace",
        "binary_crossentropy": "bernoulli", keras.losses.categorical_crossentropy: "categorical",
        keras.losses.Huber(): None, "log_cosh": None, keras.losses.BinaryFocalCrossentropy(): None,
        squared_error: None,
    }
    model = linear_model()
    for loss, kind in kinds.items():
        assert resolve_likelihood(model, loss).kind == kind, loss
    assert resolve_likelihood(two_output_model()).kind == "multi"


MIRRORED = textwrap.dedent(
    """
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from keras_autoprune.stats import collect_kfac

    def build():
        inputs = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inputs)
        seg = keras.layers.Conv2D(2, 1, activation="sigmoid", name="seg")(h)
        reg = keras.layers.Dense(2, name="reg")(keras.layers.Flatten()(h))
        model = keras.Model(inputs, [seg, reg])
        model.compile(loss=["binary_crossentropy", "mse"], loss_weights=[1.0, 0.5])
        return model

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        distributed = build()
    plain = build()
    plain.set_weights(distributed.get_weights())
    x = np.random.default_rng(0).normal(size=(10, 6, 6, 2)).astype("float32")
    got = collect_kfac(distributed, x, batch_size=5, verbose=0)
    want = collect_kfac(plain, x, batch_size=5, verbose=0)
    error = max(np.abs(got[k].G - want[k].G).max() / np.abs(want[k].G).max() for k in want)
    print("REPLICAS", distributed.distribute_strategy.num_replicas_in_sync, "ERROR", error)
    """
)


def test_several_outputs_under_a_mirrored_strategy_match_a_single_device():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", MIRRORED], cwd=root, capture_output=True, text=True, timeout=120)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("REPLICAS")]
    assert line, done.stderr[-3000:]
    _, replicas, _, error = line[0].split()
    assert int(replicas) == 2 and float(error) < 1e-5
