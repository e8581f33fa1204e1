"""Custom layers are seen through (issue 13, deliverable 2, first half).

A custom layer built from Keras sublayers and `keras.ops` is traced into a
functional sub-model (`keras_autoprune.graph.trace`): its sublayers are
pruned like any functional graph, and the pruned model, made of standard
layers, saves to ``.keras``, loads in safe mode without custom objects and
exports to TFLite. A layer that cannot be traced blocks the channels around
itself, with a warning naming it, and never breaks the model.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_autoprune as kap
from keras_autoprune.allocation.cost import PlanCost
from tests.helpers import Block, assert_contract, randomize

L = keras.layers



class Residual(keras.layers.Layer):
    """conv-bn-relu-conv-bn, added to the input by an `Add` sublayer."""

    def __init__(self, filters, hidden, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = L.Conv2D(hidden, 3, padding="same", name="conv1")
        self.bn1 = L.BatchNormalization(name="bn1")
        self.conv2 = L.Conv2D(filters, 3, padding="same", name="conv2")
        self.bn2 = L.BatchNormalization(name="bn2")
        self.add = L.Add(name="add")

    def call(self, x, training=None):
        y = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        return keras.ops.relu(self.add([x, self.bn2(self.conv2(y), training=training)]))


class SqueezeExcite(keras.layers.Layer):
    """Conv, then squeeze-excite written with `keras.ops`, plus a skip connection."""

    def __init__(self, filters, reduced, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(filters, 3, padding="same", name="conv")
        self.reduce = L.Conv2D(reduced, 1, name="reduce")
        self.expand = L.Conv2D(filters, 1, name="expand")

    def call(self, x):
        y = keras.ops.relu(self.conv(x))
        s = keras.ops.mean(y, axis=(1, 2), keepdims=True)
        s = keras.ops.sigmoid(self.expand(keras.ops.relu(self.reduce(s))))
        return keras.ops.add(x, keras.ops.multiply(y, s))


class Outer(keras.layers.Layer):
    """Two custom blocks inside a custom block, with a skip connection."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.first = Block(filters, name="first")
        self.second = Block(filters, name="second")

    def call(self, x):
        return keras.ops.add(x, self.second(self.first(x)))


class TrainingBranch(keras.layers.Layer):
    """Python control flow on ``training``: the trace cannot follow both branches."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(8, 1, name="conv")

    def call(self, x, training=None):
        y = self.conv(x)
        return y * 0.5 if training else y


class PyFunction(keras.layers.Layer):
    """A conv followed by `tf.py_function`: nothing symbolic to trace."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(8, 1, name="conv")

    def call(self, x):
        y = self.conv(x)
        out = tf.py_function(lambda t: t * 2.0, [y], tf.float32)
        out.set_shape(y.shape)
        return out


class DataDependent(keras.layers.Layer):
    """A data-dependent sign, computed with TensorFlow ops."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(8, 1, name="conv")

    def call(self, x):
        y = self.conv(x)
        return tf.where(tf.reduce_max(y) > 0, y, -y)


def _model(middle: keras.layers.Layer) -> keras.Model:
    """c1 (8) -> middle -> c2 (6) -> GAP -> head (3)."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = middle(x)
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    randomize(model)
    return model


def _inputs(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 8, 8, 3)).astype("float32")


def _sizes(graph) -> list[tuple[str, int, bool]]:
    """(id, size, prunable) per group, automatic sublayer names replaced by their class."""
    return [(g.id.split("/")[0], g.size, g.prunable) for g in graph.groups]


TRACED = {
    # name: (layer factory, expected groups, channels of the custom layer's sublayers after a 50% plan)
    "block": (
        lambda: Block(6, name="blk"),
        [("input:image", 3, False), ("c1", 8, True), ("blk", 6, True), ("c2", 6, True), ("head", 3, False)],
        {"blk": 3},
    ),
    "residual": (
        lambda: Residual(8, 5, name="res"),
        [("input:image", 3, False), ("c1", 8, True), ("res", 5, True), ("c2", 6, True), ("head", 3, False)],
        {"res/conv1": 3, "res/conv2": 4},
    ),
    "squeeze-excite": (
        lambda: SqueezeExcite(8, 4, name="se"),
        [("input:image", 3, False), ("c1", 8, True), ("se", 4, True), ("c2", 6, True), ("head", 3, False)],
        {"se/conv": 4, "se/reduce": 2, "se/expand": 4},
    ),
    "nested": (
        lambda: Outer(8, name="outer"),
        [("input:image", 3, False), ("c1", 8, True), ("outer", 8, True), ("c2", 6, True), ("head", 3, False)],
        {"outer/first": 4},
    ),
}


@pytest.mark.parametrize("case", sorted(TRACED))
def test_custom_layer_is_seen_through_and_pruned_exactly(case, tmp_path):
    factory, expected_groups, expected_widths = TRACED[case]
    model = _model(factory())
    name = model.layers[2].name
    before = [np.array(v.numpy()) for v in model.weights]
    x = _inputs()
    reference = np.asarray(model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seen through: no "no pruning handler" warning
        graph = kap.DependencyGraph(model)
    assert _sizes(graph) == expected_groups
    custom = model.get_layer(name)
    assert sorted(graph.traced) == sorted(id(l) for l in custom._flatten_layers() if type(l) in (Block, type(custom)))

    plan = kap.PrunePlan.uniform(graph, ratio=0.5)
    slim, masked = assert_contract(model, plan, graph)
    # The input model is untouched: same class, weights and outputs.
    assert type(model.get_layer(name)) is type(factory())
    for a, b in zip(before, [v.numpy() for v in model.weights]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model(x), reference)
    # The custom layer became its traced functional model, with pruned sublayers.
    inner = slim.get_layer(name)
    assert type(inner).__name__ == "Functional" and type(masked.get_layer(name)).__name__ == "Functional"
    for path, width in expected_widths.items():
        layer = slim
        for part in path.split("/"):
            layer = layer.get_layer(part)
        while isinstance(layer, keras.Model):  # a traced Block: its (automatically named) conv
            layer = [l for l in layer.layers if isinstance(l, (L.Conv2D, keras.Model))][0]
        assert layer.filters == width, path
    assert slim.get_layer("c1").filters == 4 and slim.get_layer("c2").filters == 3
    # Accounting sees the sublayers, and the plan's cost is the pruned model's.
    assert kap.count_flops(model) == kap.count_flops(masked)
    assert PlanCost(model, graph)(plan) == kap.count_flops(slim) < kap.count_flops(model)

    path = str(tmp_path / "slim.keras")
    slim.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)  # standard layers: no custom objects
    np.testing.assert_allclose(loaded(x), slim(x), rtol=1e-6, atol=1e-6)
    result = kap.export_tflite(slim, str(tmp_path / "slim.tflite"), num_samples=4)  # checked to 1e-4
    assert result.verified


def test_nap_collects_statistics_inside_custom_layers():
    model = _model(Residual(8, 5, name="res"))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(16, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 16))
    slim = kap.NAPCallback(data, budget=kap.Budget(flops=0.6), verbose=0).prune(model)
    assert kap.count_flops(slim) <= 0.6 * kap.count_flops(model)
    assert type(slim.get_layer("res")).__name__ == "Functional"


@pytest.mark.parametrize(
    "factory, reason",
    [
        (lambda: TrainingBranch(name="opaque"), "training mode"),
        (lambda: PyFunction(name="opaque"), "tracing its call failed"),
        (lambda: DataDependent(name="opaque"), "tracing its call failed"),
    ],
    ids=["training-branch", "py-function", "data-dependent"],
)
def test_untraceable_custom_layer_blocks_locally_with_a_warning(factory, reason):
    model = _model(factory())
    with pytest.warns(UserWarning, match=rf"'opaque' \({type(factory()).__name__}; not traced: .*{reason}"):
        graph = kap.DependencyGraph(model)
    assert graph.traced == {}
    assert [(g.id, g.prunable) for g in graph.groups] == [
        ("input:image", False), ("c1", False), ("opaque", False), ("c2", True), ("head", False)]
    slim, _ = assert_contract(model, kap.PrunePlan({"c2": [1, 4]}), graph)
    assert type(slim.get_layer("opaque")) is type(model.get_layer("opaque"))
    assert slim.get_layer("c2").filters == 2


def test_layer_with_own_weights_is_not_traced():
    class Scaled(Block):
        def build(self, input_shape):
            super().build(input_shape)
            self.gain = self.add_weight(shape=(), initializer="ones", name="gain")

        def call(self, x):
            return super().call(x) * self.gain

    with pytest.warns(UserWarning, match=r"'opaque' \(Scaled; not traced: it holds variables of its own"):
        graph = kap.DependencyGraph(_model(Scaled(4, name="opaque")))
    assert not graph.group("c1").prunable and graph.group("c2").prunable


# -- what keras-hub's DeiT and MiT layers do (no keras-hub needed) -------------------------------------


class ScoredBlock(keras.layers.Layer):
    """A residual MLP block that returns ``(x, None)``, as DeiT's encoder block does without scores."""

    def __init__(self, width, hidden, **kwargs):
        super().__init__(**kwargs)
        self.up = L.Dense(hidden, activation="relu", name="up")
        self.down = L.Dense(width, name="down")

    def call(self, x, return_scores=False):
        return x + self.down(self.up(x)), None


class Encoder(keras.layers.Layer):
    """Two `ScoredBlock`s; returns the tokens and an empty placeholder (as DeiT's encoder does)."""

    def __init__(self, width, hidden, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [ScoredBlock(width, hidden, name=f"block_{i}") for i in range(2)]

    def call(self, x):
        for block in self.blocks:
            x, scores = block(x, return_scores=False)
        n, c = keras.ops.shape(x)[1], keras.ops.shape(x)[2]
        return x, keras.ops.empty((0, n, c), dtype=x.dtype)


class SpatialMLP(keras.layers.Layer):
    """MiT's MixFFN: Dense, tokens reshaped to an image with the batch size read by ``ops.shape``, depthwise conv."""

    def __init__(self, width, hidden, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = L.Dense(hidden, name="fc1")
        self.dwconv = L.DepthwiseConv2D(3, padding="same", name="dwconv")
        self.fc2 = L.Dense(width, name="fc2")

    def call(self, x):
        x = self.fc1(x)
        shape = keras.ops.shape(x)
        side = int(shape[1] ** 0.5)
        x = keras.ops.reshape(x, (shape[0], side, side, shape[2]))  # shape[0] is None when traced
        x = keras.ops.reshape(self.dwconv(x), (shape[0], -1, shape[2]))
        return self.fc2(keras.ops.nn.gelu(x))


def _token_model(middle: keras.layers.Layer, tuple_output: bool) -> keras.Model:
    """tokens (16, 4) -> c1 (8) -> middle -> c2 (6) -> mean -> head (3)."""
    inputs = keras.Input((16, 4), name="tokens")
    x = L.Dense(8, name="c1")(inputs)
    x = middle(x)
    if tuple_output:
        x, _ = x
    x = L.Dense(6, activation="relu", name="c2")(x)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D(name="gap")(x)))
    randomize(model)
    return model


@pytest.mark.parametrize(
    "factory, tuple_output, hidden",
    [
        (lambda: Encoder(8, 12, name="enc"), True, {"enc/block_0/up": 12, "enc/block_1/up": 12}),
        (lambda: SpatialMLP(8, 12, name="enc"), False, {"enc/fc1": 12, "enc/fc2": 8}),
    ],
    ids=["none-and-placeholder-outputs", "reshape-with-symbolic-batch-size"],
)
def test_custom_layers_returning_none_or_reshaping_with_a_none_batch_are_traced(factory, tuple_output, hidden, tmp_path):
    model = _token_model(factory(), tuple_output)
    x = np.random.default_rng(1).normal(size=(3, 16, 4)).astype("float32")  # another batch size than traced
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seen through, blocks included: no "no pruning handler" warning
        graph = kap.DependencyGraph(model)
    # The residual stream (c1) is prunable too; the unused placeholder adds no group.
    expected = {"input:tokens": (4, False), "c1": (8, True), "c2": (6, True), "head": (3, False)}
    expected.update({name: (size, True) for name, size in hidden.items()})
    assert {g.id: (g.size, g.prunable) for g in graph.groups} == expected

    plan = kap.PrunePlan.uniform(graph, ratio=0.5)
    slim, masked = assert_contract(model, plan, graph)
    np.testing.assert_allclose(slim(x), masked(x), rtol=1e-5, atol=1e-5)
    for name, size in hidden.items():
        layer = slim
        for part in name.split("/"):
            layer = layer.get_layer(part)
        assert layer.units == size // 2
    assert kap.count_flops(slim) < kap.count_flops(model)
    path = str(tmp_path / "slim.keras")
    slim.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)  # standard layers and ops: no custom objects
    np.testing.assert_allclose(loaded(x), slim(x), rtol=1e-6, atol=1e-6)
    assert kap.export_tflite(slim, str(tmp_path / "slim.tflite"), num_samples=4).verified
