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
"""What a near-identical distance is relative to (`keras_autoprune.red.merging`)."""

MERGE_REPRESENTATIVES = ("readers", "leader")
"""What the kept channel of a near-identical cluster computes (`keras_autoprune.red.merging`)."""

SNAP_TARGETS = ("mean", "mode")
"""What a hashed weight becomes: its basin's mean or its density mode (`keras_autoprune.red.hashing`)."""

BUDGET_KNOBS = ("bandwidth_scale", "merge_threshold")
"""What a budget search may raise (`keras_autoprune.red.compress`'s ``budget_knob``)."""

_MEANINGS = {
    "merge_distance": (MERGE_DISTANCES, "what a near-identical distance is relative to"),
    "merge_representative": (MERGE_REPRESENTATIVES, "the weights of a near-identical cluster's kept channel"),
    "snap_to": (SNAP_TARGETS, "the value a hashed weight takes in its basin"),
    "budget_knob": (BUDGET_KNOBS, "what a budget search raises"),
}


def check_choice(name: str, value) -> None:
    """Raises ValueError unless ``value`` is one of the choices of option ``name`` (a key of `_MEANINGS`)."""
    choices, meaning = _MEANINGS[name]
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {choices} ({meaning}). Received: {name}={value!r}")
