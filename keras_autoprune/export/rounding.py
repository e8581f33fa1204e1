"""How far a model's own float32 arithmetic is from exact: the yardstick for deep, rounding-sensitive models.

A float32 ``.tflite`` file is verified against the Keras model to a relative
error (1e-4 by default). Some models amplify rounding so much that Keras' own
float32 result is further than that from the exact one: a deep residual
network on random weights (ResNet152: Keras float32 is 8.2e-4 from float64,
the file 9.2e-4, the two 1.4e-3 apart). Comparing the two float32 results then
measures the model's sensitivity, not the conversion.

`rounding_check` settles it with a float64 copy of the model
(`float64_copy`: the same configuration with every float32 dtype made
float64, the weights cast), on the same samples, ``y64`` its outputs:

- ``keras_error = max |y_keras - y64| / max |y64|`` (Keras float32's own error);
- ``file_error = max |y_file - y64| / max |y64|``.

The file passes when ``file_error <= max(tolerance, FACTOR * keras_error)``:
no further from exact arithmetic than a small multiple of Keras' own float32
rounding, whatever the two float32 results' distance to each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

FACTOR = 4.0
"""How many times Keras float32's own error (against float64) the file may be from float64.

Two float32 evaluations that sum in different orders (oneDNN or Eigen in
Keras, XNNPACK in LiteRT) have rounding errors of the same order but not of
the same size: measured 1.1x (ResNet152 above) and 2.1x (two nearly equal
Dense layers subtracted, ``tests/test_export.py``). 4x accepts that spread
and still rejects a file an order of magnitude worse than Keras' rounding."""


@dataclasses.dataclass(frozen=True)
class RoundingCheck:
    """Errors against the float64 copy (see the module docstring)."""

    keras_error: float
    file_error: float

    def passes(self, tolerance: float) -> bool:
        return self.file_error <= max(tolerance, FACTOR * self.keras_error)

    def describe(self) -> str:
        return (f"against a float64 copy of the model, Keras float32 is {self.keras_error:.3g} (relative) from exact "
                f"and the file {self.file_error:.3g}")


def float64_copy(model: keras.Model) -> keras.Model | None:
    """``model`` rebuilt from its configuration in float64, weights cast; None when that cannot be done.

    Only plain float32 models qualify: a mixed-precision policy, a
    configuration that does not round-trip, or weights that do not fit give
    None (no yardstick; the caller keeps its verdict).
    """
    if any(layer.dtype_policy.name != "float32" for layer in model.layers if hasattr(layer, "dtype_policy")):
        return None
    try:
        copy = model.__class__.from_config(_float64_config(model.get_config()))
        copy.set_weights([np.asarray(w, np.float64) if np.issubdtype(np.asarray(w).dtype, np.floating) else w
                          for w in model.get_weights()])
    except Exception:  # noqa: BLE001 - any failure means no float64 yardstick
        return None
    if any(getattr(layer, "compute_dtype", "float64") not in ("float64", None) for layer in copy.layers
           if not isinstance(layer, keras.layers.InputLayer)):
        return None
    return copy


def _float64_config(config: Any) -> Any:
    """The configuration with every float32 dtype (a name or a ``DTypePolicy``) made float64."""
    if isinstance(config, list):
        return [_float64_config(item) for item in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        if key == "dtype" and value == "float32":
            out[key] = "float64"
        elif key == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy" \
                and value.get("config", {}).get("name") == "float32":
            out[key] = {**value, "config": {**value["config"], "name": "float64"}}
        else:
            out[key] = _float64_config(value)
    return out


def rounding_check(model: keras.Model, inputs: Sequence[np.ndarray], expected: Sequence[np.ndarray],
                   received: Sequence[np.ndarray]) -> RoundingCheck | None:
    """Keras' and the file's errors against ``model``'s float64 copy on ``inputs``; None without a copy.

    Args:
        model: the float32 Keras model.
        inputs: the verification samples, one array per input.
        expected: Keras' float32 outputs on them; received: the file's.
    """
    from keras_autoprune.export.verify import keras_outputs

    copy = float64_copy(model)
    if copy is None:
        return None
    exact = keras_outputs(copy, [np.asarray(x, np.float64) if np.issubdtype(x.dtype, np.floating) else x for x in inputs])
    peak = max(float(np.max(np.abs(e))) for e in exact)

    def error(outputs: Sequence[np.ndarray]) -> float:
        return max(float(np.max(np.abs(np.asarray(o, np.float64) - e))) for o, e in zip(outputs, exact)) / max(peak, 1e-300)

    return RoundingCheck(keras_error=error(expected), file_error=error(received))
