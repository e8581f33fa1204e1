"""Every handler: the apply_plan == mask_plan contract on tiny models.

Each builder returns a model whose middle channels are prunable; the test
prunes half of every prunable group and checks the two executions agree to
1e-5 (relative), that the pruned layers really shrank, and that the input
model was left untouched.
"""

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from tests.helpers import assert_contract, randomize

L = keras.layers


def conv_family():
    i = keras.Input((9, 9, 3))
    x = L.Conv2D(6, 3, padding="same", name="c_same")(i)
    x = L.Conv2D(6, 3, strides=2, padding="valid", use_bias=False, name="c_valid")(x)
    x = L.Conv2DTranspose(6, 3, strides=2, name="c_t")(x)
    x = L.Conv2D(4, 1, name="head")(x)
    return keras.Model(i, x)


def conv1d_3d():
    i = keras.Input((10, 3))
    x = L.Conv1D(6, 3, padding="causal", name="c1")(i)
    x = L.Conv1DTranspose(4, 2, name="t1")(x)
    x = L.Conv1D(2, 1)(x)
    j = keras.Input((4, 4, 4, 2))
    y = L.Conv3D(6, 2, name="c3")(j)
    y = L.Conv3DTranspose(4, 2, name="t3")(y)
    y = L.Conv3D(2, 1)(y)
    return keras.Model([i, j], [x, y])


def depthwise_separable():
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 1, name="c")(i)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = L.SeparableConv2D(6, 3, depth_multiplier=2, padding="same", name="sep")(x)
    x = L.Conv1D(4, 1)(L.Reshape((64, 6))(x))
    y = L.DepthwiseConv1D(3, padding="same", name="dw1")(x)
    y = L.SeparableConv1D(4, 3, name="sep1")(y)
    return keras.Model(i, L.Dense(2)(L.Flatten()(y)))


def grouped_convs():
    i = keras.Input((6, 6, 3))
    x = L.Conv2D(6, 1, name="c")(i)
    x = L.Conv2D(12, 3, groups=6, padding="same", activation="swish", name="dw_as_grouped")(x)
    x = L.Conv2D(4, 1, name="c2")(x)
    x = L.Conv2D(4, 3, groups=2, name="grouped")(x)  # real groups: blocks c2 and its own outputs
    return keras.Model(i, L.Conv2D(2, 1)(x))


def dense_nd():
    i = keras.Input((5, 3))
    x = L.Dense(6, activation="relu", name="d1")(i)
    x = L.Dense(6, name="d2")(x)
    x = L.Flatten()(x)
    x = L.Dense(4, name="d3")(x)
    return keras.Model(i, L.Dense(2)(x))


def normalizations():
    i = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, name="c1")(i)
    x = L.BatchNormalization(name="bn")(x)
    x = L.PReLU(shared_axes=[1, 2], name="prelu")(x)
    x = L.Conv2D(8, 1, name="c2")(x)
    x = L.GroupNormalization(groups=4, name="gn")(x)
    x = L.PReLU(name="prelu_full")(x)
    x = L.Conv2D(6, 1, name="c3")(x)
    x = L.BatchNormalization(scale=False, name="bn_noscale")(x)
    x = L.Rescaling(0.5, offset=0.1, name="rescale")(x)
    x = L.LayerNormalization(axis=(1, 2), name="ln_spatial")(x)
    return keras.Model(i, L.Conv2D(2, 1)(x))


def merges():
    i = keras.Input((6, 6, 3))
    a = L.Conv2D(6, 3, padding="same", name="a")(i)
    b = L.Conv2D(6, 1, name="b")(i)
    x = L.Add()([a, b])
    x = L.Subtract()([x, L.Conv2D(6, 1, name="s")(i)])
    x = L.Average()([x, L.Conv2D(6, 1, name="avg")(i)])
    x = L.Maximum()([x, L.Conv2D(6, 1, name="mx")(i)])
    x = L.Minimum()([x, L.Conv2D(6, 1, name="mn")(i)])
    gate = L.GlobalAveragePooling2D(keepdims=True)(x)
    gate = L.Conv2D(3, 1, activation="relu", name="se_reduce")(gate)
    gate = L.Conv2D(6, 1, activation="sigmoid", name="se_expand")(gate)
    x = L.Multiply(name="se")([x, gate])
    spatial = L.Conv2D(1, 1, activation="sigmoid", name="spatial")(x)
    x = L.Multiply(name="spatial_gate")([x, spatial])
    return keras.Model(i, L.Conv2D(2, 1)(x))


def concat_reshape():
    i = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, name="a")(i)
    b = L.Conv2D(6, 3, padding="same", name="b")(i)
    x = L.Concatenate()([a, b, i])
    x = L.Conv2D(6, 1, name="c")(x)
    y = L.Concatenate(axis=1)([x, L.Conv2D(6, 1, name="d")(i)])  # along height: tied
    y = L.Reshape((8 * 4, 6))(y)
    y = L.Dense(5, name="e")(y)
    y = L.Reshape((-1,))(y)
    return keras.Model(i, L.Dense(2)(y))


def shape_layers():
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c")(i)
    x = L.MaxPooling2D()(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.Cropping2D(1)(x)
    x = L.UpSampling2D()(x)
    x = L.AveragePooling2D(2, strides=1, padding="same")(x)
    x = L.Dropout(0.5)(x)
    x = L.SpatialDropout2D(0.5)(x)
    x = L.GaussianNoise(0.1)(x)
    x = L.Identity()(x)
    x = L.Activation("swish")(x)
    x = L.ReLU(max_value=6.0)(x)
    x = L.LeakyReLU(0.2)(x)
    x = L.ELU()(x)
    x = L.Conv2D(6, 3, name="c2")(x)
    x = L.GlobalMaxPooling2D()(x)
    return keras.Model(i, L.Dense(2)(x))


def constants_to_fold():
    """Removed channels that emit sigmoid(0) = 0.5 and tanh(0) = 0 downstream."""
    i = keras.Input((6, 6, 3))
    x = L.Conv2D(6, 3, name="c1")(i)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("sigmoid", name="sig")(x)
    folded = L.Conv2D(4, 3, padding="valid", use_bias=False, name="valid_consumer")(x)
    zeroed = L.Conv2D(4, 3, padding="same", name="same_consumer")(x)
    padded = L.Conv2D(4, 1, name="pad_consumer")(L.ZeroPadding2D(1)(x))
    pooled = L.Dense(4, name="dense_consumer")(L.GlobalAveragePooling2D()(x))
    y = L.Dense(6, name="d")(pooled)
    y = L.BatchNormalization(name="bn_d")(y)
    y = L.Activation("softplus")(y)
    y = L.Dense(3, name="d_consumer")(y)
    out = L.Concatenate()([L.Flatten()(folded), L.Flatten()(zeroed), L.Flatten()(padded), y])
    return keras.Model(i, L.Dense(2)(out))


def ops_nodes():
    i = keras.Input((6, 6, 3))
    a = L.Conv2D(6, 3, padding="same", name="a")(i)
    b = L.Conv2D(6, 1, name="b")(i)
    x = keras.ops.relu(a * 2.0 + 1.0) + keras.ops.sigmoid(b)
    x = keras.ops.concatenate([x, L.Conv2D(2, 1, name="c")(i)], axis=-1)
    x = keras.ops.maximum(x, 0.5) / 3.0
    return keras.Model(i, L.Conv2D(2, 1)(x))


def resize_and_cast():
    """DeepLabV3's pyramid pooling pattern: Resizing and `ops.cast` between convolutions (with sigmoid constants)."""
    i = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 3, padding="same", activation="sigmoid", name="a")(i)  # removed channels carry 0.5
    x = L.Resizing(9, 9, interpolation="bilinear", name="resize")(a)
    y = L.Resizing(4, 8, pad_to_aspect_ratio=True, fill_value=0.0, name="padded_resize")(a)
    x = keras.ops.cast(L.Conv2D(5, 1, name="b")(x), "float32")
    y = L.Conv2D(3, 2, name="c")(y)
    return keras.Model(i, [L.Conv2D(2, 1)(x), L.Conv2D(2, 1)(y)])


BUILDERS = [
    conv_family, conv1d_3d, depthwise_separable, grouped_convs, dense_nd, normalizations, merges,
    concat_reshape, shape_layers, constants_to_fold, ops_nodes, resize_and_cast,
]


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_contract_and_shrinkage(builder):
    model = builder()
    randomize(model, seed=1)
    before = [w.numpy().copy() for w in model.weights]
    graph = kap.DependencyGraph(model)
    assert graph.unknown_layers == []
    plan = kap.PrunePlan.uniform(graph, 0.5)
    assert plan.kept, "nothing prunable"
    slim, masked = assert_contract(model, plan, graph)
    assert slim.count_params() < model.count_params()
    assert masked.count_params() == model.count_params()
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())  # the input model is untouched
    lost = {}  # layer -> output positions removed, over all groups
    for group_id, kept in plan.kept.items():
        for member in graph.group(group_id).members:
            if member.side == "output" and member.layer in [layer.name for layer in slim.layers]:
                lost[member.layer] = lost.get(member.layer, 0) + np.isin(member.channels, kept, invert=True).sum()
    assert lost
    for name, count in lost.items():
        assert slim.get_layer(name).output.shape[-1] == model.get_layer(name).output.shape[-1] - count


def test_sigmoid_constant_is_folded_into_a_new_bias():
    model = constants_to_fold()
    randomize(model, seed=2)
    graph = kap.DependencyGraph(model)
    plan = kap.PrunePlan({"c1": [0, 1, 2]})
    slim, masked = assert_contract(model, plan, graph)
    consumer = slim.get_layer("valid_consumer")
    assert consumer.use_bias and consumer.kernel.shape == (3, 3, 3, 4)
    kernel = model.get_layer("valid_consumer").kernel.numpy()
    expected_bias = 0.5 * kernel[:, :, 3:, :].sum(axis=(0, 1, 2))
    np.testing.assert_allclose(consumer.bias.numpy(), expected_bias, rtol=1e-5)
    # The same-padded consumer cannot fold: its rows are zeroed in the mask.
    masked_kernel = masked.get_layer("same_consumer").kernel.numpy()
    assert np.all(masked_kernel[:, :, 3:, :] == 0) and np.all(masked_kernel[:, :, :3, :] != 0)
    # The masked model still carries 0.5 on the removed channels before the consumers.
    probe = keras.Model(masked.inputs, masked.get_layer("sig").output)
    values = np.asarray(probe([np.ones((1, 6, 6, 3), "float32")]))
    np.testing.assert_allclose(values[..., 3:], 0.5)


def test_exact_slice_of_a_conv_and_its_batch_norm():
    i = keras.Input((5, 5, 2))
    x = L.Conv2D(4, 3, name="c")(i)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(i, L.Conv2D(3, 1, name="head")(x))
    randomize(model, seed=3)
    slim = kap.apply_plan(model, kap.PrunePlan({"c": [1, 3]}))
    np.testing.assert_array_equal(slim.get_layer("c").kernel.numpy(), model.get_layer("c").kernel.numpy()[..., [1, 3]])
    np.testing.assert_array_equal(slim.get_layer("c").bias.numpy(), model.get_layer("c").bias.numpy()[[1, 3]])
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        np.testing.assert_array_equal(
            getattr(slim.get_layer("bn"), name).numpy(), getattr(model.get_layer("bn"), name).numpy()[[1, 3]]
        )
    np.testing.assert_array_equal(
        slim.get_layer("head").kernel.numpy(), model.get_layer("head").kernel.numpy()[:, :, [1, 3], :]
    )


def test_group_norm_loses_whole_groups():
    model = normalizations()
    graph = kap.DependencyGraph(model)
    plan = kap.PrunePlan({"c2": [2, 3, 6, 7]})
    slim, _ = assert_contract(model, plan, graph)
    assert slim.get_layer("gn").groups == 2
    with pytest.raises(kap.PlanError, match="whole normalization groups"):
        kap.PrunePlan({"c2": [0, 2, 3]}).validate(graph)


def test_sequential_stays_sequential():
    model = keras.Sequential([keras.Input((6, 6, 3)), L.Conv2D(4, 3, name="c"), L.Flatten(), L.Dense(2)])
    randomize(model)
    slim, _ = assert_contract(model, kap.PrunePlan({"c": [0, 3]}))
    assert isinstance(slim, keras.Sequential) and slim.get_layer("c").filters == 2


def test_grouped_conv_with_one_channel_per_group_is_depthwise():
    model = grouped_convs()
    randomize(model, seed=4)
    graph = kap.DependencyGraph(model)
    assert graph.group("c").prunable and not graph.group("c2").prunable
    assert "grouped convolution" in graph.group("c2").reason
    slim, _ = assert_contract(model, kap.PrunePlan({"c": [1, 4, 5]}), graph)
    layer = slim.get_layer("dw_as_grouped")
    assert (layer.groups, layer.filters) == (3, 6)
    np.testing.assert_array_equal(
        layer.kernel.numpy(), model.get_layer("dw_as_grouped").kernel.numpy()[..., [2, 3, 8, 9, 10, 11]]
    )


@pytest.mark.parametrize("layer", [keras.layers.Softmax(axis=1), keras.layers.Softmax(axis=-2)])
def test_softmax_over_positions_keeps_removed_channels_exact(layer):
    """A removed channel's constant cannot be folded through a softmax over another axis (its value depends
    on the other positions): the surgery must still equal the masked model."""
    inputs = keras.Input((5, 3))
    x = layer(keras.layers.Dense(4, name="d1")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d2")(x))
    randomize(model, 0)
    assert_contract(model, kap.PrunePlan({"d1": [0, 1, 2]}))


def test_a_softmax_classifier_keeps_its_outputs_and_lets_its_inputs_be_pruned():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(keras.layers.Conv2D(8, 3, name="c1")(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))
    randomize(model, 0)
    graph = kap.DependencyGraph(model)
    assert {g.id: g.prunable for g in graph.groups if g.id in ("c1", "head")} == {"c1": True, "head": False}
    slim, _ = assert_contract(model, kap.PrunePlan({"c1": [0, 2, 5]}), graph)
    assert slim.get_layer("head").kernel.shape == (3, 3)
