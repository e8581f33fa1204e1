"""Examples run in --smoke mode."""

import importlib.util
import pathlib

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
