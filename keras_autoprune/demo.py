"""`keras-autoprune demo`: NAP pruning during `fit`, end to end, offline.

With no arguments: trains a small residual CNN on scikit-learn's bundled
digits images, prunes it with ``NAPCallback(budget=Budget(flops=0.5))``
while training continues, exports both models to TFLite (verified with
LiteRT) and prints a before/after table: accuracy, parameters, FLOPs,
``.tflite`` size and LiteRT latency, plus the path of the report plot.
About a minute on two CPU cores.

``--data`` takes an image folder (``<root>/{train,test}/<class>/*.jpg``), a
``.tar.gz`` of one (e.g. ``../shared/data/cifar10-jpeg.tar.gz``) or a TFDS
name.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time
from typing import Any

import keras

L = keras.layers


def small_cnn(input_shape: tuple[int, ...], classes: int, width: int = 32) -> keras.Model:
    """A compact residual CNN (conv-BN-ReLU stem, one residual block, two heads)."""
    inputs = keras.Input(input_shape)
    x = L.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU()(x)
    y = L.Conv2D(width, 3, padding="same", use_bias=False, name="block_conv1")(x)
    y = L.BatchNormalization(name="block_bn1")(y)
    y = L.ReLU()(y)
    y = L.Conv2D(width, 3, padding="same", use_bias=False, name="block_conv2")(y)
    y = L.BatchNormalization(name="block_bn2")(y)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv3")(x)
    x = L.GlobalAveragePooling2D()(x) if input_shape[0] > 16 else L.Flatten()(x)
    x = L.Dense(2 * width, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="small_cnn")


def load_demo_data(data: str | None, max_per_class: int = 500,
                   image_size: tuple[int, int] | None = None) -> tuple[tuple, tuple, str]:
    """``((x_train, y_train), (x_test, y_test), description)``; the test split's class ids are the training split's."""
    if data is None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")[..., None]
        x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0)
        return (x_train, y_train), (x_test, y_test), "scikit-learn digits (8x8, 1,347 train / 450 test)"
    from keras_autoprune.datasets import load_images

    x_train, y_train, classes = load_images(data, "train", image_size, max_per_class)
    x_test, y_test, _ = load_images(data, "test", image_size, max(1, max_per_class // 5), class_names=classes)
    shape = "x".join(map(str, x_train.shape[1:3]))
    return (x_train, y_train), (x_test, y_test), f"{data} ({len(classes)} classes, {shape}, {len(x_train)} train / {len(x_test)} test)"


def check_demo_arguments(epochs: int, finetune_epochs: int, flops: float, max_per_class: int, data: str | None) -> None:
    """Raises ValueError (named as the command line's flags) unless the demo can run with these arguments."""
    from keras_autoprune.budget import Budget
    from keras_autoprune.datasets import check_image_source

    for flag, value, low in (("--epochs", epochs, 0), ("--finetune-epochs", finetune_epochs, 1),
                             ("--max-per-class", max_per_class, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Expected {flag} to be an integer >= {low}"
                             + (" (pruning happens while fine-tuning)" if flag == "--finetune-epochs" else "")
                             + f". Received: {flag} {value!r}")
    Budget(flops=flops)
    if data is not None:
        check_image_source(data)


def run_demo(
    data: str | None = None,
    epochs: int = 12,
    finetune_epochs: int = 6,
    flops: float = 0.5,
    out_dir: str | os.PathLike | None = None,
    max_per_class: int = 500,
    verbose: int = 1,
    image_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Runs the demo; returns the figures it prints.

    Args:
        data: None (digits), an image folder/archive or a TFDS name.
        epochs: training epochs before pruning.
        finetune_epochs: epochs of `fit` with the NAP callback (2 pruning
            rounds in the first two, fine-tuning after).
        flops: FLOPs budget (fraction kept).
        out_dir: where the ``.tflite`` files and the report plot go
            (default: a new temporary folder).
        max_per_class: images per class for folder/TFDS data.
        verbose: 0 silent, 1 the table and steps.
        image_size: ``(height, width)`` to resize folder/TFDS images to
            (default: their own size, which they must then share).

    Raises:
        ValueError: bad arguments (before any data is read), or data that cannot be read.
    """
    import keras_autoprune as kap
    from keras_autoprune.evaluation import accuracy
    from keras_autoprune.export import export_tflite, measure_latencies
    from keras_autoprune.export.images import classes_in_turn

    check_demo_arguments(epochs, finetune_epochs, flops, max_per_class, data)
    start = time.perf_counter()
    out = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="kap_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test), description = load_demo_data(data, max_per_class, image_size)
    classes = int(max(y_train.max(), y_test.max()) + 1)
    say(f"data: {description}")

    model = small_cnn(x_train.shape[1:], classes)
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    say(f"training the unpruned model for {epochs} epochs ...")
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    before = {"accuracy": accuracy(model, (x_test, y_test)), "params": kap.count_params(model), "flops": kap.count_flops(model)}
    original = keras.models.clone_model(model)
    original.set_weights(model.get_weights())

    rounds = min(2, finetune_epochs)
    callback = kap.NAPCallback((x_train, y_train), budget=kap.Budget(flops=flops), rounds=rounds, verbose=verbose)
    say(f"fit with NAPCallback(budget=Budget(flops={flops})) for {finetune_epochs} epochs ({rounds} pruning rounds) ...")
    model.fit(x_train, y_train, epochs=finetune_epochs, batch_size=64, verbose=0, callbacks=[callback])
    slim = callback.pruned_model
    after = {"accuracy": accuracy(slim, (x_test, y_test)), "params": kap.count_params(slim), "flops": kap.count_flops(slim)}

    say("exporting both models to TFLite and verifying them with LiteRT ...")
    sample = x_test[classes_in_turn(y_test, 64)]  # every class (folder data comes sorted by class)
    exports = {
        name: export_tflite(m, out / f"{name}.tflite", representative_data=sample)
        for name, m in (("original", original), ("pruned", slim))
    }
    latencies = measure_latencies([exports["original"].path, exports["pruned"].path], num_threads=1, runs=200)
    for figures, name, latency in ((before, "original", latencies[0]), (after, "pruned", latencies[1])):
        figures.update(tflite_bytes=exports[name].size_bytes, latency_ms=latency.median_ms, tflite_error=exports[name].relative_error)
    plot = callback.report.plot(out / "report.png")
    seconds = time.perf_counter() - start

    say("")
    say(f"{'':22s} {'original':>12s} {'pruned':>12s} {'kept':>8s}")
    say(f"{'test accuracy':22s} {before['accuracy']:12.4f} {after['accuracy']:12.4f}")
    for key, label, fmt in (
        ("params", "parameters", "{:12,d}"),
        ("flops", "FLOPs", "{:12,d}"),
        ("tflite_bytes", "TFLite size (bytes)", "{:12,d}"),
        ("latency_ms", "LiteRT latency (ms)", "{:12.3f}"),
    ):
        say(f"{label:22s} {fmt.format(before[key])} {fmt.format(after[key])} {after[key] / before[key]:8.1%}")
    say(f"\nTFLite files verified against Keras (relative error {after['tflite_error']:.1e}); in {out}")
    say(f"report plot: {plot}")
    say(f"total time: {seconds:.0f} s")
    return {"before": before, "after": after, "plot": str(plot), "out_dir": str(out), "seconds": seconds, "report": callback.report}
