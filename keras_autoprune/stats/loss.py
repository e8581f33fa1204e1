"""The likelihood behind a classification loss, as Fisher statistics need it.

The Fisher information is defined by the model's predictive distribution
``p(y|x)``; the loss only tells how to read the model output: class
probabilities over the last axis (categorical / sparse categorical
cross-entropy) or one Bernoulli probability (binary cross-entropy with a
single output unit), as logits or as probabilities (``from_logits``).

Log-probabilities are computed as stably as the graph allows: from logits
(``log_softmax`` / ``log_sigmoid``) when ``from_logits=True`` *or* when the
output is produced by a softmax/sigmoid whose input is visible in the graph
(a Dense/Conv ``activation="softmax"``, an ``Activation`` or ``Softmax``
layer); otherwise from probabilities as Keras does (``p / Σp``, clipped to
``[ε, 1-ε]``, ``ε = keras.config.epsilon()``). A binary output is handled as
two classes ``[1-p, p]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

SUPPORTED_LOSSES = (
    "SparseCategoricalCrossentropy, CategoricalCrossentropy (objects, keras.losses functions or the strings "
    "'sparse_categorical_crossentropy' / 'categorical_crossentropy'), and BinaryCrossentropy "
    "('binary_crossentropy') for a model with one output unit"
)

_KINDS = {
    "sparse_categorical_crossentropy": "categorical",
    "categorical_crossentropy": "categorical",
    "binary_crossentropy": "binary",
}


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """How to read a classifier's output as ``log p(y|x)``.

    Attributes:
        kind: ``"categorical"`` (softmax over the last axis) or ``"binary"``
            (one sigmoid unit, read as two classes ``[1-p, p]``).
        from_logits: whether the output holds logits.
        source: the loss it was derived from (for messages).
    """

    kind: str
    from_logits: bool
    source: str

    def num_classes(self, output_width: int) -> int:
        return 2 if self.kind == "binary" else output_width

    def check_output(self, model: keras.Model) -> int:
        """Checks the model has one ``(batch, K)`` output; returns the classes."""
        outputs = model.outputs
        if len(outputs) != 1 or len(outputs[0].shape) != 2 or outputs[0].shape[-1] is None:
            shapes = [tuple(o.shape) for o in outputs]
            raise ValueError(
                "Expected a classifier with one output of shape (batch, classes). "
                f"Received: model '{model.name}' with output shapes {shapes}. "
                "Fix: pass a single-output classification model (multi-output and dense-prediction "
                "models are not supported for Fisher statistics)."
            )
        width = int(outputs[0].shape[-1])
        if self.kind == "binary" and width != 1:
            raise ValueError(
                f"Expected one output unit with binary cross-entropy. Received: {width} units with {self.source}. "
                "Fix: use a softmax over the classes with (sparse) categorical cross-entropy."
            )
        if self.kind == "categorical" and width < 2:
            raise ValueError(
                f"Expected at least 2 classes with {self.source}. Received: output width {width}. "
                "Fix: use binary cross-entropy for a single output unit."
            )
        return self.num_classes(width)

    def log_probabilities(self, outputs: tf.Tensor, logits: tuple[str, tf.Tensor] | None) -> tf.Tensor:
        """``log p(·|x)`` as ``(batch, classes)`` in float32 (float64 for float64 models).

        Args:
            outputs: the model output.
            logits: ``(activation, its input)`` when the output comes from a
                softmax/sigmoid visible in the graph, else None.
        """
        dtype = tf.float64 if outputs.dtype == tf.float64 else tf.float32
        expected = "softmax" if self.kind == "categorical" else "sigmoid"
        if self.from_logits:
            z = tf.cast(outputs, dtype)
        elif logits is not None and logits[0] == expected:
            z = tf.cast(logits[1], dtype)
        else:
            z = None
        eps = keras.config.epsilon()
        if self.kind == "categorical":
            if z is not None:
                return tf.nn.log_softmax(z, axis=-1)
            p = tf.cast(outputs, dtype)
            p = p / tf.reduce_sum(p, axis=-1, keepdims=True)
            return tf.math.log(tf.clip_by_value(p, eps, 1.0 - eps))
        if z is not None:
            return tf.concat([tf.math.log_sigmoid(-z), tf.math.log_sigmoid(z)], axis=-1)
        p = tf.clip_by_value(tf.cast(outputs, dtype), eps, 1.0 - eps)
        return tf.concat([tf.math.log(1.0 - p), tf.math.log(p)], axis=-1)

    def targets(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        """Host-side labels as a ``(batch, classes)`` target distribution.

        Labels are read by shape, whichever cross-entropy was compiled:
        ``(B,)`` or ``(B, 1)`` integer classes (binary: values in [0, 1]),
        or ``(B, K)`` one-hot / soft labels (rows summing to 1).

        Raises:
            ValueError: labels of another shape or out of range.
        """
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if self.kind == "binary":
            if y.ndim != 1 or not np.all((y >= 0) & (y <= 1)):
                raise ValueError(
                    "Expected binary labels of shape (batch,) or (batch, 1) with values in [0, 1]. "
                    f"Received: labels of shape {y.shape}, range [{_range(y)}]."
                )
            y = y.astype(np.float64)
            return np.stack([1.0 - y, y], axis=1)
        if y.ndim == 1:
            if not (np.all(np.round(y) == y) and np.all((y >= 0) & (y < num_classes))):
                raise ValueError(
                    f"Expected integer class labels in [0, {num_classes}). "
                    f"Received: labels of shape {y.shape}, range [{_range(y)}]. "
                    "Fix: pass class indices, or one-hot labels of shape (batch, classes)."
                )
            return np.eye(num_classes)[y.astype(np.int64)]
        if y.ndim == 2 and y.shape[1] == num_classes:
            y = y.astype(np.float64)
            if np.any(y < 0) or np.any(np.abs(y.sum(axis=1) - 1.0) > 1e-3):
                raise ValueError(
                    "Expected one-hot (or soft) labels: non-negative rows that sum to 1. "
                    f"Received: labels of shape {y.shape} with row sums in "
                    f"[{y.sum(axis=1).min():.4g}, {y.sum(axis=1).max():.4g}]."
                )
            return y
        raise ValueError(
            f"Expected labels of shape (batch,), (batch, 1) or (batch, {num_classes}). "
            f"Received: labels of shape {y.shape}."
        )


def sample_targets(log_probs: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:
    """One-hot labels sampled from ``p = exp(log_probs)`` by inverse CDF.

    Example ``b`` gets class ``#{j : c_j ≤ u_b · c_{K-1}}`` (clipped to
    ``K-1``), ``c = cumsum(p)``: a draw from ``p`` for ``u_b ~ U[0, 1)``.
    """
    p = tf.stop_gradient(tf.exp(log_probs))
    c = tf.cumsum(p, axis=-1)
    u = tf.cast(uniforms, c.dtype)[:, None] * c[:, -1:]
    classes = tf.reduce_sum(tf.cast(c <= u, tf.int32), axis=-1)
    classes = tf.minimum(classes, tf.shape(p)[-1] - 1)
    return tf.one_hot(classes, tf.shape(p)[-1], dtype=log_probs.dtype)


def resolve_likelihood(model: keras.Model, loss: Any = None) -> Likelihood:
    """The `Likelihood` of ``loss``, or of ``model.loss`` when it is None.

    Raises:
        ValueError: no loss, or a loss that is not a supported cross-entropy.
    """
    given = loss if loss is not None else getattr(model, "loss", None)
    if given is None:
        raise ValueError(
            "Expected a classification loss to define p(y|x): compile the model, or pass `loss=`. "
            f"Received: loss=None and model '{model.name}' is not compiled with a loss. "
            f"Supported: {SUPPORTED_LOSSES}."
        )
    if isinstance(given, (list, tuple)) and len(given) == 1:
        given = given[0]
    if isinstance(given, dict) and len(given) == 1:
        given = next(iter(given.values()))
    resolved = given
    if isinstance(given, str):
        try:
            resolved = keras.losses.get(given)
        except ValueError:
            resolved = None
    name, from_logits = _describe(resolved)
    if name not in _KINDS:
        raise ValueError(
            f"Expected a classification loss. Received: loss={given!r}. Supported: {SUPPORTED_LOSSES}. "
            "Regression losses do not define a distribution to sample for the Fisher."
        )
    return Likelihood(kind=_KINDS[name], from_logits=bool(from_logits), source=f"loss={given!r}")


def _describe(loss) -> tuple[str | None, bool]:
    if isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)
        kwargs = getattr(loss, "_fn_kwargs", {}) or {}
        return getattr(fn, "__name__", None), kwargs.get("from_logits", getattr(loss, "from_logits", False))
    if callable(loss):
        return getattr(loss, "__name__", None), False
    return None, False


def _range(y: np.ndarray) -> str:
    if y.size == 0 or not np.issubdtype(y.dtype, np.number):
        return "-"
    return f"{y.min():.4g}, {y.max():.4g}"
