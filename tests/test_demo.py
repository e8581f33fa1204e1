"""The demo, shortened: NAP in fit, export, table figures."""

import pathlib

from keras_autoprune.demo import run_demo


def test_demo_runs_offline_and_halves_the_flops(tmp_path):
    result = run_demo(epochs=3, finetune_epochs=2, out_dir=tmp_path, verbose=0)
    before, after = result["before"], result["after"]
    assert after["flops"] <= 0.5 * before["flops"]
    assert after["params"] < before["params"] and after["tflite_bytes"] < before["tflite_bytes"]
    assert after["tflite_error"] <= 1e-4 and after["latency_ms"] > 0
    assert after["accuracy"] > 0.5  # digits after 5 epochs in all
    png = pathlib.Path(result["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "pruned.tflite").is_file() and (tmp_path / "original.tflite").is_file()
