"""Sample inputs for calibration and verification of exported files.

`sample_inputs` turns what a user passes as ``representative_data`` into
one array per model input (float32, or the input's integer/bool dtype),
checked against the model's input shapes before any conversion work
starts. Accepted:

- a NumPy array (or `tf.Tensor`) with a batch axis, ``(N, *input_shape)``;
  for a model with several inputs, a tuple with one array per input; for a
  model with dict inputs, a dict ``{key: array}`` with its keys;
- a batched `tf.data.Dataset` whose elements are ``x`` or ``(x, y)`` (or
  ``(x, y, sample_weight)``), ``x`` a dict for dict inputs;
- any other iterable, a generator, or a function returning one (the
  ``representative_dataset`` style of the TFLite converter), yielding
  batches ``x``, ``(x, y)``, ``[x]`` or ``{key: x}``.

The data must be preprocessed exactly like the model's training inputs:
int8 calibration measures the ranges of the activations it produces.
Without data, inputs are drawn uniformly from ``[-1, 1)`` (integer and
bool inputs: 0 or 1, valid token ids and mask values for any vocabulary).

Example:

>>> import keras, numpy as np
>>> inputs = keras.Input((4,))
>>> model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
>>> [a.shape for a in sample_inputs(model, np.zeros((10, 4)), num_samples=3)]
[(3, 4)]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.export.signature import input_dtypes, input_structure

RANDOM_RANGE = (-1.0, 1.0)
"""Range of the uniform random inputs used when no data is given."""


def sample_inputs(
    model: keras.Model,
    data: Any = None,
    num_samples: int = 100,
    seed: int = 0,
) -> list[np.ndarray]:
    """Returns up to ``num_samples`` samples per model input, in ``model.inputs`` order.

    Args:
        model: a Keras model with ``model.inputs``.
        data: representative data (see the module docstring), or None for
            random inputs (uniform in ``[-1, 1)``; 0 or 1 for integer and
            bool inputs).
        num_samples: how many samples to take (the first ones). Defaults
            to 100.
        seed: seed of the random inputs. Defaults to 0.

    Returns:
        One array ``(n, *input_shape)`` per model input, ``n <= num_samples``
        (fewer when the data holds fewer samples), float32 or the input's
        integer/bool dtype (`keras_autoprune.export.signature.input_dtypes`).

    Raises:
        TypeError: when ``data`` is of an unsupported type.
        ValueError: when its shapes or keys do not fit the model, or it is empty.
    """
    inputs = _Inputs(model)
    if data is None:
        if any(d is None for shape in inputs.shapes for d in shape):
            raise ValueError(
                "Expected `representative_data` for a model whose input shapes are "
                f"not fully known, as random inputs need a shape. Received: input "
                f"shapes {inputs.shapes} and representative_data=None. Fix: pass sample "
                "inputs, e.g. `representative_data=x_val[:100]`."
            )
        rng = np.random.default_rng(seed)
        return [
            rng.uniform(*RANDOM_RANGE, (num_samples, *s)).astype(np.float32) if d == "float32"
            else rng.integers(0, 2, (num_samples, *s)).astype(d)
            for s, d in zip(inputs.shapes, inputs.dtypes)
        ]
    collected: list[list[np.ndarray]] = [[] for _ in inputs.shapes]
    count = 0
    for element in _batches(data, inputs):
        arrays = _check_batch(_split_element(element, inputs, data), inputs)
        for store, array in zip(collected, arrays):
            store.append(array)
        count += arrays[0].shape[0]
        if count >= num_samples:
            break
    if count == 0:
        raise ValueError(
            "Expected `representative_data` to hold at least one sample. Received: "
            f"an empty {type(data).__name__}. Fix: pass a few hundred samples of the "
            "model's inputs, preprocessed like the training data."
        )
    return [np.concatenate(store)[:num_samples] for store in collected]


class _Inputs:
    """Shapes, dtypes and (for dict inputs) keys of a model's inputs, in ``model.inputs`` order."""

    def __init__(self, model: keras.Model):
        self.shapes = [tuple(t.shape[1:]) for t in model.inputs]
        self.dtypes = input_dtypes(model)
        structure = input_structure(model)
        self.keys = keras.tree.flatten({k: k for k in structure}) if isinstance(structure, dict) else None


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, tf.Tensor))


def _batches(data: Any, inputs: _Inputs) -> Iterable[Any]:
    """An iterable of elements (batches, ``(x, y)`` tuples, ...) from ``data``."""
    if _is_array(data) or isinstance(data, tuple) or (isinstance(data, dict) and inputs.keys):
        return [data]
    if isinstance(data, tf.data.Dataset):
        _check_dataset_spec(data, inputs)
        return data.as_numpy_iterator()
    if isinstance(data, (str, bytes, dict)) or not (callable(data) or isinstance(data, Iterable)):
        dicts = " (dicts only for a model with dict inputs)" if isinstance(data, dict) else ""
        raise TypeError(
            "Expected `representative_data` to be a NumPy array, a batched "
            "tf.data.Dataset of x or (x, y), or an iterable / generator of batches"
            f"{dicts}. Received: representative_data of type {type(data).__name__}."
        )
    if callable(data):
        data = data()
    return data


def _check_dataset_spec(dataset: tf.data.Dataset, inputs: _Inputs) -> None:
    spec = dataset.element_spec
    first = spec[0] if isinstance(spec, (tuple, list)) else spec
    if isinstance(first, dict) and inputs.keys:
        first, shape = first.get(inputs.keys[0]), inputs.shapes[0]
    else:
        first = first[0] if isinstance(first, (tuple, list)) and first else first
        shape = inputs.shapes[0]
    if isinstance(first, tf.TensorSpec) and first.shape.rank == len(shape):
        raise ValueError(
            "Expected a batched tf.data.Dataset (elements with a batch axis). "
            f"Received: element_spec={spec}. Fix: batch it, e.g. `dataset.batch(32)`."
        )


def _split_element(element: Any, inputs: _Inputs, data: Any) -> list[Any]:
    """The model inputs held by one element: ``x``, ``(x, y)``, ``[x]``, ``{key: x}``, ..."""
    num_inputs = len(inputs.shapes)
    if inputs.keys and isinstance(element, (tuple, list)) and element and isinstance(element[0], dict):
        element = element[0]
    if inputs.keys and isinstance(element, dict):
        missing = [k for k in inputs.keys if k not in element]
        if missing:
            raise ValueError(
                f"Expected each dict of `representative_data` to hold the model's input keys "
                f"{inputs.keys}. Received: keys {sorted(element)}; missing {missing}."
            )
        return [element[k] for k in inputs.keys]
    if num_inputs == 1:
        if _is_array(element):
            return [element]
        if isinstance(element, (tuple, list)) and element and _is_array(element[0]):
            return [element[0]]
    elif isinstance(element, (tuple, list)) and element:
        if len(element) == num_inputs and all(_is_array(e) for e in element):
            return list(element)
        first = element[0]
        if isinstance(first, (tuple, list)) and len(first) == num_inputs:
            return list(first)
    keyed = f" or a dict with the keys {inputs.keys}" if inputs.keys else ""
    raise ValueError(
        f"Expected each element of `representative_data` to be a batch x, (x, y) or "
        f"[x], with x one array per model input ({num_inputs} input(s)){keyed}. Received: "
        f"an element of type {type(element).__name__} from a {type(data).__name__}."
    )


def _check_batch(arrays: list[Any], inputs: _Inputs) -> list[np.ndarray]:
    checked = []
    for i, (array, shape, dtype) in enumerate(zip(arrays, inputs.shapes, inputs.dtypes)):
        array = np.asarray(array)
        fits = array.ndim == len(shape) + 1 and all(
            d is None or d == a for d, a in zip(shape, array.shape[1:])
        )
        name = f"'{inputs.keys[i]}'" if inputs.keys else str(i)
        if not fits:
            hint = (
                "add the batch axis, e.g. `x[None]`, or batch the dataset"
                if array.ndim == len(shape)
                else "resize or reshape the samples to the model's input shape"
            )
            raise ValueError(
                f"Expected batches of shape (batch, {', '.join(map(str, shape))}) for "
                f"model input {name}. Received: an array of shape {array.shape}. "
                f"Fix: {hint}."
            )
        if dtype != "float32" and array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"Expected integer values for model input {name} (dtype {dtype}). Received: "
                f"an array of dtype {array.dtype} with fractional values. Fix: pass the token "
                "ids / mask values the model takes."
            )
        checked.append(array.astype(dtype))
    return checked
