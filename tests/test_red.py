"""RED (keras_autoprune.red): BN folding, hashing, exact merging, depthwise separation, compress."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.red import density_modes, fold_batchnorm, hash_weights, merge_neurons, separate_depthwise, silverman_bandwidth
from keras_autoprune.red.separation import distinct_kernels
from keras_autoprune.graph.dependency import DependencyGraph
from tests.helpers import Block, randomize, relative_error, subclassed_model

L = keras.layers


def _inputs(model, seed=1, batch=2):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (batch,) + tuple(model.inputs[0].shape[1:])).astype("float32")


def _assert_same(a, b, x, tolerance=1e-5):
    error = relative_error(np.asarray(a(x)), np.asarray(b(x)))
    assert error <= tolerance, f"relative error {error:.3g}"


def _copy_channel(layer, source, target, axis=-1):
    """Makes output channel ``target`` of ``layer`` equal to ``source`` (every per-channel weight)."""
    for variable in layer.weights:
        value = np.array(variable.numpy())
        moved = np.moveaxis(value, axis, 0) if value.ndim > 1 else value
        moved[target] = moved[source]
        variable.assign(value)


# -- stage 1: density modes and hashing -----------------------------------------


def test_density_modes_find_planted_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([-1.0, 0.0, 2.0])
    values = np.concatenate([c + rng.normal(0, 0.01, 50) for c in centres])
    modes = density_modes(values, bandwidth=0.05)
    np.testing.assert_allclose(modes.modes, centres, atol=0.01)
    assert len(modes.boundaries) == 2
    assert np.unique(modes.snap(values)).size == 3


def test_silverman_bandwidth_formula():
    values = np.arange(10.0)
    q25, q75 = np.percentile(values, [25, 75])
    expected = 0.9 * min(values.std(), (q75 - q25) / 1.34) * 10 ** -0.2
    assert silverman_bandwidth(values) == pytest.approx(expected)
    assert silverman_bandwidth(np.ones(5)) == 0.0


def test_snapped_values_stay_in_their_basin():
    values = np.random.default_rng(1).normal(0, 1, 3000)
    modes = density_modes(values, bandwidth=0.05)
    snapped = modes.snap(values)
    assert 3 <= len(modes.modes) < 3000
    assert np.isin(snapped, modes.modes).all()
    np.testing.assert_array_equal(modes.basin(snapped), modes.basin(values))


def test_snapping_to_the_mean_keeps_the_basins_and_moves_the_values_less():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.exponential(0.3, 400), 3 - rng.exponential(0.3, 200)])  # two skewed basins
    modes = density_modes(values, bandwidth=0.2)
    means, at_modes = modes.snap(values, to="mean"), modes.snap(values)
    basins = modes.basin(values)
    assert len(modes.modes) >= 2
    for k in np.unique(basins):
        np.testing.assert_allclose(means[basins == k], values[basins == k].mean(), rtol=1e-12)
    np.testing.assert_array_equal(modes.basin(means), basins)  # a basin's mean lies inside it
    assert np.unique(means).size == np.unique(at_modes).size == np.unique(basins).size
    assert ((means - values) ** 2).sum() < 0.9 * ((at_modes - values) ** 2).sum()
    with pytest.raises(ValueError, match="Expected `to` to be 'mode' or 'mean'. Received: to='median'"):
        modes.snap(values, to="median")


def test_hash_weights_reduces_distinct_values_and_keeps_basins():
    model = keras.Sequential([keras.Input((12,)), L.Dense(16, name="d1"), L.Dense(4, name="d2")])
    randomize(model, seed=2)
    hashed, tensors = hash_weights(model, bandwidth_scale=0.5)
    at_modes, mode_tensors = hash_weights(model, bandwidth_scale=0.5, snap_to="mode")
    assert [(t.layer, t.weight) for t in tensors] == [("d1", "kernel"), ("d1", "bias"), ("d2", "kernel"), ("d2", "bias")]
    for tensor in tensors:
        index = 0 if tensor.weight == "kernel" else 1
        before = model.get_layer(tensor.layer).weights[index].numpy().ravel().astype(np.float64)
        after = hashed.get_layer(tensor.layer).weights[index].numpy().ravel()
        assert tensor.distinct_before == before.size and tensor.distinct_after == np.unique(after).size
        assert tensor.distinct_after < tensor.distinct_before
        modes = density_modes(before, tensor.bandwidth)
        basins = modes.basin(before)
        means = np.array([before[basins == k].mean() for k in basins])  # default: each basin's mean
        np.testing.assert_allclose(after, means, rtol=1e-6)
        np.testing.assert_allclose(at_modes.get_layer(tensor.layer).weights[index].numpy().ravel(),
                                   modes.modes[basins], rtol=1e-6)
        assert tensor.relative_error == pytest.approx(np.linalg.norm(after - before) / np.linalg.norm(before), rel=1e-9)
    assert all(0 < t.relative_error <= m.relative_error for t, m in zip(tensors, mode_tensors))
    assert np.unique(model.get_layer("d1").kernel.numpy()).size == 12 * 16  # input model untouched


# -- stage 0: BatchNormalization folding ------------------------------------------


PRODUCERS = {
    "conv2d": lambda: L.Conv2D(4, 3, padding="same", use_bias=False),
    "conv1d": lambda: L.Conv1D(4, 2),
    "grouped": lambda: L.Conv2D(4, 3, groups=2),
    "depthwise": lambda: L.DepthwiseConv2D(3, depth_multiplier=2),
    "separable": lambda: L.SeparableConv2D(4, 3, depth_multiplier=2),
    "transpose": lambda: L.Conv2DTranspose(4, 3, strides=2),
    "dense": lambda: L.Dense(4),
}


@pytest.mark.parametrize("kind", sorted(PRODUCERS))
def test_batchnorm_folding_is_exact(kind):
    shape = (7, 4) if kind == "conv1d" else (6, 6, 4)
    inputs = keras.Input(shape)
    x = PRODUCERS[kind]()(inputs)
    x = L.BatchNormalization(name="bn", epsilon=0.01)(x)
    model = keras.Model(inputs, L.ReLU()(x))
    randomize(model, seed=3)
    folded, folds = fold_batchnorm(model)
    assert [f.norm for f in folds] == ["bn"]
    assert "bn" not in [layer.name for layer in folded.layers]
    _assert_same(folded, model, _inputs(model))
    assert kap.count_params(folded) == kap.count_params(model) - 4 * model.get_layer("bn").gamma.shape[0] + (
        0 if model.layers[1].use_bias else model.get_layer("bn").gamma.shape[0])


def test_batchnorm_kept_where_folding_would_be_wrong():
    inputs = keras.Input((5, 5, 3))
    a = L.Conv2D(4, 3, activation="relu", name="relu_conv")(inputs)
    a = L.BatchNormalization(name="after_activation")(a)
    b = L.Conv2D(4, 3, name="shared_output")(inputs)
    b2 = L.BatchNormalization(name="output_read_twice")(b)
    s = L.Add()([a, b2, b])
    s = L.BatchNormalization(name="after_add")(s)
    model = keras.Model(inputs, s)
    randomize(model, seed=4)
    folded, folds = fold_batchnorm(model)
    assert folds == []
    _assert_same(folded, model, _inputs(model))


def test_batchnorm_folding_in_sequential_model_keeps_an_identity():
    model = keras.Sequential([keras.Input((4, 4, 2)), L.Conv2D(3, 3, name="c"), L.BatchNormalization(name="bn"), L.ReLU()])
    randomize(model, seed=5)
    folded, folds = fold_batchnorm(model)
    assert len(folds) == 1 and type(folded.get_layer("bn")).__name__ == "Identity"
    _assert_same(folded, model, _inputs(model))


def test_batchnorm_folding_in_nested_models():
    inner = keras.Sequential([keras.Input((5, 5, 3)), L.Conv2D(4, 3, name="c"), L.BatchNormalization(name="bn")], name="inner")
    inputs = keras.Input((5, 5, 3))
    x = L.Conv2D(4, 1, name="c2")(L.ReLU()(inner(inputs)))
    middle = keras.Model(inputs, L.BatchNormalization(name="bn2")(x), name="middle")
    model = keras.Sequential([keras.Input((5, 5, 3)), middle, L.GlobalAveragePooling2D(), L.Dense(2)])
    randomize(model, seed=12)
    folded, folds = fold_batchnorm(model)
    assert [f.norm for f in folds] == ["middle/inner/bn", "middle/bn2"]
    assert [layer.name for layer in folded.layers[0].layers][-1] == "c2"  # a Functional model inside a Sequential
    _assert_same(folded, model, _inputs(model))

    outer_inputs = keras.Input((5, 5, 3))
    functional = keras.Model(outer_inputs, L.Dense(2)(L.GlobalAveragePooling2D()(middle(outer_inputs))))
    folded, folds = fold_batchnorm(functional)
    assert [f.norm for f in folds] == ["middle/inner/bn", "middle/bn2"]
    assert [layer.name for layer in folded.get_layer("middle").layers][-1] == "c2"
    _assert_same(folded, functional, _inputs(functional))
    result = kap.red.compress(functional, bandwidth_scale=0.0)
    _assert_same(result.model, functional, _inputs(functional))


def _custom_block_model():
    """A traced custom layer (Conv, BatchNormalization, relu) whose channels 0 and 2 are equal."""
    inputs = keras.Input((6, 6, 3))
    block = Block(4, name="blk")
    x = L.Conv2D(3, 1, name="c")(block(inputs))
    model = keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))
    randomize(model, seed=21)
    _copy_channel(block.conv, 0, 2)
    _copy_channel(block.bn, 0, 2)
    return model


def test_every_stage_reaches_layers_inside_custom_layers():
    model = _custom_block_model()
    x = _inputs(model)
    folded, folds = fold_batchnorm(model)
    assert [f.norm.split("/")[0] for f in folds] == ["blk"]
    assert kap.count_params(folded) == kap.count_params(model) - 4 * 4  # gamma, beta, mean, variance gone
    _assert_same(folded, model, x)

    hashed, tensors = hash_weights(folded, bandwidth_scale=1.0)
    inner = [t for t in tensors if t.layer.startswith("blk/") and t.weight == "kernel"]
    assert len(inner) == 1 and inner[0].distinct_after < inner[0].distinct_before
    kernels = [np.asarray(v) for v in hashed.weights if v.path.endswith("kernel") and len(v.shape) == 4]
    assert sorted(np.unique(k).size for k in kernels) == sorted(
        t.distinct_after for t in tensors if t.weight == "kernel" and t.layer != "head")

    result = merge_neurons(folded)
    assert list(result.clusters.values()) == [[[0, 2]]]
    _assert_same(result.model, model, x)
    compressed = kap.red.compress(model, bandwidth_scale=0.0)
    assert compressed.model.count_params() < model.count_params()
    _assert_same(compressed.model, model, x)


def test_separation_inside_a_custom_layer():
    inputs = keras.Input((8, 8, 3))
    block = Block(16, name="blk")
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(block(inputs)))
    randomize(model, seed=22)
    kernel, bias = block.conv.get_weights()
    block.conv.set_weights([np.repeat(kernel[..., :1], 16, axis=-1), bias])  # one kernel per input channel
    separated, separations = separate_depthwise(model)
    assert [(s.layer.split("/")[0], s.multiplier, s.distinct_kernels) for s in separations] == [("blk", 1, 3)]
    assert kap.count_flops(separated) < kap.count_flops(model)
    _assert_same(separated, model, _inputs(model))


def test_compress_counts_a_model_of_unknown_input_size_at_input_shape():
    inputs = keras.Input((None, None, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inputs))
    model = keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(L.ReLU()(x))))
    randomize(model, seed=24)
    _copy_channel(model.get_layer("c"), 0, 3)
    _copy_channel(model.get_layer("bn"), 0, 3)
    with pytest.raises(ValueError, match="input_shape"):
        kap.red.compress(model)
    result = kap.red.compress(model, bandwidth_scale=0.0, input_shape=(8, 8, 3))
    assert result.stages[0].flops == kap.count_flops(model, input_shape=(8, 8, 3))
    assert result.stages[-1].flops == kap.count_flops(result.model, input_shape=(8, 8, 3)) < result.stages[0].flops
    assert result.report.totals["flops_after"] == result.stages[-1].flops
    _assert_same(result.model, model, np.random.default_rng(1).normal(0, 1, (2, 8, 8, 3)).astype("float32"))
    fitted = kap.red.compress(model, bandwidth_scale=0.01, budget=kap.Budget(flops=0.9), input_shape=(8, 8, 3))
    assert fitted.stages[-1].flops <= 0.9 * kap.count_flops(model, input_shape=(8, 8, 3))


def test_a_graph_of_another_model_is_refused():
    model = _chain_model()
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    for stage in (fold_batchnorm, hash_weights, merge_neurons, separate_depthwise):
        with pytest.raises(ValueError, match="another model"):
            stage(twin, graph=DependencyGraph(model))


def test_hashing_layers_must_name_linear_layers():
    model = _chain_model()
    with pytest.raises(ValueError, match="single string"):
        hash_weights(model, layers="c1")
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['c9'\]"):
        hash_weights(model, layers=["c1", "c9"])
    _, tensors = hash_weights(model, layers=("c1",))
    assert {t.layer for t in tensors} == {"c1"}


# -- stage 2: merging -------------------------------------------------------------


def _chain_model():
    inputs = keras.Input((6, 6, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, name="c2", activation="relu")(x)
    x = L.Flatten()(x)
    outputs = L.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    randomize(model, seed=6)
    return model


def test_merging_finds_planted_duplicates_exactly():
    model = _chain_model()
    for target in (2, 5):  # channels 2 and 5 of c1 copy channel 0 (conv and BN weights)
        _copy_channel(model.get_layer("c1"), 0, target)
        _copy_channel(model.get_layer("bn1"), 0, target)
    _copy_channel(model.get_layer("c2"), 1, 4)  # read through Flatten by the head
    folded, _ = fold_batchnorm(model)
    result = merge_neurons(folded)
    assert result.clusters == {"c1": [[0, 2, 5]], "c2": [[1, 4]]}
    assert result.merged_per_layer == {"c1": 2, "c2": 1}
    assert result.model.get_layer("c1").filters == 6 and result.model.get_layer("c2").filters == 5
    assert result.model.get_layer("head").kernel.shape[0] == 4 * 4 * 5
    _assert_same(result.model, model, _inputs(model))


def test_merging_without_duplicates_changes_nothing():
    model = _chain_model()
    result = merge_neurons(model)
    assert result.merged == 0 and result.plan.kept == {}
    assert kap.count_flops(result.model) == kap.count_flops(model)


def _residual_model():
    inputs = keras.Input((5, 5, 3))
    stem = L.Conv2D(6, 3, padding="same", name="stem", activation="relu")(inputs)
    branch = L.Conv2D(6, 3, padding="same", name="branch")(stem)
    shortcut = L.Conv2D(6, 1, name="shortcut")(inputs)
    x = L.ReLU()(L.Add()([branch, shortcut]))
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(2, name="head")(x))
    randomize(model, seed=7)
    return model


def test_residual_tied_channels_merge_only_when_every_producer_agrees():
    model = _residual_model()
    _copy_channel(model.get_layer("branch"), 1, 3)  # only one producer of the Add agrees
    assert merge_neurons(model).merged == 0

    _copy_channel(model.get_layer("shortcut"), 1, 3)  # now both do
    result = merge_neurons(model)
    assert result.clusters == {"branch": [[1, 3]]}
    assert result.merged_per_layer == {"branch": 1, "shortcut": 1}
    assert result.model.get_layer("branch").filters == 5 and result.model.get_layer("shortcut").filters == 5
    _assert_same(result.model, model, _inputs(model))


def test_depthwise_transform_must_agree_too():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 1, name="expand")(inputs)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    model = keras.Model(inputs, L.Conv2D(3, 1, name="project")(x))
    randomize(model, seed=8)
    _copy_channel(model.get_layer("expand"), 0, 2)
    assert merge_neurons(model).merged == 0  # the depthwise filters of 0 and 2 differ
    _copy_channel(model.get_layer("dw"), 0, 2, axis=-2)
    result = merge_neurons(model)
    assert result.clusters == {"expand": [[0, 2]]}
    _assert_same(result.model, model, _inputs(model))


def test_concatenation_and_squeeze_excite_readers():
    inputs = keras.Input((5, 5, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(3, 1, name="b")(inputs)
    x = L.Concatenate()([b, a])
    gate = L.Dense(7, activation="sigmoid", name="gate")(L.Dense(2, name="squeeze")(L.GlobalAveragePooling2D()(x)))
    x = L.Multiply()([x, L.Reshape((1, 1, 7))(gate)])
    model = keras.Model(inputs, L.Conv2D(2, 1, name="out")(x))
    randomize(model, seed=9)
    _copy_channel(model.get_layer("a"), 0, 3)  # concat positions 3 and 6
    assert merge_neurons(model).merged == 0  # the gate of positions 3 and 6 differs
    _copy_channel(model.get_layer("gate"), 3, 6)
    result = merge_neurons(model)
    assert result.clusters == {"b": [[3, 6]]}  # one group: the gate ties the concatenation together
    assert result.model.get_layer("a").filters == 3 and result.model.get_layer("b").filters == 3
    _assert_same(result.model, model, _inputs(model))


def test_near_identical_merging_in_a_group_whose_members_hold_some_channels():
    """A concatenation added to a convolution: each branch holds only part of the group's channels."""
    inputs = keras.Input((5, 5, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(3, 1, name="b")(inputs)
    x = L.Add()([L.Concatenate()([b, a]), L.Conv2D(7, 1, name="c")(inputs)])
    model = keras.Model(inputs, L.Conv2D(2, 1, name="out")(L.ReLU()(x)))
    randomize(model, seed=23)
    _copy_channel(model.get_layer("a"), 0, 3)  # positions 3 and 6
    _copy_channel(model.get_layer("c"), 3, 6)
    for threshold in (0.0, 0.01):
        result = merge_neurons(model, merge_threshold=threshold)
        assert list(result.clusters.values()) == [[[3, 6]]], threshold
        _assert_same(result.model, model, _inputs(model))


def test_channels_merge_through_a_reduction_op():
    """A squeeze written with `keras.ops.mean` over the spatial axes treats two equal channels alike."""
    inputs = keras.Input((5, 5, 3))
    x = L.Conv2D(6, 3, name="c", activation="relu")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="head")(keras.ops.mean(x, axis=(1, 2))))
    randomize(model, seed=17)
    _copy_channel(model.get_layer("c"), 1, 4)
    result = merge_neurons(model)
    assert result.clusters == {"c": [[1, 4]]} and result.model.get_layer("c").filters == 5
    _assert_same(result.model, model, _inputs(model))


def test_group_normalization_blocks_merging():
    inputs = keras.Input((5, 5, 2))
    x = L.Conv2D(4, 1, name="c")(inputs)
    x = L.GroupNormalization(groups=2, name="gn")(x)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="out")(x))
    randomize(model, seed=13)
    _copy_channel(model.get_layer("c"), 0, 1)
    result = merge_neurons(model)
    assert result.merged == 0 and "GroupNormalization" in result.blocked["c"]


def test_near_identical_neurons_merge_by_threshold():
    model = _chain_model()
    conv = model.get_layer("c2")
    _copy_channel(conv, 1, 4)
    kernel = conv.kernel.numpy()
    kernel[..., 4] *= 1.01
    conv.kernel.assign(kernel)
    assert merge_neurons(model).merged == 0
    result = merge_neurons(model, merge_threshold=0.02)
    assert result.clusters == {"c2": [[1, 4]]}
    assert relative_error(np.asarray(result.model(_inputs(model))), np.asarray(model(_inputs(model)))) < 0.05


def _weak_orthogonal_pair():
    """The chain model with filters 1 and 4 of ``c2`` orthogonal, of norm 0.01 and without bias; and that kernel."""
    model = _chain_model()
    conv = model.get_layer("c2")
    kernel, bias = conv.kernel.numpy(), conv.bias.numpy()
    kernel[..., 1], kernel[..., 4] = 0, 0
    kernel[0, 0, 0, 1], kernel[0, 0, 1, 4] = 0.01, 0.01
    bias[[1, 4]] = 0
    conv.kernel.assign(kernel)
    conv.bias.assign(bias)
    return model, kernel


def test_near_identical_distance_compares_weights_only():
    """Two orthogonal filters of small norm are 141% apart, however many positions they occupy (here 16 after the Flatten)."""
    model, kernel = _weak_orthogonal_pair()
    conv = model.get_layer("c2")
    clusters = merge_neurons(model, merge_threshold=0.5).clusters.get("c2", [])
    assert not any({1, 4} <= set(cluster) for cluster in clusters)
    kernel[0, 0, 1, 4], kernel[0, 0, 0, 4] = 0, 0.0101  # now a 1% longer copy of channel 1: within 0.02
    conv.kernel.assign(kernel)
    assert merge_neurons(model, merge_threshold=0.02).clusters["c2"] == [[1, 4]]


def test_layer_distance_merges_weak_channels_the_channel_distance_keeps_apart():
    """Two weak orthogonal filters (norm 0.01 in a layer whose filters have norm about 2): 141% apart relative to
    themselves, under 1% relative to the layer's typical channel."""
    model, _ = _weak_orthogonal_pair()
    assert "c2" not in merge_neurons(model, merge_threshold=0.05).clusters
    merged = merge_neurons(model, merge_threshold=0.05, merge_distance="layer")
    assert merged.clusters == {"c2": [[1, 4]]}
    assert relative_error(np.asarray(merged.model(_inputs(model))), np.asarray(model(_inputs(model)))) < 0.05
    result = kap.red.compress(model, bandwidth_scale=0.0, merge_threshold=0.05, merge_distance="layer")
    assert result.merge_clusters == {"c2": [[1, 4]]} and result.report.extra["merge_distance"] == "layer"


def _near_copies_read_in_proportion(depthwise: bool):
    """Producer ``p`` whose channel 1 is a 1% perturbed copy of channel 0, read (through an identical depthwise
    filter if ``depthwise``, without activation) by ``r`` with channel 1's rows twice channel 0's."""
    inputs = keras.Input((5, 5, 3))
    x = L.Conv2D(4, 1, name="p")(inputs)
    if depthwise:
        x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    model = keras.Model(inputs, L.Conv2D(2, 3, padding="same", name="r")(x))
    randomize(model, seed=31)
    producer = model.get_layer("p")
    _copy_channel(producer, 0, 1)
    rng = np.random.default_rng(0)
    for variable in producer.weights:
        value = variable.numpy()
        value[..., 1] *= 1 + 0.01 * rng.standard_normal(value[..., 1].shape)
        variable.assign(value)
    if depthwise:
        _copy_channel(model.get_layer("dw"), 0, 1, axis=-2)
    reader = model.get_layer("r")
    kernel = reader.kernel.numpy()
    kernel[:, :, 1, :] = 2 * kernel[:, :, 0, :]
    reader.kernel.assign(kernel)
    return model


@pytest.mark.parametrize("depthwise", [False, True])
def test_near_identical_cluster_keeps_the_combination_its_readers_see(depthwise):
    """Readers with rows R_1 = 2 R_0: a = (1/3, 2/3), and without activation the merged model is exact."""
    model = _near_copies_read_in_proportion(depthwise)
    producer = model.get_layer("p")
    kernel, bias = producer.kernel.numpy(), producer.bias.numpy()
    result = merge_neurons(model, merge_threshold=0.05)
    assert [cluster for clusters in result.clusters.values() for cluster in clusters] == [[0, 1]]
    merged = result.model.get_layer("p")
    np.testing.assert_allclose(merged.kernel.numpy()[..., 0], (kernel[..., 0] + 2 * kernel[..., 1]) / 3, rtol=1e-6)
    np.testing.assert_allclose(merged.bias.numpy()[0], (bias[0] + 2 * bias[1]) / 3, rtol=1e-6)
    np.testing.assert_array_equal(merged.kernel.numpy()[..., 1:], kernel[..., 2:])  # the others untouched
    x = _inputs(model, batch=3)
    _assert_same(result.model, model, x)
    leader = merge_neurons(model, merge_threshold=0.05, merge_representative="leader")
    np.testing.assert_array_equal(leader.model.get_layer("p").kernel.numpy()[..., 0], kernel[..., 0])
    assert relative_error(np.asarray(leader.model(x)), np.asarray(model(x))) > 1e-3


def test_a_shared_producer_is_combined_once():
    """``p(a) + p(b)``: a shared producer is one member of its group, so its weights are combined once."""
    a, b = keras.Input((4, 4, 3)), keras.Input((4, 4, 3))
    producer = L.Conv2D(4, 1, name="p")
    x = L.Add()([producer(a), producer(b)])
    model = keras.Model([a, b], L.Conv2D(2, 1, name="r")(x))
    randomize(model, seed=5)
    _copy_channel(producer, 0, 1)
    kernel = producer.kernel.numpy()
    kernel[..., 1] *= 1.01
    producer.kernel.assign(kernel)
    reader = model.get_layer("r")
    rows = reader.kernel.numpy()
    rows[:, :, 1, :] = 3 * rows[:, :, 0, :]
    reader.kernel.assign(rows)
    result = merge_neurons(model, merge_threshold=0.05)
    assert [cluster for clusters in result.clusters.values() for cluster in clusters] == [[0, 1]]
    np.testing.assert_allclose(result.model.get_layer("p").kernel.numpy()[..., 0],
                               (kernel[..., 0] + 3 * kernel[..., 1]) / 4, rtol=1e-6)
    rng = np.random.default_rng(1)
    x = [rng.normal(0, 1, (2, 4, 4, 3)).astype("float32") for _ in range(2)]
    _assert_same(result.model, model, x)


def test_a_merged_normalisation_keeps_a_positive_variance():
    """Readers with R_1 = -R_0 / 2 give a = (2, -1): 2·1 − 2.5 would be a negative variance; the convex
    weights (1, 0) keep the leader's."""
    inputs = keras.Input((5, 5, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 1, name="p")(inputs))
    model = keras.Model(inputs, L.Conv2D(2, 1, name="r")(x))
    randomize(model, seed=9)
    _copy_channel(model.get_layer("p"), 0, 1)
    norm = model.get_layer("bn")
    for name, value in (("gamma", 1.0), ("beta", 0.0), ("moving_mean", 0.0), ("moving_variance", 1.0)):
        variable = getattr(norm, name)
        values = variable.numpy()
        values[[0, 1]] = value
        variable.assign(values)
    variance = norm.moving_variance.numpy()
    variance[1] = 2.5
    norm.moving_variance.assign(variance)
    reader = model.get_layer("r")
    rows = reader.kernel.numpy()
    rows[:, :, 1, :] = -0.5 * rows[:, :, 0, :]
    reader.kernel.assign(rows)
    result = merge_neurons(model, merge_threshold=0.6)
    assert [cluster for clusters in result.clusters.values() for cluster in clusters] == [[0, 1]]
    assert result.model.get_layer("bn").moving_variance.numpy()[0] == pytest.approx(1.0)
    np.testing.assert_allclose(result.model.get_layer("p").kernel.numpy()[..., 0],
                               model.get_layer("p").kernel.numpy()[..., 0], rtol=1e-5)  # 2·k − k
    assert np.isfinite(np.asarray(result.model(_inputs(model)))).all()


def test_exact_merges_keep_the_leader_with_either_representative():
    model = _chain_model()
    _copy_channel(model.get_layer("c2"), 1, 4)
    x = _inputs(model)
    for representative in ("readers", "leader"):
        result = merge_neurons(model, merge_representative=representative)
        assert result.clusters == {"c2": [[1, 4]]}
        _assert_same(result.model, model, x)
    result = kap.red.compress(model, bandwidth_scale=0.0, merge_threshold=0.01, merge_representative="leader")
    assert result.report.extra["merge_representative"] == result.merge_representative == "leader"
    assert "merge_threshold=0.01, merge_representative='leader')" in result.summary()
    assert "merge_representative" not in kap.red.compress(model, bandwidth_scale=0.0).summary()  # exact merges only


# -- stage 3: uneven depthwise separation -------------------------------------------


def test_separation_is_exact_and_only_where_cheaper():
    rng = np.random.default_rng(10)
    inputs = keras.Input((6, 6, 4))
    x = L.Conv2D(16, 3, padding="same", name="repeats", activation="swish")(inputs)
    model = keras.Model(inputs, L.Conv2D(8, 3, name="distinct")(x))
    randomize(model, seed=10)
    kernel = np.zeros((3, 3, 4, 16), "float32")
    for c in range(4):  # two distinct kernels per input channel (and some zero kernels)
        choices = rng.normal(0, 1, (2, 3, 3))
        pick = rng.integers(0, 3, 16)
        for o in range(16):
            kernel[:, :, c, o] = 0 if pick[o] == 2 else choices[pick[o]]
    model.get_layer("repeats").kernel.assign(kernel)
    separated, separations = separate_depthwise(model)
    assert [s.layer for s in separations] == ["repeats"] and separations[0].multiplier == 2
    assert separations[0].flops_after < separations[0].flops_before
    assert separations[0].flops_before == next(row.flops for row in kap.flops_table(model) if row.layer == "repeats")
    assert kap.count_flops(separated) == kap.count_flops(model) - separations[0].flops_before + separations[0].flops_after
    _assert_same(separated, model, _inputs(model))


def test_separation_compares_kernels_by_value():
    """A kernel holding -0.0 where its twin holds 0.0 is the same kernel (one slot, not two that both fire)."""
    rng = np.random.default_rng(14)
    inputs = keras.Input((6, 6, 2))
    model = keras.Model(inputs, L.Conv2D(8, 3, name="c")(inputs))
    a, b = rng.normal(size=(2, 3, 3)).astype("float32")
    a[0, 0] = 0.0
    kernel = np.zeros((3, 3, 2, 8), "float32")
    kernel[:, :, 0, :] = np.where(np.arange(8) % 2, a[..., None], b[..., None])
    kernel[:, :, 1, :] = b[..., None]
    kernel[0, 0, 0, 1] = -0.0
    model.get_layer("c").kernel.assign(kernel)
    separated, separations = separate_depthwise(model)
    assert [(s.multiplier, s.distinct_kernels) for s in separations] == [(2, 3)]
    _assert_same(separated, model, _inputs(model))


def test_separation_skips_a_convolution_at_its_first_channel_with_too_many_kernels():
    kernel = np.random.default_rng(15).normal(size=(3, 3, 4, 16))
    # M·(K + C_out) < K·C_out allows at most 5 kernels per channel here; channel 0 has 16.
    assert distinct_kernels(kernel, limit=(9 * 16 - 1) // (9 + 16)) is None
    assert [len(k) for k in distinct_kernels(kernel)] == [16] * 4


# -- the API ---------------------------------------------------------------------------


def test_compress_end_to_end(tmp_path):
    model = _chain_model()
    _copy_channel(model.get_layer("c1"), 0, 3)
    _copy_channel(model.get_layer("bn1"), 0, 3)
    snapshot = [w.numpy().copy() for w in model.weights]
    result = kap.red.compress(model, bandwidth_scale=0.05, separate_depthwise=True)
    assert [s.stage for s in result.stages] == ["original", "batchnorm_folded", "hashed", "merged", "separated"]
    assert result.stages[0].flops == kap.count_flops(model) and result.stages[-1].flops == kap.count_flops(result.model)
    assert result.neurons_merged >= 1 and result.merged_per_layer["c1"] >= 1
    # Only c1's hashing merged anything: c2's and the head's is undone (their folded weights come back).
    assert set(result.distinct_values) == {"c1"} and result.hashing_reverted == ("c2", "head")
    folded, _ = fold_batchnorm(model)
    for name in ("c2", "head"):
        np.testing.assert_array_equal(np.asarray(result.hashed_model.get_layer(name).kernel),
                                      np.asarray(folded.get_layer(name).kernel))
    paper = kap.red.compress(model, bandwidth_scale=0.05, separate_depthwise=True, hash_all_layers=True)
    assert set(paper.distinct_values) == {"c1", "c2", "head"} and paper.hashing_reverted == ()
    assert paper.neurons_merged == result.neurons_merged and paper.stages[-1] == result.stages[-1]
    assert result.report.totals["flops_after"] == kap.count_flops(result.model)
    assert result.report.totals["flops_before"] == kap.count_flops(model)
    x = _inputs(model)
    _assert_same(result.model, result.hashed_model, x)
    for before, variable in zip(snapshot, model.weights):
        np.testing.assert_array_equal(before, variable.numpy())
    path = tmp_path / "red.keras"
    result.model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(result.model(x)), rtol=1e-6, atol=1e-6)
    assert "neurons merged" in result.summary()


def test_snapping_changes_the_weights_not_the_merges():
    model = _chain_model()
    randomize(model, seed=5)
    _copy_channel(model.get_layer("c1"), 0, 3)
    _copy_channel(model.get_layer("bn1"), 0, 3)
    mean = kap.red.compress(model, bandwidth_scale=0.5, hash_all_layers=True)
    mode = kap.red.compress(model, bandwidth_scale=0.5, hash_all_layers=True, snap_to="mode")
    assert (mean.snap_to, mode.snap_to) == ("mean", "mode") and mean.report.extra["snap_to"] == "mean"
    assert mean.merge_clusters == mode.merge_clusters and mean.neurons_merged >= 1
    assert mean.stages == mode.stages and mean.distinct_values == mode.distinct_values
    folded, _ = fold_batchnorm(model)
    original = np.asarray(folded.get_layer("c2").kernel)
    errors = {name: float(np.sum((np.asarray(r.hashed_model.get_layer("c2").kernel) - original) ** 2))
              for name, r in (("mean", mean), ("mode", mode))}
    assert 0 < errors["mean"] < errors["mode"]
    assert "snap_to='mean'" in mean.summary() and "snap_to" not in kap.red.compress(model, bandwidth_scale=0).summary()
    worst = mean.largest_hashing_error
    assert worst.relative_error == max(t.relative_error for t in mean.hashed) > 0
    assert f"by at most {worst.relative_error:.1%} of its norm ({worst.layer} {worst.weight})" in mean.summary()
    assert kap.red.compress(model, bandwidth_scale=0).largest_hashing_error is None


def test_compress_with_budget_picks_a_scale_that_fits():
    model = _residual_model()
    budget = kap.Budget(flops=0.8)
    result = kap.red.compress(model, bandwidth_scale=0.1, budget=budget, separate_depthwise=True)
    assert result.stages[-1].flops <= 0.8 * kap.count_flops(model)
    assert result.bandwidth_scale > 0.1
    with pytest.raises(kap.BudgetUnreachableError, match="cannot reach the budget"):
        kap.red.compress(model, bandwidth_scale=0.001, budget=kap.Budget(params=0.01))


@pytest.mark.parametrize("merge_distance", ["channel", "layer"])
def test_a_budget_can_raise_the_merge_threshold_instead_of_the_hashing(merge_distance):
    model = _residual_model()
    full = kap.count_flops(model)
    result = kap.red.compress(model, bandwidth_scale=0.0, budget=kap.Budget(flops=0.8), budget_knob="merge_threshold",
                              merge_distance=merge_distance)
    assert result.stages[-1].flops <= 0.8 * full and result.merge_threshold > 0 and result.bandwidth_scale == 0
    assert result.hashed == () and result.neurons_merged > 0  # no hashing: near-identical merging did it all
    # The search's answer: a threshold one bracket (under 1e-3) lower keeps more than the budget.
    below = kap.red.compress(model, bandwidth_scale=0.0, merge_threshold=result.merge_threshold - 1e-3,
                             merge_distance=merge_distance)
    assert below.stages[-1].flops > 0.8 * full
    assert "merge_threshold=" in result.summary()
    with pytest.raises(kap.BudgetUnreachableError, match="merge_threshold up to"):
        kap.red.compress(model, bandwidth_scale=0.0, budget=kap.Budget(params=0.001), budget_knob="merge_threshold")


def test_default_keeps_the_hashing_of_every_layer_a_merge_compares_depthwise_included():
    """An inverted residual (expand -> depthwise -> project): a merged channel must agree in the expansion
    and in the depthwise filters, so both keep their hashing; only the readers' hashing is undone."""
    inputs = keras.Input((6, 6, 3))
    x = L.ReLU()(L.BatchNormalization(name="expand_bn")(L.Conv2D(8, 1, name="expand")(inputs)))
    x = L.ReLU()(L.BatchNormalization(name="dw_bn")(L.DepthwiseConv2D(3, padding="same", name="dw")(x)))
    x = L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="project")(x))
    model = keras.Model(inputs, L.Dense(3, name="head")(x))
    randomize(model, seed=3)
    for name in ("expand", "expand_bn", "dw_bn"):
        _copy_channel(model.get_layer(name), 0, 5)
    _copy_channel(model.get_layer("dw"), 0, 5, axis=-2)  # depthwise kernel (k, k, channels, 1); its bias: axis -1
    paper = kap.red.compress(model, bandwidth_scale=0.05, hash_all_layers=True)
    result = kap.red.compress(model, bandwidth_scale=0.05)
    assert paper.neurons_merged == result.neurons_merged >= 1 and result.merge_clusters == paper.merge_clusters
    assert set(result.distinct_values) == {"expand", "dw"} and result.hashing_reverted == ("project", "head")
    _assert_same(result.model, result.hashed_model, _inputs(model))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bandwidth_scale": -1.0}, "bandwidth_scale"),
        ({"bandwidth_scale": "wide"}, "bandwidth_scale"),
        ({"merge_threshold": float("nan")}, "merge_threshold"),
        ({"separate_depthwise": "yes"}, "separate_depthwise"),
        ({"hash_all_layers": 1}, "hash_all_layers"),
        ({"budget": 0.5}, "kap.Budget"),
        ({"budget": kap.Budget(flops=0.5), "bandwidth_scale": 0.0}, "bandwidth_scale"),
        ({"merge_distance": "absolute"}, "merge_distance"),
        ({"merge_representative": "centroid"}, "merge_representative"),
        ({"snap_to": "median"}, "snap_to"),
        ({"budget_knob": "bandwidth"}, "budget_knob"),
    ],
)
def test_compress_rejects_bad_arguments(kwargs, match):
    model = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    with pytest.raises(ValueError, match=match) as error:
        kap.red.compress(model, **kwargs)
    assert "Received" in str(error.value)


@pytest.mark.parametrize("stage, kwargs", [(hash_weights, {"bandwidth_scale": -0.5}),
                                           (hash_weights, {"snap_to": "centre"}),
                                           (merge_neurons, {"merge_threshold": float("nan")}),
                                           (merge_neurons, {"merge_distance": "absolute"}),
                                           (merge_neurons, {"merge_representative": "mean"})])
def test_stage_functions_reject_bad_knobs(stage, kwargs):
    model = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Expected `{name}` to be .*Received"):
        stage(model, **kwargs)


def test_compress_rejects_subclassed_models():
    with pytest.raises(kap.UnsupportedModelError, match="functional"):
        kap.red.compress(subclassed_model())


# -- keras.applications with random weights ----------------------------------------------


def _application(name):
    apps = keras.applications
    builders = {
        "MobileNetV2": lambda: apps.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4),
        "ResNet50": lambda: apps.ResNet50(input_shape=(32, 32, 3), weights=None, classes=4),
        "EfficientNetB0": lambda: apps.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=4),
        "DenseNet121": lambda: apps.DenseNet121(input_shape=(32, 32, 3), weights=None, classes=4),
        "ConvNeXtTiny": lambda: apps.ConvNeXtTiny(input_shape=(32, 32, 3), weights=None, classes=4),
    }
    return builders[name]()


@pytest.mark.parametrize(
    "name",
    ["MobileNetV2"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("ResNet50", "EfficientNetB0", "DenseNet121", "ConvNeXtTiny")],
)
def test_compress_applications_stay_exact(name):
    model = _application(name)
    randomize(model, seed=11, kernels=False)
    x = _inputs(model, batch=1)
    unhashed = kap.red.compress(model, bandwidth_scale=0.0)  # BatchNormalization folding (and merging) only
    _assert_same(unhashed.model, model, x)
    has_batchnorm = any(isinstance(layer, L.BatchNormalization) for layer in model.layers)
    assert (len(unhashed.folded_norms) > 0) == has_batchnorm  # ConvNeXt normalises with LayerNormalization
    # Coarse hashing: whatever it merges and separates stays exact (how much is printed; often nothing on random weights).
    coarse = kap.red.compress(model, bandwidth_scale=1.0, separate_depthwise=True)
    _assert_same(coarse.model, coarse.hashed_model, x)
    assert coarse.report.totals["flops_after"] == kap.count_flops(coarse.model)
    print(f"{name}: merged {coarse.neurons_merged}, separated {len(coarse.separations)}, "
          f"FLOPs kept {coarse.stages[-1].flops / coarse.stages[0].flops:.3f}")
