"""The serving signature shared by the SavedModel and TFLite exports.

Both exports go through one SavedModel written with Keras's
`keras.export.ExportArchive` (Keras >= 3.0): the model is tracked, and one
endpoint named ``serving_default`` runs ``model(inputs, training=False)``.
The signature's names are stable and do not depend on layer names:

- inputs: ``input_0``, ``input_1``, ... in the order of ``model.inputs``,
  each ``float32`` (or the input's integer/bool dtype: token ids, masks),
  the model's input shape and an unknown batch axis; a model called with a
  dict (``{"token_ids": ..., "padding_mask": ...}``) keeps its keys as names;
- outputs: ``output_0``, ``output_1``, ... in the order of
  ``model.outputs``, or the keys of a model's dict outputs.

The flat order is `keras.tree.flatten`'s (dict keys sorted), the order of
``model.inputs`` and ``model.outputs``.

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
import re
from collections.abc import Sequence
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


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _structure_names(structure: Any, prefix: str, count: int) -> list[str]:
    """The keys of a flat dict structure (in `keras.tree.flatten` order) if usable, else positional names."""
    if isinstance(structure, dict) and len(structure) == count and all(
        isinstance(k, str) and _NAME.match(k) for k in structure
    ) and all(not isinstance(v, (dict, list, tuple)) for v in structure.values()):
        return keras.tree.flatten({key: key for key in structure})
    return tensor_names(prefix, count)


def input_structure(model: keras.Model) -> Any:
    """How ``model`` takes its inputs: one tensor, a list, or a dict (``model.input``)."""
    try:
        return model.input
    except (AttributeError, ValueError):  # a Sequential that was never called
        return model.inputs[0] if len(model.inputs) == 1 else list(model.inputs)


def input_names(model: keras.Model) -> list[str]:
    """The signature's input names, in ``model.inputs`` order.

    The dict keys for a model with dict inputs (``token_ids``,
    ``padding_mask``), else ``input_0``, ``input_1``, ...
    """
    return _structure_names(input_structure(model), "input", len(model.inputs))


def output_names(model: keras.Model) -> list[str]:
    """The signature's output names, in ``model.outputs`` order.

    The dict keys for a model with dict outputs, else ``output_0``, ...
    """
    try:
        structure = model.output
    except (AttributeError, ValueError):
        structure = None
    return _structure_names(structure, "output", len(model.outputs))


def input_dtypes(model: keras.Model) -> list[str]:
    """The signature's input dtypes: ``float32`` for floating inputs, else the input's own (``int32``, ``bool``)."""
    dtypes = [keras.backend.standardize_dtype(tensor.dtype) for tensor in model.inputs]
    return ["float32" if "float" in dtype else dtype for dtype in dtypes]


def input_specs(model: keras.Model) -> list[tf.TensorSpec]:
    """One named `tf.TensorSpec` per input (`input_dtypes`, the input's shape, an unknown batch axis)."""
    return [
        tf.TensorSpec((None, *tensor.shape[1:]), tf.as_dtype(dtype), name=name)
        for tensor, dtype, name in zip(model.inputs, input_dtypes(model), input_names(model))
    ]


def pack_inputs(model: keras.Model, flat: Sequence[Any]) -> Any:
    """``flat`` (one value per ``model.inputs``) in the structure ``model`` is called with."""
    return keras.tree.pack_sequence_as(input_structure(model), list(flat))


def flat_outputs(result: Any) -> list:
    """A model's outputs (tensor, list or dict) as a flat list, in ``model.outputs`` order."""
    return keras.tree.flatten(result)


def serving_function(model: keras.Model):
    """Returns ``fn(*inputs) -> {output name: tensor}``, the inference call."""
    outputs = output_names(model)

    def serve(*inputs):
        result = model(pack_inputs(model, inputs), training=False)
        return dict(zip(outputs, flat_outputs(result)))

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
