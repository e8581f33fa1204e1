"""PruningCallback lifecycle, via the data-free MagnitudeCallback."""

import warnings

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.allocation import round_epochs, round_targets

L = keras.layers


def small_cnn():
    i = keras.Input((8, 8, 1))
    h = L.Conv2D(8, 3, padding="same", name="c1")(i)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU()(h)
    r = L.Conv2D(8, 3, padding="same", name="c2")(h)
    h = L.Add()([h, r])
    h = L.MaxPooling2D()(h)
    h = L.Conv2D(12, 3, activation="relu", name="c3")(h)
    h = L.Flatten()(h)
    model = keras.Model(i, L.Dense(10, name="head")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 64)


def test_schedule_helpers():
    assert round_epochs(1, 7, 3) == [1, 3, 5]
    assert round_targets(0.25, 3) == [0.75, 0.5, 0.25]


def test_budget_met_masks_hold_and_rebuilt_matches(data):
    x, y = data
    model = small_cnn()
    cb = kap.MagnitudeCallback(kap.Budget(flops=0.5), rounds=2, end_epoch=2, verbose=0)
    history = model.fit(x, y, epochs=3, batch_size=16, callbacks=[cb], verbose=0)
    flops = kap.count_flops(model)
    slim_flops = kap.count_flops(cb.pruned_model)
    assert slim_flops <= 0.5 * flops
    # Within one chunk: adding back any single removed channel would exceed the budget... at least
    # the plan is not wildly below it.
    assert slim_flops > 0.35 * flops
    assert history.history["flops_kept"][-1] == pytest.approx(slim_flops / flops)
    assert len(history.history["params_kept"]) == 3 and history.history["pruning_seconds"][-1] > 0
    # Masked channels stayed exactly zero through the optimizer steps after the last round.
    removed = np.setdiff1d(np.arange(8), cb.plan.kept.get("c1", np.arange(8)))
    assert removed.size and np.all(model.get_layer("c1").kernel.numpy()[..., removed] == 0)
    assert np.all(model.get_layer("c2").kernel.numpy()[..., removed] == 0)
    np.testing.assert_allclose(np.asarray(cb.pruned_model(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-5)
    assert cb.pruned_model.count_params() < model.count_params()
    # Constraints are removed after training: a later fit does not mask.
    assert model.get_layer("c1").kernel.constraint is None


def test_instance_is_reusable(data):
    x, y = data
    cb = kap.MagnitudeCallback(kap.Budget(params=0.6), verbose=0)
    first, second = small_cnn(), small_cnn()
    first.fit(x, y, epochs=1, callbacks=[cb], verbose=0)
    plan_one = cb.plan
    second.fit(x, y, epochs=2, callbacks=[cb], verbose=0)
    assert cb.pruned_model is not None and len(cb.history) == 1
    assert kap.count_params(cb.pruned_model) <= 0.6 * kap.count_params(second)
    assert plan_one is not cb.plan


class _Scale(keras.layers.Layer):
    """A custom layer without `get_config`: Keras cannot rebuild it from its config."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def call(self, x):
        return x * self.factor


def test_prune_copies_models_with_custom_layers_it_cannot_rebuild(data):
    x, _ = data
    inputs = keras.Input((8, 8, 1))
    h = _Scale(2.0)(L.Conv2D(8, 3, name="c1", activation="relu")(inputs))
    model = keras.Model(inputs, L.Dense(10, name="head")(L.GlobalAveragePooling2D()(L.Conv2D(8, 3, name="c2")(h))))
    before = [w.copy() for w in model.get_weights()]
    slim = kap.MagnitudeCallback(kap.Budget(flops=0.6), verbose=0).prune(model)
    assert kap.count_flops(slim) <= 0.6 * kap.count_flops(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the user's model is not changed


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


@pytest.mark.parametrize("same_instance", [True, False])
def test_a_fit_that_raised_leaves_no_stale_constraint_behind_the_next(data, same_instance):
    x, y = data
    model = small_cnn()
    own = keras.constraints.MaxNorm(3.0)
    model.get_layer("c1").kernel.constraint = own
    cb = kap.MagnitudeCallback(kap.Budget(flops=0.5), verbose=0)
    with pytest.raises(KeyboardInterrupt):  # Keras calls no on_train_end then: the masks stay on
        model.fit(x, y, epochs=2, callbacks=[cb, _Interrupt()], verbose=0)
    assert model.get_layer("c1").kernel.constraint is not own
    again = cb if same_instance else kap.MagnitudeCallback(kap.Budget(flops=0.9), verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, callbacks=[again], verbose=0)
    stale = [w for w in caught if "did not end" in str(w.message)]
    assert len(stale) == (0 if same_instance else 1)  # the same callback removes its own before installing
    assert model.get_layer("c1").kernel.constraint is own
    assert all(v.constraint is None for v in model.trainable_weights if v is not model.get_layer("c1").kernel)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(budget=0.5), TypeError, "kap.Budget"),
        (dict(budget=kap.Budget(flops=0.5), rounds=0), ValueError, "rounds"),
        (dict(budget=kap.Budget(flops=0.5), start_epoch=-1), ValueError, "start_epoch"),
        (dict(budget=kap.Budget(flops=0.5), rounds=3, end_epoch=2), ValueError, "end_epoch"),
        (dict(budget=kap.Budget(flops=0.5), check_tolerance="1e-4"), ValueError, "check_tolerance"),
        (dict(budget=kap.Budget(flops=0.5), check_tolerance=-1.0), ValueError, "check_tolerance"),
        (dict(budget=kap.Budget(flops=0.5), check_tolerance=float("nan")), ValueError, "check_tolerance"),
        (dict(budget=kap.Budget(flops=0.5), verbose=3), ValueError, "verbose"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, error, match):
    with pytest.raises(error, match=match):
        kap.MagnitudeCallback(**kwargs)


@pytest.mark.parametrize("kwargs,match", [(dict(flops=0.5, params=0.5), "exactly one"), (dict(flops=1.5), r"\(0, 1\]"), (dict(), "exactly one")])
def test_budget_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kap.Budget(**kwargs)


def test_a_fit_too_short_for_the_rounds_fails_before_training(data):
    x, y = data
    model = small_cnn()
    before = [w.copy() for w in model.get_weights()]
    cb = kap.MagnitudeCallback(kap.Budget(flops=0.5), start_epoch=1, rounds=2, verbose=0)  # rounds at epochs 2, 3
    with pytest.raises(ValueError, match=r"prunes at the start of epoch\(s\) 2, 3 .* Fix: fit\(epochs=3\)"):
        model.fit(x, y, epochs=2, callbacks=[cb], verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # no step was taken
    model.fit(x, y, epochs=3, callbacks=[cb], verbose=0)  # just long enough
    assert len(cb.history) == 2 and cb.pruned_model is not None


def test_training_stopped_before_the_last_round_warns_with_what_was_pruned(data, tmp_path):
    x, y = data

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    cb = kap.MagnitudeCallback(kap.Budget(flops=0.5), rounds=2, verbose=0)
    with pytest.warns(UserWarning, match=r"ended after 1 of 2 pruning round\(s\).*keeps 7\d\.\d% of the FLOPs"):
        small_cnn().fit(x, y, epochs=3, callbacks=[cb, StopAfterFirstEpoch()], verbose=0)
    assert cb.pruned_model is not None and 0.7 <= cb.history[0]["flops_kept"] < 0.8
    # With a state folder a short fit is allowed (it is resumed later), and says so.
    cb = kap.MagnitudeCallback(kap.Budget(flops=0.5), start_epoch=2, verbose=0, state_dir=str(tmp_path / "state"))
    with pytest.warns(UserWarning) as caught:
        small_cnn().fit(x, y, epochs=1, callbacks=[cb], verbose=0)
    messages = [str(w.message) for w in caught]
    assert any("a later fit with the same callback arguments and state_dir resumes it" in m for m in messages)
    assert any("nothing was pruned" in m for m in messages) and cb.pruned_model is None


def test_model_without_prunable_groups_fails_before_training(data):
    x, y = data
    i = keras.Input((8, 8, 1))
    model = keras.Model(i, L.Dense(10)(L.Flatten()(i)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="no prunable channel group"):
        model.fit(x, y, epochs=1, callbacks=[kap.MagnitudeCallback(kap.Budget(flops=0.5))], verbose=0)


def run_distributed(method: str) -> dict:
    """Runs tests/scripts/fit_distributed.py in a fresh process (2 logical CPUs)."""
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parent / "scripts" / "fit_distributed.py"
    done = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_callback_under_mirrored_strategy():
    result = run_distributed("MagnitudeCallback")
    assert result["replicas"] == 2
    assert result["flops_kept"] <= 0.5
    assert result["removed"] > 0 and result["removed_zero"]
    assert result["error"] < 1e-4


def test_callback_under_mixed_precision(data):
    x, y = data
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = small_cnn()
        cb = kap.MagnitudeCallback(kap.Budget(flops=0.5), verbose=0)
        model.fit(x, y, epochs=1, callbacks=[cb], verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("c1").compute_dtype == "float16"
    assert cb.pruned_model.get_layer("c1").compute_dtype == "float16"
    assert kap.count_flops(cb.pruned_model) <= 0.5 * kap.count_flops(model)
    np.testing.assert_allclose(np.asarray(cb.pruned_model(x), "float32"), np.asarray(model(x), "float32"), atol=2e-2, rtol=2e-2)
