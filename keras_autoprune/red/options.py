"""Validation of RED's knobs, shared by `compress` and the stage functions."""

from __future__ import annotations

import math
import numbers

EXAMPLES = {"bandwidth_scale": "0.05", "merge_threshold": "0.0"}


def check_knob(name: str, value) -> None:
    """Raises ValueError unless ``value`` is a finite real number >= 0 (``bandwidth_scale``, ``merge_threshold``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"Expected `{name}` to be a finite number >= 0 (e.g. {name}={EXAMPLES[name]}). Received: {name}={value!r}"
        )


MERGE_DISTANCES = ("channel", "layer")

MERGE_REPRESENTATIVES = ("readers", "leader")
"""What the kept channel of a near-identical cluster computes (`keras_autoprune.red.merging`)."""

BUDGET_KNOBS = ("bandwidth_scale", "merge_threshold")
"""What a budget search may raise (`keras_autoprune.red.compress`'s ``budget_knob``)."""


def check_distance(merge_distance) -> None:
    """Raises ValueError unless ``merge_distance`` is one of `MERGE_DISTANCES`."""
    if merge_distance not in MERGE_DISTANCES:
        raise ValueError(f"Expected `merge_distance` to be one of {MERGE_DISTANCES} (what a near-identical distance is "
                         f"relative to). Received: merge_distance={merge_distance!r}")


def check_representative(merge_representative) -> None:
    """Raises ValueError unless ``merge_representative`` is one of `MERGE_REPRESENTATIVES`."""
    if merge_representative not in MERGE_REPRESENTATIVES:
        raise ValueError(f"Expected `merge_representative` to be one of {MERGE_REPRESENTATIVES} (the weights of a "
                         f"near-identical cluster's kept channel). Received: "
                         f"merge_representative={merge_representative!r}")
