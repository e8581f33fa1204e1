"""Training a `PruningNet`: `train_pruningnet`, the paper's recipe on ``fit``.

One random gene per batch (`GeneSampler`), SGD with Nesterov momentum 0.9,
the learning rate decayed linearly to 0, label-smoothed cross-entropy
(`SmoothedCrossentropy`); ``(x, y)`` arrays in a seeded order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_autoprune.evaluation import output_activation
from keras_autoprune.metapruning.pruningnet import GeneSampler, PruningNet

WARM_START_LEARNING_RATE = 0.01
"""`train_pruningnet`'s initial rate for a PruningNet warm-started from trained weights."""
SCRATCH_LEARNING_RATE = 0.1
"""`train_pruningnet`'s initial rate for a PruningNet built with ``warm_start=False`` (the paper's)."""


def train_pruningnet(net: PruningNet, data: Any, epochs: int = 1, learning_rate: float | None = None,
                     label_smoothing: float = 0.1, from_logits: bool | None = None, seed: int = 0,
                     batch_size: int = 128, decay: bool = True, callbacks: Sequence[keras.callbacks.Callback] = (),
                     verbose: int | str = "auto") -> keras.callbacks.History:
    """Trains ``net`` with ``fit``, one random gene per batch (the paper's recipe).

    SGD (Nesterov momentum 0.9) with the learning rate decayed linearly to 0
    over the run (constant when the number of batches is unknown), label
    smoothing on the cross-entropy. For another recipe, compile ``net``
    yourself and call ``net.fit(..., callbacks=[GeneSampler()])``.

    ``(x, y)`` arrays are shuffled each epoch by a permutation drawn from
    ``seed``, so the same seed trains the same network; a dataset is read in
    the order it yields.

    Args:
        net: the `PruningNet`.
        data: labelled training batches for ``fit`` (a batched
            `tf.data.Dataset` of ``(x, y)``, integer or one-hot labels).
        epochs: passes over ``data``.
        learning_rate: initial rate; default 0.01 for a warm-started
            PruningNet, 0.1 from scratch.
        label_smoothing: label smoothing (the paper: 0.1).
        from_logits: whether the model outputs logits; default: ``True``
            unless its last layer applies a softmax.
        seed: seed of the genes drawn (and of the order of ``(x, y)``
            arrays). Training in stages, give each call its own seed: the
            same seed draws the same genes in the same order again.
        batch_size: batch size for ``(x, y)`` arrays.
        decay: decay the rate linearly to 0 over this call (``False``: keep
            it constant, e.g. when training in one-epoch stages with your own
            per-stage rate).
        callbacks: more callbacks for ``fit`` (e.g. `keras.callbacks.BackupAndRestore`).
        verbose: ``fit``'s verbosity.

    Returns:
        The `keras.callbacks.History` of ``fit``.

    Raises:
        ValueError: a bad argument or infinite ``data`` (`check_training`), before any work.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1. Received: epochs={epochs!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"`label_smoothing` must be in [0, 1). Received: label_smoothing={label_smoothing!r}")
    check_training(data, batch_size, learning_rate)
    default = WARM_START_LEARNING_RATE if net.warm_start else SCRATCH_LEARNING_RATE
    rate = learning_rate if learning_rate is not None else default
    arrays = is_labelled_arrays(data)
    steps = -(-len(data[0]) // batch_size) if arrays else _batches(data)
    if steps and decay:
        rate = keras.optimizers.schedules.PolynomialDecay(rate, decay_steps=steps * epochs, end_learning_rate=0.0)
    logits = output_activation(net.base) != "softmax" if from_logits is None else bool(from_logits)
    classes = int(net.base.outputs[0].shape[-1])
    net.compile(optimizer=keras.optimizers.SGD(rate, momentum=0.9, nesterov=True),
                loss=SmoothedCrossentropy(classes, label_smoothing, logits))
    if arrays:  # its own seeded order; `fit` would shuffle its batches unseeded
        return net.fit(_ShuffledArrays(*data, batch_size=batch_size, seed=seed), epochs=epochs, shuffle=False,
                       callbacks=[GeneSampler(seed), *callbacks], verbose=verbose)
    return net.fit(data, epochs=epochs, callbacks=[GeneSampler(seed), *callbacks], verbose=verbose)


class _ShuffledArrays(keras.utils.PyDataset):
    """``(x, y)`` arrays in batches, in a new permutation drawn from ``seed`` at every epoch.

    The same seed gives the same batches in every run, in one ``fit`` (so that
    callbacks such as ``BackupAndRestore`` or ``EarlyStopping`` see one
    training, not one per epoch). When training in stages (one call per
    epoch), give each stage its own ``seed``, or every stage repeats the same
    order.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(x))

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index: int):
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self._order = self._rng.permutation(len(self.x))


class SmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy with label smoothing for integer or one-hot labels.

    ``y = (1 - s) onehot + s / K``; loss ``-sum_k y_k log p_k``.
    """

    def __init__(self, classes: int, label_smoothing: float = 0.1, from_logits: bool = True,
                 name: str = "smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.classes, self.label_smoothing, self.from_logits = classes, label_smoothing, from_logits

    def call(self, y_true, y_pred):
        if len(y_true.shape) < len(y_pred.shape) or y_true.shape[-1] != self.classes:
            y_true = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), self.classes)
        return keras.losses.categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "classes": self.classes, "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits}


def is_labelled_arrays(data: Any) -> bool:
    """Whether ``data`` is an ``(x, y)`` tuple of NumPy arrays (shuffled and split here, not by ``fit``)."""
    return isinstance(data, tuple) and len(data) == 2 and all(isinstance(a, np.ndarray) for a in data)


def _batches(data: Any) -> int | None:
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        count = int(data.cardinality())
        return count if count > 0 else None
    return None


def check_training(data: Any, batch_size: int = 128, learning_rate: float | None = None) -> None:
    """Raises ValueError for training inputs `train_pruningnet` cannot use, before any work.

    ``batch_size`` must be an int >= 1, ``learning_rate`` None or a finite
    number > 0, and ``data`` finite: ``fit`` runs ``epochs`` passes over it,
    so a repeated dataset would train forever.
    """
    import tensorflow as tf

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1. Received: batch_size={batch_size!r}")
    if learning_rate is not None and (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))
                                      or not math.isfinite(learning_rate) or learning_rate <= 0):
        raise ValueError(f"`learning_rate` must be a finite number > 0, or None for the default. "
                         f"Received: learning_rate={learning_rate!r}")
    if isinstance(data, tf.data.Dataset) and int(data.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "Expected finite training data: the PruningNet trains `epochs` passes over it. Received: an infinite "
            "tf.data.Dataset (e.g. after .repeat()). Fix: drop the .repeat(), or bound it with .take(batches)."
        )
