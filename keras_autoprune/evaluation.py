"""Top-1 accuracy of a classifier on labelled data of any supported form."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_autoprune.stats.calibration import CalibrationData
from keras_autoprune.stats.replay import activation_name, probability_activation


def output_activation(model: keras.Model) -> str | None:
    """``"softmax"`` or ``"sigmoid"`` when the operation producing ``model``'s first output turns logits into
    probabilities with it, else None (logits).

    That operation is a ``Softmax`` or ``Activation`` layer, a layer whose
    ``activation`` is one of them, or a ``keras.ops.softmax``/``sigmoid``
    node; inside a nested model, the one producing that model's output.
    """
    tensor = model.outputs[0]
    while True:
        operation, _, index = tensor._keras_history
        if isinstance(operation, keras.Model) and getattr(operation, "outputs", None):
            tensor = operation.outputs[index]  # the nested model's own output
            continue
        found = probability_activation(operation)
        return found if found is not None else activation_name(getattr(operation, "activation", None))


def accuracy(model: keras.Model, data: Any, batch_size: int = 128) -> float:
    """Fraction of examples whose predicted class equals the label, weighted by their sample weights.

    ``sum_i w_i [argmax f(x_i) = y_i] / sum_i w_i``, as Keras's accuracy
    metrics weigh ``(x, y, sample_weight)`` data (``w_i = 1`` without
    weights). The predicted class is the arg-max of the output; with a single output
    unit (a binary classifier) it is 1 where the output exceeds 0.5 after a
    sigmoid (`output_activation`), 0 as a logit.

    Args:
        model: a classifier (logits or probabilities; one output).
        data: labelled data in any form `stats.calibration` accepts:
            ``(x, y)`` or ``(x, y, sample_weight)`` arrays, a batched
            `tf.data.Dataset` of such tuples, a generator of batches. Labels
            are integers or one-hot rows.

    Raises:
        ValueError: the sample weights sum to 0 (no example counts).
        batch_size: batch size for in-memory arrays.
    """
    binary = model.outputs[0].shape[-1] == 1
    threshold = 0.5 if output_activation(model) == "sigmoid" else 0.0
    correct = total = 0.0
    for batch in CalibrationData(data, model, batch_size=batch_size, require_labels=True):
        outputs = np.asarray(model(batch.x if len(batch.x) > 1 else batch.x[0], training=False))
        predicted = (outputs[..., 0] > threshold).astype(np.int64) if binary else np.argmax(outputs, axis=-1)
        labels = batch.y
        labels = np.argmax(labels, axis=-1) if labels.ndim == 2 and labels.shape[-1] > 1 else labels.reshape(-1)
        correct += float(np.sum(batch.sample_weight * (predicted.reshape(-1) == labels.astype(np.int64))))
        total += float(np.sum(batch.sample_weight))
    if total == 0:
        raise ValueError("Expected labelled data whose sample weights do not all equal 0. Received: weights summing "
                         "to 0, so no example counts in the accuracy. Fix: give positive weights, or no weights.")
    return correct / total
