"""The keras.applications model zoo, as used by the sweep test and docs."""

from __future__ import annotations

import importlib
import inspect
import time

import keras
import numpy as np

import keras_autoprune as kap

#: (constructor name, input size). Sizes are the smallest each accepts easily.
ARCHITECTURES = [
    ("ConvNeXtBase", 64), ("ConvNeXtLarge", 64), ("ConvNeXtSmall", 64), ("ConvNeXtTiny", 64),
    ("ConvNeXtXLarge", 64), ("DenseNet121", 64), ("DenseNet169", 64), ("DenseNet201", 64),
    ("EfficientNetB0", 64), ("EfficientNetB1", 64), ("EfficientNetB2", 64), ("EfficientNetB3", 64),
    ("EfficientNetB4", 64), ("EfficientNetB5", 64), ("EfficientNetB6", 64), ("EfficientNetB7", 64),
    ("EfficientNetV2B0", 64), ("EfficientNetV2B1", 64), ("EfficientNetV2B2", 64), ("EfficientNetV2B3", 64),
    ("EfficientNetV2L", 64), ("EfficientNetV2M", 64), ("EfficientNetV2S", 64),
    ("InceptionResNetV2", 75), ("InceptionV3", 75), ("MobileNet", 64), ("MobileNetV2", 64),
    ("MobileNetV3Large", 64), ("MobileNetV3Small", 64), ("NASNetLarge", 331), ("NASNetMobile", 224),
    ("ResNet101", 64), ("ResNet101V2", 64), ("ResNet152", 64), ("ResNet152V2", 64), ("ResNet50", 64),
    ("ResNet50V2", 64), ("VGG16", 64), ("VGG19", 64), ("Xception", 71),
]

#: Built in the default test run; the rest are marked slow.
FAST = {"MobileNetV2", "MobileNetV3Small", "ResNet50", "EfficientNetB0", "DenseNet121", "VGG16", "NASNetMobile", "ConvNeXtTiny", "Xception", "InceptionV3", "MobileNet"}


def build(name: str, size: int) -> keras.Model:
    constructor = getattr(keras.applications, name)
    kwargs = dict(weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None)
    if name.startswith("MobileNetV3"):
        kwargs["include_preprocessing"] = True
    return constructor(**kwargs)


def randomized(name: str, size: int) -> keras.Model:
    """`build`, then every weight drawn as in the docs (`tests.helpers.randomize`, scale 0.05)."""
    from tests.helpers import randomize

    model = build(name, size)
    randomize(model, scale=0.05)
    return model


def images(name: str, size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` random images in the model's input range.

    Uniform pixels in [0, 255] through the architecture's own
    ``preprocess_input`` (caffe, torch or [-1, 1] scaling; the identity for
    models that rescale inside: EfficientNet, ConvNeXt, MobileNetV3).
    """
    module = importlib.import_module(getattr(keras.applications, name).__module__)
    pixels = np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")
    return np.asarray(module.preprocess_input(pixels), dtype="float32")


def timed_surgery(model: keras.Model, ratio: float):
    """``(graph, apply_plan, mask_plan, graph seconds, apply seconds)`` for the uniform plan."""
    start = time.perf_counter()
    graph = kap.DependencyGraph(model)
    graph_s = time.perf_counter() - start
    plan = kap.PrunePlan.uniform(graph, ratio)
    start = time.perf_counter()
    slim = kap.apply_plan(model, plan, graph)
    apply_s = time.perf_counter() - start
    return graph, slim, kap.mask_plan(model, plan, graph), graph_s, apply_s


def sweep_one(name: str, size: int, ratio: float = 0.3) -> dict:
    """Graph + uniform plan + both executions; returns figures for the docs."""
    from tests.helpers import relative_error

    model = randomized(name, size)
    graph, slim, masked, graph_s, apply_s = timed_surgery(model, ratio)
    x = np.random.default_rng(0).normal(0, 1, (1, size, size, 3)).astype("float32")
    expected, received = np.asarray(masked(x)), np.asarray(slim(x))
    channels = sum(g.size for g in graph.groups)
    prunable = sum(g.size for g in graph.prunable_groups)
    return dict(
        name=name,
        size=size,
        groups=len(graph.groups),
        prunable_groups=len(graph.prunable_groups),
        prunable_share=prunable / channels,
        params=model.count_params(),
        params_after=slim.count_params(),
        out_shape=tuple(model.output.shape),
        out_shape_after=tuple(slim.output.shape),
        error=relative_error(received, expected),
        output_scale=float(np.max(np.abs(expected))),
        graph_s=graph_s,
        apply_s=apply_s,
        unknown=list(graph.unknown_layers),
        slim=slim,
        model=model,
    )


#: Exported in the default test run (float32 and int8, ~40 s on 2 busy cores); the rest are marked slow.
EXPORT_FAST = {"MobileNetV3Small"}
#: Representative images per export: int8 calibration and LiteRT verification.
EXPORT_SAMPLES = 16
#: Largest float32 relative error accepted: `kap.export_tflite`'s default ``tolerance``.
FLOAT32_TOLERANCE = inspect.signature(kap.export_tflite).parameters["tolerance"].default
#: Lowest int8 top-1 agreement with Keras accepted (``min_top1_agreement``). Low on purpose:
#: these untrained nets quantize poorly (38-69% measured; TF's own converter gives the same
#: files and figures), trained ones agree on 96% (tests/test_export.py). 2.5x chance for 10 classes.
INT8_MIN_TOP1 = 0.25
#: Largest int8 relative error accepted: below 1, a file closer to Keras than an all-zero output.
INT8_MAX_RELATIVE_ERROR = 1.0


def pruned(name: str, size: int, ratio: float = 0.3) -> tuple[keras.Model, keras.Model]:
    """``(model, apply_plan(model, uniform plan))`` with the weights of the surgery sweep."""
    model = randomized(name, size)
    graph = kap.DependencyGraph(model)
    return model, kap.apply_plan(model, kap.PrunePlan.uniform(graph, ratio), graph)


def export_case(name: str, size: int, ratio: float = 0.3) -> tuple[keras.Model, keras.Model, np.ndarray]:
    """``(model, slim, images)`` for the export sweep.

    `pruned`, then the slim model's BatchNormalization statistics
    re-estimated on the `EXPORT_SAMPLES` images (`kap.recalibrate_batchnorm`):
    with the sweep's random weights and statistics, deep nets otherwise
    give the same output for every input, and comparing files on them
    would check little more than the biases.
    """
    model, slim = pruned(name, size, ratio)
    x = images(name, size, EXPORT_SAMPLES)
    kap.recalibrate_batchnorm(slim, x)
    return model, slim, x


def timed_export(model: keras.Model, path, quantize: str | None, data: np.ndarray, check: bool = True):
    """``(kap.export_tflite(...), seconds)`` on ``data``.

    With ``check``, float32 is verified to `FLOAT32_TOLERANCE` and int8 to
    a top-1 agreement of `INT8_MIN_TOP1` (`kap.VerificationError`
    otherwise); without, the figures are only reported.
    """
    start = time.perf_counter()
    result = kap.export_tflite(
        model, path, quantize=quantize, representative_data=data, num_samples=len(data),
        tolerance=FLOAT32_TOLERANCE if check else None,
        min_top1_agreement=INT8_MIN_TOP1 if check and quantize == "int8" else None,
    )
    return result, time.perf_counter() - start
