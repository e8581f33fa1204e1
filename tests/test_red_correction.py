"""RED: the data-free bias correction of near-identical merges (keras_autoprune.red.correction)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from tests.helpers import randomize

L = keras.layers


def _relu_mean(mean: float, std: float) -> float:
    """``E[max(z, 0)]`` for ``z ~ N(mean, std²)``, in closed form."""
    ratio = mean / std
    return mean * 0.5 * (1 + math.erf(ratio / math.sqrt(2))) + std * math.exp(-ratio ** 2 / 2) / math.sqrt(2 * math.pi)


def _copy_channel(model: keras.Model, names, source: int, target: int) -> None:
    """Output channel ``target`` of the named layers becomes a copy of ``source`` (every per-channel weight)."""
    for name in names:
        for variable in model.get_layer(name).weights:
            value = variable.numpy()
            value[..., target] = value[..., source]
            variable.assign(value)


def _collinear_model(seed: int = 0) -> keras.Model:
    """Dense -> BN -> ReLU -> Dense; after folding, producer channel 1 is 1.3 times channel 0, so the two merge.

    With inputs ~ N(0, I) the normalisation's moving statistics are the true
    ones (mean ``b``, variance ``||W_c||²``), so its ``β`` and ``|γ|`` are the
    true mean and deviation of each channel before the ReLU.
    """
    inputs = keras.Input((8,))
    x = L.Dense(5, name="producer")(inputs)
    x = L.BatchNormalization(epsilon=1e-6, name="bn")(x)
    x = L.ReLU(name="relu")(x)
    model = keras.Model(inputs, L.Dense(3, name="reader")(x))
    randomize(model, seed=seed)
    producer, norm = model.get_layer("producer"), model.get_layer("bn")
    kernel, bias = producer.kernel.numpy(), producer.bias.numpy()
    kernel[:, 1] = 1.3 * kernel[:, 0]
    bias[1] = 1.3 * bias[0]
    producer.kernel.assign(kernel)
    producer.bias.assign(bias)
    gamma = np.array([0.8, 1.04, 1.1, 0.9, 1.2], "float32")  # channel 1: 1.3 times channel 0 after folding
    beta = np.array([0.3, 0.39, -0.2, 0.5, 0.1], "float32")
    norm.set_weights([gamma, beta, bias, np.sum(kernel ** 2, axis=0)])
    return model


def test_correction_keeps_the_readers_mean_where_the_statistics_are_true():
    model = _collinear_model()
    x = np.random.default_rng(1).normal(0, 1, (40_000, 8)).astype("float32")
    original = np.asarray(model.predict(x, batch_size=4096, verbose=0)).mean(axis=0)
    kwargs = {"bandwidth_scale": 0, "merge_threshold": 0.3}
    corrected = kap.red.compress(model, **kwargs)
    plain = kap.red.compress(model, **kwargs, correct_merge_bias=False)
    assert corrected.merge_clusters == plain.merge_clusters == {"producer": [[0, 1]]}
    assert corrected.bias_corrected == ("producer",) and plain.bias_corrected == ()
    means = {name: np.asarray(r.model.predict(x, batch_size=4096, verbose=0)).mean(axis=0)
             for name, r in (("corrected", corrected), ("plain", plain))}
    shift = np.abs(means["plain"] - original).max()
    assert shift > 0.05  # the merge alone moves the readers' mean
    assert np.abs(means["corrected"] - original).max() < 0.05 * shift
    # only the readers' biases differ, by the formula with the closed-form ReLU mean
    norm, reader = model.get_layer("bn"), model.get_layer("reader").kernel.numpy().astype(np.float64)
    beta, gamma = norm.beta.numpy().astype(np.float64), np.abs(norm.gamma.numpy().astype(np.float64))
    total = reader[0] + reader[1]
    a = np.array([reader[0] @ total, reader[1] @ total]) / (total @ total)
    kept = _relu_mean(a @ beta[:2], abs(a @ gamma[:2]))
    expected = sum(reader[c] * (_relu_mean(beta[c], gamma[c]) - kept) for c in (0, 1))
    difference = corrected.model.get_layer("reader").bias.numpy() - plain.model.get_layer("reader").bias.numpy()
    np.testing.assert_allclose(difference, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(corrected.model.get_layer("reader").kernel.numpy(),
                                  plain.model.get_layer("reader").kernel.numpy())
    assert "reader biases corrected for 1 of the 1 merged groups" in corrected.summary()
    assert corrected.report.extra["merge_bias_corrected_groups"] == 1
    _, folds = kap.red.fold_batchnorm(model)
    statistics = kap.red.folded_statistics(kap.DependencyGraph(model), folds)
    assert set(statistics) == {"producer"}
    np.testing.assert_array_equal(statistics["producer"].mean, beta)
    np.testing.assert_array_equal(statistics["producer"].std, gamma)


def test_the_leader_is_corrected_too_and_exact_merges_are_left_alone():
    model = _collinear_model()
    leader = kap.red.compress(model, bandwidth_scale=0, merge_threshold=0.3, merge_representative="leader")
    plain = kap.red.compress(model, bandwidth_scale=0, merge_threshold=0.3, merge_representative="leader",
                             correct_merge_bias=False)
    norm, reader = model.get_layer("bn"), model.get_layer("reader").kernel.numpy().astype(np.float64)
    beta, gamma = norm.beta.numpy().astype(np.float64), np.abs(norm.gamma.numpy().astype(np.float64))
    expected = reader[1] * (_relu_mean(beta[1], gamma[1]) - _relu_mean(beta[0], gamma[0]))  # E[x_r] = E[x_0]
    difference = leader.model.get_layer("reader").bias.numpy() - plain.model.get_layer("reader").bias.numpy()
    np.testing.assert_allclose(difference, expected, rtol=1e-4, atol=1e-6)
    exact = kap.red.compress(model, bandwidth_scale=0)  # merge_threshold=0: channels 0 and 1 differ, nothing merges
    assert exact.bias_corrected == () and "reader biases" not in exact.summary()


def test_a_residual_group_is_merged_without_correction():
    inputs = keras.Input((5, 5, 3))
    branch = L.BatchNormalization(name="bn_branch")(L.Conv2D(6, 3, padding="same", name="branch")(inputs))
    shortcut = L.BatchNormalization(name="bn_short")(L.Conv2D(6, 1, name="shortcut")(inputs))
    x = L.GlobalAveragePooling2D()(L.ReLU()(L.Add(name="add")([branch, shortcut])))
    model = keras.Model(inputs, L.Dense(2, name="head")(x))
    randomize(model, seed=4)
    _copy_channel(model, ("branch", "shortcut", "bn_branch", "bn_short"), 1, 3)
    result = kap.red.compress(model, bandwidth_scale=0, merge_threshold=0.5)
    assert result.neurons_merged >= 1 and result.bias_corrected == ()
    stage = kap.red.merge_neurons(kap.red.fold_batchnorm(model)[0], 0.5, channel_statistics={
        name: kap.red.ChannelStatistics(np.zeros(6), np.ones(6)) for name in ("branch", "shortcut")})
    (reason,) = stage.bias_uncorrected.values()
    assert "layer 'add' (Add) between 'shortcut' and the readers" in reason


def test_correct_merge_bias_must_be_a_bool():
    model = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    with pytest.raises(ValueError, match="Expected `correct_merge_bias` to be True or False. Received"):
        kap.red.compress(model, correct_merge_bias="yes")


def test_a_group_read_through_depthwise_filters_is_merged_without_correction():
    inputs = keras.Input((5, 5, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(6, 3, padding="same", name="conv")(inputs)))
    model = keras.Model(inputs, L.SeparableConv2D(2, 3, name="separable")(x))
    randomize(model, seed=8)
    _copy_channel(model, ("conv", "bn"), 1, 4)
    depthwise = model.get_layer("separable").depthwise_kernel  # (3, 3, channels, 1): its filters are compared too
    value = depthwise.numpy()
    value[:, :, 4] = value[:, :, 1]
    depthwise.assign(value)
    result = kap.red.compress(model, bandwidth_scale=0, merge_threshold=0.5)
    assert result.merge_clusters == {"conv": [[1, 4]]} and result.bias_corrected == ()
    folded, folds = kap.red.fold_batchnorm(model)
    stage = kap.red.merge_neurons(folded, 0.5, channel_statistics=kap.red.folded_statistics(
        kap.DependencyGraph(model), folds))
    assert stage.bias_uncorrected == {"conv": "reader 'separable' reads through depthwise filters"}


def test_a_softmax_over_positions_is_not_taken_for_an_elementwise_activation():
    inputs = keras.Input((5, 5, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(6, 3, padding="same", name="conv")(inputs))
    model = keras.Model(inputs, L.Conv2D(2, 1, name="reader")(L.Softmax(axis=1, name="spatial")(x)))
    randomize(model, seed=9)
    _copy_channel(model, ("conv", "bn"), 1, 4)
    folded, folds = kap.red.fold_batchnorm(model)
    stage = kap.red.merge_neurons(folded, 0.5, channel_statistics=kap.red.folded_statistics(
        kap.DependencyGraph(model), folds))
    assert stage.clusters == {"conv": [[1, 4]]}
    assert stage.bias_uncorrected == {"conv": "layer 'spatial' (Softmax) between 'conv' and the readers"}
