"""Fits a small CNN with a pruning callback under MirroredStrategy (2 CPUs).

Run in its own process (logical devices must be set before TensorFlow
starts): ``python tests/scripts/fit_distributed.py METHOD`` prints one JSON
line with the figures the test checks. METHOD is a callback class name of
keras_autoprune (e.g. MagnitudeCallback, NAPCallback, EigenDamageCallback),
or ``PruningNet``: a MetaPruning PruningNet trained with
`kap.metapruning.train_pruningnet` (one gene per batch).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_autoprune as kap  # noqa: E402

L = keras.layers


def small_cnn() -> keras.Model:
    i = keras.Input((8, 8, 1))
    h = L.Conv2D(8, 3, padding="same", name="c1")(i)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU()(h)
    h = L.Conv2D(8, 3, name="c2", activation="relu")(h)
    return keras.Model(i, L.Dense(4)(L.GlobalAveragePooling2D()(h)))


def pruningnet(strategy, x, y) -> dict:
    """A PruningNet trained under ``strategy``; its generated slim model must equal it at the last gene."""
    with strategy.scope():
        # from scratch (B != 0), so that every generator's A and a get a gradient from the first step
        net = kap.metapruning.PruningNet(small_cnn(), scales=(0.25, 0.5, 1.0), warm_start=False)
        start = [np.array(w) for w in net.trainable_weights]
        history = kap.metapruning.train_pruningnet(net, (x, y), epochs=2, batch_size=16, verbose=0)
    gene = (0, 1)
    net.set_gene(gene)
    slim = net.materialize(gene)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "losses": history.history["loss"],
        "changed": sum(not np.array_equal(a, np.asarray(b)) for a, b in zip(start, net.trainable_weights)),
        "trainable": len(start),
        "error": float(np.max(np.abs(np.asarray(slim(x)) - np.asarray(net(x))))),
        "slim_filters": [slim.get_layer("c1").filters, slim.get_layer("c2").filters],
    }


def main(method: str) -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 4, 64)
    if method == "PruningNet":
        print(json.dumps(pruningnet(strategy, x, y)))
        return
    with strategy.scope():
        model = small_cnn()
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback_class = getattr(kap, method)
    kwargs = {"data": (x, y)} if method != "MagnitudeCallback" else {}
    cb = callback_class(budget=kap.Budget(flops=0.5), verbose=0, **kwargs)
    model.fit(x, y, epochs=2, batch_size=16, callbacks=[cb], verbose=0)
    error = float(np.max(np.abs(np.asarray(cb.pruned_model(x)) - np.asarray(model(x)))))
    if isinstance(cb.plan, kap.FactorizationPlan):  # EigenDamage: c2's kernel stayed in its subspace
        factorization, kernel = cb.plan.layers["c2"], model.get_layer("c2").kernel.numpy()
        removed = 16 - sum(factorization.rank)
        enforced = bool(np.allclose(factorization.project(kernel), kernel, atol=1e-5))
    else:  # channel masks: removed filters of c1 stayed zero
        removed_channels = np.setdiff1d(np.arange(8), cb.plan.kept.get("c1", np.arange(8)))
        removed = removed_channels.size
        enforced = bool(np.all(model.get_layer("c1").kernel.numpy()[..., removed_channels] == 0))
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "flops_kept": kap.count_flops(cb.pruned_model) / kap.count_flops(model),
        "error": error,
        "removed_zero": enforced,
        "removed": int(removed),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
