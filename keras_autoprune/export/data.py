"""Sample inputs for calibration and verification of exported files.

`sample_inputs` turns what a user passes as ``representative_data`` into
one float32 array per model input, checked against the model's input shapes
before any conversion work starts. Accepted:

- a NumPy array (or `tf.Tensor`) with a batch axis, ``(N, *input_shape)``;
  for a model with several inputs, a tuple with one array per input;
- a batched `tf.data.Dataset` whose elements are ``x`` or ``(x, y)`` (or
  ``(x, y, sample_weight)``);
- any other iterable, a generator, or a function returning one (the
  ``representative_dataset`` style of the TFLite converter), yielding
  batches ``x``, ``(x, y)`` or ``[x]``.

The data must be preprocessed exactly like the model's training inputs:
int8 calibration measures the ranges of the activations it produces.
Without data, inputs are drawn uniformly from ``[-1, 1)``.

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

RANDOM_RANGE = (-1.0, 1.0)
"""Range of the uniform random inputs used when no data is given."""


def sample_inputs(
    model: keras.Model,
    data: Any = None,
    num_samples: int = 100,
    seed: int = 0,
) -> list[np.ndarray]:
    """Returns up to ``num_samples`` samples per model input, as float32 arrays.

    Args:
        model: a Keras model with ``model.inputs``.
        data: representative data (see the module docstring), or None for
            uniform random inputs in ``[-1, 1)``.
        num_samples: how many samples to take (the first ones). Defaults
            to 100.
        seed: seed of the random inputs. Defaults to 0.

    Returns:
        One array ``(n, *input_shape)`` per model input, ``n <= num_samples``
        (fewer when the data holds fewer samples).

    Raises:
        TypeError: when ``data`` is of an unsupported type.
        ValueError: when its shapes do not fit the model, or it is empty.
    """
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    if data is None:
        if any(d is None for shape in shapes for d in shape):
            raise ValueError(
                "Expected `representative_data` for a model whose input shapes are "
                f"not fully known, as random inputs need a shape. Received: input "
                f"shapes {shapes} and representative_data=None. Fix: pass sample "
                "inputs, e.g. `representative_data=x_val[:100]`."
            )
        rng = np.random.default_rng(seed)
        return [rng.uniform(*RANDOM_RANGE, (num_samples, *s)).astype(np.float32) for s in shapes]
    batches = _batches(data, shapes)
    collected: list[list[np.ndarray]] = [[] for _ in shapes]
    count = 0
    for element in batches:
        arrays = _check_batch(_split_element(element, len(shapes), data), shapes)
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


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, tf.Tensor))


def _batches(data: Any, shapes: list[tuple]) -> Iterable[Any]:
    """An iterable of elements (batches, ``(x, y)`` tuples, ...) from ``data``."""
    if _is_array(data) or isinstance(data, tuple):
        return [data]
    if isinstance(data, tf.data.Dataset):
        _check_dataset_spec(data, shapes)
        return data.as_numpy_iterator()
    if isinstance(data, (str, bytes, dict)) or not (callable(data) or isinstance(data, Iterable)):
        raise TypeError(
            "Expected `representative_data` to be a NumPy array, a batched "
            "tf.data.Dataset of x or (x, y), or an iterable / generator of batches. "
            f"Received: representative_data of type {type(data).__name__}."
        )
    if callable(data):
        data = data()
    return data


def _check_dataset_spec(dataset: tf.data.Dataset, shapes: list[tuple]) -> None:
    spec = dataset.element_spec
    first = spec[0] if isinstance(spec, (tuple, list)) else spec
    first = first[0] if isinstance(first, (tuple, list)) and first else first
    if isinstance(first, tf.TensorSpec) and first.shape.rank == len(shapes[0]):
        raise ValueError(
            "Expected a batched tf.data.Dataset (elements with a batch axis). "
            f"Received: element_spec={spec}. Fix: batch it, e.g. `dataset.batch(32)`."
        )


def _split_element(element: Any, num_inputs: int, data: Any) -> list[Any]:
    """The model inputs held by one element: ``x``, ``(x, y)``, ``[x]``, ..."""
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
    raise ValueError(
        f"Expected each element of `representative_data` to be a batch x, (x, y) or "
        f"[x], with x one array per model input ({num_inputs} input(s)). Received: "
        f"an element of type {type(element).__name__} from a {type(data).__name__}."
    )


def _check_batch(arrays: list[Any], shapes: list[tuple]) -> list[np.ndarray]:
    checked = []
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        array = np.asarray(array, dtype=np.float32)
        fits = array.ndim == len(shape) + 1 and all(
            d is None or d == a for d, a in zip(shape, array.shape[1:])
        )
        if not fits:
            hint = (
                "add the batch axis, e.g. `x[None]`, or batch the dataset"
                if array.ndim == len(shape)
                else "resize or reshape the samples to the model's input shape"
            )
            raise ValueError(
                f"Expected batches of shape (batch, {', '.join(map(str, shape))}) for "
                f"model input {i}. Received: an array of shape {array.shape}. "
                f"Fix: {hint}."
            )
        checked.append(array)
    return checked
