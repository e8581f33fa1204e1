"""Surgery never rebuilds untouched layers from their config (issue 13, deliverable 1).

Custom layers with unnamed sublayers, `Lambda` layers and layers whose
``get_config`` does not round-trip only block the channels around
themselves; the rest of the model is pruned exactly. The custom layers here
call TensorFlow ops, so they cannot be traced (seen through, see
tests/test_custom_layers.py) and stay opaque.
"""

import threading
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_autoprune as kap
from keras_autoprune.surgery.duplicate import duplicate_layer
from tests.helpers import Block, assert_contract, randomize

L = keras.layers



class OpaqueBlock(Block):
    """`Block` ending with a TensorFlow op: it cannot be traced."""

    def call(self, x):
        return tf.nn.relu(self.bn(self.conv(x)))


class ForgetfulScale(keras.layers.Layer):
    """``x * factor`` (a TensorFlow op) whose get_config forgets ``factor`` (no round trip)."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return tf.multiply(x, self.factor)

    def get_config(self):
        return super().get_config()


class LockedScale(ForgetfulScale):
    """Cannot be deep-copied (holds a lock) nor rebuilt from its config."""

    def __init__(self, factor, **kwargs):
        super().__init__(factor, **kwargs)
        self.lock = threading.Lock()


class ChannelScale(keras.layers.Layer):
    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gamma


class ScaleBlock(keras.layers.Layer):
    """A per-channel scale held by an unnamed sublayer (registered below)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = ChannelScale()

    def call(self, x):
        return self.inner(x)


class ForgetfulChannelScale(ChannelScale):
    def __init__(self, unused, **kwargs):
        super().__init__(**kwargs)
        self.unused = unused

    def get_config(self):
        return super().get_config()


kap.register_handler(ScaleBlock, kap.handlers.ChannelwiseHandler())
kap.register_handler(ForgetfulChannelScale, kap.handlers.ChannelwiseHandler())


def _model(middle: keras.layers.Layer) -> keras.Model:
    """c1 -> middle (unknown or custom) -> c2 -> relu -> c3 -> GAP -> Dense."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = middle(x)
    x = L.Conv2D(5, 3, padding="same", name="c2")(x)
    x = L.ReLU(name="r2")(x)
    x = L.Conv2D(4, 1, name="c3")(x)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))
    randomize(model)
    return model


def _graph(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kap.DependencyGraph(model)


def _snapshot(model):
    return [np.array(v.numpy()) for v in model.weights]


def _check_untouched(model, slim, name, before):
    """The slim model's ``name`` is an independent copy with the same weights; the input model is unchanged."""
    old, new = model.get_layer(name), slim.get_layer(name)
    assert new is not old and type(new) is type(old)
    assert [v.path for v in new.weights] == [v.path for v in old.weights]
    for a, b in zip(new.weights, old.weights):
        assert a is not b
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(before, _snapshot(model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "middle, name",
    [
        (lambda: OpaqueBlock(4, name="blk"), "blk"),
        (lambda: L.Lambda(lambda t: t * 2.0, name="lam"), "lam"),
        (lambda: ForgetfulScale(2.0, name="sc"), "sc"),
    ],
    ids=["unnamed-sublayers", "lambda", "config-no-round-trip"],
)
def test_untouched_custom_layer_is_copied_and_neighbours_are_pruned(middle, name):
    model = _model(middle())
    before = _snapshot(model)
    graph = _graph(model)
    assert not graph.group("c1").prunable  # blocked by the unknown layer
    plan = kap.PrunePlan({"c2": [0, 2, 4], "c3": [1, 3]})
    slim, _ = assert_contract(model, plan, graph)
    assert slim.get_layer("c2").filters == 3 and slim.get_layer("c3").filters == 2
    expected = model.get_layer("c3").kernel.numpy()[:, :, [0, 2, 4]][..., [1, 3]]
    np.testing.assert_array_equal(slim.get_layer("c3").kernel.numpy(), expected)
    _check_untouched(model, slim, name, before)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 6)).astype("float32")
    np.testing.assert_array_equal(slim.get_layer(name)(x), model.get_layer(name)(x))


def test_copied_layer_trains_independently_of_the_input_model():
    model = _model(OpaqueBlock(4, name="blk"))
    before = _snapshot(model)
    slim = kap.apply_plan(model, kap.PrunePlan({"c2": [0, 1]}), _graph(model))
    slim.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)
    slim.fit(rng.normal(size=(4, 8, 8, 3)).astype("float32"), rng.normal(size=(4, 2)).astype("float32"), verbose=0)
    assert not np.array_equal(slim.get_layer("blk").conv.kernel.numpy(), model.get_layer("blk").conv.kernel.numpy())
    for a, b in zip(before, _snapshot(model)):
        np.testing.assert_array_equal(a, b)


def test_touched_custom_layer_with_unnamed_sublayer_gets_weights_by_position():
    model = _model(ScaleBlock(name="sb"))
    model.get_layer("sb").inner.gamma.assign(np.arange(1, 7, dtype="float32"))
    graph = _graph(model)
    assert graph.group("c1").prunable
    slim, _ = assert_contract(model, kap.PrunePlan({"c1": [1, 3, 4]}), graph)
    np.testing.assert_array_equal(slim.get_layer("sb").inner.gamma.numpy(), [2.0, 4.0, 5.0])


def test_touched_layer_without_config_round_trip_is_a_clear_error():
    model = _model(ForgetfulChannelScale(7, name="fcs"))
    plan = kap.PrunePlan({"c1": [0, 1]})
    kap.mask_plan(model, plan)  # same architecture: copied, no config needed
    with pytest.raises(kap.UnsupportedModelError, match=r"(?s)'fcs' \(ForgetfulChannelScale\).*from_config.*Fix: make"):
        kap.apply_plan(model, plan)


def test_layer_that_can_be_neither_copied_nor_rebuilt_is_a_clear_error():
    model = _model(LockedScale(2.0, name="locked"))
    with pytest.raises(kap.UnsupportedModelError, match=r"(?s)'locked' \(LockedScale\).*lock.*Fix: make"):
        kap.apply_plan(model, kap.PrunePlan({"c2": [0, 1]}), _graph(model))


def test_replace_layers_copies_unnamed_sublayer_blocks():
    model = _model(Block(4, name="blk"))
    before = _snapshot(model)
    head = model.get_layer("head")
    weights = {"kernel": head.kernel.numpy(), "bias": head.bias.numpy()}
    swap = kap.LayerReplacement([L.Dense(2, name="head2")], [weights])
    new = kap.replace_layers(model, {"head": swap})
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(new(x), model(x), rtol=1e-6, atol=1e-6)
    _check_untouched(model, new, "blk", before)


def test_duplicate_layer_copies_seed_generators_and_nested_functional_models():
    tower_in = keras.Input((4,))
    tower = keras.Model(tower_in, L.Dense(3)(L.Dense(5, activation="relu")(tower_in)))

    class Holder(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.tower = tower
            self.drop = L.Dropout(0.5, seed=3)

        def call(self, x, training=False):
            return self.drop(self.tower(x), training=training)

    holder = Holder()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    expected = np.asarray(holder(x))
    copy = duplicate_layer(holder)
    np.testing.assert_array_equal(copy(x), expected)
    assert {id(v) for v in copy.variables}.isdisjoint({id(v) for v in holder.variables})
    assert len(copy.variables) == len(holder.variables) == 5  # 2 kernels, 2 biases, 1 seed state
    copy.tower.layers[-1].kernel.assign(np.zeros((5, 3), "float32"))
    np.testing.assert_array_equal(holder(x), expected)


@pytest.mark.filterwarnings("ignore:`build\\(\\)` was called on layer 'blk'")  # Keras, about Block itself
def test_pruned_model_with_copied_custom_layer_saves_and_loads(tmp_path):
    model = _model(OpaqueBlock(4, name="blk"))
    slim = kap.apply_plan(model, kap.PrunePlan({"c2": [0, 1, 3]}), _graph(model))
    path = str(tmp_path / "slim.keras")
    slim.save(path)
    loaded = keras.saving.load_model(path, custom_objects={"OpaqueBlock": OpaqueBlock})
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x), slim(x), rtol=1e-6, atol=1e-6)
    assert loaded.get_layer("c2").filters == 3


def test_an_adapted_normalization_keeps_its_statistics_through_surgery():
    """Its copy is rebuilt from the config (deep copy fails); the adapted mean and variance must follow the weights."""
    inputs = keras.Input((3,))
    norm = L.Normalization(name="norm")
    outputs = L.Dense(2, name="d2")(norm(L.Dense(4, name="d1")(inputs)))
    model = keras.Model(inputs, outputs)
    norm.adapt(np.random.default_rng(1).normal(3.0, 2.0, size=(64, 4)).astype("float32"))
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    copy = kap.apply_plan(model, kap.PrunePlan({}))
    np.testing.assert_allclose(np.asarray(copy(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(copy.get_layer("norm").mean), np.asarray(norm.mean), rtol=1e-6)


@pytest.mark.parametrize("make", ["lora", "int8"])
def test_lora_and_quantized_layers_block_their_channels(make):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="d1")(keras.layers.Dense(8, activation="relu", name="d0")(inputs))
    x = keras.layers.Dense(8, activation="relu", name="d3")(x)  # its channels are free of d1's LoRA path
    model = keras.Model(inputs, keras.layers.Dense(3, name="d2")(x))
    randomize(model, seed=3)
    if make == "lora":
        model.get_layer("d1").enable_lora(2)
        randomize(model, seed=4)  # lora_kernel_b is zero at first: give the LoRA path weight
    else:
        model.quantize("int8")
    graph = kap.DependencyGraph(model)
    blocked = {g.id: g.reason for g in graph.groups if not g.prunable}
    assert "d1" in blocked and ("lora" in blocked["d1"].lower() or "quantization_mode" in blocked["d1"])
    # Whatever stays prunable keeps the contract (before: LoRA columns stayed alive, int8 scales crashed).
    plan = kap.PrunePlan.uniform(graph, 0.5)
    assert "d1" not in plan.kept
    assert ("d3" in plan.kept) == (make == "lora")  # LoRA blocks d1's channels only; int8 quantizes every Dense
    assert_contract(model, plan, graph)


def test_a_shared_reshape_ties_the_channels_of_its_calls():
    a_in, b_in = keras.Input((6, 6, 3)), keras.Input((6, 6, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a")(a_in)
    b = keras.layers.Conv2D(4, 3, padding="same", name="b")(b_in)
    reshape = keras.layers.Reshape((36, 4), name="r")
    out = keras.layers.Add()([keras.layers.Dense(2, name="d1")(reshape(a)), keras.layers.Dense(2, name="d2")(reshape(b))])
    model = keras.Model([a_in, b_in], out)
    randomize(model, seed=5)
    graph = kap.DependencyGraph(model)
    group = next(g for g in graph.prunable_groups if any(m.layer == "a" for m in g.members))
    assert {m.layer for m in group.members} >= {"a", "b"}  # one group: both calls keep the same channels
    slim, _ = assert_contract(model, kap.PrunePlan({group.id: [0, 1]}), graph)  # before: Keras refused target_shape
    assert slim.get_layer("r").target_shape == (36, 2)


@pytest.mark.parametrize("shape, axis", [((6, 6, 3), [1, 2]), ((5, 4), 1), ((6, 4), 1)])
def test_normalization_over_other_axes_passes_channels_and_keeps_its_weights(shape, axis):
    """Instance-norm style LayerNormalization: its beta is per position, so a removed channel is not 0 after it."""
    inputs = keras.Input(shape)
    producer = keras.layers.Conv2D(6, 3, padding="same", name="p") if len(shape) == 3 else keras.layers.Dense(6, name="p")
    x = keras.layers.LayerNormalization(axis=axis, name="ln")(producer(inputs))
    reader = keras.layers.Conv2D(2, 1, name="r") if len(shape) == 3 else keras.layers.Dense(2, name="r")
    model = keras.Model(inputs, reader(keras.layers.ReLU()(x)))
    randomize(model, seed=6)  # beta and gamma non-trivial
    graph = kap.DependencyGraph(model)
    slim, _ = assert_contract(model, kap.PrunePlan({"p": [0, 2, 3]}), graph)  # before: 0.46 and 0.38 apart, or a crash
    assert slim.get_layer("ln").gamma.shape == model.get_layer("ln").gamma.shape


@pytest.mark.parametrize("kind", ["nested", "traced"])
@pytest.mark.parametrize("order", ["sigmoid_first", "relu_first"])
def test_a_nested_model_or_traced_layer_called_twice_keeps_each_calls_constants(kind, order):
    """A removed channel is 0.5 after the sigmoid branch and 0 after the relu one: each call folds its own."""
    if kind == "nested":
        inner_inputs = keras.Input((6, 6, 4))
        inner = keras.Model(inner_inputs, keras.layers.Conv2D(2, 3, padding="same", name="ic")(inner_inputs), name="inner")
    else:
        inner = Block(2, name="blk")
    inputs = keras.Input((6, 6, 3))
    a = keras.layers.Conv2D(4, 1, activation="sigmoid", name="a")(inputs)
    b = keras.layers.Conv2D(4, 1, activation="relu", name="b")(inputs)
    first, second = (a, b) if order == "sigmoid_first" else (b, a)
    model = keras.Model(inputs, keras.layers.Add()([inner(first), inner(second)]))
    randomize(model, seed=7)
    graph = kap.DependencyGraph(model)
    plan = kap.PrunePlan.uniform(graph, 0.5)
    assert len(plan.kept) == 1  # a's and b's channels, tied by the shared call: each call folds their removal
    assert_contract(model, plan, graph)  # before: 0.34 apart in one of the orders


def test_surgery_leaves_the_input_models_operations_without_new_nodes():
    inputs = keras.Input((6, 6, 3))
    x = keras.ops.relu(keras.layers.Conv2D(4, 3, padding="same", name="c1")(inputs))
    x = keras.ops.mean(keras.layers.Conv2D(4, 3, padding="same", name="c2")(x), axis=(1, 2))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(x))
    randomize(model, seed=8)
    operations = [op for op in model.operations if not isinstance(op, keras.layers.Layer)]
    assert len(operations) == 2
    before = [len(op._inbound_nodes) for op in operations]
    graph = kap.DependencyGraph(model)
    slim, masked = assert_contract(model, kap.PrunePlan.uniform(graph, 0.5), graph)
    kap.replace_layers(model, {})
    assert [len(op._inbound_nodes) for op in operations] == before  # before: 1 -> 3
    assert not {id(op) for op in operations} & {id(op) for op in slim.operations + masked.operations}
