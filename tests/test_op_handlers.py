"""`keras.ops` shape and indexing nodes between prunable layers.

Every case puts one operation between a convolution ``a`` (8 channels) and
Dense layers ``after*``; the operation must let both sides be pruned, and
the pruned model must equal the masked one, save and reload in safe mode,
and be counted by `count_flops`.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_autoprune as kap
from tests.helpers import assert_contract, randomize

L = keras.layers

#: name -> (operation on the (6, 6, 8) output of "a", size of group "a").
OPS = {
    "pad_spatial": (lambda x: ops.pad(x, [[0, 0], [1, 1], [2, 0], [0, 0]]), 8),
    "pad_channels": (lambda x: ops.pad(x, [[0, 0], [0, 0], [0, 0], [1, 2]]), 8),
    "pad_constant": (lambda x: ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=0.5), 8),
    "split_sections": (lambda x: ops.split(x, 2, axis=-1), 8),
    "split_indices": (lambda x: ops.split(x, [3, 5], axis=-1), 8),
    "split_spatial": (lambda x: ops.split(x, 2, axis=1), 8),
    "slice": (lambda x: ops.slice(x, [0, 0, 0, 2], [-1, 6, 6, 4]), 8),
    "getitem_channels": (lambda x: x[..., 2:7], 8),
    "getitem_spatial": (lambda x: x[:, 1:5], 8),
    "getitem_index": (lambda x: x[..., 3], 8),
    "take_channels": (lambda x: ops.take(x, [1, 3, 6], axis=-1), 8),
    "take_spatial": (lambda x: ops.take(x, [0, 2], axis=1), 8),
    "transpose_spatial": (lambda x: ops.transpose(x, [0, 2, 1, 3]), 8),
    "swapaxes": (lambda x: ops.swapaxes(x, 1, 2), 8),
    "repeat": (lambda x: ops.repeat(x, 2, axis=-1), 8),
    "repeat_per_channel": (lambda x: ops.repeat(x, [1, 2, 1, 3, 1, 1, 2, 1], axis=-1), 8),
    "tile": (lambda x: ops.tile(x, [1, 1, 2, 2]), 8),
    "reshape_split_channels": (lambda x: ops.reshape(x, (-1, 6, 6, 2, 4)), 4),
    "reshape_flatten_spatial": (lambda x: ops.reshape(x, (-1, 36, 8)), 8),
    "reshape_merge_last": (lambda x: ops.reshape(ops.reshape(x, (-1, 6, 6, 2, 4)), (-1, 6, 6, 8)), 4),
}


def _model(op):
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", name="a")(inputs)
    y = op(x)
    if isinstance(y, (list, tuple)):
        y = ops.concatenate([L.Dense(4, name=f"after{k}")(part) for k, part in enumerate(y)], axis=-1)
    else:
        y = L.Dense(4, name="after")(y)
    model = keras.Model(inputs, L.Dense(2, name="head")(y))
    randomize(model, seed=5)
    return model


def _random_plan(graph, seed):
    rng = np.random.default_rng(seed)
    groups = graph.prunable_groups
    return kap.PrunePlan.from_ratios(
        graph, {g.id: rng.uniform(0.2, 0.7) for g in groups}, {g.id: rng.random(g.size) for g in groups}
    )


@pytest.fixture(params=sorted(OPS), scope="module")
def case(request):
    op, a_size = OPS[request.param]
    model = _model(op)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = kap.DependencyGraph(model)
    assert not [w for w in caught if "keras_autoprune" in str(w.message)]
    return request.param, model, graph, a_size


def test_op_no_longer_blocks(case):
    name, model, graph, a_size = case
    assert graph.unknown_layers == []
    prunable = {g.id: g.size for g in graph.prunable_groups}
    afters = {layer.name: 4 for layer in model.layers if layer.name.startswith("after")}
    assert prunable == {"a": a_size, **afters}
    blocked = [g for g in graph.groups if not g.prunable]
    expected = {"it is a model input", "it is a model output"}
    if name == "pad_channels":  # the three zero channels the pad creates
        pad = [g for g in blocked if "constant padding" in g.reason]
        assert [g.size for g in pad] == [3]
        blocked = [g for g in blocked if g not in pad]
    assert {g.reason for g in blocked} == expected


@pytest.mark.parametrize("plan_kind", ["uniform", "random"])
def test_op_contract(case, plan_kind):
    _, model, graph, _ = case
    plan = kap.PrunePlan.uniform(graph, 0.5) if plan_kind == "uniform" else _random_plan(graph, seed=7)
    assert "a" in plan.kept
    slim, _ = assert_contract(model, plan, graph)
    removed = graph.group("a").size - len(plan.kept["a"])
    assert slim.get_layer("a").filters == model.get_layer("a").filters - removed * (8 // graph.group("a").size)


def test_op_pruned_model_saves_loads_and_counts(case, tmp_path):
    _, model, graph, _ = case
    slim = kap.apply_plan(model, _random_plan(graph, seed=11), graph)
    path = str(tmp_path / "slim.keras")
    slim.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(slim(x)), rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flops = kap.count_flops(slim)
    assert not [w for w in caught if "count_flops" in str(w.message)]
    rows = kap.flops_table(slim)
    assert all(r.counted for r in rows) and flops == sum(r.flops for r in rows)
    assert 0 < flops < kap.count_flops(model)


def _operation(model, kind):
    (op,) = [o for o in model.operations if type(o).__name__ == kind]
    return op


def test_split_gets_new_split_points():
    model = _model(OPS["split_indices"][0])
    slim, _ = assert_contract(model, kap.PrunePlan({"a": [0, 2, 3, 4, 6, 7]}))
    assert list(_operation(slim, "Split").indices_or_sections) == [2, 4]  # was [3, 5]; channels 1 and 5 gone
    assert [slim.get_layer(f"after{k}").kernel.shape[0] for k in range(3)] == [2, 2, 2]


def test_channel_slice_gets_new_bounds():
    model = _model(OPS["getitem_channels"][0])
    slim, _ = assert_contract(model, kap.PrunePlan({"a": [1, 2, 4, 5, 6, 7]}))
    node = _operation(slim, "GetItem")._inbound_nodes[0]
    assert node.arguments.args[1] == (Ellipsis, slice(1, 5))  # x[..., 2:7] without channel 3
    assert slim.get_layer("after").kernel.shape[0] == 4


def test_take_and_repeat_get_the_kept_channels():
    model = _model(OPS["take_channels"][0])
    slim, _ = assert_contract(model, kap.PrunePlan({"a": [0, 1, 2, 6, 7]}))  # channel 3 goes: and take's 2nd index
    assert _operation(slim, "Take")._inbound_nodes[0].arguments.args[1] == [1, 3]
    model = _model(OPS["repeat_per_channel"][0])
    slim, _ = assert_contract(model, kap.PrunePlan({"a": [0, 3, 6]}))
    assert list(_operation(slim, "Repeat").repeats) == [1, 3, 2]


@pytest.mark.parametrize("name", ["pad_spatial", "getitem_spatial", "split_spatial"])
def test_non_channel_axis_is_a_pass_through(name):
    model = _model(OPS[name][0])
    graph = kap.DependencyGraph(model)
    kind = {"pad_spatial": "Pad", "getitem_spatial": "GetItem", "split_spatial": "Split"}[name]
    op = _operation(model, kind)
    members = [m for m in graph.group("a").members if m.layer == op.name]
    assert {(m.side, m.tensor_index) for m in members} >= {("input", 0), ("output", 0)}
    for member in members:
        np.testing.assert_array_equal(member.positions, np.arange(8))
        np.testing.assert_array_equal(member.channels, np.arange(8))
    slim, _ = assert_contract(model, kap.PrunePlan({"a": [0, 2, 5]}), graph)
    new = _operation(slim, kind)
    assert new.get_config() == op.get_config()
    assert repr(new._inbound_nodes[0].arguments.args[1:]) == repr(op._inbound_nodes[0].arguments.args[1:])


BLOCKING = {
    "strided_channel_slice": (lambda x: x[..., ::2], "indexes the channel axis with slice(None, None, 2)"),
    "transpose_moves_channels": (lambda x: ops.transpose(x, [0, 3, 1, 2]), "moves the channel axis"),
    "reflect_pad_channels": (lambda x: ops.pad(x, [[0, 0], [0, 0], [0, 0], [1, 1]], mode="reflect"), "mode 'reflect'"),
}


@pytest.mark.parametrize("name", sorted(BLOCKING))
def test_ops_that_cannot_be_re_expressed_block_with_a_reason(name):
    op, message = BLOCKING[name]
    model = _model(op)
    graph = kap.DependencyGraph(model)
    assert not graph.group("a").prunable and message in graph.group("a").reason
    plan = kap.PrunePlan.uniform(graph, 0.5)
    assert "a" not in plan.kept and plan.kept  # the Dense after it is still pruned
    assert_contract(model, plan, graph)


def test_split_inside_a_nested_model():
    inner_in = keras.Input((6, 6, 3))
    left, right = ops.split(L.Conv2D(8, 1, name="a")(inner_in), [5], axis=-1)
    merged = ops.concatenate([L.Dense(3, name="l")(left), L.Dense(3, name="r")(right)], axis=-1)
    inner = keras.Model(inner_in, merged, name="inner")
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, L.Dense(2, name="head")(inner(inputs)))
    randomize(model, seed=3)
    graph = kap.DependencyGraph(model)
    assert {g.id: g.size for g in graph.prunable_groups} == {"inner/a": 8, "inner/l": 3, "inner/r": 3}
    slim, _ = assert_contract(model, kap.PrunePlan({"inner/a": [0, 1, 5, 7]}), graph)
    assert list(_operation(slim.get_layer("inner"), "Split").indices_or_sections) == [2]
