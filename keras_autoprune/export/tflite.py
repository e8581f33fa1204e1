"""`export_tflite`: a verified ``.tflite`` (LiteRT) file from a Keras model.

The model is converted (by default from a frozen concrete function; see
`keras_autoprune.export.convert` for the two conversion paths and why),
written, run with LiteRT on sample inputs and compared with Keras (see
`keras_autoprune.export.verify`).

Quantization (``quantize``):

- ``None``: float32 weights and activations; verified to ``tolerance``.
- ``"dynamic"``: int8 weights, float activations (dynamic range).
- ``"float16"``: float16 weights, float32 activations.
- ``"int8"``: full integer: int8 weights and activations, calibrated on
  ``representative_data``; builtin int8 kernels only; with
  ``int8_io=True`` the inputs and outputs are int8 too. Activations that
  are (nearly) dead on the representative data get the smallest int8 scale
  that LiteRT's XNNPACK delegate accepts (`keras_autoprune.export.int8_scales`;
  the result's ``note`` names them).

Quantized files are judged by their top-1 agreement with Keras, reported in
the result and checked only when ``min_top1_agreement`` is set.

Example:

>>> import keras, numpy as np, tempfile, os
>>> inputs = keras.Input((8,))
>>> model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
>>> path = os.path.join(tempfile.mkdtemp(), "m.tflite")
>>> result = export_tflite(model, path)              # doctest: +SKIP
>>> result.relative_error < 1e-4, result.top1_agreement   # doctest: +SKIP
(True, 1.0)
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any

import keras

from keras_autoprune.errors import VerificationError
from keras_autoprune.export.convert import CONVERSION_PATHS, convert
from keras_autoprune.export.data import sample_inputs
from keras_autoprune.export.int8_scales import admit_int8_scales, describe
from keras_autoprune.export.result import ExportResult
from keras_autoprune.export.signature import check_exportable
from keras_autoprune.export.rounding import FACTOR, rounding_check
from keras_autoprune.export.verify import check_figures, check_thresholds, compare, reference_outputs, run_tflite

QUANTIZE_MODES = (None, "dynamic", "float16", "int8")
"""Accepted values of ``quantize``."""


def export_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    quantize: str | None = None,
    representative_data: Any = None,
    allow_flex: bool = False,
    int8_io: bool = False,
    tolerance: float | None = 1e-4,
    min_top1_agreement: float | None = None,
    num_samples: int = 100,
    seed: int = 0,
    via: str = "function",
) -> ExportResult:
    """Converts ``model`` to a ``.tflite`` file, runs it with LiteRT and compares.

    Arguments are checked before any work. The file is verified on
    ``num_samples`` samples of ``representative_data`` (uniform random
    inputs in ``[-1, 1)`` when None; 0 or 1 for integer inputs) against
    ``model(x, training=False)``. Models with several inputs or outputs,
    dict inputs (integer token ids, padding masks) and dict outputs are
    supported: the file's signature names are
    `keras_autoprune.export.signature`'s.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        path: the file to write; its directory must exist.
        quantize: None (float32, the default), ``"dynamic"``, ``"float16"``
            or ``"int8"`` (see the module docstring).
        representative_data: sample inputs, preprocessed like the training
            data: a NumPy array ``(N, *input_shape)`` (a tuple of arrays for
            several inputs, a dict ``{key: array}`` for dict inputs), a
            batched `tf.data.Dataset` of ``x`` or ``(x, y)``, or an
            iterable / generator of such batches (see
            `keras_autoprune.export.data`). Required for ``"int8"``, where
            it calibrates the activation ranges. Defaults to None.
        allow_flex: allow TensorFlow Select (Flex) ops when builtins lack an
            op. Defaults to False: conversion then fails with an
            `ExportError` naming the ops. A file with Flex ops cannot be
            verified here (LiteRT's Python interpreter has no Flex
            delegate): the result then has ``verified=False``.
        int8_io: with ``quantize="int8"``, make the file's inputs and
            outputs int8 (quantization parameters in the tensor details).
            Defaults to False (float32 inputs and outputs).
        tolerance: largest relative error ``max|tflite - keras| /
            max|keras|`` allowed for float32 files (``quantize=None``).
            Defaults to 1e-4. None: not checked. A file beyond it still
            passes when the model's own float32 rounding explains the
            difference: against a float64 copy of the model, the file is
            within ``max(tolerance, 4 x`` Keras float32's error``)``
            (`keras_autoprune.export.rounding`; the result's ``note`` says so).
        min_top1_agreement: if set, the lowest top-1 agreement with Keras
            allowed for any ``quantize``, e.g. 0.95. Defaults to None:
            reported, not checked.
        num_samples: samples used for int8 calibration and verification.
            Defaults to 100.
        seed: seed of the random inputs used without data. Defaults to 0.
        via: conversion path, ``"function"`` (frozen concrete function, the
            default) or ``"saved_model"`` (through a temporary SavedModel);
            see `keras_autoprune.export.convert`.

    Returns:
        An `ExportResult` with the path, size and verification figures.

    Raises:
        UnsupportedModelError: ``model`` is not a built Keras model.
        ValueError, TypeError: bad arguments or representative data
            (including samples the Keras model itself cannot run).
        ExportError: conversion needs ops outside the TFLite builtins, or
            no conversion path gives a file with the expected signature.
        VerificationError: the file's error exceeds ``tolerance`` (float32)
            or its top-1 agreement is below ``min_top1_agreement``.
    """
    model = check_exportable(model)
    path = check_tflite_arguments(path, quantize, representative_data is not None, int8_io, via, tolerance,
                                  min_top1_agreement, num_samples)
    inputs = sample_inputs(model, representative_data, num_samples, seed)
    expected = reference_outputs(model, inputs)  # the model must run on the samples before any conversion
    content, flex_ops = convert(model, quantize, inputs, int8_io, allow_flex, via)
    content, scale_fixes = admit_int8_scales(content) if quantize == "int8" else (content, [])
    what = f"{quantize or 'float32'} TFLite file {path}"
    if flex_ops:
        path.write_bytes(content)
        note = "LiteRT's Python interpreter cannot run Flex ops; run the file where the Flex delegate is linked"
        warnings.warn(f"The {what} holds Flex ops ({', '.join(flex_ops)}) and was not verified: {note}.",
                      stacklevel=2)
        return ExportResult(path, "tflite", quantize, len(content), None, None, None, 0,
                            verified=False, flex_ops=flex_ops, note=note)
    # Verified under another name, then renamed: a file that fails never replaces one already at `path`;
    # it is kept beside it for inspection.
    staging = unverified_path(path)
    staging.write_bytes(content)
    try:
        result = _verify(staging, path, model, inputs, expected, quantize, tolerance, min_top1_agreement, scale_fixes)
    except VerificationError as error:
        raise VerificationError(f"{error} The file that failed is kept at '{staging}' for inspection; "
                                f"'{path}' was not written.") from error
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, path)
    return result


def unverified_path(path: pathlib.Path) -> pathlib.Path:
    """Where `export_tflite` writes a file before verifying it (and keeps it if it fails): ``m.unverified.tflite``."""
    return path.with_name(f"{path.stem}.unverified{path.suffix}")


def _verify(staging: pathlib.Path, path: pathlib.Path, model: keras.Model, inputs: list, expected: list,
            quantize: str | None, tolerance: float, min_top1_agreement: float | None,
            scale_fixes: list) -> ExportResult:
    """Runs the file at ``staging`` with LiteRT against ``expected`` (raises VerificationError); its result at ``path``."""
    what = f"{quantize or 'float32'} TFLite file {path}"
    received = run_tflite(staging, model, inputs)
    figures = compare(expected, received)
    tolerance = tolerance if quantize is None else None
    note, rounding = describe(scale_fixes) if scale_fixes else "", ""
    if tolerance is not None and figures.relative_error > tolerance:  # the model's own rounding may be the cause
        check = rounding_check(model, inputs, expected, received)
        rounding = "" if check is None else check.describe()
        if check is not None and check.passes(tolerance):
            note = (f"relative error {figures.relative_error:.3g} to Keras float32, above the tolerance {tolerance:g}, "
                    f"but {rounding}: within {FACTOR:g}x the model's own float32 rounding (verified against float64)")
            tolerance = None
    check_figures(figures, what, tolerance, min_top1_agreement, rounding)
    return ExportResult(path, "tflite", quantize, staging.stat().st_size, figures.max_abs_error,
                        figures.relative_error, figures.top1_agreement, figures.num_samples, note=note)


def check_tflite_arguments(path: Any, quantize: str | None = None, has_representative_data: bool = False,
                           int8_io: bool = False, via: str = "function", tolerance: float | None = 1e-4,
                           min_top1_agreement: float | None = None, num_samples: int = 100) -> pathlib.Path:
    """`export_tflite`'s checks of everything but the model and the data, before any work; returns ``path``."""
    path = _check_path(path)
    _check_options(quantize, has_representative_data, int8_io, via)
    check_thresholds(tolerance, min_top1_agreement, num_samples)
    return path


def _check_path(path: Any) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected `path` to be a file path. Received: path={path!r}")
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(
            f"Expected `path` to name a file to write. Received: path='{path}', an existing "
            "directory. Fix: e.g. `path='model.tflite'`."
        )
    if not path.parent.is_dir():
        raise ValueError(
            f"Expected the directory of `path` to exist. Received: path='{path}', whose "
            f"directory '{path.parent}' does not exist. Fix: create it first, e.g. "
            f"`os.makedirs('{path.parent}')`."
        )
    return path


def _check_options(quantize: Any, has_representative_data: bool, int8_io: bool, via: Any) -> None:
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"Expected `quantize` to be one of {list(QUANTIZE_MODES)}. "
            f"Received: quantize={quantize!r}"
        )
    if quantize == "int8" and not has_representative_data:
        raise ValueError(
            "Expected `representative_data` with quantize='int8': full-integer "
            "quantization calibrates activation ranges on sample inputs. Received: "
            "representative_data=None. Fix: pass ~100 training inputs, preprocessed like "
            "the training data (array, batched tf.data.Dataset or generator), or use "
            "quantize='dynamic', which needs no data."
        )
    if int8_io and quantize != "int8":
        raise ValueError(
            "Expected quantize='int8' with int8_io=True (int8 input and output tensors "
            f"need a full-integer model). Received: quantize={quantize!r}, int8_io=True."
        )
    if via not in CONVERSION_PATHS:
        raise ValueError(
            f"Expected `via` to be one of {list(CONVERSION_PATHS)}. Received: via={via!r}"
        )
