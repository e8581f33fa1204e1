"""RED's exactness on every keras.applications architecture of the surgery sweep (`tests.zoo`).

For each model (random weights, BatchNormalization folded, hashed at the
default ``bandwidth_scale``): merging the random weights finds nothing and
changes nothing; six planted duplicate neurons (two copies in each of three
mergeable groups, `tests.red_zoo.plant_duplicates`) are all merged and the
merged model equals the planted one to 1e-5 (relative); the stem
convolution given repeated kernels (`plant_repeats`) is separated, exactly.
The figures are published by ``python -m benchmarks.red_sweep``
(docs/methods/red.md); the biggest models are marked slow.
"""

import pytest

from tests.red_zoo import red_sweep_one
from tests.zoo import ARCHITECTURES

#: A few seconds each; the rest take 20 s to several minutes on 2 CPU cores.
FAST = {"MobileNet", "MobileNetV3Small", "EfficientNetB0"}

CASES = [
    pytest.param(name, size, id=name, marks=() if name in FAST else pytest.mark.slow)
    for name, size in ARCHITECTURES
]


@pytest.mark.parametrize("name,size", CASES)
def test_red_merging_and_separation_are_exact_on_application(name, size):
    row = red_sweep_one(name, size)
    assert row["output_scale"] > 0  # a dead network would make the checks vacuous
    assert row["random_merged"] == 0 and row["random_error"] == 0.0  # nothing to merge: an unchanged copy
    assert (row["planted"], row["planted_merged"]) == (6, 6)
    assert row["merged"] >= 6
    assert row["merge_error"] <= 1e-5, row["merge_error"]
    assert row["repeats_layer"] is not None and row["repeats_layer"] in row["separated"]
    assert row["separation_error"] <= 1e-5, row["separation_error"]
    assert row["fold_error"] <= 1e-5, row["fold_error"]
