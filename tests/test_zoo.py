"""The keras.applications sweep: every architecture, uniform 30% plan.

Checks for each model: output shape unchanged, parameters and FLOPs strictly
lower, and ``apply_plan == mask_plan`` to 1e-5 (relative). Small inputs keep
it fast; the biggest models are marked slow.
"""

import pytest

import keras_autoprune as kap
from tests.zoo import ARCHITECTURES, FAST, sweep_one

CASES = [
    pytest.param(name, size, id=name, marks=() if name in FAST else pytest.mark.slow)
    for name, size in ARCHITECTURES
]


@pytest.mark.parametrize("name,size", CASES)
def test_uniform_plan_on_application(name, size):
    result = sweep_one(name, size, ratio=0.3)
    assert result["out_shape_after"] == result["out_shape"]
    assert result["params_after"] < result["params"]
    assert kap.count_flops(result["slim"]) < kap.count_flops(result["model"])
    assert result["output_scale"] > 0  # a dead network would make the check vacuous
    assert result["error"] <= 1e-5, result["error"]
    assert result["prunable_groups"] >= 1
