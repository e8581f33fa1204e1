"""Pruning survives an interrupted `fit`: `state_dir`, `BackupAndRestore`, checkpoint + `initial_epoch`."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from tests.helpers import Interrupt

L = keras.layers
EPOCHS = 5  # rounds at the start of epochs 2 and 3 (0-based 1 and 2), fine-tuning in epochs 4 and 5


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(12, 3, padding="same", name="c2")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(4, name="logits")(x))
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(96, 8, 8, 3)).astype("float32")
Y = _RNG.integers(0, 4, 96)


def _callback(method: str, state_dir):
    budget = kap.Budget(flops=0.5)
    schedule = {"start_epoch": 1, "rounds": 2, "verbose": 0, "state_dir": state_dir}
    if method == "magnitude":
        return kap.MagnitudeCallback(budget, **schedule)
    if method == "nap":
        return kap.NAPCallback((X, Y), budget=budget, num_batches=2, batch_size=32, **schedule)
    if method == "psap":
        return kap.PSAPCallback(budget, (X, Y), num_batches=2, batch_size=32, **schedule)
    if method == "eigendamage":
        return kap.EigenDamageCallback((X, Y), budget=kap.Budget(flops=0.8), num_batches=2, batch_size=32, **schedule)
    raise ValueError(method)


def _fit(model, callbacks, initial_epoch=0):
    model.fit(X, Y, batch_size=32, epochs=EPOCHS, initial_epoch=initial_epoch, shuffle=False, verbose=0, callbacks=callbacks)


def _uninterrupted(method, tmp_path):
    callback = _callback(method, tmp_path / "whole")
    _fit(_model(), [callback])
    return callback


def _assert_same_result(resumed, whole):
    if isinstance(whole.plan, kap.FactorizationPlan):  # bases: equal subspaces (eigenvectors to float rounding)
        assert resumed.plan.layers.keys() == whole.plan.layers.keys()
        for name, factorization in whole.plan.layers.items():
            again = resumed.plan.layers[name]
            for q, r in ((factorization.q_in, again.q_in), (factorization.q_out, again.q_out)):
                assert q.shape == r.shape
                np.testing.assert_allclose(r @ r.T, q @ q.T, atol=1e-6)
    else:
        assert resumed.plan.to_json() == whole.plan.to_json()
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in whole.history] == [1, 2]
    np.testing.assert_allclose(resumed.pruned_model.predict(X[:8], verbose=0), whole.pruned_model.predict(X[:8], verbose=0),
                               rtol=1e-4, atol=1e-5)
    assert kap.count_flops(resumed.pruned_model) == kap.count_flops(whole.pruned_model)


@pytest.mark.parametrize("after", [0, 1, 2, 3], ids=["before-rounds", "between-rounds", "after-last-round", "fine-tuning"])
def test_backup_and_restore_resumes_magnitude_pruning_at_every_point(tmp_path, after):
    whole = _uninterrupted("magnitude", tmp_path)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), [_callback("magnitude", tmp_path / "state"), backup, Interrupt(after)])
    resumed = _callback("magnitude", tmp_path / "state")  # a new process: new model, new callback
    _fit(_model(), [resumed, keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    _assert_same_result(resumed, whole)


@pytest.mark.parametrize("method", ["nap", "psap", "eigendamage"])
def test_curvature_callbacks_resume_between_rounds(tmp_path, method):
    whole = _uninterrupted(method, tmp_path)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), [_callback(method, tmp_path / "state"), backup, Interrupt(1)])
    resumed = _callback(method, tmp_path / "state")
    _fit(_model(), [resumed, keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    _assert_same_result(resumed, whole)
    assert resumed.statistics_seconds > 0


def test_checkpoint_and_initial_epoch_resume(tmp_path):
    whole = _uninterrupted("nap", tmp_path)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "model-{epoch}.keras"))
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(), [_callback("nap", tmp_path / "state"), checkpoint, Interrupt(2)])
    model = keras.saving.load_model(tmp_path / "model-3.keras")  # the end of epoch 3 (1-based)
    resumed = _callback("nap", tmp_path / "state")
    _fit(model, [resumed], initial_epoch=3)
    _assert_same_result(resumed, whole)


def test_state_files_hold_the_plan_after_each_epoch(tmp_path):
    callback = _uninterrupted("magnitude", tmp_path)
    states = [json.loads((tmp_path / "whole" / f"pruning-state-{e}.json").read_text()) for e in range(EPOCHS)]
    assert [s["plan"] is None for s in states] == [True, False, False, False, False]
    assert states[-1]["plan"] == callback.plan.to_json() and len(states[-1]["history"]) == 2


def test_a_resume_that_would_lose_pruning_fails_before_training(tmp_path):
    model = _model()
    model.fit(X, Y, batch_size=32, epochs=3, verbose=0)
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"starts at epoch 4, after the pruning round\(s\) scheduled at epoch\(s\) \[2, 3\].*state_dir"):
        _fit(model, [_callback("magnitude", None)], initial_epoch=3)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)  # not one step was trained
    with pytest.raises(ValueError, match="holds no state for the end of epoch 3"):
        _fit(_model(), [_callback("magnitude", tmp_path / "empty")], initial_epoch=3)


def test_a_state_of_another_run_is_refused(tmp_path):
    _uninterrupted("magnitude", tmp_path)
    other = kap.MagnitudeCallback(kap.Budget(flops=0.6), start_epoch=1, rounds=2, verbose=0, state_dir=tmp_path / "whole")
    with pytest.raises(ValueError, match="does not belong to this run: its settings"):
        _fit(_model(), [other], initial_epoch=3)
    # A budget that prints the same ("50% of FLOPs") is another run too.
    close = kap.MagnitudeCallback(kap.Budget(flops=0.504), start_epoch=1, rounds=2, verbose=0, state_dir=tmp_path / "whole")
    with pytest.raises(ValueError, match="does not belong to this run: its settings"):
        _fit(_model(), [close], initial_epoch=3)


def test_a_state_written_with_other_method_settings_is_refused(tmp_path):
    _uninterrupted("magnitude", tmp_path)
    other = kap.MagnitudeCallback(kap.Budget(flops=0.5), start_epoch=1, rounds=2, verbose=0, state_dir=tmp_path / "whole",
                                  max_layer_ratio=0.5)
    with pytest.raises(ValueError, match="does not belong to this run: its settings.*max_layer_ratio"):
        _fit(_model(), [other], initial_epoch=3)


def test_prune_neither_resumes_nor_writes_a_fits_state(tmp_path):
    _uninterrupted("magnitude", tmp_path)  # states of a fit at 50% in tmp_path / "whole"
    written = sorted(p.name for p in (tmp_path / "whole").iterdir())
    other = kap.MagnitudeCallback(kap.Budget(flops=0.6), start_epoch=1, rounds=2, verbose=0, state_dir=tmp_path / "whole")
    model = _model()
    slim = other.prune(model)  # one-shot: that fit's states are not read (they would be refused: another budget)
    assert kap.count_flops(slim) <= 0.6 * kap.count_flops(model) and len(other.history) == 2
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == written


def test_one_callback_reused_on_another_model_starts_afresh(tmp_path):
    callback = kap.MagnitudeCallback(kap.Budget(flops=0.5), verbose=0)
    first = _model()
    first.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    plan_first = callback.plan.to_json()
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="other")(inputs)
    second = keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling2D()(L.ReLU()(x))))
    second.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    second.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert callback.plan.to_json() != plan_first and len(callback.history) == 1
    assert callback.pruned_model.get_layer("other").filters < 6  # this model's plan, not the first one's
    # With a state folder, a state written for the first model is refused for the second.
    stateful = kap.MagnitudeCallback(kap.Budget(flops=0.5), start_epoch=1, rounds=2, verbose=0, state_dir=tmp_path / "s")
    _fit(_model(), [stateful])
    with pytest.raises(ValueError, match="its model has other variables"):
        second.fit(X, Y, batch_size=32, epochs=EPOCHS, initial_epoch=3, verbose=0, callbacks=[
            kap.MagnitudeCallback(kap.Budget(flops=0.5), start_epoch=1, rounds=2, verbose=0, state_dir=tmp_path / "s")])
