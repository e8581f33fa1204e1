"""Shared helpers for the tests: weight randomisation, the exactness check, an interrupted `fit`."""

from __future__ import annotations

import keras
import numpy as np

import keras_autoprune as kap


def randomize(model, seed: int = 0, scale: float = 0.5, kernels: bool = True) -> None:
    """Gives every weight a random value (variances stay positive).

    Default initialisers leave biases, betas and moving means at zero, which
    would hide bias-handling mistakes; random values expose them. With
    ``kernels=False`` kernels keep their (fan-in scaled) initial values, so
    that signals survive deep stacks.
    """
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if "int" in str(variable.dtype) or "count" in variable.path:
            continue
        if not kernels and "kernel" in variable.path:
            continue
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            value = rng.uniform(0.5, 1.5, shape)
        elif variable.path.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, scale, shape)
        variable.assign(value.astype(variable.dtype))
    for layer in model._flatten_layers(include_self=False):
        # Keras calls this after loading weights: a Normalization layer caches its statistics from them.
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b| / max |b|`` (with a floor so an all-zero b is handled)."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def assert_contract(model, plan, graph=None, batch: int = 2, seed: int = 0, tolerance: float = 1e-5):
    """Checks ``apply_plan(m, p)(x) == mask_plan(m, p)(x)`` on random inputs.

    Returns:
        ``(slim, masked)`` models for further checks.
    """
    slim = kap.apply_plan(model, plan, graph)
    masked = kap.mask_plan(model, plan, graph)
    rng = np.random.default_rng(seed)
    inputs = [rng.normal(0, 1, (batch,) + tuple(t.shape[1:])).astype("float32") for t in model.inputs]
    inputs = inputs[0] if len(inputs) == 1 else inputs
    expected = _as_list(masked(inputs))
    received = _as_list(slim(inputs))
    for e, r in zip(expected, received):
        assert e.shape == r.shape, (e.shape, r.shape)
        error = relative_error(r, e)
        assert error <= tolerance, f"apply_plan and mask_plan differ: relative error {error:.3g}"
    return slim, masked


def _as_list(outputs):
    if isinstance(outputs, (list, tuple)):
        return [np.asarray(o) for o in outputs]
    return [np.asarray(outputs)]


def subclassed_model():
    """A built subclassed model (which the library must reject)."""
    import keras

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    return net


def _block_class():
    import keras

    class Block(keras.layers.Layer):
        """Conv + BN + relu with automatic (unstable) sublayer names: a traceable custom layer."""

        def __init__(self, filters, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(filters, 3, padding="same")
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return keras.ops.relu(self.bn(self.conv(x)))

    return Block


Block = _block_class()


class Interrupt(keras.callbacks.Callback):
    """Stops training as a crash or a preemption would, after the other callbacks finished epoch ``after`` (0-based)."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after:
            raise KeyboardInterrupt(f"interrupted after epoch {epoch}")
