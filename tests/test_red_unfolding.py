"""RED's `restore_batchnorm=True`: folded BatchNormalizations put back, exact in inference mode."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.surgery.replace import named_layers
from tests.helpers import randomize
from tests.red_zoo import plant_duplicates
from tests.test_red import _application, _assert_same, _chain_model, _copy_channel, _custom_block_model, _inputs

L = keras.layers


def _norms(model):
    return {name: layer for name, layer in named_layers(model).items()
            if isinstance(layer, L.BatchNormalization)}


def test_restored_model_equals_the_compressed_one_with_the_norms_back_over_the_kept_channels():
    model = _chain_model()
    for target in (2, 5):  # c1's channels 2 and 5 copy channel 0: two merges
        _copy_channel(model.get_layer("c1"), 0, target)
        _copy_channel(model.get_layer("bn1"), 0, target)
    folded = kap.red.compress(model, bandwidth_scale=0.05)
    result = kap.red.compress(model, bandwidth_scale=0.05, restore_batchnorm=True)
    assert result.neurons_merged == 2 and [s.stage for s in result.stages][-1] == "batchnorm_restored"
    assert [layer.name for layer in result.model.layers][1:3] == ["c1", "bn1"]
    norm, original = result.model.get_layer("bn1"), model.get_layer("bn1")
    kept = [0, 1, 3, 4, 6, 7]  # the lowest index of a cluster stays
    np.testing.assert_array_equal(norm.gamma.numpy(), original.gamma.numpy()[kept])
    np.testing.assert_array_equal(norm.moving_variance.numpy(), original.moving_variance.numpy()[kept])
    np.testing.assert_array_equal(norm.moving_mean.numpy(), original.moving_mean.numpy()[kept])
    assert result.model.get_layer("c1").use_bias == model.get_layer("c1").use_bias
    x = _inputs(model, batch=4)
    _assert_same(result.model, folded.model, x)
    _assert_same(result.model, result.hashed_model, x)
    assert kap.count_params(result.model) == kap.count_params(folded.model) + 4 * 6 - (
        0 if model.get_layer("c1").use_bias else 6)  # gamma, beta, mean, variance back; no folded bias
    assert result.report.totals["flops_after"] == kap.count_flops(result.model)


def test_restoring_in_a_sequential_model_a_nested_model_and_without_center():
    inner = keras.Sequential([keras.Input((5, 5, 3)), L.Conv2D(4, 3, name="c", use_bias=False),
                              L.BatchNormalization(name="bn", center=False)], name="inner")
    model = keras.Sequential([keras.Input((5, 5, 3)), inner, L.ReLU(), L.GlobalAveragePooling2D(), L.Dense(2, name="d")])
    randomize(model, seed=31)
    _copy_channel(inner.get_layer("c"), 1, 3)
    _copy_channel(inner.get_layer("bn"), 1, 3)
    result = kap.red.compress(model, bandwidth_scale=0.0, restore_batchnorm=True)
    assert result.neurons_merged == 1
    norm = result.model.get_layer("inner").get_layer("bn")
    assert norm.center and norm.gamma.shape == (3,) and not result.model.get_layer("inner").get_layer("c").use_bias
    _assert_same(result.model, model, _inputs(model, batch=3))


def test_a_separated_convolution_takes_its_norm_after_the_pointwise_part():
    rng = np.random.default_rng(32)
    inputs = keras.Input((6, 6, 4))
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="repeats")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(L.ReLU()(x)))
    randomize(model, seed=32)
    kernel = np.zeros((3, 3, 4, 16), "float32")
    for c in range(4):  # two distinct kernels per input channel
        choices, pick = rng.normal(0, 1, (2, 3, 3)), rng.integers(0, 2, 16)
        for o in range(16):
            kernel[:, :, c, o] = choices[pick[o]]
    model.get_layer("repeats").kernel.assign(kernel)
    norm = model.get_layer("bn")  # s = 1 on every channel, so the folded kernels still repeat
    norm.gamma.assign(np.sqrt(norm.moving_variance.numpy() + norm.epsilon))
    result = kap.red.compress(model, bandwidth_scale=0.0, separate_depthwise=True, restore_batchnorm=True)
    assert [s.layer for s in result.separations] == ["repeats"]
    block = result.model.get_layer("repeats")
    # M kernels per channel: the input tiled M times, a multiplier-1 depthwise, the 1×1 with the bias
    assert [type(layer).__name__ for layer in block.layers] == ["InputLayer", "Concatenate", "DepthwiseConv2D", "Conv2D"]
    assert block.layers[2].kernel.shape == (3, 3, 4 * result.separations[0].multiplier, 1)
    assert [layer.name for layer in result.model.layers][2] == "bn"
    _assert_same(result.model, model, _inputs(model, batch=3))


def test_the_restored_norms_train_with_batch_statistics():
    model = _chain_model()
    result = kap.red.compress(model, bandwidth_scale=0.05, restore_batchnorm=True)
    restored = result.model
    x = _inputs(model, batch=16)
    before = restored.get_layer("bn1").moving_mean.numpy().copy()
    restored.compile(keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError())
    restored.fit(x, np.zeros((16, 3), "float32"), batch_size=16, epochs=1, verbose=0)
    assert not np.allclose(restored.get_layer("bn1").moving_mean.numpy(), before)
    assert set(_norms(restored)) == {"bn1"}


def test_restore_batchnorm_is_refused_through_traced_custom_layers_and_must_be_a_bool():
    with pytest.raises(ValueError, match="restore_batchnorm=False") as error:
        kap.red.compress(_custom_block_model(), bandwidth_scale=0.0, restore_batchnorm=True)
    assert "Received" in str(error.value)
    with pytest.raises(ValueError, match="restore_batchnorm"):
        kap.red.compress(_chain_model(), restore_batchnorm="yes")


@pytest.mark.parametrize("name", ["MobileNetV2", pytest.param("EfficientNetB0", marks=pytest.mark.slow),
                                  pytest.param("ResNet50", marks=pytest.mark.slow)])
def test_restoring_on_an_application_with_planted_duplicates_is_exact(name):
    """No hashing: the restored model equals the folded compressed one and the original after exact merges."""
    model = _application(name)
    randomize(model, seed=11, kernels=False)
    planted = plant_duplicates(model, kap.DependencyGraph(model))
    result = kap.red.compress(model, bandwidth_scale=0.0, restore_batchnorm=True)
    assert result.neurons_merged >= sum(len(cluster) - 1 for cluster in planted.values()) == 6
    assert len(_norms(result.model)) == len(_norms(model)) and len(result.folded_norms) > 0
    assert kap.count_flops(result.model) < kap.count_flops(model)
    folded = kap.red.compress(model, bandwidth_scale=0.0)
    assert folded.neurons_merged == result.neurons_merged
    x = _inputs(model, batch=2)
    _assert_same(result.model, folded.model, x)
    _assert_same(result.model, model, x)
