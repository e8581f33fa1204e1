"""The likelihood behind a model's compiled loss, as Fisher statistics need it.

The Fisher information is defined by the model's predictive distribution
``p(y|x)``; the loss tells how to read each output as one (see
`keras_autoprune.stats.likelihoods` for the distributions and the scaling):

| loss (object, function or string)              | distribution     | true Fisher samples         |
|------------------------------------------------|------------------|-----------------------------|
| (sparse) categorical cross-entropy             | categorical      | a class per position        |
| binary cross-entropy                           | Bernoulli        | 0/1 per element             |
| mean squared error (``'mse'``)                 | Gaussian, σ = 1  | ``y ~ N(f(x), I)``          |
| mean absolute error (``'mae'``)                | Laplace, b = 1   | ``y ~ Laplace(f(x), 1)``    |
| any other differentiable loss                  | none             | -- (empirical Fisher only)  |

Several outputs: ``loss`` as Keras takes it (one loss for every output, a
list in the order of ``model.outputs``, or a dict by output name) and
``loss_weights`` (list or dict; read from the compiled model when ``loss``
is); outputs without a loss are left out. When any output's loss defines no
distribution, the whole pass uses the empirical Fisher (`Likelihood.fisher`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import check_model
from keras_autoprune.stats.likelihoods import OutputLikelihood, sample_targets

__all__ = ["SUPPORTED_LOSSES", "Likelihood", "OutputLikelihood", "resolve_likelihood", "sample_targets"]

SUPPORTED_LOSSES = (
    "SparseCategoricalCrossentropy, CategoricalCrossentropy and BinaryCrossentropy (softmax / sigmoid outputs, "
    "per position: classifiers, multi-label, segmentation), MeanSquaredError (Gaussian) and MeanAbsoluteError "
    "(Laplace), as objects, keras.losses functions or strings; any other differentiable loss uses the empirical "
    "Fisher (squared gradients of the loss at the real labels)"
)

_KINDS = {
    keras.losses.sparse_categorical_crossentropy: "categorical",
    keras.losses.categorical_crossentropy: "categorical",
    keras.losses.binary_crossentropy: "bernoulli",
    keras.losses.mean_squared_error: "gaussian",
    keras.losses.mean_absolute_error: "laplace",
}


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """``p(y|x)`` of a whole model: one `OutputLikelihood` per output with a loss.

    Attributes:
        heads: the outputs with a loss, in the order of ``model.outputs``.
        num_outputs: the model's number of outputs.
        source: the loss as given (for messages).
    """

    heads: tuple[OutputLikelihood, ...]
    num_outputs: int
    source: str

    @property
    def kind(self) -> str | None:
        """The kind of a single-output likelihood (None: no distribution; ``"multi"`` for several outputs)."""
        return self.heads[0].kind if len(self.heads) == 1 else "multi"

    @property
    def from_logits(self) -> bool:
        return all(h.from_logits for h in self.heads)

    @property
    def samplable(self) -> bool:
        """Whether every loss defines a distribution (so the true Fisher exists)."""
        return all(h.samplable for h in self.heads)

    def fisher(self, requested: str) -> str:
        """The Fisher a pass requested as ``requested`` uses: ``"empirical"`` when a loss cannot be sampled."""
        return requested if self.samplable else "empirical"

    def describe(self, fisher: str) -> str:
        """One line: which Fisher, and why."""
        heads = "; ".join(h.describe() for h in self.heads)
        if fisher == "true":
            return f"true Fisher (labels sampled from the model): {heads}"
        if self.samplable:
            return f"empirical Fisher (requested; the real labels): {heads}"
        reason = self._unsampled()
        return f"empirical Fisher (squared gradients of the loss at the real labels), because {reason}: {heads}"

    def labels_reason(self) -> str | None:
        """Why the data must carry labels whatever Fisher is asked for (None when the true Fisher exists)."""
        if self.samplable:
            return None
        return f"{self._unsampled()}, so the empirical Fisher uses the real labels"

    def _unsampled(self) -> str:
        heads = [h for h in self.heads if not h.samplable]
        names = ", ".join(f"{h.source} of output '{h.name}'" for h in heads)
        return f"{names} define{'s' if len(heads) == 1 else ''} no distribution to sample labels from"

    def check_model(self, model: keras.Model) -> None:
        """Raises unless every output with a loss can be read as its kind."""
        outputs = check_model(model).outputs
        for head in self.heads:
            head.check_output(tuple(outputs[head.index].shape), model.name)

    def noise_widths(self, output_shapes: list[tuple]) -> list[int]:
        """Uniform draws per example for each head, for outputs of these shapes (without batch)."""
        return [h.noise_width(tuple(output_shapes[h.index])) for h in self.heads]

    def targets(self, y: Any, output_shapes: list[tuple], index: int = 0) -> list[np.ndarray]:
        """Real labels per head (see `OutputLikelihood.targets`), from ``y`` as Keras takes it.

        ``y`` is an array for one output; for several, a list/tuple in the
        order of ``model.outputs`` or a dict by output name.
        """
        per_output = self._split(y, index)
        return [h.targets(per_output[h.index], output_shapes[h.index], index) for h in self.heads]

    def _split(self, y: Any, index: int) -> list[Any]:
        if self.num_outputs == 1:
            if isinstance(y, dict) and len(y) == 1:
                y = next(iter(y.values()))
            if isinstance(y, (list, tuple)) and len(y) == 1:
                y = y[0]
            return [y]
        names = [h.name for h in self.heads]
        if isinstance(y, dict):
            missing = [n for n in names if n not in y]
            if missing:
                raise ValueError(
                    f"Expected labels for the outputs {names}. Received: a dict with keys {sorted(y)} in batch "
                    f"{index} (missing {missing})."
                )
            found = {h.index: y[h.name] for h in self.heads}
            return [found.get(i) for i in range(self.num_outputs)]
        if isinstance(y, (list, tuple)) and len(y) == self.num_outputs:
            return list(y)
        got = f"a {type(y).__name__} of {len(y)}" if isinstance(y, (list, tuple)) else f"one array {np.shape(y)}"
        raise ValueError(
            f"Expected labels for each of the model's {self.num_outputs} outputs: a list in the order of "
            f"model.outputs or a dict by output name {names}. Received: {got} in batch {index}."
        )

    def objective(self, outputs: list[tf.Tensor], logits: dict, labels: list[tf.Tensor], fisher: str) -> tf.Tensor:
        """The scalar whose gradient gives ``δ`` for a chunk (traced; see `likelihoods`).

        Args:
            outputs: the model's outputs, flat, in the order of ``model.outputs``.
            logits: ``id(output) -> (activation, its input)`` from `replay.replay`.
            labels: per head, its uniforms (true Fisher) or real labels.
            fisher: ``"true"`` or ``"empirical"``.
        """
        terms = []
        for head, value in zip(self.heads, labels):
            out = outputs[head.index]
            terms.append(head.contribution(out, logits.get(id(out)), value, fisher))
        dtype = tf.float64 if all(t.dtype == tf.float64 for t in terms) else tf.float32
        return tf.add_n([tf.cast(t, dtype) for t in terms])


def resolve_likelihood(model: keras.Model, loss: Any = None, loss_weights: Any = None) -> Likelihood:
    """The `Likelihood` of ``loss``, or of the model's compiled loss when it is None.

    Args:
        model: a Functional or Sequential model.
        loss: as `keras.Model.compile` takes it; None reads ``model.loss``.
        loss_weights: per-output weights (float, list or dict); None: those
            the model was compiled with when ``loss`` is None, else 1.

    Raises:
        ValueError: no loss, a loss Keras does not know, or a structure that
            does not match the outputs.
    """
    given = _plain(loss if loss is not None else getattr(model, "loss", None))
    if given is None:
        raise ValueError(
            "Expected a loss to define p(y|x): compile the model, or pass `loss=`. "
            f"Received: loss=None and model '{model.name}' is not compiled with a loss. "
            f"Supported: {SUPPORTED_LOSSES}."
        )
    if loss is None and loss_weights is None:
        config = getattr(getattr(model, "_compile_config", None), "config", None) or {}
        loss_weights = config.get("loss_weights")
    functional = check_model(model)
    names = _output_names(model, functional)
    losses = _per_output(given, names, "loss", model)
    weights = _per_output(_plain(loss_weights), names, "loss_weights", model) if loss_weights is not None else None
    heads = []
    for i, (name, item) in enumerate(zip(names, losses)):
        if item is None:
            continue
        weight = 1.0 if weights is None or weights[i] is None else weights[i]
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not weight >= 0:
            raise ValueError(f"Expected non-negative numbers as loss weights. Received: loss_weights={loss_weights!r}")
        heads.append(_head(i, name, item, float(weight)))
    if not heads:
        raise ValueError(f"Expected a loss for at least one output. Received: loss={given!r} for outputs {names}.")
    return Likelihood(tuple(heads), len(names), source=f"loss={_spell(given)}")


def _output_names(model: keras.Model, functional: keras.Model) -> list[str]:
    struct = functional._outputs_struct
    if isinstance(struct, dict):
        return keras.tree.flatten({key: key for key in struct})
    names = list(getattr(model, "output_names", None) or getattr(functional, "output_names", None) or [])
    if len(names) != len(functional.outputs):
        names = [f"output_{i}" for i in range(len(functional.outputs))]
    return names


def _plain(value: Any) -> Any:
    """Keras' tracked ListWrapper / DictWrapper as a plain list / dict."""
    if isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "items") and not isinstance(value, str)):
        return dict(value.items())
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListWrapper":
        return list(value)
    return value


def _per_output(value: Any, names: list[str], what: str, model: keras.Model) -> list[Any]:
    """One entry per output from Keras' forms: a single value, a list by position, a dict by name."""
    if isinstance(value, dict):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(
                f"Expected `{what}` keys among the output names {names} of model '{model.name}'. "
                f"Received: {what} with keys {sorted(map(str, value))} ({unknown} are not outputs)."
            )
        return [value.get(n) for n in names]
    if isinstance(value, list):
        if len(value) == len(names):
            return value
        if len(value) == 1:
            return value * len(names)
        raise ValueError(
            f"Expected one `{what}` entry per output of model '{model.name}' ({len(names)}: {names}). "
            f"Received: a list of {len(value)}."
        )
    return [value] * len(names)


def _head(index: int, name: str, given: Any, weight: float) -> OutputLikelihood:
    resolved = given
    if isinstance(given, str):
        try:
            resolved = keras.losses.get(given)
        except ValueError as error:
            raise ValueError(
                f"Expected a loss Keras knows. Received: loss={given!r} for output '{name}'. ({error})"
            ) from error
    if not callable(resolved):
        raise ValueError(f"Expected a loss: a keras.losses.Loss, a function or a string. Received: loss={given!r}.")
    from keras.src.losses.losses import LossFunctionWrapper  # how Keras wraps a loss function (not exported)

    fn, kwargs = resolved, {}
    if isinstance(resolved, LossFunctionWrapper):
        fn, kwargs = resolved.fn, dict(getattr(resolved, "_fn_kwargs", {}) or {})
    kind = _KINDS.get(fn) if _hashable(fn) else None
    if kwargs.get("axis", -1) != -1:
        kind = None  # a class axis other than the last: read the loss itself
    wrapper = resolved if isinstance(resolved, keras.losses.Loss) else LossFunctionWrapper(resolved)
    source = f"loss={_spell(given)}"
    return OutputLikelihood(
        index=index, name=name, kind=kind, from_logits=bool(kwargs.get("from_logits", False)), weight=weight,
        loss=wrapper, source=source, ignore_class=kwargs.get("ignore_class"),
    )


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _spell(loss: Any) -> str:
    """A short spelling of a loss (structure) for messages: ``'mse'``, ``MeanSquaredError()``, ``my_loss``."""
    if isinstance(loss, str) or loss is None:
        return repr(loss)
    if isinstance(loss, dict):
        return "{" + ", ".join(f"{k!r}: {_spell(v)}" for k, v in loss.items()) + "}"
    if isinstance(loss, (list, tuple)):
        return "[" + ", ".join(_spell(v) for v in loss) + "]"
    if isinstance(loss, keras.losses.Loss):
        return f"{type(loss).__name__}()"
    return getattr(loss, "__name__", type(loss).__name__)
