"""RED's approximate separation: the low-rank blocks, the synthesized images and the refit of the 1×1 parts."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.red import reconstruct_pointwise, separate_low_rank, synthesize_images
from keras_autoprune.red.low_rank import relative_errors
from keras_autoprune.red.synthesis import usable_norms
from tests.helpers import randomize, relative_error

L = keras.layers


def _conv_model(c_in=4, c_out=32, size=8, seed=0):
    inputs = keras.Input((size, size, c_in))
    model = keras.Model(inputs, L.Conv2D(c_out, 3, padding="same", name="conv")(inputs))
    randomize(model, seed=seed)
    return model


def _truncated(kernel: np.ndarray, rank: int) -> np.ndarray:
    """Each input channel's 9 × C_out kernel matrix truncated to ``rank`` by its own SVD (the reference)."""
    out = np.empty_like(kernel, dtype=np.float64)
    for c in range(kernel.shape[2]):
        matrix = kernel[:, :, c, :].reshape(9, -1).astype(np.float64)
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        out[:, :, c, :] = ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(3, 3, -1)
    return out


def test_a_kernel_of_low_channel_rank_separates_exactly():
    model = _conv_model()
    rng = np.random.default_rng(1)
    kernel = np.einsum("hwcm,cmo->hwco", rng.normal(size=(3, 3, 4, 2)), rng.normal(size=(4, 2, 32))).astype("float32")
    model.get_layer("conv").kernel.assign(kernel)
    separated, separations = separate_low_rank(model, tolerance=1e-9)
    [separation] = separations
    assert (separation.layer, separation.multiplier, separation.distinct_kernels) == ("conv", 2, 8)
    assert separation.kernel_error < 1e-12
    # 2·(9 + 32) slots per channel against 9·32 multiply-adds: cheaper, and counted as kap.count_flops does
    assert kap.count_flops(separated) == kap.count_flops(model) - separation.flops_before + separation.flops_after
    assert separation.flops_after < separation.flops_before
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 4)).astype("float32")
    assert relative_error(np.asarray(separated(x)), np.asarray(model(x))) < 1e-5


@pytest.mark.parametrize("tolerance", [0.05, 0.3, 0.6])
def test_the_rank_is_the_smallest_within_the_tolerance_and_the_block_computes_the_truncated_kernel(tolerance):
    model = _conv_model(seed=3)
    kernel = np.asarray(model.get_layer("conv").kernel)
    energy = np.stack([np.linalg.svd(kernel[:, :, c, :].reshape(9, -1), compute_uv=False) ** 2 for c in range(4)])
    errors = [energy[:, m:].sum() / energy.sum() for m in range(10)]
    expected = next(m for m in range(1, 10) if errors[m] <= tolerance)
    separated, separations = separate_low_rank(model, tolerance)
    if expected * (9 + 32) >= 9 * 32:  # not cheaper: left alone
        assert separations == [] and expected == 8
        return
    [separation] = separations
    assert separation.multiplier == expected and separation.kernel_error == pytest.approx(errors[expected], rel=1e-6)
    reference = keras.models.clone_model(model)
    reference.set_weights([_truncated(kernel, expected).astype("float32"), np.asarray(model.get_layer("conv").bias)])
    x = np.random.default_rng(4).normal(size=(2, 8, 8, 4)).astype("float32")
    assert relative_error(np.asarray(separated(x)), np.asarray(reference(x))) < 1e-5


def test_relative_errors_of_a_zero_kernel_and_layers_that_cannot_get_cheaper():
    assert relative_errors(np.zeros((3, 2))).tolist() == [0.0, 0.0, 0.0]
    inputs = keras.Input((8, 8, 4))
    pointwise = keras.Model(inputs, L.Conv2D(6, 1, name="pointwise")(L.Conv2D(3, 3, name="narrow")(inputs)))
    # a 1×1 kernel never gets cheaper (M·(1 + C_out) ≥ C_out); 3 outputs: M·(9 + 3) < 27 needs M ≤ 2
    _, separations = separate_low_rank(pointwise, tolerance=1.0)
    assert [(s.layer, s.multiplier) for s in separations] == [("narrow", 1)]


def _bn_model(seed=5):
    inputs = keras.Input((8, 8, 3))
    x = L.Normalization(mean=[120.0, 110.0, 100.0], variance=[900.0, 800.0, 700.0], name="normalize")(inputs)
    x = L.Conv2D(16, 3, padding="same", name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(24, 3, padding="same", name="c2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU()(x)
    outputs = L.Dense(4, name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    randomize(model, seed=seed)
    return model


def _statistics_gap(model, images):
    norms = usable_norms(model)
    features = keras.Model(model.inputs[0], [n.input for n in norms])(images)
    gap = 0.0
    for norm, feature in zip(norms, features):
        feature = np.asarray(feature).reshape(-1, feature.shape[-1])
        std = np.sqrt(np.asarray(norm.moving_variance) + norm.epsilon)
        gap += np.mean((feature.mean(0) - np.asarray(norm.moving_mean)) ** 2) + np.mean((feature.std(0) - std) ** 2)
    return gap


def test_synthesized_images_match_the_batchnorm_statistics():
    model = _bn_model()
    images = synthesize_images(model, count=16, steps=60, batch_size=8, verbose=0)
    assert images.shape == (16, 8, 8, 3) and images.dtype == np.float32
    noise = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32") * np.sqrt([900, 800, 700]) + [120, 110, 100]
    assert _statistics_gap(model, images[:8]) < 0.1 * _statistics_gap(model, noise[:8].astype("float32"))
    np.testing.assert_array_equal(images, synthesize_images(model, count=16, steps=60, batch_size=8, verbose=0))


def test_the_refit_solves_the_least_squares_problem_and_beats_the_svd():
    model = _conv_model(seed=6)
    separated, separations = separate_low_rank(model, tolerance=0.5)
    z = np.random.default_rng(7).normal(size=(6, 8, 8, 4))
    x = (z[..., :1] + 0.3 * z).astype("float32")  # correlated channels: the SVD's kernel error is not the output's
    target = np.asarray(model(x))
    before = np.sum((np.asarray(separated(x)) - target) ** 2)
    assert reconstruct_pointwise(separated, model, [s.layer for s in separations], x, ridge=0.0) == ("conv",)
    block = separated.get_layer("conv")
    depthwise = next(layer for layer in block.layers if isinstance(layer, L.DepthwiseConv2D))
    copies = separations[0].multiplier
    features = np.asarray(depthwise(np.concatenate([x] * copies, -1))).reshape(-1, 4 * copies)
    residual = (np.asarray(separated(x)) - target).reshape(-1, 32)
    # normal equations: the residual is orthogonal to every feature and to the constant (the bias)
    assert np.abs(features.T @ residual).max() < 1e-3 * np.abs(features.T @ target.reshape(-1, 32)).max()
    assert np.abs(residual.sum(0)).max() < 1e-3 * np.abs(target).sum(0).max()
    assert np.sum(residual**2) < 0.9 * before


def test_compress_with_a_separation_tolerance(tmp_path):
    model = _bn_model()
    snapshot = [w.numpy().copy() for w in model.weights]
    result = kap.red.compress(model, separation_tolerance=0.3, verbose=0)
    assert [s.stage for s in result.stages][-2:] == ["merged", "approximated"]
    assert {a.layer for a in result.approximations} == {"c1", "c2"} and result.reconstruction == "synthetic"
    assert result.reconstructed == ("c1", "c2")
    assert all(0 < a.kernel_error <= 0.3 for a in result.approximations)
    assert result.stages[-1].flops == kap.count_flops(result.model) < result.stage("merged").flops
    assert result.report.extra["convolutions_approximated"] == 2 and "approximately" in result.summary()
    for before, variable in zip(snapshot, model.weights):
        np.testing.assert_array_equal(before, variable.numpy())
    unrefit = kap.red.compress(model, separation_tolerance=0.3, reconstruction=None)
    assert unrefit.reconstruction == "none" and unrefit.reconstructed == () and unrefit.stages == result.stages
    x = np.random.default_rng(8).normal(120, 25, (4, 8, 8, 3)).astype("float32")
    mine = kap.red.compress(model, separation_tolerance=0.3, reconstruction=x)
    assert mine.reconstruction == "inputs" and mine.reconstructed == ("c1", "c2")
    restored = kap.red.compress(model, separation_tolerance=0.3, reconstruction=x, restore_batchnorm=True)
    assert relative_error(np.asarray(restored.model(x)), np.asarray(mine.model(x))) < 1e-4
    path = tmp_path / "approximated.keras"
    mine.model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(mine.model(x)), rtol=1e-5, atol=1e-5)
    export = kap.export_tflite(mine.model, tmp_path / "approximated.tflite")
    assert export.max_abs_error < 1e-3


def test_a_budget_raises_the_separation_tolerance():
    model = _bn_model()
    x = np.random.default_rng(9).normal(120, 25, (4, 8, 8, 3)).astype("float32")
    result = kap.red.compress(model, budget=kap.Budget(flops=0.6), budget_knob="separation_tolerance", reconstruction=x)
    assert result.stages[-1].flops <= 0.6 * result.stages[0].flops
    assert 1e-3 <= result.separation_tolerance <= 1 and result.reconstructed
    looser = kap.red.compress(model, separation_tolerance=result.separation_tolerance * 0.9, reconstruction=None)
    assert looser.stages[-1].flops > 0.6 * looser.stages[0].flops  # the search found (nearly) the smallest tolerance


@pytest.mark.parametrize("kwargs, match", [
    ({"separation_tolerance": -0.1}, "separation_tolerance"),
    ({"separation_tolerance": 0.1, "reconstruction": "real"}, "reconstruction"),
    ({"separation_tolerance": 0.1, "reconstruction": np.zeros((2, 5, 5, 3), "float32")}, r"\(N, 8, 8, 3\)"),
    ({"separation_tolerance": 0.1, "reconstruction": [1, 2]}, "NumPy array"),
    ({"separation_tolerance": 0.1, "verbose": 2}, "verbose"),
    ({"separation_tolerance": 1.5}, r"in \[0, 1\]"),
    ({"reconstruction": "real"}, "reconstruction"),  # checked even when nothing is approximated
])
def test_bad_approximation_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kap.red.compress(_bn_model(), **kwargs)


def test_the_latency_cost_needs_fixed_input_sizes_and_helpers_check_their_arguments():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, L.Conv2D(32, 3, name="conv")(inputs))
    with pytest.raises(ValueError, match="fixed size.*separation_cost='flops'"):
        kap.red.compress(model, separation_tolerance=0.5, reconstruction=None, separation_cost="latency")
    bn_model = _bn_model()
    with pytest.raises(ValueError, match="count"):
        synthesize_images(bn_model, count=0)
    separated, separations = separate_low_rank(_conv_model(), 0.5)
    with pytest.raises(ValueError, match="at least one input"):
        reconstruct_pointwise(separated, _conv_model(), [s.layer for s in separations], np.zeros((0, 8, 8, 4)))
    # rounding: a full-rank spectrum's error is exactly 0 at full rank, so a tiny tolerance keeps full rank
    spectrum = np.random.default_rng(13).random((64, 9))
    assert relative_errors(spectrum)[-1] == 0.0


def test_synthesis_needs_batchnorm_and_says_so_before_any_work():
    model = _conv_model()
    with pytest.raises(ValueError, match="without a top-level BatchNormalization.*reconstruction=None"):
        kap.red.compress(model, separation_tolerance=0.1)
    assert kap.red.compress(model, separation_tolerance=0.5, reconstruction=None).approximations


def _truncated_taps(kernel: np.ndarray, rank: int) -> np.ndarray:
    """`_truncated` for any number of taps (the reference, from NumPy's SVD per input channel)."""
    taps = kernel.shape[:-2]
    flat = kernel.reshape((-1,) + kernel.shape[-2:]).astype(np.float64)
    out = np.empty_like(flat)
    for c in range(flat.shape[1]):
        u, s, vt = np.linalg.svd(flat[:, c, :], full_matrices=False)
        out[:, c, :] = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return out.reshape(taps + kernel.shape[-2:])


@pytest.mark.parametrize("name, size", [
    pytest.param("ResNet50", 32, id="ResNet50"),
    pytest.param("InceptionV3", 75, id="InceptionV3", marks=pytest.mark.slow),
    pytest.param("Xception", 71, id="Xception", marks=pytest.mark.slow),
])
def test_approximate_separation_on_applications_computes_the_truncated_kernels(name, size):
    """Every approximated convolution of a keras.applications model computes its truncated kernel, and the refit
    reaches every one of them (all are top-level layers called once)."""
    from tests.zoo import build

    model = build(name, size)
    randomize(model, scale=0.05)
    result = kap.red.compress(model, bandwidth_scale=0, separation_tolerance=0.5, reconstruction=None)
    assert len(result.approximations) >= 2  # Xception: its two full convolutions (the rest are separable)
    reference, _ = kap.red.fold_batchnorm(model)
    for approximation in result.approximations:
        layer = reference.get_layer(approximation.layer)
        layer.kernel.assign(_truncated_taps(np.asarray(layer.kernel), approximation.multiplier).astype("float32"))
    x = np.random.default_rng(11).normal(0, 1, (2, size, size, 3)).astype("float32")
    assert relative_error(np.asarray(result.model(x)), np.asarray(reference(x))) < 1e-4
    assert result.stages[-1].flops < result.stage("merged").flops
    refitted = kap.red.compress(model, bandwidth_scale=0, separation_tolerance=0.5, reconstruction=x)
    assert refitted.reconstructed == tuple(a.layer for a in refitted.approximations)


def _twin_model():
    """Two identical 16-channel 3×3 convolutions at 32×32 (one configuration, timed once) and a 64-channel one at 8×8."""
    inputs = keras.Input((32, 32, 16))
    x = L.Conv2D(16, 3, padding="same", name="first")(inputs)
    x = L.Conv2D(16, 3, padding="same", name="second")(L.ReLU()(x))
    x = L.Conv2D(64, 3, strides=4, padding="same", name="narrow")(L.ReLU()(x))
    model = keras.Model(inputs, L.Conv2D(64, 3, padding="same", name="wide")(x))
    randomize(model, seed=12)
    return model


@pytest.mark.parametrize("cost", ["latency", "latency_int8"])
def test_the_latency_cost_keeps_exactly_the_blocks_measured_faster(cost):
    model = _twin_model()
    by_flops = kap.red.compress(model, bandwidth_scale=0, separation_tolerance=0.6, reconstruction=None)
    timed = kap.red.compress(model, bandwidth_scale=0, separation_tolerance=0.6, reconstruction=None,
                             separation_cost=cost)
    assert timed.separation_cost == cost and set(timed.block_timings) == {a.layer for a in by_flops.approximations}
    assert [a.layer for a in timed.approximations] == [a.layer for a in by_flops.approximations
                                                        if timed.block_timings[a.layer].faster]
    first, second = timed.block_timings["first"], timed.block_timings["second"]
    assert (first.convolution_ms, first.block_ms) == (second.convolution_ms, second.block_ms)  # timed once
    assert all(t.convolution_ms > 0 and t.block_ms > 0 for t in timed.block_timings.values())
    assert by_flops.block_timings == {} and "LiteRT timed" in timed.summary()
    with pytest.raises(ValueError, match="separation_cost"):
        kap.red.compress(model, separation_cost="speed")
