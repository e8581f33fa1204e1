"""Re-estimating BatchNormalization statistics after surgery (`recalibrate_batchnorm`).

Removing channels changes the inputs of every later layer, so the moving
means and variances stored in BatchNormalization layers no longer describe
what those layers see; re-estimating them on a few hundred training images
recovers much of the accuracy lost by one-shot pruning, with no training.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_autoprune.stats.calibration import CalibrationData


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every `keras.layers.BatchNormalization` of ``model``, nested models and custom layers included."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


def recalibrate_batchnorm(model: keras.Model, data: Any, batch_size: int = 128, num_batches: int | None = None) -> int:
    """Replaces the moving statistics of every BatchNormalization layer by their average over ``data``.

    The model runs forward in training mode (each layer normalises with its
    batch's statistics, as during training) and, for the ``k``-th batch of
    ``n_k`` examples, each layer updates ``moving <- (1 - n_k/N_k) moving +
    (n_k/N_k) batch_statistic`` with ``N_k = n_1 + ... + n_k``, so after
    ``K`` batches ``moving_mean = sum_k (n_k/N) mean_k`` and
    ``moving_variance = sum_k (n_k/N) var_k`` (the batch variance Keras
    computes): a cumulative average weighted by batch size (a short last
    batch counts for its examples), not the exponential one of ``fit``. The
    layers' ``momentum`` is restored afterwards, and so is ``trainable``:
    frozen layers (``trainable=False``, as in a frozen backbone, which Keras
    runs in inference mode even in a training call) are re-estimated too.
    Nothing else changes: no weight is trained. Dropout layers are active
    during these passes, as in training.

    Changes ``model`` in place (its moving statistics only).

    Args:
        model: a Keras model (the slim model from surgery, typically).
        data: unlabelled or labelled batches in any form the calibration
            data accepts (``x`` arrays, ``(x, y)``, a batched
            `tf.data.Dataset`, a generator); labels are ignored. Use
            non-augmented or augmented training images, not test images.
        batch_size: batch size for in-memory arrays.
        num_batches: use at most this many batches (default: all of ``data``).

    Returns:
        The number of BatchNormalization layers updated (0: nothing to do,
        and ``data`` is not read).

    Raises:
        ValueError: ``data`` yields no batch, or batches that do not fit the model.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    frozen = [layer for layer in layers if not layer.trainable]
    seen = 0  # examples so far
    try:
        for layer in frozen:
            layer.trainable = True
        for batch in CalibrationData(data, model, batch_size=batch_size, num_batches=num_batches, require_labels=False):
            seen += batch.size
            for layer in layers:
                layer.momentum = 1.0 - batch.size / seen
            model(batch.x if len(batch.x) > 1 else batch.x[0], training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for layer in frozen:
            layer.trainable = False
    return len(layers)

