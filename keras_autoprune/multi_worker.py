"""Keras 3 `fit` under `tf.distribute.MultiWorkerMirroredStrategy`, which Keras breaks today.

Keras 3 (checked up to 3.15.1, TensorFlow 2.21) cannot `fit` or `evaluate`
under `MultiWorkerMirroredStrategy`, not even a plain model with no callback
(keras-team/keras#20585, open; `predict` works): the TensorFlow trainer
trips twice on the strategy's cross-worker reductions.

1. Before the first step, ``TensorFlowTrainer._maybe_symbolic_build`` takes
   one distributed batch and averages it over the replicas with
   ``strategy.reduce("MEAN", batch, axis=None)``, only to learn the batch's
   shapes. The collective strategy reduces one value at a time, not an
   ``(x, y)`` structure, and raises "Attempt to convert a value
   (PerReplica...) to a Tensor".
2. After every step, ``reduce_per_replica`` averages the logs across workers
   with ``strategy.reduce("MEAN", v, axis=0)``; the logs (loss, metrics) are
   scalars, which have no axis 0.

`enable_multi_worker_fit` replaces those two functions, for the collective
multi-worker strategy only, by versions that (1) build from the first
replica's share of the batch (its shapes are all the build reads) and (2)
average a scalar log over the replicas, ``mean_r v_r``
(``strategy.reduce("MEAN", v, axis=None)``), and leave everything else to
Keras. Nothing else changes: Keras still distributes the data, all-reduces
the gradients and keeps the variables mirrored; under every other strategy
(none, `MirroredStrategy`, TPU) the original functions run.
`tests/test_multiworker.py` trains two workers on localhost, one replica
each, and checks that every batch's logs, the evaluation and the pruning
plan equal those of one process without a strategy. Several replicas per
worker (GPUs), ``steps_per_execution > 1`` and custom ``train_step`` logs
take the same code paths but are not tested here.

It patches Keras for the whole process, so it is never done implicitly: call
`enable_multi_worker_fit()` once, on every worker, before `fit`;
`disable_multi_worker_fit()` puts Keras' functions back.

>>> import keras_autoprune as kap
>>> kap.enable_multi_worker_fit()   # doctest: +SKIP
>>> strategy = tf.distribute.MultiWorkerMirroredStrategy()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import itertools
import warnings
from types import ModuleType
from typing import Any

import tensorflow as tf
from keras import tree

_TRAINER_MODULE = "keras.src.backend.tensorflow.trainer"  # private: looked up only when the fix is asked for
CHECKED_KERAS = (3, 15, 1)  # the newest Keras the fix was checked with
_ORIGINAL: dict[str, Any] = {}


def enable_multi_worker_fit() -> bool:
    """Lets Keras 3 `fit` and `evaluate` run under `MultiWorkerMirroredStrategy`.

    Idempotent. Call it on every worker before the first `fit` (the module
    docstring says what it changes and why). It was checked with Keras
    3.15.1; a later Keras gets a warning, as it may have fixed the bug or
    changed the functions this replaces.

    Returns:
        True if it patched Keras now, False if it was already patched.

    Raises:
        RuntimeError: the installed Keras no longer has the functions this fix
            replaces (a Keras release reorganised its TensorFlow trainer); try
            `fit` without it, since that release may have fixed the bug.
    """
    if _ORIGINAL:
        return False
    import keras

    try:
        tf_trainer = _trainer_module()
    except ImportError:
        tf_trainer = None
    trainer_class = getattr(tf_trainer, "TensorFlowTrainer", None)
    needed = {"TensorFlowTrainer._maybe_symbolic_build": hasattr(trainer_class, "_maybe_symbolic_build"),
              "reduce_per_replica": hasattr(tf_trainer, "reduce_per_replica"),
              "_collective_all_reduce_multi_worker": hasattr(tf_trainer, "_collective_all_reduce_multi_worker")}
    missing = [name for name, found in needed.items() if not found]
    if missing:
        raise RuntimeError(
            "keras_autoprune.enable_multi_worker_fit() fixes keras-team/keras#20585 in Keras' TensorFlow trainer, "
            f"but this Keras lacks what it replaces. Received: keras=={keras.__version__}, missing {missing}. "
            "Fix: run `fit` under MultiWorkerMirroredStrategy without it (this Keras may have fixed the bug), "
            "or install keras<=3.15.1.")
    if _version(keras.__version__) > CHECKED_KERAS:
        warnings.warn(
            f"keras_autoprune.enable_multi_worker_fit() was checked with Keras <= {'.'.join(map(str, CHECKED_KERAS))}; "
            f"this is keras=={keras.__version__}, which may have fixed keras-team/keras#20585 or changed the functions "
            "it replaces. Try `fit` under MultiWorkerMirroredStrategy without it first.", stacklevel=2)
    _ORIGINAL["build"] = trainer_class._maybe_symbolic_build
    _ORIGINAL["reduce"] = tf_trainer.reduce_per_replica
    trainer_class._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = _reduce_per_replica
    return True


def disable_multi_worker_fit() -> bool:
    """Puts back the Keras functions `enable_multi_worker_fit` replaced.

    A model whose train or test function was already traced keeps the
    patched reduction in it until Keras traces it again (``compile``).

    Returns:
        True if it restored them, False if Keras was not patched.
    """
    if not _ORIGINAL:
        return False
    tf_trainer = _trainer_module()
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _ORIGINAL.pop("build")
    tf_trainer.reduce_per_replica = _ORIGINAL.pop("reduce")
    return True


def multi_worker_fit_enabled() -> bool:
    """Whether `enable_multi_worker_fit` is in effect."""
    return bool(_ORIGINAL)


def _trainer_module() -> ModuleType:
    return importlib.import_module(_TRAINER_MODULE)


def _version(text: str) -> tuple[int, ...]:
    """``"3.15.1"`` -> ``(3, 15, 1)``; a pre-release suffix is dropped (``"3.16.0.dev2025"`` -> ``(3, 16, 0)``)."""
    numbers = []
    for part in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def _multi_worker(strategy) -> bool:
    return strategy is not None and _trainer_module()._collective_all_reduce_multi_worker(strategy)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Keras' build before the first step, from the first replica's share of the batch under multi-worker."""
    if not _multi_worker(self._distribute_strategy) or iterator is None:
        return _ORIGINAL["build"](self, iterator=iterator, data_batch=data_batch)
    strategy = self.distribute_strategy

    def first_replica(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    for _, _, batches in iterator:
        data_batch = tree.map_structure(first_replica, next(batches))
        break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_per_replica(values, strategy, reduction):
    """Keras' reduction of a step's outputs, with scalars averaged over the replicas under multi-worker."""
    original = _ORIGINAL["reduce"]
    if not _multi_worker(strategy) or reduction not in ("auto", "mean"):
        return original(values, strategy, reduction)

    def reduce(value):
        shape = getattr(strategy.experimental_local_results(value)[0], "shape", None)
        if isinstance(shape, tf.TensorShape) and shape.rank == 0:
            return strategy.reduce("MEAN", value, axis=None)
        return original(value, strategy, reduction)

    return tree.map_structure(reduce, values)
