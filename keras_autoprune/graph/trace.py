"""Seeing through custom layers: a custom layer's ``call`` traced into a functional sub-model.

A custom layer (a `keras.layers.Layer` subclass defined outside Keras,
without a registered handler) whose ``call`` is built from Keras sublayers
and `keras.ops` is *traced*, the way Torch-Pruning traces modules: its
``call`` runs once on symbolic `keras.Input` tensors, so that every sublayer
call and every `keras.ops` call is recorded as a node, and
``keras.Model(inputs, outputs, name=layer.name)`` is the functional
sub-model that computes the same thing with **the same sublayer objects**
(no weight is copied; the traced model is a view of the layer).

`DependencyGraph` then walks the traced model like a nested model (its
layers are named ``custom_layer/sublayer``) and the surgery puts a pruned
clone of it where the custom layer was: the pruned model is made of standard
layers and `keras.ops` nodes, saves to ``.keras`` and loads with
``keras.saving.load_model`` in safe mode without ``custom_objects``.

A trace is accepted only if the traced model reproduces the layer on a
random batch (relative error <= 1e-4) in inference mode, and in training
mode too when the layer holds no random-seed state (Dropout, noise): the
variables a training-mode call updates (BatchNormalization moving
statistics) are restored afterwards. ``training`` is passed as ``None`` when
``call`` accepts it, so sublayers read the training flag of the model that
runs them; Python control flow on ``training`` therefore follows the
inference branch, and the training-mode check rejects a layer whose
training branch differs.

What is not traced (the layer then blocks the channels that cross it, with
a warning naming it and the reason): built-in Keras layers; layers that own
variables themselves (``self.add_weight``, a seed generator) rather than
through sublayers; a ``call`` that raises on symbolic tensors (TensorFlow
ops such as ``tf.py_function``, Python control flow on tensor values);
operations that capture a variable or a backend tensor as a constant; and a
trace whose outputs differ from the layer's.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import keras
import numpy as np

from keras_autoprune.graph.handlers import get_handler

#: layer -> {input signature: (traced model or None, reason)}.
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_TOLERANCE = 1e-4


def see_through(operation: Any, node: Any) -> tuple[keras.Model | None, str | None]:
    """The traced model to walk in place of ``operation``'s call ``node``, if it is seen through.

    A layer is seen through when it has no registered handler, is not a
    built-in Keras layer and `trace_layer` accepts its trace. The graph, the
    accounting and the surgery all decide with this function.

    Returns:
        ``(model, None)``, ``(None, reason)`` for a custom layer that could
        not be traced, or ``(None, None)`` for a layer not meant to be traced.
    """
    if isinstance(operation, keras.Model) or not isinstance(operation, keras.layers.Layer):
        return None, None
    module = type(operation).__module__ or ""
    if module == "keras" or module.startswith("keras.") or get_handler(operation) is not None:
        return None, None
    return trace_layer(operation, node)


def trace_layer(layer: keras.layers.Layer, node: Any) -> tuple[keras.Model | None, str | None]:
    """Traces one call of ``layer`` (its functional ``node``) into a sub-model.

    Args:
        layer: a custom layer (see `see_through`).
        node: the functional-graph node of the call; its tensor arguments
            become the sub-model's inputs, in ``node.arguments.keras_tensors``
            order, and its other arguments are passed as they are.

    Returns:
        ``(model, None)``: a verified functional model named ``layer.name``
        whose layers are ``layer``'s sublayers; or ``(None, reason)``.
        Results are cached per layer and input signature.
    """
    tensors = list(node.arguments.keras_tensors)
    signature = tuple((tuple(t.shape), str(t.dtype)) for t in tensors)
    cache = _CACHE.setdefault(layer, {})
    if signature not in cache:
        try:
            cache[signature] = _trace(layer, node, tensors)
        except Exception as error:  # noqa: BLE001 - any failure: the layer stays opaque
            cache[signature] = (None, f"tracing its call failed ({type(error).__name__}: {error})")
    return cache[signature]


def traced_model(layer: Any) -> keras.Model | None:
    """The traced model of ``layer`` already accepted by `trace_layer`, if any."""
    for model, _ in _CACHE.get(layer, {}).values() if _accepts_weakref(layer) else ():
        if model is not None:
            return model
    return None


def _accepts_weakref(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _trace(layer, node, tensors) -> tuple[keras.Model | None, str | None]:
    own = _own_variables(layer)
    if own:
        return None, f"it holds variables of its own ({', '.join(own[:3])}), not through sublayers"
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=f"{layer.name}_input_{i}") for i, t in enumerate(tensors)]
    args, kwargs = node.arguments.fill_in({id(t): i for t, i in zip(tensors, inputs)})
    if _accepts_training(layer):
        kwargs = {**kwargs, "training": None}
    outputs = layer.call(*args, **kwargs)
    flat = keras.tree.flatten(outputs)
    if not flat or not all(isinstance(t, keras.KerasTensor) for t in flat):
        return None, "its call does not return symbolic tensors"
    model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=layer.name)
    captured = _captured_constants(model)
    if captured:
        return None, f"operation '{captured}' captures a variable or tensor as a constant"
    error = _mismatch(layer, model, tensors, node)
    if error:
        return None, error
    return model, None


def _own_variables(layer) -> list[str]:
    below = {id(v) for sub in layer._flatten_layers(include_self=False, recursive=True) for v in sub.variables}
    return [v.path for v in layer.variables if id(v) not in below]


def _accepts_training(layer) -> bool:
    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


def _captured_constants(model) -> str | None:
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            values = keras.tree.flatten((node.arguments.args, node.arguments.kwargs))
            for value in values:
                if isinstance(value, keras.KerasTensor):
                    continue
                if isinstance(value, keras.Variable) or keras.ops.is_tensor(value):
                    return node.operation.name
    return None


def _mismatch(layer, model, tensors, node) -> str | None:
    """Compares the layer and its trace on a random batch; returns why they differ, or None."""
    rng = np.random.default_rng(0)
    values = [_sample(t, rng) for t in tensors]
    args, kwargs = node.arguments.fill_in({id(t): v for t, v in zip(tensors, values)})
    modes = [False]
    if not any("seed_generator" in v.path for v in layer.variables):
        modes.append(True)
    for training in modes:
        saved = [np.array(v.numpy()) for v in layer.variables]
        try:
            expected = layer(*args, **{**kwargs, "training": training})
            received = model(values if len(values) > 1 else values[0], training=training)
        finally:
            for variable, value in zip(layer.variables, saved):
                variable.assign(value)
        expected, received = keras.tree.flatten(expected), keras.tree.flatten(received)
        if len(expected) != len(received):
            return f"its trace returns {len(received)} tensors instead of {len(expected)}"
        for e, r in zip(expected, received):
            e, r = np.asarray(e, np.float64), np.asarray(r, np.float64)
            if e.shape != r.shape:
                return f"its trace returns shape {r.shape} instead of {e.shape}"
            scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-6)
            if e.size and float(np.max(np.abs(e - r))) / scale > _TOLERANCE:
                mode = "training" if training else "inference"
                return f"its trace does not reproduce its outputs in {mode} mode (Python control flow?)"
    return None


def _sample(tensor, rng) -> np.ndarray:
    shape = tuple(2 if i == 0 and d is None else (8 if d is None else int(d)) for i, d in enumerate(tensor.shape))
    dtype = np.dtype(keras.backend.standardize_dtype(tensor.dtype))
    if np.issubdtype(dtype, np.integer) or dtype == bool:
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.normal(0.0, 1.0, shape).astype(dtype)
