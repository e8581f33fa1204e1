"""Top-1 accuracy of a classifier on labelled data of any supported form."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_autoprune.stats.calibration import CalibrationData


def accuracy(model: keras.Model, data: Any, batch_size: int = 128) -> float:
    """Fraction of examples whose arg-max prediction equals the label.

    Args:
        model: a classifier (logits or probabilities; one output).
        data: labelled data in any form `stats.calibration` accepts:
            ``(x, y)`` arrays, a batched `tf.data.Dataset` of ``(x, y)``, a
            generator of batches. Labels are integers or one-hot rows.
        batch_size: batch size for in-memory arrays.
    """
    correct = total = 0
    for batch in CalibrationData(data, model, batch_size=batch_size, require_labels=True):
        predicted = np.argmax(np.asarray(model(batch.x if len(batch.x) > 1 else batch.x[0], training=False)), axis=-1)
        labels = batch.y
        labels = np.argmax(labels, axis=-1) if labels.ndim == 2 and labels.shape[-1] > 1 else labels.reshape(-1)
        correct += int(np.sum(predicted.reshape(-1) == labels.astype(np.int64)))
        total += labels.shape[0]
    return correct / total
