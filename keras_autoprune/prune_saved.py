"""Pruning a saved ``.keras`` model on an image data set: what ``keras-autoprune prune`` runs.

The model is loaded in safe mode (``unsafe=True`` opts out: a ``.keras``
file with ``Lambda`` layers can then run arbitrary code), compiled if it was
saved uncompiled (SGD with Nesterov momentum 0.9 and a sparse cross-entropy,
``from_logits`` unless the last layer applies a softmax), and fine-tuned
``epochs`` epochs with the method's callback; pruning rounds run at the start
of the first ``min(2, epochs)`` epochs and the remaining epochs fine-tune the
pruned network. Images come from `keras_autoprune.datasets.load_images`
(a ``<root>/{train,test}/<class>/*`` folder, a ``.tar.gz`` of one, or a TFDS
name), resized to the model's input and scaled like ``keras-autoprune export``
(``unit``: [0, 1], ``symmetric``: [-1, 1], ``none``: raw [0, 255]).

**BatchNormalization statistics re-estimated after fine-tuning**
(``recalibrate=True``, the default). `fit` updates each moving statistic as
``moving <- m · moving + (1 − m) · batch`` (Keras' ``momentum`` m = 0.99),
so after ``k`` steps the statistics of the network before the last pruning
round still weigh ``m^k``: 85% after 16 steps (1,000 images in batches of
64), 5% only after about 300. Unless the fine-tuning after the last round
is long, the pruned network is evaluated and saved with the statistics of
a wider one. `kap.recalibrate_batchnorm` replaces them by their average
over up to `RECALIBRATION_IMAGES` training images (`recalibration_images`:
the images the fine-tuning reads, not augmented, as it reads them). On the
converged CIFAR-10 ResNet-20 of the benchmarks, NAP to 50% of the FLOPs
with 100 images per class and 2 epochs (``keras-autoprune prune ... --scale
none --max-per-class 100``), two runs: test accuracy 17.3% and 25.2% as
fine-tuned, 62.5% and 65.4% re-estimated (1,000 test images; 89.9% before
pruning).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np

from keras_autoprune.budget import Budget
from keras_autoprune.saved_paths import check_model_paths

METHODS = ("nap", "eigendamage", "psap", "magnitude")
CALIBRATION_IMAGES = 1024
RECALIBRATION_IMAGES = 2048


def parse_budget(text: str) -> Budget:
    """``"flops=0.5"`` or ``"params=0.3"`` -> `Budget`."""
    metric, _, value = text.partition("=")
    if metric not in ("flops", "params") or not value:
        raise ValueError(f"Expected --budget flops=F or params=F with F in (0, 1]. Received: --budget {text!r}. Fix: e.g. --budget flops=0.5")
    try:
        fraction = float(value)
    except ValueError:
        raise ValueError(f"Expected a number after '{metric}='. Received: --budget {text!r}. Fix: e.g. --budget flops=0.5") from None
    return Budget(**{metric: fraction})


@dataclasses.dataclass
class PruneOutcome:
    """What `prune_saved_model` produced: the slim model, its report, the accuracies and files."""

    pruned_model: object
    report: object
    accuracy_before: float | None
    accuracy_after: float | None
    seconds: float
    files: list[str]
    accuracy_finetuned: float | None = None  # before the BatchNormalization re-estimation, if one ran
    batchnorm_recalibrated: int = 0  # BatchNormalization layers re-estimated


def recalibration_images(x: np.ndarray, limit: int = RECALIBRATION_IMAGES) -> np.ndarray:
    """At most ``limit`` of the images ``x``, drawn without replacement (seed 0) and kept in their order."""
    if len(x) <= limit:
        return x
    return x[np.sort(np.random.default_rng(0).permutation(len(x))[:limit])]


def prune_saved_model(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    budget: Budget,
    out: str | os.PathLike,
    *,
    method: str = "nap",
    epochs: int = 2,
    scale: str = "unit",
    learning_rate: float = 0.01,
    batch_size: int = 64,
    max_per_class: int | None = None,
    tflite: str | os.PathLike | None = None,
    int8: str | os.PathLike | None = None,
    unsafe: bool = False,
    recalibrate: bool = True,
    log=print,
) -> PruneOutcome:
    """Loads, prunes while fine-tuning, evaluates, saves and optionally exports a model (module docstring).

    Raises:
        ValueError: bad arguments or files, before any training.
    """
    import keras

    import keras_autoprune as kap
    from keras_autoprune.datasets import check_image_source, load_images
    from keras_autoprune.evaluation import accuracy, output_activation
    from keras_autoprune.export.images import SCALES, classes_in_turn, to_channels

    if method not in METHODS:
        raise ValueError(f"Expected --method to be one of {METHODS}. Received: {method!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Expected --epochs >= 1 (pruning happens while training). Received: {epochs!r}")
    if scale not in SCALES:
        raise ValueError(f"Expected --scale to be one of {list(SCALES)}. Received: {scale!r}")
    for name, value, low in (("--batch-size", batch_size, 1), ("--max-per-class", max_per_class, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"Expected {name} to be an integer >= {low}. Received: {value!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real) or not learning_rate > 0:
        raise ValueError(f"Expected --learning-rate to be a number > 0. Received: {learning_rate!r}")
    check_model_paths(model_path, out, tflite, int8)
    check_image_source(data)
    if not isinstance(budget, Budget):
        raise ValueError(f"Expected `budget` to be a kap.Budget, e.g. kap.Budget(flops=0.5). Received: budget={budget!r}")
    start = time.perf_counter()
    model = keras.saving.load_model(model_path, safe_mode=not unsafe)
    shapes = [tuple(t.shape) for t in model.inputs]
    if len(shapes) != 1 or len(shapes[0]) != 4 or None in shapes[0][1:] or shapes[0][-1] not in (1, 3):
        raise ValueError("Expected a model with one image input (N, H, W, C) of known height and width and 1 or 3 "
                         f"channels. Received inputs {shapes}. Fix: prune other models from Python with a callback "
                         "(docs/callbacks.md), or save the model with a fixed input size.")
    height, width, channels = shapes[0][1:]
    multiplier, offset = SCALES[scale]

    def images(split, class_names=None):
        x, y, classes = load_images(data, split, image_size=(height, width), max_per_class=max_per_class,
                                    class_names=class_names)
        return (to_channels(x, channels) * multiplier + offset).astype("float32"), y, classes

    x_train, y_train, classes = images("train")
    try:
        test = images("test", classes)[:2]  # the training split's class ids
    except FileNotFoundError:  # no test split: no accuracy is reported (said below)
        test = None
    log(f"data: {len(x_train)} training images, {0 if test is None else len(test[0])} test images, {len(classes)} classes")
    if getattr(model, "loss", None) is None:
        from_logits = output_activation(model) != "softmax"
        model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits), metrics=["accuracy"])
    accuracy_before = accuracy(model, test, batch_size) if test is not None else None
    order = np.random.default_rng(0).permutation(len(x_train))[:CALIBRATION_IMAGES]
    calibration = (x_train[order], y_train[order])
    rounds = min(2, epochs)
    options = {"rounds": rounds, "verbose": 1}
    calibration_options = {"num_batches": max(1, len(order) // batch_size), "batch_size": batch_size}
    callback = {
        "nap": lambda: kap.NAPCallback(calibration, budget=budget, **calibration_options, **options),
        "eigendamage": lambda: kap.EigenDamageCallback(calibration, budget=budget, **calibration_options, **options),
        "psap": lambda: kap.PSAPCallback(budget, calibration, **calibration_options, **options),
        "magnitude": lambda: kap.MagnitudeCallback(budget, **options),
    }[method]()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, callbacks=[callback],
              verbose=1 if sys.stdout.isatty() else 2)
    slim = callback.pruned_model
    accuracy_after = accuracy(slim, test, batch_size) if test is not None else None
    accuracy_finetuned, recalibrated = None, 0
    if recalibrate:
        images = recalibration_images(x_train)
        recalibrated = kap.recalibrate_batchnorm(slim, images, batch_size=batch_size)
        if recalibrated:
            log(f"BatchNormalization statistics re-estimated on {len(images)} training images ({recalibrated} layers)")
            accuracy_finetuned = accuracy_after
            accuracy_after = accuracy(slim, test, batch_size) if test is not None else None
    slim.save(out)
    files = [str(out)]
    for path, quantize in ((tflite, None), (int8, "int8")):
        if path is not None:
            x_sample, y_sample = test if test is not None else (x_train, y_train)
            sample = x_sample[classes_in_turn(y_sample, 100)]  # every class, not the first folder's images
            result = kap.export_tflite(slim, path, quantize=quantize, representative_data=sample)
            log(result.summary())
            files.append(str(path))
    return PruneOutcome(slim, callback.report, accuracy_before, accuracy_after, time.perf_counter() - start, files,
                        accuracy_finetuned, recalibrated)


def describe_model(model_path: str | os.PathLike, unsafe: bool = False, input_shape: Any = None) -> str:
    """The per-layer FLOPs and parameters table of a saved model, with its totals (``keras-autoprune report``).

    ``input_shape`` (without the batch axis) counts the FLOPs of a model whose inputs have unknown sizes, as in
    `kap.count_flops`.
    """
    import keras

    import keras_autoprune as kap

    if not pathlib.Path(model_path).is_file():
        raise ValueError(f"Expected a saved model file (.keras). Received: '{model_path}', which does not exist.")
    model = keras.saving.load_model(model_path, safe_mode=not unsafe, compile=False)
    table = kap.format_table(kap.flops_table(model, input_shape))
    graph = kap.DependencyGraph(model)
    prunable = sum(group.size for group in graph.prunable_groups)
    total = sum(group.size for group in graph.groups)
    return (f"{table}\n\nmodel '{model.name}': {kap.count_params(model):,} parameters, {kap.count_flops(model, input_shape):,} FLOPs per "
            f"example; {len(graph.prunable_groups)} prunable channel groups ({prunable} of {total} channels)")
