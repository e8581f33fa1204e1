"""Reparameterisation surgery: `replace_layers` and rotation -> core -> rotation factorisation."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.errors import PlanError
from keras_autoprune.surgery.factorization import FactorizationPlan, LayerFactorization, factorize_layer
from keras_autoprune.surgery.replace import LayerReplacement, replace_layers
from tests.helpers import randomize, relative_error


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q[:, :k]


def conv_model() -> keras.Model:
    """Strided 'same', dilated 'valid', a residual add, BN and Dense N-D on a 3-D input."""
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c1")(inp)
    y = keras.layers.Conv2D(8, 3, dilation_rate=2, padding="same", name="c2")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    x = keras.layers.Add()([x, y])
    x = keras.layers.Reshape((36, 8))(x)
    x = keras.layers.Dense(6, activation="tanh", name="d_nd")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(4, name="head")(x)
    model = keras.Model(inp, out)
    randomize(model, seed=1, scale=0.3)
    return model


def conv1d_model() -> keras.Sequential:
    model = keras.Sequential([
        keras.Input((10, 4)),
        keras.layers.Conv1D(6, 3, padding="causal", activation="relu", name="c1"),
        keras.layers.Conv1D(5, 2, strides=2, name="c2", use_bias=False),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="head"),
    ])
    randomize(model, seed=2, scale=0.3)
    return model


def full_plan(model, names, seed=0) -> FactorizationPlan:
    layers = kap.surgery.replace.named_layers(model)
    return FactorizationPlan({
        name: LayerFactorization(orthonormal(layers[name].kernel.shape[-2], layers[name].kernel.shape[-2], seed + i),
                                 orthonormal(layers[name].kernel.shape[-1], layers[name].kernel.shape[-1], seed + 50 + i))
        for i, name in enumerate(names)
    })


def reduced_plan(model, names, keep=0.5, seed=0) -> FactorizationPlan:
    layers = kap.surgery.replace.named_layers(model)
    out = {}
    for i, name in enumerate(names):
        cin, cout = layers[name].kernel.shape[-2:]
        out[name] = LayerFactorization(orthonormal(cin, max(1, int(cin * keep)), seed + i),
                                       orthonormal(cout, max(1, int(cout * keep)), seed + 50 + i))
    return FactorizationPlan(out)


def inputs_for(model, batch=3, seed=5):
    return np.random.default_rng(seed).normal(size=(batch,) + tuple(model.inputs[0].shape[1:])).astype("float32")


@pytest.mark.parametrize("build, names", [
    (conv_model, ["c1", "c2", "d_nd"]),
    (conv1d_model, ["c1", "c2"]),
])
def test_unpruned_composite_reproduces_the_original_layers(build, names):
    model = build()
    x = inputs_for(model)
    factorised = full_plan(model, names).apply(model)

    assert relative_error(np.asarray(factorised(x)), np.asarray(model(x))) <= 1e-5
    assert type(factorised) is type(model)
    for name in names:
        block = factorised.get_layer(name)
        assert isinstance(block, keras.Sequential)
        assert [l.name for l in block.layers] == [f"{name}_rot_in", f"{name}_core", f"{name}_rot_out"]
    # The original is untouched and keeps its layers.
    assert not isinstance(model.get_layer("c1"), keras.Sequential)


def test_core_keeps_kernel_size_strides_padding_dilation_and_rotations_are_pointwise():
    model = conv_model()
    plan = reduced_plan(model, ["c1", "c2"], keep=0.5)
    block = plan.apply(model).get_layer("c2").layers
    rot_in, core, rot_out = block
    assert (rot_in.kernel_size, rot_in.strides, rot_in.use_bias, rot_in.filters) == ((1, 1), (1, 1), False, 4)
    assert (core.kernel_size, core.dilation_rate, core.padding, core.use_bias, core.filters) == ((3, 3), (2, 2), "same", False, 4)
    assert (rot_out.kernel_size, rot_out.filters, rot_out.use_bias) == ((1, 1), 8, True)
    c1 = plan.apply(model).get_layer("c1").layers
    assert c1[1].strides == (2, 2) and c1[2].activation.__name__ == "relu" and c1[1].activation.__name__ == "linear"
    # Weights: Q_in, Q_inᵀ K_k Q_out, Q_outᵀ and the original bias.
    f = plan.layers["c2"]
    kernel = model.get_layer("c2").kernel.numpy().astype(np.float64)
    np.testing.assert_allclose(rot_in.kernel.numpy()[0, 0], f.q_in, atol=1e-6)
    np.testing.assert_allclose(core.kernel.numpy()[1, 2], f.q_in.T @ kernel[1, 2] @ f.q_out, atol=1e-5)
    np.testing.assert_allclose(rot_out.kernel.numpy()[0, 0], f.q_out.T, atol=1e-6)
    np.testing.assert_array_equal(rot_out.bias.numpy(), model.get_layer("c2").bias.numpy())


@pytest.mark.parametrize("build, names", [(conv_model, ["c1", "c2", "d_nd"]), (conv1d_model, ["c1", "c2"])])
def test_pruned_composite_equals_the_projected_model(build, names):
    model = build()
    plan = reduced_plan(model, names, keep=0.5)
    x = inputs_for(model)
    projected = plan.project(model)

    assert relative_error(np.asarray(plan.apply(model)(x)), np.asarray(projected(x))) <= 1e-5
    # The projection is a real change (not the identity), and P K P is what the projected layer holds.
    assert relative_error(np.asarray(projected(x)), np.asarray(model(x))) > 1e-2
    f = plan.layers["c2"]
    kernel = model.get_layer("c2").kernel.numpy().astype(np.float64)
    expected = np.einsum("ij,...jk,kl->...il", f.q_in @ f.q_in.T, kernel, f.q_out @ f.q_out.T)
    np.testing.assert_allclose(projected.get_layer("c2").kernel.numpy(), expected, atol=1e-5)


def test_factorised_flops_and_params_are_the_three_layers():
    model = conv_model()
    plan = reduced_plan(model, ["c2"], keep=0.5)  # 8 -> 4 in, 8 -> 4 out; 6x6 maps
    factorised = plan.apply(model)
    positions = 6 * 6
    before = 2 * 9 * 8 * 8 * positions + 8 * positions
    after = 2 * 8 * 4 * positions + 2 * 9 * 4 * 4 * positions + 2 * 4 * 8 * positions + 8 * positions
    assert kap.count_flops(model) - kap.count_flops(factorised) == before - after
    assert kap.count_params(model) - kap.count_params(factorised) == (9 * 8 * 8 + 8) - (8 * 4 + 9 * 4 * 4 + 4 * 8 + 8)


def test_nested_and_shared_layers_are_replaced_everywhere():
    inner_in = keras.Input((6,))
    inner = keras.Model(inner_in, keras.layers.Dense(5, activation="relu", name="d")(inner_in), name="inner")
    inp = keras.Input((6,))
    shared = keras.layers.Dense(6, name="shared")
    h = shared(shared(inp))
    out = keras.layers.Dense(2, name="head")(inner(h))
    model = keras.Model(inp, out)
    randomize(model, seed=3, scale=0.4)
    x = inputs_for(model)
    factorised = full_plan(model, ["inner/d", "shared"]).apply(model)
    assert relative_error(np.asarray(factorised(x)), np.asarray(model(x))) <= 1e-5
    assert isinstance(factorised.get_layer("inner").get_layer("d"), keras.Sequential)
    plan = reduced_plan(model, ["inner/d", "shared"], keep=0.5)
    assert relative_error(np.asarray(plan.apply(model)(x)), np.asarray(plan.project(model)(x))) <= 1e-5


def test_factorised_model_saves_loads_and_exports_to_tflite(tmp_path):
    model = conv_model()
    factorised = reduced_plan(model, ["c1", "c2", "d_nd"], keep=0.5).apply(model)
    x = inputs_for(model)
    path = tmp_path / "f.keras"
    factorised.save(path)
    loaded = keras.models.load_model(path)  # standard layers only: no custom_objects
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(factorised(x)), rtol=0, atol=1e-6)

    result = kap.export_tflite(factorised, tmp_path / "f.tflite", num_samples=8)
    assert result.verified and result.relative_error <= 1e-4


def test_plan_json_round_trip_is_bit_exact_and_documented_format():
    model = conv_model()
    plan = reduced_plan(model, ["c1", "d_nd"], keep=0.5)
    text = plan.to_json()
    data = json.loads(text)
    assert data["format"] == "keras-autoprune/factorization" and data["version"] == 1
    assert data["layers"]["c1"]["q_in"]["shape"] == [3, 1] and data["layers"]["c1"]["q_out"]["shape"] == [8, 4]
    again = FactorizationPlan.from_json(text)
    for name, f in plan.layers.items():
        assert np.array_equal(again.layers[name].q_in, f.q_in) and np.array_equal(again.layers[name].q_out, f.q_out)
    with pytest.raises(PlanError, match="factorization plan"):
        FactorizationPlan.from_json(kap.PrunePlan({}).to_json())
    with pytest.raises(PlanError, match="Expected the JSON text"):
        FactorizationPlan.from_json(text[:-5])  # truncated
    data["layers"]["c1"]["q_out"]["shape"] = [8, 5]
    with pytest.raises(PlanError, match="damaged entry"):
        FactorizationPlan.from_json(json.dumps(data))


@pytest.mark.parametrize("layers, match", [
    ({"nope": LayerFactorization(np.eye(3), np.eye(8))}, "does not have"),
    ({"bn": LayerFactorization(np.eye(8), np.eye(8))}, "cannot be factorised"),
    ({"c1": LayerFactorization(np.eye(4), np.eye(8))}, r"q_in must have shape \(3, n\)"),
    ({"c1": LayerFactorization(np.eye(3), np.ones((8, 2)))}, "not orthonormal"),
    ({"c1": LayerFactorization(np.eye(3), np.full((8, 2), np.nan))}, "not orthonormal"),
])
def test_invalid_plans_fail_clearly(layers, match):
    with pytest.raises(PlanError, match=match):
        FactorizationPlan(layers).apply(conv_model())


def test_replace_layers_general_api_and_errors():
    model = conv1d_model()
    head = model.get_layer("head")
    kernel = head.kernel.numpy()
    q, r = np.linalg.qr(kernel)  # kernel = q @ r: the same function as two Dense layers
    swap = LayerReplacement(
        [keras.layers.Dense(q.shape[1], use_bias=False, name="head_q"), keras.layers.Dense(3, name="head_r")],
        [{"kernel": q}, {"kernel": r, "bias": head.bias.numpy()}],
    )
    x = inputs_for(model)
    new = replace_layers(model, {"head": swap})
    assert relative_error(np.asarray(new(x)), np.asarray(model(x))) <= 1e-5
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['nope'\]"):
        replace_layers(model, {"nope": swap})
    with pytest.raises(ValueError, match="one weights dict per layer"):
        LayerReplacement([keras.layers.Dense(2)], [])
    with pytest.raises(TypeError, match="LayerReplacement"):
        replace_layers(model, {"head": [keras.layers.Dense(3)]})
    with pytest.raises(PlanError, match="BatchNormalization is not one of"):
        factorize_layer(keras.layers.BatchNormalization(), LayerFactorization(np.eye(2), np.eye(2)))


def test_replace_layers_takes_one_functional_block_and_refuses_other_built_layers():
    from keras_autoprune.surgery.weights import weight_keys

    model = conv1d_model()
    head = model.get_layer("head")
    kernel, bias = head.kernel.numpy(), head.bias.numpy()
    # head(x) = (x W1 + x W2) + b with W1 + W2 = W: two branches, not a chain
    inputs = keras.Input((kernel.shape[0],))
    left, right = keras.layers.Dense(3, use_bias=False, name="left"), keras.layers.Dense(3, name="right")
    block = keras.Model(inputs, keras.layers.Add(name="sum")([left(inputs), right(inputs)]), name="head")
    half = kernel / 2
    values = dict(zip(weight_keys(block), [half, kernel - half, bias]))  # left kernel, right kernel, right bias
    new = replace_layers(model, {"head": LayerReplacement([block], [values])})
    x = inputs_for(model)
    assert relative_error(np.asarray(new(x)), np.asarray(model(x))) <= 1e-5
    assert [type(layer).__name__ for layer in new.get_layer("head").layers] == ["InputLayer", "Dense", "Dense", "Add"]
    built = keras.layers.Dense(3, name="used")
    built.build((None, kernel.shape[0]))
    with pytest.raises(ValueError, match=r"new \(unbuilt\) layers, or one functional keras.Model.*\['used'\]"):
        LayerReplacement([built], [{}])
