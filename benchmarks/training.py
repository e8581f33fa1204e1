"""The one training recipe of the benchmarks (pretraining, fine-tuning, TFMOT peer).

SGD with Nesterov momentum 0.9 and weight decay, sparse cross-entropy on
logits, batches from `benchmarks.data.train_dataset`, and a per-epoch
learning rate. The functions take the Keras module to use (``keras`` for
Keras 3, ``tf_keras`` in the TFMOT peer), so that both frameworks train the
same way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.data import BenchData, steps_per_epoch, train_dataset
from benchmarks.stages import Deadline


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Wall-clock seconds of the ``fit`` call (callbacks included) and the epochs completed (absolute)."""

    seconds: float
    end_epoch: int


def compile_model(model: Any, keras_module: Any, learning_rate: float, weight_decay: float) -> None:
    """Compiles ``model`` with a fresh SGD optimizer (no optimizer state carried over)."""
    model.compile(
        optimizer=keras_module.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay),
        loss=keras_module.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def fit_epochs(
    model: Any,
    data: BenchData,
    *,
    batch_size: int,
    seed: int,
    first: int,
    last: int,
    learning_rate: Callable[[int], float],
    keras_module: Any,
    callbacks: Sequence[Any] = (),
    deadline: Deadline | None = None,
    verbose: int = 0,
) -> FitResult:
    """Trains epochs ``first .. last - 1`` (absolute numbers) in one ``fit`` call.

    Args:
        learning_rate: the learning rate of an (absolute) epoch.
        callbacks: more callbacks (a pruning callback).
        deadline: stop after the epoch past which another epoch (as long as
            the last one) would not fit; ``end_epoch`` tells where it stopped.
    """
    if last <= first:
        return FitResult(0.0, first)
    progress = _progress_callback(keras_module, deadline)
    schedule = keras_module.callbacks.LearningRateScheduler(learning_rate)
    start = time.perf_counter()
    model.fit(
        train_dataset(data, batch_size, seed, first, last),
        epochs=last,
        initial_epoch=first,
        steps_per_epoch=steps_per_epoch(data, batch_size),
        callbacks=[schedule, *callbacks, progress],
        shuffle=False,  # the dataset is already shuffled, per epoch and deterministically
        verbose=verbose,
    )
    return FitResult(time.perf_counter() - start, first + progress.completed)


def _progress_callback(keras_module: Any, deadline: Deadline | None):
    class Progress(keras_module.callbacks.Callback):
        """Counts finished epochs; stops training when the next one would pass the deadline."""

        def __init__(self):
            super().__init__()
            self.completed = 0
            self._start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.completed += 1
            if deadline is not None and not deadline.allows(1.2 * (time.perf_counter() - self._start)):
                self.model.stop_training = True

    return Progress()
