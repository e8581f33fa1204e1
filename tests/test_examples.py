"""Examples run in --smoke mode."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uniform_pruning_digits_smoke():
    result = _load("uniform_pruning_digits").main(["--smoke"])
    assert result["params_pruned"] < result["params"]
    assert result["flops_pruned"] < 0.5 * result["flops"]
    assert result["apply_vs_mask"] < 1e-4
    assert result["accuracy_finetuned"] > 0.5  # digits is easy: the pruned net still learns


@pytest.mark.parametrize("method", ["nap", "eigendamage"])
def test_cifar10_pruning_smoke(tmp_path, method):
    archive = EXAMPLES.parents[1] / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not present")
    result = _load("cifar10_pruning").main(["--smoke", "--method", method, "--data", str(archive), "--out", str(tmp_path)])
    assert result["flops_kept"] <= 0.5
    assert result["float32"].relative_error <= 1e-4
    assert result["int8"].path.is_file() and result["int8"].size_bytes < result["float32"].size_bytes
    assert (tmp_path / f"resnet20_{method}.keras").is_file()
