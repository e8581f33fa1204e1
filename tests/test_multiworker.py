"""Pruning under `tf.distribute.MultiWorkerMirroredStrategy`: two worker processes on localhost.

Keras 3 cannot `fit` under MultiWorkerMirroredStrategy today, even without a
callback (keras-team/keras#20585: "Attempt to convert a value (PerReplica...)
to a Tensor", seen here with Keras 3.15 and TensorFlow 2.21). The test runs
the real two-worker comparison; while the workers fail with exactly that
upstream error it reports an expected failure (any other failure fails), and
once Keras fixes it the comparison runs and must pass.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "fit_multiworker.py"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run(out: pathlib.Path, index: int, tf_config: dict | None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[2]))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(index)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_make_the_single_worker_plan(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    reference = _run(single, 0, None)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()[-2000:]  # the script itself works
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    multi = tmp_path / "multi"
    multi.mkdir()
    processes = [_run(multi, i, {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}) for i in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in processes]
    finally:
        for p in processes:
            p.kill()
    outputs = [p.stdout.read() for p in processes]
    if codes != [0, 0] and all("Attempt to convert a value (PerReplica" in o for o in outputs):
        pytest.xfail("Keras 3 cannot fit under MultiWorkerMirroredStrategy (keras-team/keras#20585)")
    assert codes == [0, 0], [o[-2000:] for o in outputs]
    expected = (single / "plan-0.json").read_text()
    assert (multi / "plan-0.json").read_text() == expected
    assert (multi / "plan-1.json").read_text() == expected
    assert (multi / "pruned.keras").exists()
