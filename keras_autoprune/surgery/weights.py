"""Reading and writing a layer's weights by variable path, never by position."""

from __future__ import annotations

import numpy as np

from keras_autoprune.errors import SurgeryError


def relative_path(variable, layer) -> str:
    """Path of ``variable`` below ``layer`` (``"kernel"``, ``"sub/bias"``)."""
    parts = variable.path.split("/")
    if layer.name in parts:
        start = len(parts) - 1 - parts[::-1].index(layer.name)
        return "/".join(parts[start + 1 :])
    return parts[-1]


def layer_weights(layer) -> dict[str, np.ndarray]:
    """``{relative path: value}`` of every variable of ``layer``."""
    return {relative_path(v, layer): np.asarray(v.numpy()) for v in layer.weights}


def assign_weights(layer, values: dict[str, np.ndarray]) -> None:
    """Assigns ``values`` (by relative path) to the variables of ``layer``."""
    for variable in layer.weights:
        name = relative_path(variable, layer)
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
