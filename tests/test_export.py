"""Export: TFLite (float32, dynamic, float16, int8), SavedModel, latency, .keras.

Real-image tests use CIFAR-10 JPEGs from ``../shared/data`` (beside the
repository); they are skipped, with the reason, only where the archive is
absent.
"""

from __future__ import annotations

import pathlib
import tarfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import keras_autoprune as kap
from keras_autoprune.errors import ExportError, UnsupportedModelError, VerificationError
from keras_autoprune.export import (
    export_saved_model,
    export_tflite,
    measure_latencies,
    measure_latency,
    verify_tflite,
)
from keras_autoprune.export import tflite as tflite_module
from keras_autoprune.export.data import sample_inputs
from keras_autoprune.export.flex import unsupported_ops
from keras_autoprune.export.verify import Figures, check_figures

CIFAR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
needs_cifar = pytest.mark.skipif(not CIFAR.is_file(), reason=f"CIFAR-10 JPEG archive not found at {CIFAR}")


# -- shared helpers (also used by test_cli.py) ------------------------------
def extract_cifar(dest: pathlib.Path, per_class: dict[str, int]) -> pathlib.Path:
    """Extracts the first ``per_class[split]`` images of each class into ``dest/<split>/<class>/``.

    Only the members needed are written; the archive is streamed once.
    """
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR) as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class:
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) >= per_class[parts[0]]:
                continue
            counts[key] = counts.get(key, 0) + 1
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    return dest


def read_split(root: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes ``root/<split>/<class>/*.jpg`` to ``(x in [0, 1], labels)``."""
    images, labels = [], []
    for label, name in enumerate(CIFAR_CLASSES):
        for path in sorted((root / split / name).glob("*.jpg")):
            images.append(tf.io.decode_jpeg(tf.io.read_file(str(path))).numpy())
            labels.append(label)
    return np.stack(images).astype("float32") / 255.0, np.array(labels)


def calibrate_batchnorm(model: keras.Model, x: np.ndarray) -> None:
    """Sets every BatchNormalization's moving statistics to those of ``x``.

    Untrained deep nets lose the input signal (all samples give the same
    output); with calibrated statistics their outputs depend on the input,
    so that comparisons with exported files mean something.
    """
    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum


def prune(model: keras.Model, ratio: float = 0.3) -> keras.Model:
    graph = kap.DependencyGraph(model)
    return kap.apply_plan(model, kap.PrunePlan.uniform(graph, ratio), graph)


def small_cnn(classes: int = 10) -> keras.Model:
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for _ in range(2):
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x))


def resnet_style() -> keras.Model:
    """Two residual blocks (identity and strided projection), 32x32 inputs."""
    def conv_bn(x, filters, strides=1, relu=True):
        x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        return keras.layers.ReLU()(x) if relu else x

    inputs = keras.Input((32, 32, 3))
    x = conv_bn(inputs, 16)
    x = keras.layers.ReLU()(keras.layers.Add()([x, conv_bn(conv_bn(x, 16), 16, relu=False)]))
    shortcut = keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 1, strides=2, use_bias=False)(x))
    x = keras.layers.ReLU()(keras.layers.Add()([shortcut, conv_bn(conv_bn(x, 16, strides=2), 16, relu=False)]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def random_inputs(shape: tuple, count: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, *shape)).astype("float32")


def run_litert(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    """Runs a float file sample by sample through the plain tensor API."""
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    outputs = []
    for sample in x:
        interpreter.set_tensor(source["index"], sample[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(target["index"])[0])
    return np.stack(outputs)


# -- fixtures ------------------------------------------------------------------
def _pruned_application(name: str, **kwargs) -> tuple[keras.Model, keras.Model]:
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None, **kwargs)
    slim = prune(model)
    calibrate_batchnorm(slim, random_inputs((64, 64, 3), count=16, seed=0))
    return model, slim


@pytest.fixture(scope="module")
def mobilenet_v2():
    return _pruned_application("MobileNetV2", alpha=0.35)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    if not CIFAR.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {CIFAR}")
    root = extract_cifar(tmp_path_factory.mktemp("cifar"), {"train": 20, "test": 10})
    return read_split(root, "train"), read_split(root, "test")


@pytest.fixture(scope="module")
def trained_cnn(cifar):
    """A small CNN trained a few steps on 200 CIFAR images, then pruned by 25%."""
    (x_train, y_train), _ = cifar
    keras.utils.set_random_seed(0)
    model = small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=8, batch_size=20, verbose=0)
    return prune(model, 0.25)


@pytest.fixture(scope="module")
def float_file(trained_cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "cnn.tflite"
    return export_tflite(trained_cnn, path, num_samples=16)


# -- float32 -------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [
    ("MobileNetV2", {"alpha": 0.35}),
    # Squeeze-excite Multiply, hard-swish. Without its Rescaling layer: it maps
    # the [-1, 1) random inputs to -1 ± 0.008, and normalising such inputs
    # amplifies float32 rounding in Keras itself to ~1e-4 (vs float64).
    ("MobileNetV3Small", {"include_preprocessing": False}),
])
def test_float32_matches_pruned_application(name, kwargs, mobilenet_v2, tmp_path):
    model, slim = mobilenet_v2 if name == "MobileNetV2" else _pruned_application(name, **kwargs)
    assert kap.count_params(slim) < kap.count_params(model)
    path = tmp_path / "slim.tflite"

    result = export_tflite(slim, path, num_samples=16)

    assert result.path == path and result.size_bytes == path.stat().st_size
    assert (result.format, result.quantize, result.verified, result.num_samples) == ("tflite", None, True, 16)
    assert result.relative_error <= 1e-4
    assert result.top1_agreement == 1.0
    # Independently of the verifier: the plain tensor API on new inputs.
    x = random_inputs((64, 64, 3), count=4, seed=7)
    expected = slim(x, training=False).numpy()
    assert np.abs(expected.std(axis=0)).mean() > 1e-3  # outputs depend on the input
    error = np.abs(run_litert(path, x) - expected).max() / np.abs(expected).max()
    assert error <= 1e-4


def test_float32_via_saved_model_gives_the_same_outputs(trained_cnn, float_file, tmp_path, monkeypatch):
    from keras_autoprune.export import convert as convert_module

    sources = []
    real = convert_module._saved_model_source

    def recorded(model, scratch):  # the library's own path, recorded: it must be the one converting
        sources.append(model.name)
        return real(model, scratch)

    monkeypatch.setattr(convert_module, "_saved_model_source", recorded)
    result = export_tflite(trained_cnn, tmp_path / "sm.tflite", via="saved_model", num_samples=16)
    assert sources == [trained_cnn.name]
    x = random_inputs((32, 32, 3))
    np.testing.assert_allclose(run_litert(result.path, x), run_litert(float_file.path, x), rtol=0, atol=1e-5)


# -- quantized -----------------------------------------------------------------
@needs_cifar
@pytest.mark.parametrize("quantize, max_relative_error", [("float16", 5e-3), ("dynamic", 3e-2)])
def test_dynamic_and_float16_agree_closely(quantize, max_relative_error, trained_cnn, cifar, tmp_path):
    _, (x_test, _) = cifar
    result = export_tflite(trained_cnn, tmp_path / f"{quantize}.tflite", quantize=quantize,
                           representative_data=x_test)
    assert (result.quantize, result.num_samples) == (quantize, 100)
    assert result.relative_error <= max_relative_error
    assert result.top1_agreement >= 0.95


@needs_cifar
@pytest.mark.parametrize("int8_io", [False, True])
def test_int8_on_real_images_reports_top1_agreement(int8_io, trained_cnn, cifar, tmp_path):
    _, (x_test, y_test) = cifar
    dataset = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(25)
    path = tmp_path / "int8.tflite"

    result = export_tflite(trained_cnn, path, quantize="int8", representative_data=dataset,
                           int8_io=int8_io, min_top1_agreement=0.85)

    # Measured on TF 2.21: 96% agreement, relative error 0.012 (100 test images).
    assert result.num_samples == 100
    assert 0.85 <= result.top1_agreement <= 1.0
    assert result.relative_error <= 0.1
    (source,) = Interpreter(model_path=str(path)).get_input_details()
    assert source["dtype"] == (np.int8 if int8_io else np.float32)
    again = verify_tflite(path, trained_cnn, [x_test])
    assert (again.top1_agreement, again.max_abs_error) == (result.top1_agreement, result.max_abs_error)


def test_check_figures_raises_on_thresholds_only():
    figures = Figures(max_abs_error=0.02, relative_error=0.01, top1_agreement=0.9, num_samples=50)
    check_figures(figures, "file", tolerance=0.05, min_top1_agreement=0.9)
    check_figures(figures, "file", tolerance=None, min_top1_agreement=None)
    with pytest.raises(VerificationError, match="relative error of 0.001. Received: relative error 0.01"):
        check_figures(figures, "float32 TFLite file m.tflite", tolerance=1e-3, min_top1_agreement=None)
    with pytest.raises(VerificationError, match=r"at least 95.00% of 50 samples. Received: top-1 agreement 0.9000"):
        check_figures(figures, "int8 TFLite file m.tflite", tolerance=None, min_top1_agreement=0.95)


# -- SavedModel ------------------------------------------------------------------
def _cancelling_model(seed=0):
    """Two nearly equal Dense layers subtracted: float32 rounding alone moves the output by ~1e-3 (relative)."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((512,))
    a, b = keras.layers.Dense(64, use_bias=False), keras.layers.Dense(64, use_bias=False)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Subtract()([a(inputs), b(inputs)])))
    w = rng.normal(size=(512, 64)).astype("float32")
    a.set_weights([w])
    b.set_weights([(w * (1 + 1e-4 * rng.normal(size=w.shape))).astype("float32")])
    return model, rng.uniform(-1, 1, (32, 512)).astype("float32")


def test_float32_file_of_a_rounding_sensitive_model_is_verified_against_float64(tmp_path):
    from keras_autoprune.export.rounding import FACTOR, float64_copy, rounding_check

    model, x = _cancelling_model()
    copy = float64_copy(model)
    assert {layer.compute_dtype for layer in copy.layers[1:]} == {"float64"}
    assert all(np.array_equal(w64, w32) for w64, w32 in zip(copy.get_weights(), model.get_weights()))
    assert model.layers[1].compute_dtype == "float32"  # the user's model is untouched

    result = kap.export_tflite(model, tmp_path / "m.tflite", representative_data=x, num_samples=32)
    assert result.verified and result.relative_error > 1e-4  # beyond the tolerance, yet verified ...
    assert "verified against float64" in result.note and "note" in result.summary()
    expected = [np.asarray(model(x))]
    check = rounding_check(model, [x], expected, [np.asarray(Interpreter(str(result.path)).get_signature_runner()(input_0=x)["output_0"])])
    assert 1e-4 < check.keras_error and check.file_error <= FACTOR * check.keras_error  # ... as Keras itself rounds
    # A file far worse than the model's own rounding is still refused, and the message says what float64 showed.
    wrong = rounding_check(model, [x], expected, [expected[0] + 10 * FACTOR * check.keras_error * np.max(np.abs(expected[0]))])
    assert not wrong.passes(1e-4)
    with pytest.raises(VerificationError, match="float64 copy of the model, Keras float32 is"):
        check_figures(Figures(1.0, 0.01, None, 32), "float32 file", 1e-4, None, wrong.describe())


def test_a_file_that_fails_verification_leaves_the_previous_file_in_place(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    model = keras.Model(inputs, keras.layers.Dense(200)(inputs))  # 200 close logits: int8 flips some top-1 classes
    x = np.random.default_rng(0).uniform(-1, 1, (100, 16)).astype("float32")
    path = tmp_path / "m.tflite"
    path.write_bytes(b"previous")
    with pytest.raises(VerificationError, match="top-1 agreement 0.99.*kept at .*m.unverified.tflite.*was not written"):
        kap.export_tflite(model, path, quantize="int8", representative_data=x, num_samples=100, min_top1_agreement=1.0)
    assert path.read_bytes() == b"previous"
    failed = tmp_path / "m.unverified.tflite"
    assert verify_tflite(failed, model, [x]).top1_agreement == pytest.approx(0.99)  # kept for inspection
    result = kap.export_tflite(model, path, quantize="int8", representative_data=x, num_samples=100)
    assert result.verified and result.size_bytes == path.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]  # the next export to `path` reuses that name


def test_float64_copy_refuses_mixed_precision():
    from keras_autoprune.export.rounding import float64_copy

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, dtype="mixed_float16")(inputs))
    assert float64_copy(model) is None


def test_saved_model_serving_layout_and_signature(tmp_path):
    keras.utils.set_random_seed(0)
    model = prune(resnet_style())
    calibrate_batchnorm(model, random_inputs((32, 32, 3), count=16, seed=0))
    base = tmp_path / "serving" / "resnet"  # created with its parent

    first = export_saved_model(model, base, num_samples=8)
    second = export_saved_model(model, base)

    assert (first.path, second.path) == (base / "1", base / "2")
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # no staging leftovers
    assert (base / "1" / "saved_model.pb").is_file() and (base / "1" / "variables").is_dir()
    assert first.relative_error <= 1e-5 and first.num_samples == 8 and second.num_samples == 32
    signature = tf.saved_model.load(str(first.path)).signatures["serving_default"]
    assert list(signature.structured_input_signature[1]) == ["input_0"]
    assert list(signature.structured_outputs) == ["output_0"]
    x = random_inputs((32, 32, 3))
    served = signature(input_0=tf.constant(x))["output_0"].numpy()
    np.testing.assert_allclose(served, model(x, training=False).numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="Received: version=2, but .* exists"):
        export_saved_model(model, base, version=2)
    assert export_saved_model(model, base, version=7).path == base / "7"
    # The DESIGN.md form: a path ending in the version number.
    assert export_saved_model(model, tmp_path / "serving" / "other" / "3").path == tmp_path / "serving" / "other" / "3"


# -- Flex ops -------------------------------------------------------------------
def _erf_model() -> keras.Model:
    inputs = keras.Input((8,))
    return keras.Model(inputs, keras.ops.erf(keras.layers.Dense(4)(inputs)))


def test_flex_op_fails_naming_the_op_and_the_option(tmp_path):
    with pytest.raises(ExportError) as error:
        export_tflite(_erf_model(), tmp_path / "erf.tflite")
    message = str(error.value)
    assert "TensorFlow Select (Flex) op(s) Erf" in message
    assert "`allow_flex=True`" in message
    assert not (tmp_path / "erf.tflite").exists()


def test_allow_flex_writes_an_unverified_file(tmp_path):
    with pytest.warns(UserWarning, match=r"holds Flex ops \(Erf\) and was not verified"):
        result = export_tflite(_erf_model(), tmp_path / "erf.tflite", allow_flex=True)
    assert (result.verified, result.flex_ops, result.max_abs_error) == (False, ("Erf",), None)
    assert result.size_bytes == (tmp_path / "erf.tflite").stat().st_size


def test_unsupported_ops_reads_converter_messages():
    message = (
        "error: failed while converting: 'main':\nSome ops are not supported by the native TFLite "
        "runtime\nTF Select ops: Erf, Lgamma\nDetails:\n\ttf.Erf(tensor<?x8xf32>)\n"
        "Custom ops: Erfinv\n"
    )
    assert unsupported_ops(message) == (("Erf", "Lgamma"), ("Erfinv",))
    assert unsupported_ops("'tf.Erf' op is neither a custom op nor a flex op") == (("Erf",), ())
    assert unsupported_ops("some other converter failure") == ((), ())


# -- arguments are checked before any work ------------------------------------------
@pytest.fixture
def tiny_model():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"quantize": "int4"}, ValueError, r"one of \[None, 'dynamic', 'float16', 'int8'\]. Received: quantize='int4'"),
    ({"quantize": "int8"}, ValueError, "Received: representative_data=None"),
    ({"int8_io": True}, ValueError, "Received: quantize=None, int8_io=True"),
    ({"tolerance": -1.0}, ValueError, "Received: tolerance=-1.0"),
    ({"min_top1_agreement": 95}, ValueError, "Received: min_top1_agreement=95"),
    ({"num_samples": 0}, ValueError, "Received: num_samples=0"),
    ({"via": "onnx"}, ValueError, "Received: via='onnx'"),
    ({"representative_data": np.zeros((4, 8, 8, 3))}, ValueError,
     r"shape \(batch, 6, 6, 3\) for model input 0. Received: an array of shape \(4, 8, 8, 3\)"),
    ({"representative_data": np.zeros((6, 6, 3))}, ValueError, r"add the batch axis"),
    ({"representative_data": tf.data.Dataset.from_tensor_slices(np.zeros((4, 6, 6, 3)))}, ValueError,
     r"batched tf.data.Dataset.*Fix: batch it"),
    ({"representative_data": {"x": 1}}, TypeError, "Received: representative_data of type dict"),
    ({"representative_data": []}, ValueError, "at least one sample"),
])
def test_bad_arguments_fail_before_conversion(kwargs, error, match, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tflite_module, "convert", _must_not_run)
    with pytest.raises(error, match=match):
        export_tflite(tiny_model, tmp_path / "m.tflite", **kwargs)
    assert not (tmp_path / "m.tflite").exists()


def test_bad_model_and_path_fail_before_conversion(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tflite_module, "convert", _must_not_run)
    with pytest.raises(UnsupportedModelError, match="Received: model of type str"):
        export_tflite("model.keras", tmp_path / "m.tflite")
    with pytest.raises(ValueError, match="directory '.*missing' does not exist"):
        export_tflite(tiny_model, tmp_path / "missing" / "m.tflite")
    with pytest.raises(ValueError, match="an existing directory"):
        export_tflite(tiny_model, tmp_path)


def _must_not_run(*args, **kwargs):
    raise AssertionError("conversion started although the arguments are invalid")


def test_representative_data_forms_give_the_same_samples(tiny_model):
    x = np.arange(10 * 6 * 6 * 3, dtype="float32").reshape(10, 6, 6, 3)
    y = np.arange(10)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    forms = {
        "array": x,
        "tuple": (x, y),
        "dataset of x": tf.data.Dataset.from_tensor_slices(x).batch(3),
        "dataset of (x, y)": tf.data.Dataset.from_tensor_slices((x, y)).batch(4),
        "list of (x, y)": batches,
        "generator of [x]": ([b[0]] for b in batches),
        "function": lambda: iter(batches),
    }
    for name, data in forms.items():
        (samples,) = sample_inputs(tiny_model, data, num_samples=7)
        np.testing.assert_array_equal(samples, x[:7], err_msg=name)
    (random,) = sample_inputs(tiny_model, None, num_samples=5)
    assert random.shape == (5, 6, 6, 3) and -1 <= random.min() and random.max() < 1


# -- latency --------------------------------------------------------------------------
def test_latency_is_positive_and_ordered(tiny_model, tmp_path):
    path = export_tflite(tiny_model, tmp_path / "tiny.tflite", num_samples=4).path
    result = measure_latency(path, num_threads=1, warmup=2, runs=20)
    assert result.runs == len(result.times_ms) == 20 and result.num_threads == 1
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms
    assert result.median_ms == pytest.approx(float(np.median(result.times_ms)))
    pair = measure_latencies([path, path], warmup=0, runs=10, rounds=3)
    assert [r.runs for r in pair] == [10, 10]
    with pytest.raises(ValueError, match="Received: runs=0"):
        measure_latency(path, runs=0)
    with pytest.raises(ValueError, match="a list of .tflite paths.*Received: one path"):
        measure_latencies(str(path))  # before: timed each character of the path


# -- .keras round trip ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["MobileNetV2", "resnet_style"])
def test_pruned_model_round_trips_through_keras_file(name, mobilenet_v2, tmp_path):
    if name == "MobileNetV2":
        slim = mobilenet_v2[1]
    else:
        keras.utils.set_random_seed(0)
        slim = prune(resnet_style())
    path = tmp_path / "slim.keras"
    slim.save(path)

    loaded = keras.saving.load_model(path)  # no custom_objects

    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in slim.layers]
    assert loaded.count_params() == slim.count_params()
    x = random_inputs(tuple(slim.inputs[0].shape[1:]), count=4)
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), slim(x, training=False).numpy())
