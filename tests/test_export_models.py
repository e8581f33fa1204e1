"""Export of every model Keras can export (issue 13, deliverable 5).

swish/silu activations, several inputs and outputs, dict inputs with
integer dtypes (token ids, padding mask), dict outputs; float32 and int8;
each file run with LiteRT. And the signature check: a converted file
without ``serving_default`` falls back to the other path or fails clearly.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import keras_autoprune as kap
from keras_autoprune.export import convert as convert_module
from keras_autoprune.export import export_saved_model, export_tflite
from keras_autoprune.export.data import sample_inputs
from keras_autoprune.export.signature import input_names, input_specs, output_names, serving_function
from keras_autoprune.export.tflite_signature import file_signatures, signature_problem

L = keras.layers
VOCAB, LENGTH = 20, 7
# int8 calibration inside TF's converter still uses tf.lite.Interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")


def swish_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="swish")(inputs)
    x = L.Activation("silu")(L.Conv2D(6, 1)(x))
    x = x * keras.ops.sigmoid(x)
    return keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(x)))


def two_in_two_out() -> keras.Model:
    keras.utils.set_random_seed(0)
    a, b = keras.Input((6,), name="a"), keras.Input((4, 4, 2), name="b")
    x = L.Concatenate()([L.Dense(5, activation="relu")(a), L.Flatten()(L.Conv2D(3, 1)(b))])
    return keras.Model([a, b], [L.Dense(4, name="logits")(x), L.Dense(1, name="score")(x)])


def text_model() -> keras.Model:
    """Dict inputs (int32 token ids and padding mask) and dict outputs."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((LENGTH,), dtype="int32", name="token_ids")
    mask = keras.Input((LENGTH,), dtype="int32", name="padding_mask")
    m = keras.ops.expand_dims(keras.ops.cast(mask, "float32"), -1)
    x = L.Dense(8, activation="gelu")(L.Embedding(VOCAB, 8)(ids) * m)
    pooled = keras.ops.sum(x * m, axis=1) / (keras.ops.sum(m, axis=1) + 1.0)
    outputs = {"sequence": L.Dense(2)(x), "logits": L.Dense(3)(pooled)}
    return keras.Model({"token_ids": ids, "padding_mask": mask}, outputs)


def text_data(count: int = 24, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, LENGTH + 1, (count, 1))
    return {"token_ids": rng.integers(0, VOCAB, (count, LENGTH)).astype("int32"),
            "padding_mask": (np.arange(LENGTH) < lengths).astype("int32")}


def run_signature(path, feed: dict) -> dict:
    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return runner(**feed)


def test_swish_and_silu_float32_is_verified(tmp_path):
    model = swish_model()
    result = export_tflite(model, tmp_path / "swish.tflite", num_samples=8)
    assert result.verified and result.relative_error <= 1e-5
    signatures = file_signatures((tmp_path / "swish.tflite").read_bytes())
    assert signatures == {"serving_default": (["input_0"], ["output_0"])}
    x = np.random.default_rng(3).uniform(-1, 1, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(run_signature(result.path, {"input_0": x})["output_0"], model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_efficientnet_b0_float32_is_verified(tmp_path):
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    result = export_tflite(model, tmp_path / "effb0.tflite", representative_data=x, num_samples=8)
    assert result.verified and result.relative_error <= 1e-4


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_several_inputs_and_outputs(quantize, tmp_path):
    model = two_in_two_out()
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 4, 4, 2)).astype("float32"))
    result = export_tflite(model, tmp_path / "m.tflite", quantize=quantize, representative_data=data, num_samples=32)
    signature = file_signatures(result.path.read_bytes())["serving_default"]
    assert signature == (["input_0", "input_1"], ["output_0", "output_1"])
    assert result.num_samples == 32
    if quantize is None:
        assert result.relative_error <= 1e-5
        received = run_signature(result.path, {"input_0": data[0][:3], "input_1": data[1][:3]})
        for name, expected in zip(["output_0", "output_1"], model([data[0][:3], data[1][:3]])):
            np.testing.assert_allclose(received[name], expected, rtol=1e-5, atol=1e-6)
    else:
        assert result.relative_error < 0.05 and result.top1_agreement >= 0.9


@pytest.mark.parametrize("quantize, int8_io", [(None, False), ("int8", False), ("int8", True)])
def test_dict_integer_inputs_and_dict_outputs(quantize, int8_io, tmp_path):
    model = text_model()
    assert input_names(model) == ["padding_mask", "token_ids"] and output_names(model) == ["logits", "sequence"]
    data = text_data()
    result = export_tflite(model, tmp_path / "text.tflite", quantize=quantize, int8_io=int8_io,
                           representative_data=data, num_samples=24)
    assert sorted(file_signatures(result.path.read_bytes())["serving_default"][0]) == ["padding_mask", "token_ids"]
    runner = Interpreter(model_path=str(result.path)).get_signature_runner("serving_default")
    dtypes = {k: d["dtype"] for k, d in runner.get_input_details().items()}
    assert dtypes == {"padding_mask": np.int32, "token_ids": np.int32}
    if quantize is None:
        assert result.relative_error <= 1e-5
        feed = {k: v[:3] for k, v in data.items()}
        received, expected = runner(**feed), model(feed)
        for key in ("logits", "sequence"):
            np.testing.assert_allclose(received[key], expected[key], rtol=1e-5, atol=1e-6)
    else:
        assert result.relative_error < 0.05 and result.top1_agreement >= 0.9
        out_dtype = runner.get_output_details()["logits"]["dtype"]
        assert out_dtype == (np.int8 if int8_io else np.float32)


def test_dict_model_saved_model_keeps_the_keys(tmp_path):
    model = text_model()
    result = export_saved_model(model, tmp_path / "serving", representative_data=text_data())
    assert result.relative_error <= 1e-5
    signature = tf.saved_model.load(str(result.path)).signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == ["padding_mask", "token_ids"]
    assert sorted(signature.structured_outputs) == ["logits", "sequence"]


def test_dict_representative_data_forms_give_the_same_samples():
    model = text_model()
    data = text_data(10)
    y = np.arange(10)
    forms = {
        "dict": data,
        "(dict, y)": (data, y),
        "dataset of dicts": tf.data.Dataset.from_tensor_slices(data).batch(3),
        "dataset of (dict, y)": tf.data.Dataset.from_tensor_slices((data, y)).batch(4),
        "generator of dicts": ({k: v[i:i + 5] for k, v in data.items()} for i in (0, 5)),
        "float ids": {k: v.astype("float32") for k, v in data.items()},
    }
    for name, form in forms.items():
        mask, ids = sample_inputs(model, form, num_samples=7)
        assert ids.dtype == mask.dtype == np.int32, name
        np.testing.assert_array_equal(ids, data["token_ids"][:7], err_msg=name)
        np.testing.assert_array_equal(mask, data["padding_mask"][:7], err_msg=name)
    mask, ids = sample_inputs(model, None, num_samples=5)
    assert ids.dtype == np.int32 and set(np.unique(ids)) <= {0, 1}


@pytest.mark.parametrize("data, match", [
    ({"token_ids": np.zeros((2, LENGTH), "int32")},
     r"input keys \['padding_mask', 'token_ids'\]. Received: keys \['token_ids'\]; missing \['padding_mask'\]"),
    ({"token_ids": np.full((2, LENGTH), 0.5), "padding_mask": np.ones((2, LENGTH))},
     r"integer values for model input 'token_ids'"),
    ({"token_ids": np.zeros((2, 3), "int32"), "padding_mask": np.ones((2, 3), "int32")},
     r"model input 'padding_mask'. Received: an array of shape \(2, 3\)"),
])
def test_bad_dict_data_fails_before_conversion(data, match, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "_convert", _must_not_run)
    with pytest.raises(ValueError, match=match):
        export_tflite(text_model(), tmp_path / "m.tflite", quantize="int8", representative_data=data)


def test_dict_data_for_a_model_without_dict_inputs_is_a_type_error(tmp_path):
    match = r"dicts only for a model with dict inputs\). Received: representative_data of type dict"
    with pytest.raises(TypeError, match=match):
        export_tflite(swish_model(), tmp_path / "m.tflite", representative_data={"x": np.zeros((2, 8, 8, 3))})


def _must_not_run(*args, **kwargs):
    raise AssertionError("conversion started although the arguments are invalid")


def test_signature_problem_reads_a_signature_less_file():
    model = swish_model()
    function = tf.function(serving_function(model), input_signature=input_specs(model)).get_concrete_function()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = tf.lite.TFLiteConverter.from_concrete_functions([function]).convert()  # no trackable: no signature
    assert file_signatures(content) == {}
    problem = signature_problem(content, ["input_0"], ["output_0"])
    assert problem == "a file with the signature(s) [] and no 'serving_default'"


def test_file_without_signature_falls_back_to_saved_model_path(tmp_path, monkeypatch):
    calls = []
    real = convert_module.signature_problem

    def first_fails(content, inputs, outputs):
        calls.append(real(content, inputs, outputs))
        return "a file with the signature(s) [] and no 'serving_default'" if len(calls) == 1 else calls[-1]

    saved_model_sources = []
    real_source = convert_module._saved_model_source

    def recorded(model, scratch):
        saved_model_sources.append(model.name)
        return real_source(model, scratch)

    monkeypatch.setattr(convert_module, "signature_problem", first_fails)
    monkeypatch.setattr(convert_module, "_saved_model_source", recorded)
    with pytest.warns(UserWarning, match=r"frozen function gave a file .*; converting through a SavedModel"):
        result = export_tflite(swish_model(), tmp_path / "m.tflite", num_samples=4)
    assert calls == [None, None] and result.relative_error <= 1e-5
    assert len(saved_model_sources) == 1  # the second conversion went through the SavedModel path


def test_file_without_signature_on_every_path_is_an_export_error(tmp_path, monkeypatch):
    problem = "a file with the signature(s) [] and no 'serving_default'"
    monkeypatch.setattr(convert_module, "signature_problem", lambda *args: problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        match = r"(?s)'serving_default' signature with inputs \['input_0'\].*Received: a file .*via='function' and then"
        with pytest.raises(kap.ExportError, match=match):
            export_tflite(swish_model(), tmp_path / "m.tflite", num_samples=4)
    assert not (tmp_path / "m.tflite").exists()


def test_latency_of_a_model_with_token_id_inputs(tmp_path):
    from keras_autoprune.export import measure_latency

    path = export_tflite(text_model(), tmp_path / "text.tflite", representative_data=text_data(), num_samples=4).path
    result = measure_latency(path, warmup=1, runs=3)  # random 0/1 token ids: valid for any vocabulary
    assert result.runs == 3 and result.min_ms > 0


@keras.saving.register_keras_serializable(package="tests")
class PositionTable(keras.layers.Layer):
    """Adds learned position vectors to a sequence of any length up to ``max_length`` (as BERT's position embedding)."""

    def __init__(self, max_length: int, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, shape):
        self.table = self.add_weight(shape=(self.max_length, shape[-1]), initializer="normal")

    def call(self, x):
        return x + keras.ops.slice(self.table, (0, 0), (keras.ops.shape(x)[1], x.shape[-1]))


def unknown_length_text_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = PositionTable(8)(L.Embedding(VOCAB, 8)(ids))
    return keras.Model(ids, L.Dense(3)(keras.ops.mean(L.Dense(8, activation="gelu")(x), axis=1)))


def test_unknown_sequence_length_exports_with_samples_and_runs_other_lengths(tmp_path):
    model = unknown_length_text_model()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"input shapes are not fully known.*representative_data"):
        export_tflite(model, tmp_path / "m.tflite")
    result = export_tflite(model, tmp_path / "m.tflite", representative_data=rng.integers(0, VOCAB, (6, 5)).astype("int32"))
    assert result.verified and result.relative_error < 1e-5
    # The file keeps the unknown length: a length-8 batch gives Keras's outputs too.
    ids = rng.integers(0, VOCAB, (2, 8)).astype("int32")
    received = Interpreter(model_path=str(result.path)).get_signature_runner("serving_default")(**{input_names(model)[0]: ids})
    np.testing.assert_allclose(next(iter(received.values())), model(ids).numpy(), rtol=1e-4, atol=1e-5)


def test_samples_the_model_cannot_run_fail_before_conversion(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "_convert", _must_not_run)
    too_long = np.zeros((2, 12), "int32")  # the position table holds 8 positions
    match = r"`representative_data` that model '.*' can run. Received: samples of input shapes \(2, 12\), on which"
    with pytest.raises(ValueError, match=match):
        export_tflite(unknown_length_text_model(), tmp_path / "m.tflite", representative_data=too_long)
    assert not (tmp_path / "m.tflite").exists()
