"""The likelihood ``p(y|x)`` one model output defines, as Fisher statistics need it.

One `OutputLikelihood` per output with a loss. Its ``kind`` says how the
output reads as a distribution over labels (independent per position):

- ``"categorical"``: a softmax over the last axis, one class per position
  (``(B, C)`` classifiers; ``(B, H, W, C)`` per-pixel segmentation);
  (sparse) categorical cross-entropy.
- ``"bernoulli"``: one independent sigmoid per element (binary, multi-label,
  per-pixel masks); binary cross-entropy.
- ``"gaussian"``: ``N(f(x), I)`` per element; mean squared error. The
  scale σ does not change which weights rank first: ``σ = 1`` is used.
- ``"laplace"``: ``Laplace(f(x), 1)`` per element; mean absolute error. Its
  Fisher is ``I`` per element like the Gaussian's (``∂|y-f|/∂f = ±1``), so
  the expectation is the same; only the sampling noise differs.
- ``None``: the loss defines no distribution to sample (Huber, log-cosh,
  focal losses, custom functions and `keras.losses.Loss` subclasses): only
  the empirical Fisher (gradients of the loss itself at the real labels).

Reading an output ``(B, *S)`` with ``P`` positions per example (``prod(S)``;
``prod(S[:-1])`` for categorical), its negative log-likelihood summed over
positions ``ℓ = −Σ_p log p(y_p|x)`` is scaled as Keras scales the loss
(the mean over positions, times the output's loss weight ``w``):
``c = w / P``. The calibration pass differentiates

    true Fisher:       Σ_outputs √c · ℓ(y ~ p(·|x))    (E[δδᵀ] = c · Fisher)
    empirical Fisher:  Σ_outputs  c · ℓ(y = labels)    (the loss's gradient)

per example: sampled labels are independent across positions and outputs, so
the cross terms of ``δδᵀ`` vanish in expectation and ``E[δδᵀ]`` is the
Gauss-Newton matrix of the weighted training loss (the Fisher of the
likelihood, weighted per output). A loss of kind None contributes
``w · loss(y, f)`` (its own per-example value, averaged over positions).

Log-probabilities are computed from logits when ``from_logits=True`` or when
the output comes from a softmax/sigmoid visible in the graph; otherwise from
probabilities as Keras does (clipped to ``[ε, 1-ε]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

#: What each kind samples, for messages and reports.
DISTRIBUTIONS = {
    "categorical": "a class per position from the softmax over the last axis",
    "bernoulli": "0/1 per element from its sigmoid",
    "gaussian": "y ~ N(f(x), I) per element",
    "laplace": "y ~ Laplace(f(x), 1) per element",
}
_TINY = 2.0**-53


@dataclasses.dataclass(frozen=True)
class OutputLikelihood:
    """How one model output reads as ``p(y|x)`` (see the module docstring).

    Attributes:
        index: the output's position in ``model.outputs``.
        name: the output's name (its key in ``loss`` / ``loss_weights``).
        kind: ``"categorical"``, ``"bernoulli"``, ``"gaussian"``,
            ``"laplace"``, or None (no distribution: empirical Fisher only).
        from_logits: whether the output holds logits (cross-entropies).
        weight: the output's loss weight.
        loss: the Keras loss (a `keras.losses.Loss`), used by kind None.
        source: the loss as given (for messages).
        ignore_class: label of positions the loss ignores (sparse
            categorical cross-entropy's ``ignore_class``), or None.
    """

    index: int
    name: str
    kind: str | None
    from_logits: bool = False
    weight: float = 1.0
    loss: Any = None
    source: str = ""
    ignore_class: int | None = None

    @property
    def samplable(self) -> bool:
        return self.kind is not None

    def describe(self) -> str:
        what = DISTRIBUTIONS.get(self.kind, "no distribution (empirical Fisher only)")
        weight = "" if self.weight == 1.0 else f", loss weight {self.weight:g}"
        return f"output '{self.name}': {self.kind or 'loss'}, {what} ({self.source}{weight})"

    # -- shapes ---------------------------------------------------------
    def check_output(self, shape: tuple, model_name: str) -> None:
        """Raises unless an output of ``shape`` (with batch) can be read as this kind."""
        if self.kind != "categorical":
            return
        width = shape[-1] if len(shape) >= 2 else None
        if width is None or width < 2:
            raise ValueError(
                f"Expected a class axis (last, at least 2 classes) on output '{self.name}' of model '{model_name}' "
                f"with {self.source}. Received: output shape {tuple(shape)}. Fix: use binary cross-entropy for a "
                "single sigmoid unit, or end the model with a Dense/Conv layer with one unit per class."
            )

    def noise_width(self, shape: tuple[int, ...]) -> int:
        """Uniform draws per example to sample a label for an output of ``shape`` (without batch)."""
        return int(np.prod(shape[:-1] if self.kind == "categorical" else shape, dtype=np.int64))

    def _positions(self, outputs: tf.Tensor, dtype) -> tf.Tensor:
        shape = outputs.shape[1:-1] if self.kind == "categorical" else outputs.shape[1:]
        if all(d is not None for d in shape):
            return tf.constant(float(np.prod(shape, dtype=np.int64)), dtype)
        dynamic = tf.shape(outputs)[1:-1] if self.kind == "categorical" else tf.shape(outputs)[1:]
        return tf.cast(tf.reduce_prod(dynamic), dtype)

    # -- the differentiated objective (traced) ----------------------------
    def contribution(self, outputs: tf.Tensor, logits: tuple | None, labels: tf.Tensor, fisher: str) -> tf.Tensor:
        """This output's term of the objective whose gradients give ``δ`` (module docstring)."""
        dtype = tf.float64 if outputs.dtype == tf.float64 else tf.float32
        weight = tf.constant(self.weight, dtype)
        if self.kind is None:
            return weight * self._loss_sum(outputs, labels, dtype)
        scale = weight / self._positions(outputs, dtype)
        if fisher == "true":
            targets = self.sample(outputs, logits, labels)
            return tf.sqrt(scale) * self.negative_log_likelihood(outputs, logits, targets)
        return scale * self.negative_log_likelihood(outputs, logits, tf.cast(labels, dtype))

    def _logits(self, outputs: tf.Tensor, logits: tuple | None, dtype) -> tf.Tensor | None:
        expected = "softmax" if self.kind == "categorical" else "sigmoid"
        if self.from_logits:
            return tf.cast(outputs, dtype)
        if logits is not None and logits[0] == expected:
            return tf.cast(logits[1], dtype)
        return None

    def log_probabilities(self, outputs: tf.Tensor, logits: tuple | None) -> tf.Tensor:
        """Categorical: ``log p(·|x)`` over the last axis. Bernoulli: ``[log(1-p), log p]`` on a new last axis."""
        dtype = tf.float64 if outputs.dtype == tf.float64 else tf.float32
        z = self._logits(outputs, logits, dtype)
        eps = keras.config.epsilon()
        if self.kind == "categorical":
            if z is not None:
                return tf.nn.log_softmax(z, axis=-1)
            p = tf.cast(outputs, dtype)
            p = p / tf.reduce_sum(p, axis=-1, keepdims=True)
            return tf.math.log(tf.clip_by_value(p, eps, 1.0 - eps))
        if z is not None:
            return tf.stack([tf.math.log_sigmoid(-z), tf.math.log_sigmoid(z)], axis=-1)
        p = tf.clip_by_value(tf.cast(outputs, dtype), eps, 1.0 - eps)
        return tf.stack([tf.math.log(1.0 - p), tf.math.log(p)], axis=-1)

    def sample(self, outputs: tf.Tensor, logits: tuple | None, uniforms: tf.Tensor) -> tf.Tensor:
        """Labels drawn from the model by inverse CDF of ``uniforms (B, noise_width)``; no gradient."""
        dtype = tf.float64 if outputs.dtype == tf.float64 else tf.float32
        u = tf.cast(uniforms, tf.float64)
        if self.kind in ("categorical", "bernoulli"):
            log_probs = self.log_probabilities(outputs, logits)
            u = tf.reshape(u, tf.shape(log_probs)[:-1])
            onehot = sample_targets(log_probs, u)
            return onehot if self.kind == "categorical" else onehot[..., 1]
        f = tf.stop_gradient(tf.cast(outputs, dtype))
        u = tf.reshape(tf.clip_by_value(u, _TINY, 1.0 - _TINY), tf.shape(f))
        if self.kind == "gaussian":
            noise = tf.math.ndtri(u)
        else:  # Laplace(0, 1) by inverse CDF
            centred = u - 0.5
            noise = -tf.sign(centred) * tf.math.log(tf.maximum(1.0 - 2.0 * tf.abs(centred), _TINY))
        return f + tf.cast(noise, dtype)

    def negative_log_likelihood(self, outputs: tf.Tensor, logits: tuple | None, targets: tf.Tensor) -> tf.Tensor:
        """``Σ_b Σ_positions −log p(y|x)`` (constants dropped), ``targets`` as `targets` returns them."""
        dtype = tf.float64 if outputs.dtype == tf.float64 else tf.float32
        targets = tf.cast(targets, dtype)
        if self.kind == "categorical":
            return -tf.reduce_sum(targets * self.log_probabilities(outputs, logits))
        if self.kind == "bernoulli":
            log_probs = self.log_probabilities(outputs, logits)
            return -tf.reduce_sum((1.0 - targets) * log_probs[..., 0] + targets * log_probs[..., 1])
        residual = targets - tf.cast(outputs, dtype)
        if self.kind == "gaussian":
            return 0.5 * tf.reduce_sum(tf.square(residual))
        return tf.reduce_sum(tf.abs(residual))

    def _loss_sum(self, outputs: tf.Tensor, labels: tf.Tensor, dtype) -> tf.Tensor:
        """``Σ_b loss_b``: the Keras loss unreduced, averaged over positions per example."""
        loss_dtype = dtype if dtype == tf.float64 else getattr(self.loss, "dtype", None) or "float32"
        values = self.loss.call(tf.cast(labels, loss_dtype), tf.cast(outputs, loss_dtype))
        values = tf.cast(values, dtype)
        if values.shape.rank == 0:  # already the batch mean
            return values * tf.cast(tf.shape(outputs)[0], dtype)
        per_example = tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)
        return tf.reduce_sum(per_example)

    # -- labels on the host (empirical Fisher) ------------------------------
    def targets(self, y: Any, shape: tuple, index: int) -> np.ndarray:
        """Real labels as the graph takes them, checked against an output of ``shape`` (with batch).

        Categorical: a ``(B, *S[:-1], C)`` distribution from class indices
        ``(B, *S[:-1])`` / ``(B, *S[:-1], 1)`` or one-hot (soft) rows;
        Bernoulli / Gaussian / Laplace: ``(B, *S)`` values (a trailing axis
        of 1 may be left out); kind None: ``y`` as given.

        Raises:
            ValueError: labels of another shape or out of range.
        """
        y = np.asarray(y)
        if self.kind is None:
            return y
        inner = tuple(shape[1:])
        if self.kind == "categorical":
            return self._categorical(y, inner, index)
        if y.ndim == len(inner) and inner and inner[-1] == 1:
            y = y[..., None]
        if y.ndim != len(inner) + 1 or not _fits(y.shape[1:], inner):
            raise ValueError(
                f"Expected labels of shape {_batch(inner)} for output '{self.name}' ({self.source}). "
                f"Received: labels of shape {y.shape} in batch {index}."
            )
        if not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
            raise ValueError(
                f"Expected numeric labels for output '{self.name}'. Received: dtype {y.dtype} in batch {index}."
            )
        y = y.astype(np.float64)
        if self.kind == "bernoulli" and not np.all((y >= 0) & (y <= 1)):
            raise ValueError(
                f"Expected binary labels with values in [0, 1] for output '{self.name}' ({self.source}). "
                f"Received: labels of shape {y.shape}, range [{_range(y)}] in batch {index}."
            )
        if not np.all(np.isfinite(y)):
            raise ValueError(f"Expected finite labels for output '{self.name}'. Received: NaN or Inf in batch {index}.")
        return y

    def _categorical(self, y: np.ndarray, inner: tuple, index: int) -> np.ndarray:
        classes, positions = inner[-1], inner[:-1]
        if y.ndim == len(inner) + 1 and y.shape[-1] == 1 and classes != 1:
            y = y[..., 0]
        if y.ndim == len(inner) and _fits(y.shape[1:], positions):
            ignored = np.zeros(y.shape, bool) if self.ignore_class is None else y == self.ignore_class
            valid = y[~ignored]
            if valid.size and not (np.all(np.round(valid) == valid) and np.all((valid >= 0) & (valid < classes))):
                raise ValueError(
                    f"Expected integer class labels in [0, {classes}) for output '{self.name}' and its {classes} "
                    f"classes. Received: labels of shape {y.shape} from {_range(valid)} in batch {index}. "
                    "Fix: map the labels to 0 .. classes-1 (e.g. with np.unique(y, return_inverse=True)), or "
                    "pass one-hot labels of shape (batch, ..., classes)."
                )
            onehot = np.eye(classes)[np.where(ignored, 0, y).astype(np.int64)]
            onehot[ignored] = 0.0  # ignored positions add nothing
            return onehot
        if y.ndim == len(inner) + 1 and _fits(y.shape[1:], inner):
            y = y.astype(np.float64)
            sums = y.sum(axis=-1)
            if np.any(y < 0) or np.any(np.abs(sums - 1.0) > 1e-3):
                raise ValueError(
                    f"Expected one-hot (or soft) labels for output '{self.name}': non-negative rows that sum to 1. "
                    f"Received: labels of shape {y.shape} with row sums in [{sums.min():.4g}, {sums.max():.4g}] "
                    f"in batch {index}."
                )
            return y
        forms = f"{_batch(positions)}, {_batch((*positions, 1))} or {_batch(inner)}"
        raise ValueError(
            f"Expected labels of shape {forms} for output '{self.name}'. Received: labels of shape {y.shape} "
            f"in batch {index}."
        )


def sample_targets(log_probs: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:
    """One-hot labels sampled from ``p = exp(log_probs)`` over the last axis, by inverse CDF.

    Position ``b`` gets class ``#{j : c_j ≤ u_b · c_{K-1}}`` (clipped to
    ``K-1``), ``c = cumsum(p)``: a draw from ``p`` for ``u_b ~ U[0, 1)``.
    ``uniforms`` has the shape of ``log_probs`` without its last axis.
    """
    p = tf.stop_gradient(tf.exp(log_probs))
    c = tf.cumsum(p, axis=-1)
    u = tf.cast(uniforms, c.dtype)[..., None] * c[..., -1:]
    classes = tf.reduce_sum(tf.cast(c <= u, tf.int32), axis=-1)
    classes = tf.minimum(classes, tf.shape(p)[-1] - 1)
    return tf.one_hot(classes, tf.shape(p)[-1], dtype=log_probs.dtype)


def _fits(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or int(s) == int(e) for s, e in zip(shape, expected))


def _batch(inner: tuple) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in inner)
    return f"(batch, {dims})" if inner else "(batch,)"


def _range(y: np.ndarray) -> str:
    if y.size == 0 or not np.issubdtype(y.dtype, np.number):
        return "-"
    return f"{y.min():.4g}, {y.max():.4g}"
