"""Reading and writing a layer's weights by variable path, never by position.

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
    """Assigns ``values`` (by relative path) to the variables of ``layer``."""
    for name, variable in zip(weight_keys(layer), layer.weights):
        if name not in values:
            raise SurgeryError(
                f"Layer '{layer.name}' has a variable '{name}' that surgery did not provide "
                f"(provided: {sorted(values)}). This is a bug in its handler."
            )
        value = values[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise SurgeryError(
                f"Layer '{layer.name}', variable '{name}': surgery produced shape {value.shape}, "
                f"the rebuilt layer expects {tuple(variable.shape)}. This is a bug in its handler."
            )
        variable.assign(value.astype(variable.dtype))
