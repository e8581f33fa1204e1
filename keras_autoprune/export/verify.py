"""Runs exported files and compares them with the Keras model.

The ``.tflite`` file is run with LiteRT
(`ai_edge_litert.interpreter.Interpreter`, its ``serving_default``
signature runner), the same runtime a device uses; files with int8 inputs
or outputs are fed quantized inputs and their outputs are dequantized
(``x_q = round(x / scale) + zero_point``, ``x = (x_q - zero_point) * scale``).

Figures, over every output and sample (``y`` Keras, ``ŷ`` exported):

- ``max_abs_error = max |ŷ - y|``;
- ``relative_error = max |ŷ - y| / max |y|``;
- ``top1_agreement = mean(argmax ŷ == argmax y)`` over the last axis, for
  outputs with more than one class (the lowest over such outputs).

Example:

>>> import numpy as np
>>> f = compare([np.array([[1.0, 2.0], [3.0, 1.0]])], [np.array([[1.0, 2.5], [2.0, 1.0]])])
>>> f.max_abs_error, f.relative_error, f.top1_agreement
(1.0, 0.3333333333333333, 1.0)
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from keras_autoprune.errors import ExportError, VerificationError
from keras_autoprune.export.signature import (
    SIGNATURE_KEY,
    flat_outputs,
    input_names,
    output_names,
    pack_inputs,
    tensor_names,
)

BATCH_SIZE = 16
"""Samples per call when running the models (bounds the memory used)."""


@dataclasses.dataclass(frozen=True)
class Figures:
    """How closely exported outputs match Keras (see the module docstring)."""

    max_abs_error: float
    relative_error: float
    top1_agreement: float | None
    num_samples: int


def compare(expected: Sequence[np.ndarray], received: Sequence[np.ndarray]) -> Figures:
    """Compares outputs, one array per output with the samples on axis 0.

    Raises:
        ValueError: when the outputs' number or shapes differ.
    """
    if len(expected) != len(received) or any(e.shape != r.shape for e, r in zip(expected, received)):
        raise ValueError(
            "Expected exported outputs of the Keras model's shapes "
            f"{[e.shape for e in expected]}. Received: {[r.shape for r in received]}."
        )
    peak = max(float(np.max(np.abs(e))) for e in expected)
    error = max(float(np.max(np.abs(r.astype(np.float64) - e))) for e, r in zip(expected, received))
    agreements = [
        float(np.mean(np.argmax(e, axis=-1) == np.argmax(r, axis=-1)))
        for e, r in zip(expected, received)
        if e.ndim >= 2 and e.shape[-1] > 1
    ]
    return Figures(
        max_abs_error=error,
        relative_error=error / max(peak, 1e-12),
        top1_agreement=min(agreements) if agreements else None,
        num_samples=int(expected[0].shape[0]),
    )


def verify_tflite(
    path: str | pathlib.Path,
    model: keras.Model,
    inputs: Sequence[np.ndarray],
    expected: Sequence[np.ndarray] | None = None,
) -> Figures:
    """Runs a ``.tflite`` file from `export_tflite` and compares it with ``model``.

    Args:
        path: the file.
        model: the Keras model it was converted from.
        inputs: one array per model input, in ``model.inputs`` order,
            samples on axis 0 (`keras_autoprune.export.data.sample_inputs`
            makes them from any representative data, dicts included).
        expected: ``keras_outputs(model, inputs)`` when already computed.

    Raises:
        ExportError: LiteRT cannot run the file on ``inputs`` (the message
            names the input shapes and LiteRT's error).

    Returns:
        The `Figures` (errors and top-1 agreement).

    Example:

    >>> figures = verify_tflite("slim.tflite", slim, [x_val[:32]])   # doctest: +SKIP
    >>> figures.relative_error < 1e-4                                # doctest: +SKIP
    True
    """
    expected = keras_outputs(model, inputs) if expected is None else expected
    return compare(expected, run_tflite(path, model, inputs))


def run_tflite(path: str | pathlib.Path, model: keras.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The file's outputs on ``inputs`` (`tflite_outputs` with ``model``'s signature names).

    Raises:
        ExportError: LiteRT cannot run the file on ``inputs``.
    """
    try:
        return tflite_outputs(path, inputs, input_names=input_names(model), output_names=output_names(model))
    except RuntimeError as error:  # LiteRT reports a failed invoke (e.g. a SLICE out of range) this way
        raise ExportError(
            f"Expected LiteRT to run {path} on the verification samples (input shapes {_shapes(inputs)}), as Keras "
            f"did. Received: {error}. Fix: report it with the model; with inputs of unknown length, try "
            "`representative_data` at the length the model will be served with."
        ) from error


def reference_outputs(model: keras.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`keras_outputs`, checked before any conversion: samples the Keras model cannot run are bad input.

    Raises:
        ValueError: ``model`` raised on ``inputs`` (for example token ids
            longer than a text model's ``max_sequence_length``).
    """
    try:
        return keras_outputs(model, inputs)
    except Exception as error:  # noqa: BLE001 - any failure of the user's model on the samples
        raise ValueError(
            f"Expected `representative_data` that model '{model.name}' can run. Received: samples of input "
            f"shapes {_shapes(inputs)}, on which the model raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
            "Fix: pass samples of the shape, dtype and range the model is served with."
        ) from error


def _shapes(inputs: Sequence[np.ndarray]) -> str:
    return ", ".join(str(tuple(x.shape)) for x in inputs)


def keras_outputs(model: keras.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``model(inputs, training=False)`` in batches, one array per output (``model.outputs`` order)."""
    def run(batch: list[np.ndarray]) -> list:
        return flat_outputs(model(pack_inputs(model, batch), training=False))

    return _batched(run, inputs)


def tflite_outputs(
    path: str | pathlib.Path,
    inputs: Sequence[np.ndarray],
    num_threads: int = 1,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Runs a ``.tflite`` file written by `export_tflite` on ``inputs``.

    Args:
        path: the file; it must have the ``serving_default`` signature.
        inputs: one array per input, samples on axis 0.
        num_threads: LiteRT threads. Defaults to 1.
        input_names, output_names: the signature's names, in order
            (`keras_autoprune.export.signature.input_names` of the model).
            Defaults to ``input_0`` ... and every ``output_0`` ...

    Returns:
        One float32 array per output (dequantized for int8 outputs).
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    runner = interpreter.get_signature_runner(SIGNATURE_KEY)
    in_details = runner.get_input_details()
    out_details = runner.get_output_details()
    names = list(input_names) if input_names is not None else tensor_names("input", len(inputs))
    outputs = list(output_names) if output_names is not None else tensor_names("output", len(out_details))

    def run(batch: list[np.ndarray]) -> list[np.ndarray]:
        feed = {name: _quantize(x, in_details[name]) for name, x in zip(names, batch)}
        result = runner(**feed)
        return [_dequantize(result[name], out_details[name]) for name in outputs]

    return _batched(run, inputs)


def serving_outputs(signature: Callable, model: keras.Model, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Runs a reloaded SavedModel ``serving_default`` signature on ``inputs``."""
    names = input_names(model)
    outputs = output_names(model)

    def run(batch: list[np.ndarray]) -> list[np.ndarray]:
        result = signature(**dict(zip(names, batch)))
        return [np.asarray(result[name]) for name in outputs]

    return _batched(run, inputs)


def check_thresholds(tolerance: Any, min_top1_agreement: Any, num_samples: Any) -> None:
    """Checks the verification arguments of the export functions.

    Raises:
        ValueError: ``tolerance`` not None or > 0, ``min_top1_agreement``
            not None or in ``[0, 1]``, ``num_samples`` not an integer >= 1.
    """
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(
            "Expected `tolerance` to be a positive number (a relative error, e.g. 1e-4) "
            f"or None. Received: tolerance={tolerance!r}"
        )
    if min_top1_agreement is not None and not (
        isinstance(min_top1_agreement, (int, float)) and 0 <= min_top1_agreement <= 1
    ):
        raise ValueError(
            "Expected `min_top1_agreement` to be a fraction in [0, 1] (e.g. 0.95) or None. "
            f"Received: min_top1_agreement={min_top1_agreement!r}"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(
            f"Expected `num_samples` to be an integer >= 1. Received: num_samples={num_samples!r}"
        )


def check_figures(
    figures: Figures,
    what: str,
    tolerance: float | None,
    min_top1_agreement: float | None,
    rounding: str = "",
) -> None:
    """Raises `VerificationError` when ``figures`` break a threshold.

    Args:
        figures: from `compare`.
        what: the export, for the message (``"float32 TFLite file m.tflite"``).
        tolerance: largest relative error allowed; None: not checked.
        min_top1_agreement: lowest top-1 agreement allowed; None: not checked.
        rounding: what the float64 yardstick found (`keras_autoprune.export.rounding`), for the message.
    """
    if tolerance is not None and not figures.relative_error <= tolerance:
        found = f" {rounding[0].upper()}{rounding[1:]}." if rounding else ""
        raise VerificationError(
            f"Expected the {what} to match the Keras model within a relative error of "
            f"{tolerance:g}. Received: relative error {figures.relative_error:.3g} "
            f"(max abs error {figures.max_abs_error:.3g}) on {figures.num_samples} "
            f"samples.{found} Fix: report this with the model if it is float32; pass a larger "
            "`tolerance` only if the difference is acceptable for your use."
        )
    if min_top1_agreement is None:
        return
    if figures.top1_agreement is None or figures.top1_agreement < min_top1_agreement:
        received = "no output with a class axis" if figures.top1_agreement is None else (
            f"top-1 agreement {figures.top1_agreement:.4f}")
        raise VerificationError(
            f"Expected the {what} to agree with the Keras model's top-1 class on at "
            f"least {min_top1_agreement:.2%} of {figures.num_samples} samples. Received: "
            f"{received}. Fix: calibrate with more representative data (int8), try "
            "quantize='dynamic' or 'float16', or lower `min_top1_agreement`."
        )


def _batched(run: Callable[[list[np.ndarray]], list[np.ndarray]], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    count = inputs[0].shape[0]
    chunks = [run([x[s:s + BATCH_SIZE] for x in inputs]) for s in range(0, count, BATCH_SIZE)]
    return [np.concatenate([_output_array(c[i]) for c in chunks]) for i in range(len(chunks[0]))]


def _output_array(value) -> np.ndarray:
    """An output as float32, or float64 as it is (the float64 copy of `rounding` is the yardstick)."""
    array = np.asarray(value)
    return array if array.dtype == np.float64 else array.astype(np.float32)


def _quantize(x: np.ndarray, details: dict) -> np.ndarray:
    dtype = details["dtype"]
    scale, zero_point = details["quantization"]
    if np.issubdtype(dtype, np.floating) or scale == 0:  # float, or not quantized (token ids, masks)
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, details: dict) -> np.ndarray:
    scale, zero_point = details["quantization"]
    if np.issubdtype(details["dtype"], np.floating) or scale == 0:
        return y.astype(np.float32)
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)
