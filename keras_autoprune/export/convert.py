"""Keras model -> ``.tflite`` bytes: the conversion paths and converter settings.

Two paths, both giving a file with the ``serving_default`` signature of
`keras_autoprune.export.signature` (inputs ``input_0`` ... or the keys of
dict inputs, outputs ``output_0`` ... or the keys of dict outputs):

- ``"function"`` (the default): trace the serving function as a concrete
  `tf.function`, fold the variables into constants
  (``convert_variables_to_constants_v2``, the freezing step that
  ``from_keras_model`` itself used before Keras 3), save that constant-only
  function as the one signature of a scratch SavedModel, with custom
  gradients left out, and convert it with
  ``TFLiteConverter.from_saved_model``. It needs no SavedModel of the
  model's variables and is several times faster (MobileNetV2 alpha 0.35 at
  64x64: about 5 s instead of 18 s on 2 shared cores; EfficientNetB0 at
  64x64: 14 s instead of 34 s).
- ``"saved_model"``: write the model with `keras.export.ExportArchive` to a
  temporary SavedModel and use ``TFLiteConverter.from_saved_model``, the
  path of ``from_keras_model`` and ``model.export(format="litert")`` on
  recent releases. It is used automatically when freezing fails (models
  holding lookup tables, for example).

Every file's signature is checked (`keras_autoprune.export.tflite_signature`):
a ``"function"`` file without the expected signature is converted again
through ``"saved_model"`` (with a warning); a file that still lacks it is an
`ExportError`. Why: ``from_concrete_functions([frozen], tf.Module())``, used
before, saves the function itself and, when that fails (the custom gradient
of ``swish``/``silu`` captures a tensor that a frozen graph cannot save),
silently converts without any signature; LiteRT then fails with ``Invalid
signature_key provided: "serving_default"``.

Both use only APIs that TF >= 2.16 and Keras >= 3.0 have (tested on TF
2.21 / Keras 3.15). Not used: ``from_keras_model``
(fails on Keras 3 models in TF 2.16, tensorflow/tensorflow#63867),
``model.export(format="litert")`` (recent Keras only, always enables Flex
ops, no control of the signature), and ``from_concrete_functions`` with
the model as ``trackable_obj`` (keeps the weights as resource variables
that LiteRT runs uninitialised: NaN outputs on TF 2.21).

Settings by ``quantize``: ``"dynamic"`` sets ``Optimize.DEFAULT``;
``"float16"`` adds ``supported_types=[tf.float16]``; ``"int8"`` adds the
representative dataset (one sample per step, a dict keyed by signature
input name, so any number and order of inputs), builtin int8 kernels only
(``TFLITE_BUILTINS_INT8``) and, with ``int8_io``, int8 input and output
tensors (integer inputs such as token ids stay as they are). Builtin ops
only unless Flex is allowed (see `keras_autoprune.export.flex`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.errors import ExportError
from keras_autoprune.export.flex import flex_error, unsupported_ops
from keras_autoprune.export.signature import (
    SIGNATURE_KEY,
    input_names,
    input_specs,
    output_names,
    serving_function,
    write_serving_saved_model,
)
from keras_autoprune.export.tflite_signature import signature_problem

CONVERSION_PATHS = ("function", "saved_model")
"""Accepted values of ``via``."""


def convert(
    model: keras.Model,
    quantize: str | None,
    inputs: list[np.ndarray],
    int8_io: bool = False,
    allow_flex: bool = False,
    via: str = "function",
) -> tuple[bytes, tuple[str, ...]]:
    """Converts ``model``; builtin ops are tried first, then Flex if allowed.

    The file's ``serving_default`` signature is checked
    (`keras_autoprune.export.tflite_signature`); a file without it from the
    ``"function"`` path is converted again through the ``"saved_model"``
    path, with a warning.

    Args:
        model: a model accepted by `check_exportable`.
        quantize: None, ``"dynamic"``, ``"float16"`` or ``"int8"``.
        inputs: calibration samples, one array per input (used by int8).
        int8_io: int8 input and output tensors (int8 only).
        allow_flex: allow TensorFlow Select ops when builtins lack one.
        via: ``"function"`` or ``"saved_model"`` (see the module docstring).

    Returns:
        ``(file content, names of the Flex ops it holds)``.

    Raises:
        ExportError: builtins lack an op and Flex is not allowed (or does
            not have it either), or no path gives a file with the expected
            signature.
    """
    names = input_names(model), output_names(model)
    content, flex_ops = _convert(model, quantize, inputs, int8_io, allow_flex, via)
    problem = signature_problem(content, *names)
    if problem and via == "function":
        warnings.warn(
            f"Converting model '{model.name}' from a frozen function gave {problem}; converting "
            "through a SavedModel instead (via='saved_model').",
            stacklevel=3,
        )
        content, flex_ops = _convert(model, quantize, inputs, int8_io, allow_flex, "saved_model")
        problem = signature_problem(content, *names)
    if problem:
        raise ExportError(
            f"Expected the converted file of model '{model.name}' to have the '{SIGNATURE_KEY}' "
            f"signature with inputs {sorted(names[0])} and outputs {sorted(names[1])}. Received: "
            f"{problem} (via='{via}'{' and then via=saved_model' if via == 'function' else ''}). "
            "Fix: try the other `via`; if both fail, report it with the model."
        )
    return content, flex_ops


def _convert(model, quantize, inputs, int8_io, allow_flex, via) -> tuple[bytes, tuple[str, ...]]:
    names = input_names(model)
    with tempfile.TemporaryDirectory(prefix="kap_tflite_") as scratch:
        source = _function_source(model, scratch) if via == "function" else _saved_model_source(model, scratch)
        try:
            return _configure(source(), quantize, inputs, names, int8_io, flex=False).convert(), ()
        except Exception as error:  # noqa: BLE001 - the converter raises several types.
            select_ops, custom_ops = unsupported_ops(str(error))
            if not select_ops and not custom_ops:
                raise
            if not allow_flex or custom_ops:
                raise flex_error(select_ops, custom_ops, allow_flex) from None
        return _configure(source(), quantize, inputs, names, int8_io, flex=True).convert(), select_ops


def _function_source(model: keras.Model, scratch: str) -> Callable[[], tf.lite.TFLiteConverter]:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    specs = input_specs(model)
    function = tf.function(serving_function(model), input_signature=specs)
    directory = os.path.join(scratch, "frozen")
    try:
        frozen = convert_variables_to_constants_v2(function.get_concrete_function())
        # Freezing keeps the inputs' names but returns a flat list: name the
        # outputs again (dict outputs keep their keys).
        order = [t.name.split(":")[0] for t in frozen.inputs]
        outputs = output_names(model)

        def named(*args):
            by_name = {spec.name: arg for spec, arg in zip(specs, args)}
            return dict(zip(outputs, frozen(*[by_name[name] for name in order])))

        signature = tf.function(named, input_signature=specs).get_concrete_function()
        # The frozen function (constants only) as a SavedModel signature. Custom
        # gradients (swish/silu) are not saved: inference does not need them and
        # TF cannot save those of a frozen graph (its converter then silently
        # drops the signature).
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        tf.saved_model.save(tf.Module(), directory, signatures={SIGNATURE_KEY: signature}, options=options)
    except Exception as error:  # noqa: BLE001 - any failure: use the other path.
        warnings.warn(
            f"Could not freeze model '{model.name}' for conversion ({type(error).__name__}: "
            f"{error}); converting through a SavedModel instead (via='saved_model').",
            stacklevel=5,
        )
        return _saved_model_source(model, scratch)
    return lambda: tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=[SIGNATURE_KEY])


def _saved_model_source(model: keras.Model, scratch: str) -> Callable[[], tf.lite.TFLiteConverter]:
    write_serving_saved_model(model, scratch)
    return lambda: tf.lite.TFLiteConverter.from_saved_model(scratch, signature_keys=[SIGNATURE_KEY])


def _configure(
    converter: tf.lite.TFLiteConverter,
    quantize: str | None,
    inputs: list[np.ndarray],
    names: list[str],
    int8_io: bool,
    flex: bool,
) -> tf.lite.TFLiteConverter:
    ops = tf.lite.OpsSet
    builtins = ops.TFLITE_BUILTINS_INT8 if quantize == "int8" else ops.TFLITE_BUILTINS
    converter.target_spec.supported_ops = [builtins, ops.SELECT_TF_OPS] if flex else [builtins]
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        count = inputs[0].shape[0]
        # One sample per step, keyed by signature input name (any number of inputs, any order).
        converter.representative_dataset = lambda: (
            {name: x[i:i + 1] for name, x in zip(names, inputs)} for i in range(count))
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    return converter
