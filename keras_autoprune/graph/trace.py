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

Outputs and intermediate values need not all be tensors: only the tensor
leaves of what ``call`` returns are traced. Its other leaves (``None``,
Python numbers, tensors that do not depend on the inputs, such as an
``ops.empty`` placeholder) are constants of the trace, put back in place
wherever the traced model stands for the layer (`expand_outputs`); channels
reading them are blocked. A custom sublayer whose own symbolic call fails
(Keras records no call returning ``None``, as in ``return x, None``) is
traced first, the same way, and called as its traced model: a nested
functional model named after it, walked and pruned like any nested model.

A reshape target built from ``ops.shape`` of a symbolic tensor is completed
so that it runs (`keras_autoprune.graph.reshape_targets`).

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
import re
import weakref
from typing import Any

import keras
import numpy as np

from keras_autoprune.graph.handlers import get_handler
from keras_autoprune.graph.reshape_targets import complete_reshape_targets

#: layer -> {input signature: (traced model or None, reason)}.
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
#: traced model -> (the layer's output structure, {flat position: constant leaf}).
_LEAVES: "weakref.WeakKeyDictionary[Any, tuple[Any, dict[int, Any]]]" = weakref.WeakKeyDictionary()
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
    if not _traceable(operation):
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
    return _trace_cached(layer, node.arguments)


def _trace_cached(layer, arguments) -> tuple[keras.Model | None, str | None]:
    tensors = list(arguments.keras_tensors)
    signature = (tuple((tuple(t.shape), str(t.dtype)) for t in tensors), _static_arguments(arguments))
    cache = _CACHE.setdefault(layer, {})
    if signature not in cache:
        try:
            cache[signature] = _trace(layer, arguments, tensors)
        except Exception as error:  # noqa: BLE001 - any failure: the layer stays opaque
            cache[signature] = (None, f"tracing its call failed ({type(error).__name__}: {error})")
    return cache[signature]


def _static_arguments(arguments) -> str:
    """The call's non-tensor arguments (flags such as ``return_attention_scores``), as a cache key."""
    leaves = keras.tree.flatten((arguments.args, arguments.kwargs))
    return repr([None if isinstance(v, keras.KerasTensor) else v for v in leaves])


def expand_outputs(model: keras.Model, values: list, constant=None) -> list:
    """A traced layer's flat outputs: ``values`` with the layer's constant leaves put back.

    Args:
        model: a traced model (`trace_layer`).
        values: one value per output of ``model``, in order.
        constant: ``constant(position, leaf)`` gives what stands for a
            constant leaf; by default the leaf itself.

    Returns:
        One value per leaf of what the layer returns (per output of its
        functional node), in ``keras.tree.flatten`` order; ``values`` itself
        when every leaf is a tensor.
    """
    constants = _LEAVES.get(model, (None, {}))[1] if _accepts_weakref(model) else {}
    if not constants:
        return list(values)
    rest = iter(values)
    count = len(constants) + len(values)
    if constant is None:
        return [constants[i] if i in constants else next(rest) for i in range(count)]
    return [constant(i, constants[i]) if i in constants else next(rest) for i in range(count)]


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


def _trace(layer, arguments, tensors) -> tuple[keras.Model | None, str | None]:
    own = _own_variables(layer)
    if own:
        return None, f"it holds variables of its own ({', '.join(own[:3])}), not through sublayers"
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=f"{layer.name}_input_{i}") for i, t in enumerate(tensors)]
    args, kwargs = arguments.fill_in({id(t): i for t, i in zip(tensors, inputs)})
    if _accepts_training(layer):
        kwargs = {**kwargs, "training": None}
    with _CustomSublayersTraced(layer):
        outputs = layer.call(*args, **kwargs)
    flat = keras.tree.flatten(outputs)
    symbolic = [t for t in flat if isinstance(t, keras.KerasTensor)]
    if not symbolic:
        return None, "its call does not return symbolic tensors"
    if any(isinstance(t, keras.Variable) for t in flat):
        return None, "its call returns a variable"
    constants = {i: t for i, t in enumerate(flat) if not isinstance(t, keras.KerasTensor)}
    structure = keras.tree.pack_sequence_as(outputs, [0] * len(flat))
    if constants:  # only the tensor leaves are traced
        outputs = symbolic[0] if len(symbolic) == 1 else symbolic
    model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name=layer.name)
    model = complete_reshape_targets(model)
    _name_operations(model)
    _LEAVES[model] = (structure, constants)
    captured = _captured_constants(model)
    if captured:
        return None, f"operation '{captured}' captures a variable or tensor as a constant"
    error = _mismatch(layer, model, tensors, arguments)
    if error:
        return None, error
    return model, None


def _name_operations(model: keras.Model) -> None:
    """Names the trace's `keras.ops` nodes by class and order (``reshape``, ``reshape_1``, ...).

    Keras names an operation from a process-wide counter, so two traces of
    the same layer (the layer and its copy in a rebuilt model) would name
    their nodes differently, and qualified names (``custom/reshape_13``)
    would not match between a model and its pruned or factorised version.
    """
    taken = {op.name for op in model.operations if isinstance(op, keras.layers.Layer)}
    counts: dict[str, int] = {}
    for op in model.operations:
        if isinstance(op, keras.layers.Layer):
            continue
        base = re.sub(r"(?<!^)(?=[A-Z])", "_", type(op).__name__).lower()
        while True:
            index = counts.get(base, 0)
            counts[base] = index + 1
            name = base if index == 0 else f"{base}_{index}"
            if name not in taken:
                break
        taken.add(name)
        op.name = name


def _call_traced(model: keras.Model, tensors: list):
    """``model`` called on a traced layer's tensor arguments: the layer's output structure."""
    outputs = keras.tree.flatten(model(tensors[0] if len(tensors) == 1 else tensors))
    structure, _ = _LEAVES[model]
    return keras.tree.pack_sequence_as(structure, expand_outputs(model, outputs))


class _CustomSublayersTraced:
    """While a layer's call is traced, a direct custom sublayer whose symbolic call fails is traced itself.

    Keras records a sublayer call only if it returns tensors; a sublayer
    returning ``(x, None)`` raises. Such a sublayer (one `see_through`
    would trace) is then traced on the same arguments and its traced model
    called instead, and the call returns the sublayer's output structure
    (constant leaves included). Its class's ``__call__`` is wrapped for the
    duration of the trace only, and only symbolic calls of these sublayers
    are affected.
    """

    def __init__(self, layer):
        self.layers = {
            id(sub): sub for sub in layer._flatten_layers(include_self=False, recursive=False)
            if _traceable(sub)
        }
        self.saved: list[tuple[type, Any]] = []

    def __enter__(self):
        for cls in {type(sub) for sub in self.layers.values()}:
            self.saved.append((cls, cls.__dict__.get("__call__", _MISSING)))
            cls.__call__ = self._wrap(cls.__call__)
        return self

    def __exit__(self, *exc):
        for cls, original in reversed(self.saved):
            if original is _MISSING:
                del cls.__call__
            else:
                cls.__call__ = original
        return False

    def _wrap(self, call):
        layers = self.layers

        def __call__(sub, *args, **kwargs):
            if id(sub) not in layers or not any(
                isinstance(v, keras.KerasTensor) for v in keras.tree.flatten((args, kwargs))
            ):
                return call(sub, *args, **kwargs)
            try:
                return call(sub, *args, **kwargs)
            except Exception as error:  # noqa: BLE001 - traced instead, or the error stands
                from keras.src.ops.symbolic_arguments import SymbolicArguments

                arguments = SymbolicArguments(*args, **kwargs)
                model, reason = _trace_cached(sub, arguments)
                if model is None:
                    raise ValueError(f"sublayer '{sub.name}' could not be called ({error}) nor traced ({reason})") from error
                return _call_traced(model, list(arguments.keras_tensors))

        return __call__


_MISSING = object()


def _traceable(layer) -> bool:
    if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
        return False
    module = type(layer).__module__ or ""
    return not (module == "keras" or module.startswith("keras.") or get_handler(layer) is not None)


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


def _mismatch(layer, model, tensors, arguments) -> str | None:
    """Compares the layer and its trace on a random batch; returns why they differ, or None."""
    rng = np.random.default_rng(0)
    values = [_sample(t, rng) for t in tensors]
    args, kwargs = arguments.fill_in({id(t): v for t, v in zip(tensors, values)})
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
        expected, received = keras.tree.flatten(expected), expand_outputs(model, keras.tree.flatten(received))
        if len(expected) != len(received):
            return f"its trace returns {len(received)} values instead of {len(expected)}"
        for e, r in zip(expected, received):
            if e is None or r is None:
                if e is not r:
                    return "its trace returns None where the layer does not, or the reverse"
                continue
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
