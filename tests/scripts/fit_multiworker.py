"""One worker of a two-worker `MultiWorkerMirroredStrategy` pruning run (tests/test_multiworker.py).

``python tests/scripts/fit_multiworker.py OUT_DIR INDEX METHOD [INTERRUPT_AFTER]``
with ``TF_CONFIG`` set (no ``TF_CONFIG``: the single-worker reference, no
strategy). ``METHOD``: a key of ``CALLBACKS``, or ``pruningnet``.
``INTERRUPT_AFTER``: stop after that epoch (0-based) with exit code
``INTERRUPTED``, as a preemption would; run again to resume (the pruning
state in ``OUT_DIR/state``, Keras' backups in ``OUT_DIR/backup-<INDEX>``).

A callback: every worker passes the whole calibration set; the statistics
are split across the workers' replicas and summed back
(`keras_autoprune.stats.engine`), so every worker makes the same plan. Each
writes ``plan-<INDEX>.json`` and ``logs-<INDEX>.json`` (the fit history,
then `evaluate` and `predict` of the masked model); the chief (index 0)
writes the pruned model. ``pruningnet``: MetaPruning's PruningNet trained
with `train_pruningnet`; ``logs-<INDEX>.json`` holds its losses and logits.
"""

import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_autoprune as kap  # noqa: E402
from tests.helpers import Interrupt  # noqa: E402

BUDGET = kap.Budget(flops=0.5)
EPOCHS = 4  # rounds at the start of epochs 2 and 3 (0-based 1 and 2), fine-tuning in epoch 4
INTERRUPTED = 3  # the exit code of a worker stopped by ``INTERRUPT_AFTER``
CALLBACKS = {  # (calibration data, **schedule) -> callback
    "nap": lambda data, **schedule: kap.NAPCallback(data, budget=BUDGET, num_batches=2, batch_size=32, **schedule),
    "eigendamage": lambda data, **schedule: kap.EigenDamageCallback(data, budget=BUDGET, num_batches=2, batch_size=32,
                                                                    **schedule),
    "psap": lambda data, **schedule: kap.PSAPCallback(BUDGET, data, num_batches=2, batch_size=32, **schedule),
    "magnitude": lambda data, **schedule: kap.MagnitudeCallback(BUDGET, **schedule),
}


def main(out: pathlib.Path, index: int, method: str, interrupt_after: int = -1) -> None:
    if "TF_CONFIG" in os.environ:
        kap.enable_multi_worker_fit()  # keras-team/keras#20585
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 64)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
        h = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="c2")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(h))
        model.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if method == "pruningnet":
        train_pruningnet(model, strategy, x, y, out / f"logs-{index}.json")
        return
    # The pruning state: one folder for all workers (they write the same state). Keras' BackupAndRestore is not
    # multi-worker aware (workers sharing its folder collide on its files): one folder per worker.
    callback = CALLBACKS[method]((x, y), start_epoch=1, rounds=2, verbose=0, state_dir=out / "state")
    callbacks = [callback, keras.callbacks.BackupAndRestore(str(out / f"backup-{index}"))]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    batches = BatchLosses()  # the logs each step reduces across the workers
    try:
        logs = model.fit(dataset, epochs=EPOCHS, verbose=0,
                         callbacks=callbacks + [batches, Interrupt(interrupt_after)]).history
    except KeyboardInterrupt as stop:
        print(stop)
        raise SystemExit(INTERRUPTED) from None
    logs["evaluate"] = model.evaluate(dataset, verbose=0, callbacks=[batches])
    logs["predict"] = model.predict(x[:4], verbose=0).tolist()
    logs["batch_loss"], logs["test_batch_loss"] = batches.train, batches.test
    (out / f"plan-{index}.json").write_text(callback.plan.to_json())
    (out / f"logs-{index}.json").write_text(json.dumps(logs))
    if index == 0:
        callback.pruned_model.save(out / "pruned.keras")


class BatchLosses(keras.callbacks.Callback):
    """The loss in the logs of every training and evaluation batch."""

    def __init__(self):
        super().__init__()
        self.train, self.test = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.train.append(float(logs["loss"]))

    def on_test_batch_end(self, batch, logs=None):
        self.test.append(float(logs["loss"]))


def train_pruningnet(model: keras.Model, strategy, x: np.ndarray, y: np.ndarray, logs: pathlib.Path) -> None:
    """MetaPruning's PruningNet built from ``model`` and trained under ``strategy`` (one random gene per global
    batch); writes its losses and the logits it generates for one gene."""
    with strategy.scope():
        net = kap.metapruning.PruningNet(model, scales=(0.25, 0.5, 1.0), warm_start=False)
        history = kap.metapruning.train_pruningnet(net, (x, y), epochs=2, batch_size=16, verbose=0)
    net.set_gene((0, 1))
    logs.write_text(json.dumps({"loss": history.history["loss"], "predict": np.asarray(net(x[:4])).tolist()}))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *[int(a) for a in sys.argv[4:]])
