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
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, k)))[0]


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


# -- helpers ------------------------------------------------------------------------
L = keras.layers


def blobs(n: int = 128, shape: tuple = (12, 12, 3), classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around one random image per class: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(classes,) + shape)[y] + rng.normal(size=(n,) + shape)
    return x.astype("float32"), y


def compiled(model: keras.Model, loss="sparse_categorical_crossentropy_logits") -> keras.Model:
    if loss == "sparse_categorical_crossentropy_logits":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss, metrics=["accuracy"])
    return model


def sequential(constraint=None, loss="sparse_categorical_crossentropy_logits") -> keras.Sequential:
    keras.utils.set_random_seed(0)
    return compiled(keras.Sequential([
        keras.Input((12, 12, 3)),
        L.Conv2D(16, 3, activation="relu", kernel_constraint=constraint, name="c1"),
        L.MaxPooling2D(),
        L.Conv2D(16, 3, padding="same", activation="relu", name="c2"),
        L.GlobalAveragePooling2D(),
        L.Dense(32, activation="relu", name="d1"),
        L.Dense(4, name="head"),
    ], name="seq"), loss)


def fit(model, data, budget, x, y, rounds: int = 2, epochs: int = 3, **kwargs) -> kap.EigenDamageCallback:
    cb = kap.EigenDamageCallback(data, budget=budget, rounds=rounds, verbose=0, **kwargs)
    model.fit(x, y, epochs=epochs, batch_size=32, callbacks=[cb], verbose=0)
    return cb


def kept(cb, model, metric: str) -> float:
    count = kap.count_flops if metric == "flops" else kap.count_params
    return count(cb.pruned_model) / count(model)


def assert_pruned_is_live(cb, model, x, tolerance: float = 1e-5) -> None:
    """The three-layer model computes the trained (projected) model, and every kernel stayed in its subspace."""
    assert relative_error(np.asarray(cb.pruned_model(x)), np.asarray(model(x))) <= tolerance
    layers = kap.surgery.replace.named_layers(model)
    for name, f in cb.plan.layers.items():
        kernel = layers[name].kernel.numpy()
        np.testing.assert_allclose(f.project(kernel), kernel, atol=1e-5)


# -- architectures --------------------------------------------------------------------
@pytest.mark.parametrize("budget", [
    kap.Budget(flops=0.5), pytest.param(kap.Budget(params=0.3), marks=pytest.mark.slow),
], ids=["flops", "params"])
def test_resnet_cifar_meets_the_budget_and_equals_the_live_model(budget):
    from keras_autoprune.zoo import resnet_cifar

    keras.utils.set_random_seed(0)
    model = compiled(resnet_cifar(8, input_shape=(16, 16, 3), classes=4, width=8))
    x, y = blobs(64, shape=(16, 16, 3))
    cb = fit(model, (x[:32], y[:32]), budget, x, y, epochs=2)
    assert budget.fraction - 0.05 <= kept(cb, model, budget.metric) <= budget.fraction
    assert [h["target"] for h in cb.history] == pytest.approx([(1 + budget.fraction) / 2, budget.fraction])
    assert "logits" not in cb.plan.layers and len(cb.plan.layers) >= 4
    assert_pruned_is_live(cb, model, x[:16])
    # Widths are unchanged: every BatchNormalization and Add is the original one.
    bns = [l for l in cb.pruned_model.layers if isinstance(l, L.BatchNormalization)]
    assert [l.gamma.shape for l in bns] == [l.gamma.shape for l in model.layers if isinstance(l, L.BatchNormalization)]


def test_sequential_model():
    model = sequential()
    x, y = blobs()
    cb = fit(model, (x, y), kap.Budget(flops=0.5), x, y)
    assert 0.45 <= kept(cb, model, "flops") <= 0.5
    assert set(cb.plan.layers) <= {"c1", "c2", "d1"} and cb.plan.layers
    assert isinstance(cb.pruned_model, keras.Sequential)
    assert_pruned_is_live(cb, model, x[:16])
    assert all(model.get_layer(n).kernel.constraint is None for n in ("c1", "c2", "d1"))


def test_nested_functional_sub_model():
    block_in = keras.Input((6, 6, 8))
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="ic1")(block_in)
    h = L.Conv2D(8, 3, padding="same", name="ic2")(h)
    block = keras.Model(block_in, L.Add()([h, block_in]), name="block")
    inputs = keras.Input((12, 12, 3))
    h = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inputs)
    h = L.GlobalAveragePooling2D()(block(h))
    keras.utils.set_random_seed(0)
    model = compiled(keras.Model(inputs, L.Dense(4, name="head")(h)))
    x, y = blobs()
    cb = fit(model, (x, y), kap.Budget(flops=0.5), x, y)
    assert set(cb.plan.layers) <= {"stem", "block/ic1", "block/ic2"} and {"block/ic1", "block/ic2"} & set(cb.plan.layers)
    assert kept(cb, model, "flops") <= 0.5
    assert isinstance(cb.pruned_model.get_layer("block"), keras.Model)  # the sub-model stays a sub-model
    assert_pruned_is_live(cb, model, x[:16])


def test_conv1d_on_sequences():
    keras.utils.set_random_seed(0)
    model = compiled(keras.Sequential([
        keras.Input((24, 5)),
        L.Conv1D(16, 5, padding="causal", activation="relu", name="c1"),
        L.Conv1D(16, 3, strides=2, dilation_rate=1, activation="relu", name="c2"),
        L.GlobalAveragePooling1D(),
        L.Dense(3, name="head"),
    ]))
    x = np.random.default_rng(1).normal(size=(128, 24, 5)).astype("float32")
    y = np.digitize(x[:, :, 0].mean(axis=1), [-0.1, 0.1])
    cb = fit(model, (x, y), kap.Budget(params=0.5), x, y)
    assert 0.4 <= kept(cb, model, "params") <= 0.5
    assert set(cb.plan.layers) == {"c1", "c2"}
    assert_pruned_is_live(cb, model, x[:16])


@pytest.mark.slow
def test_mobilenet_v2_factorises_pointwise_convs_only_and_exports(tmp_path):
    keras.utils.set_random_seed(0)
    model = compiled(keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10, classifier_activation=None,
    ))
    x, y = blobs(64, (32, 32, 3), 10)
    cb = fit(model, (x[:32], y[:32]), kap.Budget(flops=0.5), x, y, epochs=2)
    layers = kap.surgery.replace.named_layers(model)
    assert cb.plan.layers and all(type(layers[n]) is L.Conv2D for n in cb.plan.layers)
    assert not any(isinstance(layers[n], L.DepthwiseConv2D) for n in cb._layers)
    assert kept(cb, model, "flops") <= 0.5
    assert_pruned_is_live(cb, model, x[:8], tolerance=1e-4)
    assert kap.export_tflite(cb.pruned_model, tmp_path / "m.tflite", representative_data=x[:8]).verified


# -- data sources and precision ---------------------------------------------------------
@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_passes_the_final_check_with_float16_rounding(mixed_precision):
    """The three float16 layers round differently from the one they replace (about 1e-3 relative here)."""
    model = sequential()
    assert model.get_layer("c1").compute_dtype == "float16"
    x, y = blobs()
    cb = fit(model, (x, y), kap.Budget(flops=0.5), x, y)
    assert cb.rebuilt_tolerance() == 32 * 2.0**-11
    assert kept(cb, model, "flops") <= 0.5
    assert cb.pruned_model.get_layer("c1").layers[1].compute_dtype == "float16"
    error = relative_error(np.asarray(cb.pruned_model(x[:16]), np.float32), np.asarray(model(x[:16]), np.float32))
    assert 0 < error < cb.rebuilt_tolerance()


def test_tf_data_dataset_for_calibration_and_training():
    import tensorflow as tf

    model = sequential()
    x, y = blobs()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(128, seed=0).batch(32)
    cb = kap.EigenDamageCallback(dataset, budget=kap.Budget(flops=0.5), rounds=2, verbose=0)
    model.fit(dataset, epochs=3, callbacks=[cb], verbose=0)
    assert len(cb.history) == 2 and kept(cb, model, "flops") <= 0.5
    assert_pruned_is_live(cb, model, x[:16])


def test_generator_is_read_once_rounds_one_works_more_fail_in_init():
    x, y = blobs()

    def batches():
        for start in range(0, len(x), 32):
            yield x[start:start + 32], y[start:start + 32]

    with pytest.raises(ValueError, match=r"read once per round \(rounds=2\).*one-shot iterator \(generator\).*list of batches"):
        kap.EigenDamageCallback(batches(), budget=kap.Budget(flops=0.5), rounds=2, scorer="kfac")
    # The default scorer reads the data twice per round: even one round is refused, with the way out.
    with pytest.raises(ValueError, match=r"read 2 times per round \(rounds=1\).*or use scorer='kfac' and rounds=1"):
        kap.EigenDamageCallback(batches(), budget=kap.Budget(flops=0.5), rounds=1)
    model = sequential()
    generator = batches()
    cb = fit(model, generator, kap.Budget(flops=0.5), x, y, rounds=1, epochs=2, scorer="kfac")
    assert kept(cb, model, "flops") <= 0.5
    assert_pruned_is_live(cb, model, x[:16])
    # The same callback in a second fit: the generator is exhausted; said before any training.
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="exhausted generator.*new generator before each fit"):
        model.fit(x, y, epochs=1, callbacks=[cb], verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))
    # A list of batches is re-iterable: rounds > 1 work.
    cb = fit(sequential(), list(batches()), kap.Budget(flops=0.5), x, y, rounds=2)
    assert len(cb.history) == 2


# -- misuse fails before training ------------------------------------------------------
class EpochCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1


@pytest.mark.parametrize("case", ["unreachable", "custom loss without labels", "wrong input shape"])
def test_misuse_fails_before_the_first_epoch(case):
    x, y = blobs()
    budget, data, model = kap.Budget(flops=0.5), (x, y), sequential()
    if case == "unreachable":
        budget, match = kap.Budget(params=0.01), r"Received: kap.Budget\(params=0.01\).*keeps 10.1% of its params.*Budget\(params=0.11\) or more"
    elif case == "custom loss without labels":  # the empirical Fisher needs the labels
        model, data = sequential(loss=lambda y_true, y_pred: keras.ops.mean(y_pred**2, axis=-1)), x
        match = "`data` does not fit model 'seq'.*defines no distribution to sample labels from.*Fix: give labels"
    else:
        data, match = (x[:, :8, :8], y), r"`data` does not fit model 'seq'.*\(None, 12, 12, 3\).*\(32, 8, 8, 3\)"
    counter = EpochCounter()
    cb = kap.EigenDamageCallback(data, budget=budget, start_epoch=1, verbose=0)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, epochs=2, callbacks=[counter, cb], verbose=0)
    assert counter.epochs == 0


def test_unreachable_floor_is_the_maximal_plan():
    """The floor the callback reports before training is what `eigendamage_plan` reaches removing everything it may."""
    from keras_autoprune.methods import eigendamage
    from keras_autoprune.stats import collect_kfac

    model = sequential()
    x, y = blobs(64)
    layers = eigendamage.eligible_layers(kap.DependencyGraph(model))
    cost = eigendamage.FactorizedCost(model, layers)
    factors = collect_kfac(model, (x, y), layers=list(layers), full_input_factor=False, verbose=0)
    for ratio in (0.5, 0.95):
        with pytest.warns(UserWarning, match="cannot reach"):
            plan = eigendamage.eigendamage_plan(model, factors, cost, kap.Budget(params=0.01), max_layer_ratio=ratio)
        assert cost.cost(cost.smallest(ratio), "params") / cost.total["params"] == cost.kept(plan)["params"]
    assert cost.smallest(0.95) == {"c1": (1, 1), "c2": (1, 1), "d1": (1, 2)}


# -- state, constraints, what comes after fit ------------------------------------------------
def test_fit_twice_with_the_same_callback_starts_over():
    model = sequential()
    x, y = blobs()
    cb = fit(model, (x, y), kap.Budget(flops=0.5), x, y)
    first_model, first_plan = cb.pruned_model, cb.plan
    model.fit(x, y, epochs=3, batch_size=32, callbacks=[cb], verbose=0)
    assert len(cb.history) == 2 and cb.pruned_model is not first_model and cb.plan is not first_plan
    assert [h["target"] for h in cb.history] == pytest.approx([0.75, 0.5])
    assert cb.history[0]["flops_kept"] > 0.5  # the first round of the second fit starts from the whole layer again
    assert kept(cb, model, "flops") <= 0.5
    assert_pruned_is_live(cb, model, x[:16])


def test_user_kernel_constraint_runs_before_the_projection_and_is_restored():
    constraint = keras.constraints.MaxNorm(0.1, axis=[0, 1, 2])  # binding: initial column norms are about 0.5
    model = sequential(constraint=constraint)
    x, y = blobs()
    cb = fit(model, (x, y), kap.Budget(flops=0.5), x, y)
    assert "c1" in cb.plan.layers
    assert model.get_layer("c1").kernel.constraint is constraint and model.get_layer("c1").kernel_constraint is constraint
    assert_pruned_is_live(cb, model, x[:16])  # the projection ran last: the kernel is in its subspace
    norms = np.sqrt((model.get_layer("c1").kernel.numpy() ** 2).sum(axis=(0, 1, 2)))
    assert norms.max() < 0.3  # and the constraint acted (up to the projection)
    model.fit(x, y, epochs=1, verbose=0)  # after fit, the user's constraint alone
    norms = np.sqrt((model.get_layer("c1").kernel.numpy() ** 2).sum(axis=(0, 1, 2)))
    assert norms.max() <= 0.1 + 1e-6


def test_pruned_model_saves_loads_exports_and_fine_tunes(tmp_path):
    model = sequential()
    x, y = blobs()
    cb = fit(model, (x, y), kap.Budget(flops=0.5), x, y)
    slim = cb.pruned_model
    slim.save(tmp_path / "slim.keras")
    loaded = keras.models.load_model(tmp_path / "slim.keras")
    np.testing.assert_allclose(np.asarray(loaded(x[:16])), np.asarray(slim(x[:16])), atol=1e-6)
    assert kap.export_tflite(slim, tmp_path / "slim.tflite", representative_data=x[:8]).verified
    # The three layers train like any layers (the compile state comes with the clone).
    before = [w.numpy().copy() for w in loaded.trainable_weights]
    loss_before = loaded.evaluate(x, y, verbose=0)[0]
    loaded.fit(x, y, epochs=3, batch_size=32, verbose=0)
    assert all(not np.allclose(a, w.numpy()) for a, w in zip(before, loaded.trainable_weights))
    assert loaded.evaluate(x, y, verbose=0)[0] < loss_before
