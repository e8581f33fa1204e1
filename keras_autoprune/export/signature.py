"""The serving signature shared by the SavedModel and TFLite exports.

Both exports go through one SavedModel written with Keras's
`keras.export.ExportArchive` (Keras >= 3.0): the model is tracked, and one
endpoint named ``serving_default`` runs ``model(inputs, training=False)``.
The signature's names are stable and do not depend on layer names:

- inputs: ``input_0``, ``input_1``, ... in the order of ``model.inputs``,
  each ``float32`` with the model's input shape and an unknown batch axis;
- outputs: ``output_0``, ``output_1``, ... in the order of
  ``model.outputs`` (a dict, so the names survive the export).

Example:

>>> import keras
>>> inputs = keras.Input((4,))
>>> model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
>>> input_names(model), output_names(model)
(['input_0'], ['output_0'])
"""

from __future__ import annotations

import inspect
import pathlib
from typing import Any

import keras
import tensorflow as tf

from keras_autoprune.errors import UnsupportedModelError

SIGNATURE_KEY = "serving_default"
"""Name of the signature in the SavedModel and in the ``.tflite`` file."""


def check_exportable(model: Any) -> keras.Model:
    """Returns ``model`` if it is a built Keras model with known inputs.

    Raises:
        UnsupportedModelError: for anything else, before any work is done.
    """
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            "Expected a `keras.Model` (Sequential or Functional). "
            f"Received: model of type {type(model).__name__}. Fix: load it first, "
            "e.g. `keras.saving.load_model('model.keras')`."
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise UnsupportedModelError(
            "Expected a built model with symbolic inputs, as the export signature is "
            f"made from them. Received: model '{model.name}' of type "
            f"{type(model).__name__} without `model.inputs`. Fix: build it from "
            "`keras.Input(shape)` (a Functional model, or Sequential with an Input)."
        )
    return model


def tensor_names(prefix: str, count: int) -> list[str]:
    """``[f"{prefix}_0", ..., f"{prefix}_{count - 1}"]``."""
    return [f"{prefix}_{i}" for i in range(count)]


def input_names(model: keras.Model) -> list[str]:
    """The signature's input names: ``input_0`` ... in ``model.inputs`` order."""
    return tensor_names("input", len(model.inputs))


def output_names(model: keras.Model) -> list[str]:
    """The signature's output names: ``output_0`` ... in ``model.outputs`` order."""
    return tensor_names("output", len(model.outputs))


def input_specs(model: keras.Model) -> list[tf.TensorSpec]:
    """One float32 `tf.TensorSpec` per input, named, with an unknown batch axis."""
    return [
        tf.TensorSpec((None, *tensor.shape[1:]), tf.float32, name=name)
        for tensor, name in zip(model.inputs, input_names(model))
    ]


def serving_function(model: keras.Model):
    """Returns ``fn(*inputs) -> {output_i: tensor}``, the inference call."""
    outputs = output_names(model)

    def serve(*inputs):
        result = model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)
        flat = result if isinstance(result, (list, tuple)) else [result]
        return dict(zip(outputs, flat))

    return serve


def write_serving_saved_model(model: keras.Model, directory: str | pathlib.Path) -> None:
    """Writes ``model`` as a SavedModel with the ``serving_default`` signature.

    Args:
        model: a model accepted by `check_exportable`.
        directory: where to write (``saved_model.pb``, ``variables/``).
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE_KEY, serving_function(model), input_signature=input_specs(model))
    # Early Keras 3 releases have no `verbose` argument (they print the endpoints).
    if "verbose" in inspect.signature(archive.write_out).parameters:
        archive.write_out(str(directory), verbose=False)
    else:  # pragma: no cover - old Keras
        archive.write_out(str(directory))
