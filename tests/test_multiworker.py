"""Pruning under `tf.distribute.MultiWorkerMirroredStrategy`: two worker processes on localhost.

Keras 3 cannot `fit` under MultiWorkerMirroredStrategy by itself
(keras-team/keras#20585); the workers call `kap.enable_multi_worker_fit()`
first. Two workers, each with one replica and half of every batch, must end
where one process without a strategy ends: the same losses, the same plan and
the same pruned model, and `evaluate` and `predict` give the same values.
Interrupted between two pruning rounds and started again (the pruning state
in one shared `state_dir`, Keras' `BackupAndRestore` in a folder per
worker), they end with that plan too. MetaPruning's PruningNet, one random
gene per batch, trains to the same losses and generated weights.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune import multi_worker

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "fit_multiworker.py"
INTERRUPTED = 3  # the script's exit code when stopped as a preemption would


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run(out: pathlib.Path, index: int, method: str, tf_config: dict | None, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[2]))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(index), method, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_single_and_two_workers(tmp_path: pathlib.Path, method: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Runs ``method`` in one process without a strategy and in two localhost workers; their output folders."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    reference = _run(single, 0, method, None)
    assert _wait_for([reference, *_two_workers(multi, method)]) == [0, 0, 0]
    return single, multi


def _two_workers(out: pathlib.Path, method: str, *extra: str) -> list[subprocess.Popen]:
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    return [_run(out, i, method, {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}, *extra)
            for i in range(2)]


def _wait_for(processes: list[subprocess.Popen]) -> list[int]:
    """Their exit codes; fails with the end of their output unless every one exited with 0 or ``INTERRUPTED``."""
    try:
        codes = [p.wait(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert set(codes) <= {0, INTERRUPTED}, [p.stdout.read()[-2000:] for p in processes]
    return codes


def _assert_same_logs(single: pathlib.Path, multi: pathlib.Path, keys: tuple[str, ...]) -> None:
    reference = json.loads((single / "logs-0.json").read_text())
    for index in range(2):
        logs = json.loads((multi / f"logs-{index}.json").read_text())
        for key in keys:
            np.testing.assert_allclose(logs[key], reference[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["nap", "eigendamage", "psap", "magnitude"])
def test_two_workers_end_where_one_process_ends(tmp_path, method):
    single, multi = _run_single_and_two_workers(tmp_path, method)
    reference_plan = (single / "plan-0.json").read_text()
    for index in range(2):
        _assert_same_plan(method, (multi / f"plan-{index}.json").read_text(), reference_plan)
    # every batch's logs and the epochs' of fit and evaluate (the patched reduction), predict (Keras' own)
    _assert_same_logs(single, multi, ("batch_loss", "test_batch_loss", "loss", "evaluate", "predict"))
    ours = keras.saving.load_model(multi / "pruned.keras")
    theirs = keras.saving.load_model(single / "pruned.keras")
    assert kap.count_flops(ours) == kap.count_flops(theirs)
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), rtol=1e-4, atol=1e-5)


def test_two_workers_resume_pruning_after_a_preemption(tmp_path):
    single, resumed = tmp_path / "single", tmp_path / "resumed"
    single.mkdir()
    resumed.mkdir()
    assert _wait_for([_run(single, 0, "nap", None)]) == [0]  # one process, not interrupted
    assert _wait_for(_two_workers(resumed, "nap", "1")) == [INTERRUPTED, INTERRUPTED]  # between the two rounds
    assert not (resumed / "plan-0.json").exists()
    assert _wait_for(_two_workers(resumed, "nap")) == [0, 0]  # new processes, models and callbacks
    for index in range(2):
        assert (resumed / f"plan-{index}.json").read_text() == (single / "plan-0.json").read_text()
    ours, theirs = keras.saving.load_model(resumed / "pruned.keras"), keras.saving.load_model(single / "pruned.keras")
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), rtol=1e-4, atol=1e-5)


def test_two_workers_train_the_pruningnet_of_one_process(tmp_path):
    single, multi = _run_single_and_two_workers(tmp_path, "pruningnet")
    _assert_same_logs(single, multi, ("loss", "predict"))  # the same genes, steps and generated weights


def _assert_same_plan(method: str, ours: str, theirs: str) -> None:
    """Channel plans: the same channels (the JSON text). EigenDamage: the same ranks and the same kept subspaces,
    ``Q Qᵀ``, which an eigenvector's sign does not change and float32 rounding (gradients summed across
    workers, statistics split and summed) moves by about 1e-5."""
    if method != "eigendamage":
        assert ours == theirs
        return
    ours, theirs = kap.FactorizationPlan.from_json(ours).layers, kap.FactorizationPlan.from_json(theirs).layers
    assert {name: f.rank for name, f in ours.items()} == {name: f.rank for name, f in theirs.items()}
    assert ours  # the budget made it prune
    for name, factorization in ours.items():
        for q, reference in ((factorization.q_in, theirs[name].q_in), (factorization.q_out, theirs[name].q_out)):
            np.testing.assert_allclose(q @ q.T, reference @ reference.T, atol=1e-4)


def test_the_fix_is_explicit_idempotent_and_undone():
    from keras.src.backend.tensorflow import trainer

    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = trainer.reduce_per_replica
    assert not kap.multi_worker_fit_enabled()  # importing the library patches nothing
    try:
        assert kap.enable_multi_worker_fit() is True
        assert kap.enable_multi_worker_fit() is False
        assert trainer.TensorFlowTrainer._maybe_symbolic_build is multi_worker._maybe_symbolic_build
        assert trainer.reduce_per_replica is multi_worker._reduce_per_replica
    finally:
        assert kap.disable_multi_worker_fit() is True
    assert kap.disable_multi_worker_fit() is False
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is original_build
    assert trainer.reduce_per_replica is original_reduce


def test_without_a_multi_worker_strategy_keras_own_functions_run(monkeypatch):
    import tensorflow as tf

    calls = []
    monkeypatch.setitem(multi_worker._ORIGINAL, "reduce",
                        lambda values, strategy, reduction: calls.append(reduction) or values)
    monkeypatch.setitem(multi_worker._ORIGINAL, "build",
                        lambda model, iterator=None, data_batch=None: calls.append(("build", model.name)))
    for strategy in (tf.distribute.get_strategy(), tf.distribute.MirroredStrategy(["/cpu:0"])):
        assert multi_worker._reduce_per_replica({"loss": 1.0}, strategy, "auto") == {"loss": 1.0}
        with strategy.scope():
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)], name="plain")
        multi_worker._maybe_symbolic_build(model, iterator=iter([]))
    assert calls == ["auto", ("build", "plain")] * 2


def test_a_newer_keras_is_warned_about(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.16.0")
    try:
        with pytest.warns(UserWarning, match=r"checked with Keras <= 3\.15\.1; this is keras==3\.16\.0"):
            assert kap.enable_multi_worker_fit() is True
    finally:
        kap.disable_multi_worker_fit()


def test_a_keras_without_the_replaced_functions_is_refused(monkeypatch):
    monkeypatch.setattr(multi_worker, "_TRAINER_MODULE", "json")  # a module without Keras' trainer functions
    expected = (r"Received: keras==3\.\d+\.\d+.*missing \['TensorFlowTrainer\._maybe_symbolic_build', "
                r"'reduce_per_replica', '_collective_all_reduce_multi_worker'\]")
    with pytest.raises(RuntimeError, match=expected):
        kap.enable_multi_worker_fit()
    assert not multi_worker.multi_worker_fit_enabled()
