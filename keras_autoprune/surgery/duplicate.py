"""`duplicate_layer`: an independent copy of a built layer, without its config.

Surgery leaves most layers of a model unchanged. Rebuilding those from
``get_config()`` is fragile: sublayers created without names get new
automatic names (so their variables cannot be matched), a `Lambda` cannot be
deserialised in safe mode, and a custom ``get_config`` that forgets an
argument fails deep inside Keras. A copy needs none of that:

- every sublayer and operation below the layer gets a new instance of its
  class (``cls.__new__``, so Keras's per-instance build wrappers are bound to
  the copy), whose ``__dict__`` is a deep copy of the original's;
- every variable (weights, seed-generator states, metric variables) is a new
  backend variable holding the original's value, with the same name, path,
  trainability, constraint and regularizer;
- modules and functions are shared, not copied;
- the top layer's graph connections (``_inbound_nodes``/``_outbound_nodes``)
  are left behind: the copy is called anew in the new model.

``copy.deepcopy(layer)`` cannot be used: Keras routes it through
``__reduce__``, i.e. a save/load round trip through the config.

The copy shares no variable with the original (checked), so training one
never changes the other.
"""

from __future__ import annotations

import copy
import sys
import types

import keras
import numpy as np

try:  # Keras's switch for attribute tracking (TrackedList.append etc.).
    from keras.src.utils.tracking import DotNotTrackScope as _no_tracking
except ImportError:  # pragma: no cover - other Keras layouts
    import contextlib

    _no_tracking = contextlib.nullcontext


def duplicate_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """Returns an independent copy of the built ``layer`` (same class, name, state, weights).

    Args:
        layer: any built Keras layer, custom and non-serialisable ones
            included (a `Lambda`, a layer whose ``get_config`` is incomplete).

    Returns:
        A layer that computes the same function with its own variables, not
        yet connected to any functional graph.

    Raises:
        Exception: whatever deep-copying the layer's attributes raised (the
            caller falls back to the config and reports both failures).
    """
    operations = _operations_below(layer)
    # Modules (e.g. a SeedGenerator's `backend`) are shared, not copied.
    memo: dict[int, object] = {id(m): m for m in list(sys.modules.values()) if m is not None}
    memo[id(layer._inbound_nodes)] = []
    memo[id(layer._outbound_nodes)] = []
    variables = _variables_below(operations)
    for variable in variables:
        memo[id(variable)] = _new_variable(variable)
    shells = []
    for operation in operations:
        shell = type(operation).__new__(type(operation))
        memo[id(operation)] = shell
        shells.append((operation, shell))
    with _no_tracking():
        for operation, shell in shells:
            _copy_state(operation, shell, memo)
        for variable in variables:
            new = memo[id(variable)]
            new._constraint = copy.deepcopy(variable._constraint, memo)
            new._regularizer = copy.deepcopy(variable._regularizer, memo)
    for _, shell in shells:
        _retrack(shell)
    new_layer = memo[id(layer)]
    shared = {id(v) for v in layer.variables} & {id(v) for v in new_layer.variables}
    if shared:
        raise RuntimeError(f"the copy of layer '{layer.name}' still shares {len(shared)} variable(s) with it")
    return new_layer


def _operations_below(layer) -> list:
    """The layer, its sublayers (recursively) and the operations of nested functional graphs."""
    found, seen = [], set()
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        for operation in [sub] + list(getattr(sub, "_operations", None) or []):
            if id(operation) not in seen:
                seen.add(id(operation))
                found.append(operation)
    return found


def _variables_below(operations) -> list:
    variables, seen = [], set()
    for operation in operations:
        if not isinstance(operation, keras.layers.Layer):
            continue
        for variable in list(operation.variables) + list(operation.metrics_variables):
            if id(variable) not in seen:
                seen.add(id(variable))
                variables.append(variable)
    return variables


def _new_variable(variable):
    """A new backend variable with ``variable``'s value, name, path and flags."""
    if getattr(variable, "_value", True) is None:
        raise ValueError(f"variable '{variable.path}' is not initialised")
    new = keras.Variable(
        initializer=np.array(variable.numpy()),
        dtype=variable._dtype,
        trainable=variable.trainable,
        autocast=variable._autocast,
        aggregation=variable.aggregation,
        synchronization=variable.synchronization,
        name=variable.name,
    )
    new._path = variable.path
    new._overwrite_with_gradient = variable._overwrite_with_gradient
    return new


def _copy_state(operation, shell, memo) -> None:
    """Deep-copies ``operation.__dict__`` into ``shell``, keeping the shell's own build wrappers."""
    fresh = vars(shell)
    for key, value in vars(operation).items():
        if key in fresh and _closes_over(value, operation):
            continue  # e.g. Layer.__new__'s `build`/`quantize` wrappers, bound to the shell
        fresh[key] = copy.deepcopy(value, memo)


def _closes_over(value, owner) -> bool:
    if not isinstance(value, types.FunctionType) or not value.__closure__:
        return False
    for cell in value.__closure__:
        try:
            if cell.cell_contents is owner:
                return True
        except ValueError:  # empty cell
            continue
    return False


def _retrack(layer) -> None:
    """Points Keras's attribute tracker at the copied objects (its id sets held the originals')."""
    tracker = vars(layer).get("_tracker")
    if tracker is None or not hasattr(tracker, "stored_ids"):
        return
    tracker.stored_ids = {name: {id(value) for value in store} for name, (_, store) in tracker.config.items()}
