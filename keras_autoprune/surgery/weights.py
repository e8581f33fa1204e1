"""Reading and writing a layer's weights by variable path (by position only as a checked fallback).

Keys are paths relative to the layer (``"kernel"``, ``"sub/bias"``). Variables
created without an explicit name get globally unique-ified names
(``variable_36``); their key drops the numeric suffix and, when several share
a stem, numbers them in creation order (``variable``, ``variable#1``), so a
clone of the layer maps onto the original.
"""

from __future__ import annotations

import re

import numpy as np

from keras_autoprune.errors import SurgeryError


def relative_path(variable, layer) -> str:
    """Path of ``variable`` below ``layer`` (``"kernel"``, ``"sub/bias"``)."""
    parts = variable.path.split("/")
    if layer.name in parts:
        start = len(parts) - 1 - parts[::-1].index(layer.name)
        return "/".join(parts[start + 1 :])
    return parts[-1]


_SUFFIX = re.compile(r"_\d+$")


def weight_keys(layer) -> list[str]:
    """Stable key of each of ``layer.weights`` (see the module docstring)."""
    keys, seen = [], {}
    for variable in layer.weights:
        path = relative_path(variable, layer)
        head, _, last = path.rpartition("/")
        stem = (head + "/" if head else "") + (_SUFFIX.sub("", last) if last.startswith("variable") else last)
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        keys.append(stem if count == 0 else f"{stem}#{count}")
    return keys


def layer_weights(layer) -> dict[str, np.ndarray]:
    """``{key: value}`` of every variable of ``layer``."""
    return {key: np.asarray(v.numpy()) for key, v in zip(weight_keys(layer), layer.weights)}


def assign_weights(layer, values: dict[str, np.ndarray]) -> None:
    """Assigns ``values`` to the variables of ``layer``, by key, else by position.

    Keys are matched first (`weight_keys`). When they do not match (a
    layer rebuilt from its config whose unnamed sublayers got new automatic
    names: ``conv2d_7/kernel`` for ``conv2d_1/kernel``), the values are
    assigned by position, in the order of ``values`` (the source layer's
    variable order), provided the counts are equal and every shape matches.

    Raises:
        SurgeryError: neither matching works (names the variable, the keys
            and the shapes).
    """
    keys = weight_keys(layer)
    if all(key in values for key in keys):
        pairs = [(key, variable, values[key]) for key, variable in zip(keys, layer.weights)]
    else:
        pairs = _by_position(layer, keys, values)
    for key, variable, value in pairs:
        if tuple(value.shape) != tuple(variable.shape):
            raise SurgeryError(
                f"Layer '{layer.name}', variable '{key}': surgery produced shape {value.shape}, "
                f"the rebuilt layer expects {tuple(variable.shape)}. With `kap.replace_layers`, check the "
                "replacement's weights against its layers' shapes; otherwise this is a bug in the layer's handler."
            )
        variable.assign(value.astype(variable.dtype))
    finalize = getattr(layer, "finalize_state", None)
    if callable(finalize):  # e.g. an adapted Normalization computes its mean and variance from the variables
        finalize()


def _by_position(layer, keys: list[str], values: dict[str, np.ndarray]) -> list:
    expected = [tuple(v.shape) for v in layer.weights]
    received = [tuple(np.shape(v)) for v in values.values()]
    if expected != received:
        missing = next(key for key in keys if key not in values)
        raise SurgeryError(
            f"Layer '{layer.name}' has a variable '{missing}' that surgery did not provide, and the "
            f"values cannot be matched by position either. Expected: {list(zip(keys, expected))}. "
            f"Received: {list(zip(values, received))}. With `kap.replace_layers`, give each replacement layer "
            "its weights by these keys; otherwise this is a bug in the layer's handler."
        )
    return [(key, variable, value) for key, variable, value in zip(keys, layer.weights, values.values())]
