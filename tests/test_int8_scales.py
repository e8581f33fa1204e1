"""Int8 files with a (nearly) dead layer: scales XNNPACK accepts (`keras_autoprune.export.int8_scales`)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tensorflow.lite.tools import flatbuffer_utils

import keras_autoprune as kap
from keras_autoprune.export.convert import convert
from keras_autoprune.export.int8_scales import REQUANTIZATION_LIMIT, admit_int8_scales


def _nearly_dead_model(pool: bool = False) -> tuple[keras.Model, np.ndarray]:
    """conv -> ReLU whose output spans 2e-6 on the data -> [max pool] -> conv -> pool -> dense, and the data."""
    inputs = keras.Input((8, 8, 3))
    dead = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="dead_conv")
    hidden = dead(inputs)
    if pool:  # an equal-scale op between the dead layer and its reader
        hidden = keras.layers.MaxPooling2D(2, name="pool")(hidden)
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(5, 3, padding="same", name="after_conv")(hidden)))
    model = keras.Model(inputs, outputs)
    data = np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 3)).astype(np.float32)
    kernel, _ = dead.get_weights()
    pre_activation = keras.ops.convert_to_numpy(keras.ops.conv(data, kernel, padding="same"))
    dead.set_weights([kernel, -pre_activation.max(axis=(0, 1, 2)) + 2e-6])  # ReLU output in [0, 2e-6]
    after = model.get_layer("after_conv")
    after.set_weights([after.get_weights()[0], np.linspace(-1, 1, 5).astype(np.float32)])  # its bias must survive
    return model, data


def _requantization_scales(content: bytes) -> dict[str, float]:
    """Largest ``s_in * s_w / s_out`` of each convolution and fully connected op, by output tensor name."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    graph, found = model.subgraphs[0], {}
    for op in graph.operators:
        if flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) in ("CONV_2D", "FULLY_CONNECTED"):
            source, kernel, output = graph.tensors[op.inputs[0]], graph.tensors[op.inputs[1]], graph.tensors[op.outputs[0]]
            found[output.name.decode()] = float(source.quantization.scale[0] * np.max(kernel.quantization.scale)
                                                / output.quantization.scale[0])
    return found


def test_admit_int8_scales_raises_only_the_dead_layers_scale_and_xnnpack_then_runs_the_file(tmp_path):
    model, data = _nearly_dead_model()
    content, _ = convert(model, "int8", [data], False, False, "function")
    before = _requantization_scales(content)
    dead = [name for name, scale in before.items() if scale >= REQUANTIZATION_LIMIT]
    assert len(dead) == 1 and "dead_conv" in dead[0]
    raw = tmp_path / "raw.tflite"
    raw.write_bytes(content)
    with pytest.raises(RuntimeError, match="XNNPACK|prepare"):  # why the fix exists: LiteRT's default delegate refuses it
        Interpreter(str(raw)).allocate_tensors()

    fixed, fixes = admit_int8_scales(content)
    after = _requantization_scales(fixed)
    assert [fix.tensor for fix in fixes] == dead
    assert fixes[0].requantization == pytest.approx(before[dead[0]], rel=1e-6)
    assert after[dead[0]] == pytest.approx(255.0, rel=1e-5)
    consumer = next(name for name in after if "after_conv" in name)  # reads the raised scale: its ratio grows, stays legal
    assert before[consumer] < after[consumer] < REQUANTIZATION_LIMIT
    (logits,) = set(after) - {dead[0], consumer}  # the Dense layer is untouched
    assert after[logits] == before[logits]
    assert admit_int8_scales(fixed) == (fixed, [])  # nothing left to raise
    interpreter = Interpreter(model_content=fixed)
    interpreter.allocate_tensors()
    reference = _run(content, data, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)  # the raw file, reference kernels
    np.testing.assert_allclose(_run(fixed, data, OpResolverType.AUTO), reference, atol=0.05 * np.abs(reference).max())


def _run(content: bytes, data: np.ndarray, resolver) -> np.ndarray:
    interpreter = Interpreter(model_content=content, experimental_op_resolver_type=resolver)
    interpreter.resize_tensor_input(0, data.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], data)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.parametrize("pool", [False, True], ids=["direct", "through-max-pool"])
def test_export_tflite_int8_of_a_nearly_dead_layer_is_verified_with_xnnpack_and_says_so(pool, tmp_path):
    model, data = _nearly_dead_model(pool)
    result = kap.export_tflite(model, tmp_path / "m.tflite", quantize="int8", representative_data=data,
                               min_top1_agreement=0.9)
    assert result.verified and result.top1_agreement >= 0.9 and result.relative_error < 0.05
    assert "dead_conv" in result.note and "XNNPACK" in result.note


def test_admit_int8_scales_leaves_a_healthy_file_byte_for_byte():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3, activation="relu")(inputs))))
    data = np.random.default_rng(1).uniform(-1, 1, (32, 8, 8, 3)).astype(np.float32)
    content, _ = convert(model, "int8", [data], False, False, "function")
    assert admit_int8_scales(content) == (content, [])
