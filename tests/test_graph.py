"""DependencyGraph: groups, index maps, blocking, model checks."""

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from tests.helpers import subclassed_model

L = keras.layers


def _group_of(graph, layer, side="output"):
    for group in graph.groups:
        for member in group.members:
            if member.layer == layer and member.side == side:
                return group, member
    raise AssertionError(f"{layer} {side} not found")


def test_residual_add_ties_both_branches_into_one_group():
    inputs = keras.Input((8, 8, 3), name="image")
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(4, 1, name="b")(a)
    added = L.Add(name="add")([a, b])
    outputs = L.Conv2D(2, 1, name="head")(added)
    graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    group_a, _ = _group_of(graph, "a")
    group_b, _ = _group_of(graph, "b")
    assert group_a is group_b
    assert group_a.id == "a" and group_a.size == 4 and group_a.prunable
    layers = {(m.layer, m.side) for m in group_a.members}
    assert {("a", "output"), ("b", "output"), ("b", "input"), ("add", "output"), ("head", "input")} <= layers
    assert [g.id for g in graph.groups] == ["input:image", "a", "head"]
    assert not graph.group("input:image").prunable
    assert graph.group("head").reason == "it is a model output"


def test_concatenate_offsets_and_flatten_index_map():
    inputs = keras.Input((2, 2, 3))
    a = L.Conv2D(2, 1, name="a")(inputs)
    b = L.Conv2D(3, 1, name="b")(inputs)
    cat = L.Concatenate(name="cat")([a, b])
    flat = L.Flatten(name="flat")(cat)
    outputs = L.Dense(1, name="dense")(flat)
    graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    group_b, member = _group_of(graph, "cat")
    # "cat" output holds both groups: find b's positions on it.
    cat_b = [m for m in graph.group("b").members if m.layer == "cat" and m.side == "output"][0]
    np.testing.assert_array_equal(cat_b.positions, [2, 3, 4])
    np.testing.assert_array_equal(cat_b.channels, [0, 1, 2])
    dense_a = [m for m in graph.group("a").members if m.layer == "dense" and m.side == "input"][0]
    # Flatten of (2, 2, 5): feature (h*2 + w)*5 + c holds channel c; a owns c in {0, 1}.
    np.testing.assert_array_equal(dense_a.positions, [0, 1, 5, 6, 10, 11, 15, 16])
    np.testing.assert_array_equal(dense_a.channels, [0, 1] * 4)


def test_depthwise_multiplier_maps_each_input_channel_to_its_outputs():
    inputs = keras.Input((4, 4, 3))
    x = L.Conv2D(3, 1, name="c")(inputs)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    outputs = L.Conv2D(2, 1, name="head")(x)
    graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    dw = [m for m in graph.group("c").members if m.layer == "dw" and m.side == "output"][0]
    np.testing.assert_array_equal(dw.channels, [0, 0, 1, 1, 2, 2])


def test_shared_layer_ties_the_inputs_of_all_its_calls():
    inputs = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, name="a")(inputs)
    b = L.Conv2D(4, 1, name="b")(inputs)
    shared = L.Conv2D(5, 1, name="shared")
    merged = L.Concatenate(name="cat")([shared(a), shared(b)])
    outputs = L.Conv2D(2, 1, name="head")(merged)
    graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    assert graph.group_index("b") is None  # tied to "a" through the shared weights
    assert graph.group("a").size == 4
    # The shared conv's output channels are one group (same weights in both calls).
    assert graph.group("shared").size == 5


def test_keras_ops_nodes_are_walked():
    inputs = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, name="a")(inputs)
    b = L.Conv2D(4, 1, name="b")(inputs)
    x = keras.ops.relu(a * 2.0) + b
    outputs = L.Conv2D(2, 1, name="head")(x)
    graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    assert graph.group("a").prunable and graph.group_index("b") is None  # tied to a
    assert graph.unknown_layers == []


def test_nested_model_is_walked_recursively():
    backbone = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="c1"), L.ReLU(name="r")], name="backbone")
    model = keras.Sequential([keras.Input((8, 8, 3)), backbone, L.GlobalAveragePooling2D(name="gap"), L.Dense(3, name="fc")])
    graph = kap.DependencyGraph(model)
    group = graph.group("backbone/c1")
    assert group.prunable and group.size == 4
    assert {m.layer for m in group.members} >= {"backbone/c1", "backbone/r", "gap", "fc"}


def test_unknown_layer_blocks_its_channels_and_warns_once():
    inputs = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, name="a")(inputs)
    lam = L.Lambda(lambda t: t * 3.0, name="lam")(a)
    b = L.Conv2D(4, 1, name="b")(lam)
    outputs = L.Conv2D(2, 1, name="head")(b)
    with pytest.warns(UserWarning, match=r"'lam' \(Lambda\).*register_handler") as record:
        graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    assert len([w for w in record if "register_handler" in str(w.message)]) == 1
    assert not graph.group("a").prunable and "no pruning handler" in graph.group("a").reason
    assert not graph.group("lam").prunable
    assert graph.group("b").prunable


def test_layer_norm_blocks_group_norm_makes_chunks():
    inputs = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, name="a")(inputs)
    a = L.LayerNormalization(name="ln")(a)
    b = L.Conv2D(6, 1, name="b")(a)
    b = L.GroupNormalization(groups=3, name="gn")(b)
    outputs = L.Conv2D(2, 1, name="head")(b)
    graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    assert not graph.group("a").prunable and "across channels" in graph.group("a").reason
    np.testing.assert_array_equal(graph.group("b").chunks, [0, 0, 1, 1, 2, 2])


def test_softmax_over_channels_blocks():
    inputs = keras.Input((4, 4, 3))
    a = L.Conv2D(4, 1, name="a")(inputs)
    a = L.Softmax(name="sm")(a)
    outputs = L.Conv2D(2, 1, name="head")(a)
    graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    assert not graph.group("a").prunable


def test_reshape_that_splits_channels_blocks_and_one_that_keeps_them_maps():
    inputs = keras.Input((2, 2, 3))
    a = L.Conv2D(4, 1, name="a")(inputs)
    split = L.Reshape((2, 2, 2, 2), name="split")(a)
    b = L.Conv2D(4, 1, name="b")(inputs)
    keep = L.Reshape((4, 4), name="keep")(b)
    outputs = [L.Flatten()(split), L.Dense(2, name="d")(keep)]
    graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    assert not graph.group("a").prunable
    assert graph.group("b").prunable


def test_a_reshape_flattening_tokens_into_rows_maps_and_one_gathering_rows_back_blocks_with_its_reason():
    import warnings

    inputs = keras.Input((4, 8))
    rows = keras.ops.reshape(L.Dense(8, name="a")(inputs), (-1, 8))      # (None, 8): channels kept
    tokens = keras.ops.reshape(L.Dense(16, name="b")(rows), (-1, 4, 16))  # 4 rows back into one example
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear reason, not a handler failure
        graph = kap.DependencyGraph(keras.Model(inputs, L.Dense(2, name="head")(tokens)))
    assert graph.group("a").prunable
    assert not graph.group("b").prunable
    assert "gathers the rows of several batch entries into one (16 elements per entry in, 64 out)" in graph.group("b").reason


def test_subclassed_model_is_rejected_with_a_fix():
    net = subclassed_model()
    with pytest.raises(kap.UnsupportedModelError, match="subclassed.*functional API"):
        kap.DependencyGraph(net)


def test_unbuilt_sequential_and_non_models_are_rejected():
    with pytest.raises(kap.UnsupportedModelError, match="not built.*keras.Input"):
        kap.DependencyGraph(keras.Sequential([L.Dense(2)]))
    with pytest.raises(kap.UnsupportedModelError, match="Expected a Keras 3"):
        kap.DependencyGraph("model.keras")


def test_register_handler_rejects_bad_arguments():
    with pytest.raises(TypeError, match="must be a class"):
        kap.register_handler(L.Dense(2), kap.handlers.LinearHandler("units"))
    with pytest.raises(TypeError, match="LayerHandler"):
        kap.register_handler(L.Dense, object())


def test_register_handler_unblocks_a_custom_layer():
    class Scale(L.Layer):  # an element-wise layer the library does not know
        def call(self, x):
            return x * 2.0

    kap.register_handler(Scale, kap.handlers.ActivationHandler())
    inputs = keras.Input((4, 4, 3))
    a = Scale(name="scale")(L.Conv2D(4, 1, name="a")(inputs))
    graph = kap.DependencyGraph(keras.Model(inputs, L.Conv2D(2, 1)(a)))
    assert graph.group("a").prunable
