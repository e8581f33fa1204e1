"""RED's refit of every changed layer (`reconstruct_layers`, ``refit_layers="all"``)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_autoprune.red import reconstruct_layers
from keras_autoprune.red.saved import stage_details
from tests.helpers import randomize, relative_error

L = keras.layers


def _cnn(width=6, seed=0):
    """A convolution with stride and padding, a depthwise convolution with multiplier 2, a 1×1 and a dense layer."""
    inputs = keras.Input((9, 9, 3))
    x = L.Conv2D(width, 3, strides=2, padding="same", activation="tanh", name="conv")(inputs)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="valid", activation="tanh", name="depthwise")(x)
    x = L.Conv2D(5, 1, activation="tanh", name="pointwise")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, L.Dense(4, name="dense")(x))
    randomize(model, seed=seed)
    return model


def _inputs(count=64, seed=1):
    return np.random.default_rng(seed).normal(size=(count, 9, 9, 3)).astype("float32")


def _perturbed(model, names, seed=2):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    for name in names:
        layer = copy.get_layer(name)
        layer.set_weights([w + rng.normal(scale=0.5, size=w.shape).astype(w.dtype) for w in layer.get_weights()])
    return copy


def test_without_ridge_every_perturbed_layer_gets_the_reference_weights_back():
    reference = _cnn()
    model = _perturbed(reference, ["conv", "depthwise", "pointwise", "dense"])
    x = _inputs()
    assert relative_error(np.asarray(model(x)), np.asarray(reference(x))) > 0.1
    refitted = reconstruct_layers(model, reference, x, ridge=0.0)
    assert refitted == ("conv", "depthwise", "pointwise", "dense")
    # each layer sees the reference's input once the layers before it are refitted, so the fit is exact
    for name in refitted:
        for mine, theirs in zip(model.get_layer(name).get_weights(), reference.get_layer(name).get_weights()):
            np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-3)
    assert relative_error(np.asarray(model(_inputs(seed=7))), np.asarray(reference(_inputs(seed=7)))) < 1e-3


def test_layers_that_already_compute_the_reference_are_left_alone():
    reference = _cnn()
    model = _perturbed(reference, ["pointwise"])
    before = {name: model.get_layer(name).get_weights() for name in ("conv", "depthwise")}
    # without ridge the 1×1 fit is exact, so the dense layer then reads the reference's input: left alone too
    assert reconstruct_layers(model, reference, _inputs(), ridge=0.0) == ("pointwise",)
    assert reconstruct_layers(_perturbed(reference, ["pointwise"]), reference, _inputs(), ridge=0.1) == (
        "pointwise", "dense")
    for name, weights in before.items():
        for mine, old in zip(model.get_layer(name).get_weights(), weights):
            np.testing.assert_array_equal(mine, old)


def test_kept_masks_fit_each_kept_channel_to_its_reference_channel_and_the_readers_recombine():
    reference = _cnn(width=6)
    conv_mask = np.array([True, False, True, True, False, True])
    depthwise_mask = np.repeat(conv_mask, 2)  # a depthwise layer keeps its inputs' channels, 2 outputs each
    model = _cnn(width=int(conv_mask.sum()), seed=9)  # the kept channels' width, other weights
    x = _inputs(256)
    before = relative_error(np.asarray(model(x)), np.asarray(reference(x)))
    refitted = reconstruct_layers(model, reference, x, kept={"conv": conv_mask, "depthwise": depthwise_mask},
                                  ridge=0.0)
    assert refitted == ("conv", "depthwise", "pointwise", "dense")
    kernel, bias = reference.get_layer("conv").get_weights()
    np.testing.assert_allclose(model.get_layer("conv").get_weights()[0], kernel[..., conv_mask], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(model.get_layer("conv").get_weights()[1], bias[conv_mask], rtol=1e-3, atol=1e-3)
    kernel, bias = reference.get_layer("depthwise").get_weights()
    np.testing.assert_allclose(model.get_layer("depthwise").get_weights()[0], kernel[:, :, conv_mask],
                               rtol=1e-3, atol=1e-3)
    # two channels are gone: the 1×1 refit recombines what is left, far closer than the random weights
    after = relative_error(np.asarray(model(x)), np.asarray(reference(x)))
    assert after < 0.5 * before


@pytest.mark.parametrize("anchored", [False, True])
def test_the_ridge_solves_the_regularised_normal_equations(anchored):
    reference = _cnn()
    model = _perturbed(reference, ["dense"])
    current = model.get_layer("dense").get_weights()[0].astype(np.float64)
    x = _inputs()
    ridge = 0.3
    reconstruct_layers(model, reference, x, ridge=ridge, anchored=anchored)
    features = np.asarray(keras.Model(model.inputs[0], model.get_layer("pool").output)(x), np.float64)
    target = features @ reference.get_layer("dense").get_weights()[0] + reference.get_layer("dense").get_weights()[1]
    design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    weight = ridge * np.trace(features.T @ features) / features.shape[1]
    penalty = np.diag([weight] * features.shape[1] + [0.0])
    # anchored: λ‖W − W₀‖² pulls towards the layer's current kernel W₀ instead of 0
    pull = np.concatenate([weight * current, np.zeros((1, current.shape[1]))]) if anchored else 0.0
    expected = np.linalg.solve(design.T @ design + penalty, design.T @ target + pull)
    kernel, bias = model.get_layer("dense").get_weights()
    np.testing.assert_allclose(kernel, expected[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias, expected[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inputs, ridge, match", [
    (np.zeros((0, 9, 9, 3), "float32"), 1e-3, "at least one input"),
    (np.zeros((2, 9, 9, 3), "float32"), -1.0, "ridge"),
])
def test_bad_arguments_are_refused(inputs, ridge, match):
    reference = _cnn()
    with pytest.raises(ValueError, match=match):
        reconstruct_layers(_perturbed(reference, ["dense"]), reference, inputs, ridge=ridge)


def _pixels(count=64, seed=8):
    return np.random.default_rng(seed).normal(120, 25, (count, 8, 8, 3)).astype("float32")


def test_compress_refits_every_changed_layer_on_the_given_inputs(tmp_path):
    import keras_autoprune as kap
    from tests.test_red_low_rank import _bn_model

    model = _bn_model()
    x = _pixels()
    plain = kap.red.compress(model, merge_threshold=1.0, verbose=0)
    assert plain.neurons_merged > 0 and plain.reconstruction == "none" and plain.reconstructed == ()
    result = kap.red.compress(model, merge_threshold=1.0, refit_layers="all", reconstruction=x, verbose=0)
    assert (result.refit_layers, result.reconstruction) == ("all", "inputs")
    assert result.reconstructed == ("c1", "c2", "head")  # hashed and merged: every linear layer changed
    assert result.stages == plain.stages and result.merge_clusters == plain.merge_clusters
    assert result.report.extra["layers_refitted"] == 3 and result.report.extra["refit_layers"] == "all"
    original = np.asarray(model(x))
    assert relative_error(np.asarray(result.model(x)), original) < 0.5 * relative_error(np.asarray(plain.model(x)),
                                                                                         original)
    # the hashed model the result also returns is not the refitted one
    np.testing.assert_array_equal(np.asarray(result.hashed_model(x)), np.asarray(plain.hashed_model(x)))
    restored = kap.red.compress(model, merge_threshold=1.0, refit_layers="all", reconstruction=x,
                                restore_batchnorm=True, verbose=0)
    assert relative_error(np.asarray(restored.model(x)), np.asarray(result.model(x))) < 1e-4
    export = kap.export_tflite(result.model, tmp_path / "refitted.tflite")
    assert export.max_abs_error < 1e-3


def test_compress_refits_with_synthesized_images_and_under_a_budget():
    import keras_autoprune as kap
    from tests.test_red_low_rank import _bn_model

    model = _bn_model()
    result = kap.red.compress(model, budget=kap.Budget(flops=0.8), budget_knob="merge_threshold",
                              refit_layers="all", verbose=0)
    assert result.stages[-1].flops <= 0.8 * result.stages[0].flops
    assert result.reconstruction == "synthetic" and result.reconstructed == ("c1", "c2", "head")
    assert "layers refitted on synthetic inputs (every changed layer): 3: c1, c2, head" in stage_details(result)
    unrefitted = kap.red.compress(model, merge_threshold=result.merge_threshold, verbose=0)
    assert unrefitted.stages == result.stages  # the search ran without the refit; the refit changes no size


def test_refit_layers_is_checked_and_synthesis_needs_batchnorm_before_any_work():
    import keras_autoprune as kap

    with pytest.raises(ValueError, match=r"Expected `refit_layers` to be one of \('approximated', 'all'\)"):
        kap.red.compress(_cnn(), refit_layers="every")
    with pytest.raises(ValueError, match="BatchNormalization"):
        kap.red.compress(_cnn(), refit_layers="all")
    result = kap.red.compress(_cnn(), refit_layers="all", reconstruction=None)  # nothing to refit on: no refit
    assert result.reconstruction == "none" and result.reconstructed == ()


def test_refit_on_mobilenetv2_reaches_depthwise_residual_and_merged_layers():
    """On keras.applications' MobileNetV2 (depthwise layers, residual adds, merged channels) every refitted layer is
    a convolution, depthwise convolution or dense layer, and the refit brings the output back towards the original."""
    import keras_autoprune as kap
    from tests.zoo import randomized

    model = randomized("MobileNetV2", 32)
    x = np.random.default_rng(12).normal(0, 1, (16, 32, 32, 3)).astype("float32")
    plain = kap.red.compress(model, merge_threshold=0.9, verbose=0)
    result = kap.red.compress(model, merge_threshold=0.9, refit_layers="all", reconstruction=x, verbose=0)
    assert plain.neurons_merged > 0 and result.stages == plain.stages
    kinds = {type(result.model.get_layer(name)).__name__ for name in result.reconstructed}
    # the layers after the last merge get their reference input back once the refit is this close (16 inputs,
    # 1×1 positions at the end: an interpolation), so they are left alone
    assert {"Conv2D", "DepthwiseConv2D"} <= kinds <= {"Conv2D", "DepthwiseConv2D", "Dense"}
    assert len(result.reconstructed) >= 30
    original = np.asarray(model(x))
    assert relative_error(np.asarray(result.model(x)), original) < 0.5 * relative_error(np.asarray(plain.model(x)),
                                                                                         original)


def test_a_separated_block_gets_the_factors_of_its_fitted_convolution_then_its_refitted_1x1():
    """A block whose depthwise and 1×1 kernels were both spoiled is rebuilt from the least-squares convolution:
    with a reference kernel of channel rank 2 (the block's multiplier) the block computes it again exactly."""
    from keras_autoprune.red import separate_low_rank

    inputs = keras.Input((8, 8, 4))
    reference = keras.Model(inputs, L.Conv2D(32, 3, padding="same", name="conv")(inputs))
    rng = np.random.default_rng(1)
    kernel = np.einsum("hwcm,cmo->hwco", rng.normal(size=(3, 3, 4, 2)), rng.normal(size=(4, 2, 32)))
    reference.get_layer("conv").set_weights([kernel.astype("float32"), rng.normal(size=32).astype("float32")])
    separated, [separation] = separate_low_rank(reference, tolerance=1e-9)
    assert separation.multiplier == 2
    block = separated.get_layer("conv")
    for part in block.layers[2:]:  # the depthwise and 1×1 layers after the input and the tile
        part.set_weights([w + rng.normal(size=w.shape).astype(w.dtype) for w in part.get_weights()])
    x = rng.normal(size=(32, 8, 8, 4)).astype("float32")
    assert relative_error(np.asarray(separated(x)), np.asarray(reference(x))) > 0.1
    assert reconstruct_layers(separated, reference, x, ridge=0.0) == ("conv",)
    assert relative_error(np.asarray(separated(x)), np.asarray(reference(x))) < 1e-4


def test_the_kernel_a_block_computes_is_the_convolution_it_stands_for():
    """`_block_kernel` (the anchor of a block's refit) sums the depthwise and 1×1 kernels over the multiplier."""
    from keras_autoprune.red import separate_low_rank
    from keras_autoprune.red.reconstruction import _block_kernel
    from keras_autoprune.red.separation import block_parts

    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, L.Conv2D(32, 3, padding="same", name="conv")(inputs))
    randomize(model, seed=3)
    separated, [separation] = separate_low_rank(model, tolerance=0.3)
    assert separation.multiplier > 1  # a tiled block
    _, depthwise, pointwise = block_parts(separated.get_layer("conv"))
    kernel = _block_kernel(depthwise, pointwise, 4)
    twin = keras.models.clone_model(model)
    twin.set_weights([kernel, np.asarray(pointwise.bias)])
    x = np.random.default_rng(5).normal(size=(2, 8, 8, 4)).astype("float32")
    assert relative_error(np.asarray(twin(x)), np.asarray(separated(x))) < 1e-5


def test_a_model_pruned_by_a_plan_is_refitted_against_its_original():
    """`plan=`: kap.apply_plan's output (BatchNormalization kept) refitted against the unpruned model."""
    import keras_autoprune as kap
    from tests.test_red_low_rank import _bn_model

    model = _bn_model()
    graph = kap.DependencyGraph(model)
    plan = kap.PrunePlan.uniform(graph, 0.5)
    slim = kap.apply_plan(model, plan, graph)
    before = slim.get_layer("head").get_weights()[0].copy()
    x = _pixels()
    original = np.asarray(model(x))
    error = relative_error(np.asarray(slim(x)), original)
    assert reconstruct_layers(slim, model, x, plan=plan) == ("c1", "c2", "head")
    assert relative_error(np.asarray(slim(x)), original) < 0.5 * error
    assert slim.get_layer("head").get_weights()[0].shape == before.shape  # sizes kept, weights refitted
    with pytest.raises(ValueError, match="`kept` or `plan`"):
        reconstruct_layers(slim, model, x, kept={}, plan=plan)


def test_synthesis_stays_finite_with_a_constant_channel_before_a_batchnorm():
    """A dead channel (constant input to its BatchNormalization, as MobileNetV2's collapsed expansion channels give)
    has zero batch variance; the standard deviation √(v + ε) keeps its gradient finite."""
    from keras_autoprune.red import synthesize_images
    from tests.test_red_low_rank import _bn_model

    model = _bn_model()
    conv = model.get_layer("c1")
    kernel, bias = conv.get_weights()
    kernel[..., 0], bias[0] = 0.0, 0.0  # channel 0 of bn1's input is exactly 0 (a ReLU's dead channel)
    conv.set_weights([kernel, bias])
    images = synthesize_images(model, count=8, steps=20, batch_size=8, verbose=0)
    assert np.isfinite(images).all()


def test_synthesis_that_diverges_says_so_instead_of_returning_nan():
    from keras_autoprune.red import synthesize_images
    from tests.test_red_low_rank import _bn_model

    with pytest.raises(FloatingPointError, match="diverged.*smaller learning_rate"):
        synthesize_images(_bn_model(), count=4, steps=5, batch_size=4, learning_rate=1e38, verbose=0)


def test_a_nested_model_that_is_not_a_separated_block_is_left_alone():
    """A nested Sequential of two dense layers is no depthwise + 1×1 block: neither refitted nor taken for one."""
    inputs = keras.Input((6,))
    head = keras.Sequential([L.Dense(5), L.Dense(3)], name="head")
    reference = keras.Model(inputs, head(L.Dense(4, name="first")(inputs)))
    randomize(reference, seed=4)
    model = _perturbed(reference, ["first"])
    nested = [w.copy() for w in model.get_layer("head").get_weights()]
    x = np.random.default_rng(6).normal(size=(32, 6)).astype("float32")
    assert reconstruct_layers(model, reference, x, ridge=0.0) == ("first",)
    for mine, old in zip(model.get_layer("head").get_weights(), nested):
        np.testing.assert_array_equal(mine, old)
    np.testing.assert_allclose(model.get_layer("first").get_weights()[0], reference.get_layer("first").get_weights()[0],
                               rtol=1e-3, atol=1e-3)
