"""Calibration data: every accepted source as a stream of NumPy batches.

Accepted sources (element conventions follow `keras.utils.unpack_x_y_sample_weight`:
a tuple is ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``, anything else is
``x``):

- a batched `tf.data.Dataset`;
- a `keras.utils.PyDataset`;
- in-memory arrays: a tuple ``(x, y)`` / ``(x, y, sample_weight)`` (``y`` may
  be None), or ``x`` alone (an array, a list of arrays for several inputs, or
  a dict by input name), cut into batches of ``batch_size``;
- any other iterable or generator of batches.

Labels are needed for the empirical Fisher only: the true Fisher samples them
from the model, so ``x``-only data is accepted with ``fisher="true"`` (labels
given anyway are ignored). Sample weights, when given, must be non-negative,
one per example.

Batches are checked as they arrive (the first one before any work), against
the model's inputs: count, rank, known dimensions, equal batch sizes.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import check_model

_SOURCES = (
    "a batched tf.data.Dataset, a keras.utils.PyDataset, a tuple of arrays (x, y) or "
    "(x, y, sample_weight), an array x, or an iterable/generator of such batches"
)


@dataclasses.dataclass(frozen=True)
class CalibrationBatch:
    """One batch, as NumPy arrays.

    Attributes:
        x: one array per model input, in the order of ``model.inputs``.
        y: labels, or None; read through a likelihood (`CalibrationData`'s
            ``likelihood``): a list of label arrays, one per output with a loss.
        sample_weight: ``(B,)`` float64 weights (ones when none were given).
    """

    x: list[np.ndarray]
    y: np.ndarray | list[np.ndarray] | None
    sample_weight: np.ndarray

    @property
    def size(self) -> int:
        return int(self.x[0].shape[0])

    def slice(self, start: int, stop: int) -> CalibrationBatch:
        y = self.y
        if y is not None:
            y = [a[start:stop] for a in y] if isinstance(y, list) else y[start:stop]
        return CalibrationBatch([a[start:stop] for a in self.x], y, self.sample_weight[start:stop])


class CalibrationData:
    """Batches from any supported source, checked against a model.

    Args:
        data: the source (see the module docstring).
        model: the model the batches are fed to.
        batch_size: batch size for in-memory arrays (ignored otherwise).
        num_batches: stop after this many batches (None: the whole source).
        require_labels: whether every batch must carry labels.
        likelihood: when given (a `stats.loss.Likelihood`), labels are read
            through it: any structure Keras takes for the model's outputs,
            checked and converted per output (`Likelihood.targets`). Without
            it, labels are one array, checked as a classifier's.
        labels_reason: why labels are needed (for the message when missing).

    Raises:
        TypeError: unsupported source type.
        ValueError: bad arguments, or a first batch that does not fit.
    """

    def __init__(
        self,
        data: Any,
        model: keras.Model,
        *,
        batch_size: int = 32,
        num_batches: int | None = None,
        require_labels: bool = True,
        likelihood: Any = None,
        labels_reason: str | None = None,
    ):
        check_count("batch_size", batch_size)
        check_batch_count(data, num_batches)
        self._functional = check_model(model)
        self._require_labels = require_labels
        self._likelihood = likelihood
        self._labels_reason = labels_reason
        self._num_batches = num_batches
        self._elements, length = _source(data, batch_size)
        self.total: int | None = length if num_batches is None else min(num_batches, length or num_batches)
        self._first = next(self._elements, None)
        if self._first is None:
            raise ValueError(f"Expected at least one calibration batch. Received: an empty {type(data).__name__}.")
        self._first = self._normalize(self._first, 0)

    def __iter__(self) -> Iterator[CalibrationBatch]:
        rest = (self._normalize(e, i + 1) for i, e in enumerate(self._elements))
        stream = itertools.chain([self._first], rest)
        return itertools.islice(stream, self._num_batches) if self._num_batches else stream

    # -- checks ---------------------------------------------------------
    def _normalize(self, element: Any, index: int) -> CalibrationBatch:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(element)
        x = self._flat_inputs(x, index)
        size = x[0].shape[0]
        if y is None and self._require_labels:
            if self._labels_reason:
                raise ValueError(
                    f"Expected (x, y) batches: {self._labels_reason}. Received: batch {index} without labels. "
                    "Fix: give labels."
                )
            raise ValueError(
                "Expected (x, y) batches: the empirical Fisher uses the real labels. "
                f"Received: batch {index} without labels. Fix: give labels, or use fisher='true', "
                "which samples labels from the model's predictions."
            )
        if y is not None and self._require_labels and self._likelihood is not None:
            y = keras.tree.map_structure(lambda a: None if a is None else _array(a, "y"), y)
            for leaf in keras.tree.flatten(y):
                if leaf is not None:  # an output without a loss needs no labels
                    _same_size(leaf, size, "labels y", index)
            shapes = [tuple(t.shape) for t in self._functional.outputs]
            y = self._likelihood.targets(y, shapes, index)
        elif y is not None and self._require_labels:
            y = _array(y, "y")
            _same_size(y, size, "labels y", index)
            _check_classes(y, self._functional, index)
        else:
            y = None
        if sample_weight is None:
            weights = np.ones(size)
        else:
            weights = _array(sample_weight, "sample_weight").astype(np.float64)
            weights = weights[:, 0] if weights.ndim == 2 and weights.shape[1] == 1 else weights
            _same_size(weights, size, "sample_weight", index)
            if weights.ndim != 1 or not np.all(np.isfinite(weights) & (weights >= 0)):
                raise ValueError(
                    "Expected one finite, non-negative sample weight per example. "
                    f"Received: sample_weight of shape {weights.shape} in batch {index}."
                )
        return CalibrationBatch(x, y, weights)

    def _flat_inputs(self, x: Any, index: int) -> list[np.ndarray]:
        inputs = self._functional.inputs
        if isinstance(x, dict):
            struct = self._functional._inputs_struct
            keys = sorted(struct) if isinstance(struct, dict) else [t.name for t in inputs]
            missing = [k for k in keys if k not in x]
            if missing:
                raise ValueError(f"Expected inputs named {keys}. Received: a dict with keys {sorted(x)} (batch {index}).")
            x = [x[k] for k in keys]
        arrays = [_array(a, "x") for a in (x if isinstance(x, (list, tuple)) else [x])]
        if len(arrays) != len(inputs):
            raise ValueError(
                f"Expected {len(inputs)} input array(s) per batch, for the model's inputs. "
                f"Received: {len(arrays)} in batch {index}. Fix: pass labels as the second item of a "
                "tuple (x, y), not of a list, and one array per input."
            )
        for array, tensor in zip(arrays, inputs):
            expected = tuple(tensor.shape)
            if array.ndim == len(expected) - 1 and _fits(array.shape, expected[1:]):
                raise ValueError(
                    f"Expected batched inputs of shape {expected}. Received: an example of shape {array.shape} "
                    f"(batch {index}). Fix: batch the data, e.g. `dataset.batch(32)`."
                )
            if array.ndim != len(expected) or not _fits(array.shape[1:], expected[1:]):
                raise ValueError(
                    f"Expected inputs of shape {expected} (None = any). Received: an array of shape "
                    f"{array.shape} in batch {index}."
                )
            _same_size(array, arrays[0].shape[0], "inputs", index)
            _check_dtype(array, tensor, index)
        return arrays


def _check_dtype(array: np.ndarray, tensor: Any, index: int) -> None:
    """Numbers for numeric inputs, and whole numbers for integer inputs (token ids, indices)."""
    expected = str(tensor.dtype)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(
            f"Expected numeric inputs ({expected}) for input '{tensor.name}'. Received: an array of dtype "
            f"{array.dtype} in batch {index}. Fix: convert the data to numbers before calibration."
        )
    if "int" in expected and np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
        raise ValueError(
            f"Expected whole numbers for the integer input '{tensor.name}' ({expected}: token ids or indices). "
            f"Received: float values with fractions in batch {index}. Fix: pass the integer ids the model reads."
        )


def _check_classes(y: np.ndarray, model: keras.Model, index: int) -> None:
    """Labels of a single ``(B, C)``-output classifier: integers in ``[0, C)``, or one-hot rows of ``C`` columns."""
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        return
    classes = model.outputs[0].shape[-1]
    if classes is None or classes < 2 or y.size == 0:
        return
    sparse = y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)
    if sparse:
        low, high = y.min(), y.max()
        if low < 0 or high >= classes or not np.all(y == np.round(y)):
            raise ValueError(
                f"Expected integer class labels in [0, {classes}) for model '{model.name}' and its {classes} "
                f"outputs. Received: labels from {low} to {high} in batch {index}. Fix: map the labels to "
                "0 .. classes-1 (e.g. with np.unique(y, return_inverse=True)), or check that the data set "
                "belongs to this model."
            )
    elif y.ndim == 2 and y.shape[1] != classes:
        raise ValueError(
            f"Expected one-hot labels with {classes} columns for model '{model.name}'. Received: labels of shape "
            f"{y.shape} in batch {index}."
        )


def _source(data: Any, batch_size: int) -> tuple[Iterator[Any], int | None]:
    """An iterator over raw elements, and their number when known."""
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        return iter(data), (cardinality if cardinality >= 0 else None)
    if isinstance(data, keras.utils.PyDataset):
        return (data[i] for i in range(len(data))), len(data)
    if isinstance(data, tuple) or _is_arrays(data):
        arrays = data if isinstance(data, tuple) else (data,)
        if not 1 <= len(arrays) <= 3:
            raise ValueError(
                f"Expected a tuple (x,), (x, y) or (x, y, sample_weight). Received: a tuple of {len(arrays)} items."
            )
        arrays = keras.tree.map_structure(lambda a: None if a is None else _array(a, "data"), arrays)
        sizes = {a.shape[0] if a.ndim else None for a in keras.tree.flatten(arrays) if a is not None}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"Expected arrays with the same number of examples. Received: first dimensions {sorted(map(str, sizes))}."
            )
        n = sizes.pop()
        starts = range(0, n, batch_size)

        def cut(array, start):
            return None if array is None else array[start : start + batch_size]

        batches = (keras.tree.map_structure(lambda a, s=s: cut(a, s), arrays) for s in starts)
        return batches, len(starts)
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"Expected calibration data as {_SOURCES}. Received: data of type {type(data).__name__}.")
    return iter(data), (len(data) if hasattr(data, "__len__") else None)


def _is_arrays(data: Any) -> bool:
    if isinstance(data, (np.ndarray, tf.Tensor)):
        return True
    if isinstance(data, (list, dict)) and data:
        values = data.values() if isinstance(data, dict) else data
        return all(isinstance(v, (np.ndarray, tf.Tensor)) for v in values)
    return False


def _array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
        raise TypeError(f"Expected dense arrays. Received: {what} of type {type(value).__name__}.")
    try:
        return np.asarray(value)
    except Exception as error:  # noqa: BLE001 - reported with the type received
        raise TypeError(f"Expected array-like {what}. Received: {type(value).__name__} ({error}).") from error


def _fits(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or int(s) == int(e) for s, e in zip(shape, expected))


def _same_size(array: np.ndarray, size: int, what: str, index: int) -> None:
    if array.ndim == 0 or array.shape[0] != size:
        raise ValueError(
            f"Expected {what} with {size} examples, like the first input. "
            f"Received: shape {array.shape} in batch {index}."
        )


def check_batch_count(data: Any, num_batches: int | None) -> None:
    """Raises ValueError unless ``num_batches`` is None or a positive integer, and ``data`` is finite when it is None."""
    if num_batches is not None:
        check_count("num_batches", num_batches)
    elif isinstance(data, tf.data.Dataset) and int(data.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "Expected a finite dataset, or `num_batches`. Received: an infinite tf.data.Dataset "
            "(e.g. after .repeat()) and num_batches=None. Fix: pass num_batches=..."
        )


def check_count(name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Expected a positive integer. Received: {name}={value!r}")


def progress_bar(total: int | None, verbose: int) -> keras.utils.Progbar:
    """A Keras progress bar over calibration batches (``verbose=0``: silent).

    When standard output is not a terminal (a log file, CI), a bar redrawn
    in place would fill the log with control characters: it then prints one
    plain line when the pass ends (Keras' ``verbose=2``).
    """
    if verbose == 1 and not sys.stdout.isatty():
        verbose = 2
    return keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
