"""Validation of RED's knobs, shared by `compress` and the stage functions."""

from __future__ import annotations

import math
import numbers

EXAMPLES = {"bandwidth_scale": "0.05", "merge_threshold": "0.0", "separation_tolerance": "0.1"}


def check_knob(name: str, value) -> None:
    """Raises ValueError unless ``value`` is a finite real number >= 0 (a key of ``EXAMPLES``)."""
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

BUDGET_KNOBS = ("bandwidth_scale", "merge_threshold", "separation_tolerance")
"""What a budget search may raise (`keras_autoprune.red.compress`'s ``budget_knob``)."""

SEPARATION_COSTS = ("flops", "latency", "latency_int8")
"""What decides that a separated block replaces its convolution (`keras_autoprune.red.block_latency`)."""

RECONSTRUCTIONS = ("synthetic",)
"""What an approximate separation's 1×1 part may be refitted on, by name (or a NumPy array of inputs, or None)."""

REFIT_LAYERS = ("approximated", "all")
"""Which layers the reconstruction refits (`keras_autoprune.red.reconstruction`): the approximate blocks' 1×1
parts, or every layer whose output differs from the model's before compression."""

_MEANINGS = {
    "refit_layers": (REFIT_LAYERS, "which layers are refitted on the reconstruction inputs"),
    "reconstruction": (RECONSTRUCTIONS, "what the compressed layers are refitted on; None for no refit, and "
                       "`kap.red.compress` also takes a NumPy array of model inputs"),
    "separation_cost": (SEPARATION_COSTS, "what decides that a separated block replaces its convolution"),
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


def check_reconstruction(model, reconstruction, refitting: bool = True) -> None:
    """Raises ValueError unless ``reconstruction`` is ``"synthetic"`` (with ``refitting``, on a model with
    BatchNormalization to synthesize from), None, or an array of inputs of the model's input shape."""
    import numpy as np

    from keras_autoprune.red.synthesis import check_synthesizable

    if reconstruction is None:
        return
    if isinstance(reconstruction, str):
        check_choice("reconstruction", reconstruction)
        if refitting:
            check_synthesizable(model)
        return
    if not isinstance(reconstruction, np.ndarray):
        raise ValueError(
            "Expected `reconstruction` to be 'synthetic', a NumPy array of model inputs, or None. "
            f"Received: {type(reconstruction).__name__}. Fix: pass np.asarray(your_inputs)."
        )
    expected = tuple(model.inputs[0].shape[1:]) if len(model.inputs) == 1 else None
    matches = expected is not None and reconstruction.ndim == len(expected) + 1 and len(reconstruction) > 0 and all(
        size is None or size == got for size, got in zip(expected, reconstruction.shape[1:]))
    if not matches:
        raise ValueError(
            f"Expected `reconstruction` inputs of shape (N, {', '.join(map(str, expected or ('...',)))}) with N >= 1 "
            f"for a one-input model. Received: an array of shape {reconstruction.shape}. Fix: pass a batch of the "
            "model's inputs, or reconstruction=None."
        )
