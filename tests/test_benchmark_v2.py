"""Benchmark v2: the converged models' data, recipe and training (`benchmarks.converged`) and protocol 1 (`benchmarks.oneshot`)."""

from __future__ import annotations

import dataclasses
import json

import keras
import numpy as np
import pytest

from benchmarks import converged, oneshot

pytestmark = pytest.mark.skipif(not converged.DEFAULT_SOURCE.exists(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")


@pytest.fixture(scope="module")
def cifar():
    return converged.load_cifar10()


def test_cifar10_archive_decodes_to_balanced_uint8_arrays(cifar):
    assert cifar.x_train.shape == (50000, 32, 32, 3) and cifar.x_test.shape == (10000, 32, 32, 3)
    assert cifar.x_train.dtype == np.uint8
    assert np.bincount(cifar.y_train).tolist() == [5000] * 10 and np.bincount(cifar.y_test).tolist() == [1000] * 10
    mean, variance = cifar.pixel_statistics()
    np.testing.assert_allclose(mean, cifar.x_train.reshape(-1, 3).mean(axis=0), rtol=1e-6)
    assert np.all((variance > 2000) & (variance < 6000))


def test_committed_models_match_their_manifest(cifar):
    """The converged models load in safe mode with no benchmark code and reach the manifest's accuracy."""
    manifest = json.loads((converged.MODELS_DIR / "manifest.json").read_text())
    assert set(manifest["models"]) == {"resnet20", "mobilenetv2"}
    measured = converged.verify(data=cifar, log=lambda line: None)
    for name, entry in manifest["models"].items():
        assert measured[name] == pytest.approx(entry["test_accuracy"], abs=5e-4)
        model = keras.saving.load_model(converged.MODELS_DIR / entry["file"], safe_mode=True, compile=False)
        assert model.layers[1].__class__.__name__ == "Normalization"  # raw pixels in
    assert manifest["models"]["mobilenetv2"]["test_accuracy"] >= 0.89


def test_augment_is_a_seeded_flip_and_crop():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6)
    x, y = converged.augment(images, labels, seed=3, epoch=1)
    again, _ = converged.augment(images, labels, seed=3, epoch=1)
    other, _ = converged.augment(images, labels, seed=3, epoch=2)
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, other)
    assert x.dtype == np.float32 and x.shape == images.shape and sorted(y.tolist()) == labels.tolist()
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0))).astype(np.float32)
    for image, label in zip(x, y):  # every output is some crop of its padded source, flipped or not
        source = padded[label]
        crops = [source[r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(np.array_equal(image, crop) or np.array_equal(image, crop[:, ::-1]) for crop in crops)


def test_cutout_fills_one_square_per_image_with_the_mean_pixel_and_keeps_the_other_draws():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40)
    plain, y = converged.augment(images, labels, seed=3, epoch=1)
    cut, y_cut = converged.augment(images, labels, seed=3, epoch=1, cutout=8)
    np.testing.assert_array_equal(y, y_cut)  # the same order, flips and crops
    mean = images.reshape(-1, 3).mean(axis=0).astype(np.float32)
    changed = np.any(cut != plain, axis=-1)
    np.testing.assert_allclose(cut[changed], np.broadcast_to(mean, cut[changed].shape))
    sizes = changed.sum(axis=(1, 2))
    assert sizes.max() == 64 and sizes.min() >= 16  # 8 x 8, or clipped to 4 x 4 at a corner at the least
    for square in changed:  # one axis-aligned rectangle
        rows, cols = np.nonzero(square.any(axis=1))[0], np.nonzero(square.any(axis=0))[0]
        assert square.sum() == len(rows) * len(cols) and np.ptp(rows) == len(rows) - 1 <= 7
        assert np.ptp(cols) == len(cols) - 1 <= 7
    given, _ = converged.augment(images, labels, seed=3, epoch=1, cutout=8, fill=mean)
    np.testing.assert_array_equal(given, cut)  # the mean passed once equals the one computed


def test_recipe_learning_rate_warms_up_then_decays_to_zero():
    recipe = converged.Recipe(peak_learning_rate=0.1, warmup_epochs=2)
    assert recipe.learning_rate(0, 10) == pytest.approx(0.05)
    assert recipe.learning_rate(1, 10) == pytest.approx(0.1)
    assert recipe.learning_rate(2, 10) == pytest.approx(0.1)
    assert recipe.learning_rate(6, 10) == pytest.approx(0.05)
    assert recipe.learning_rate(10, 10) == pytest.approx(0.0, abs=1e-12)


def test_training_in_stages_equals_one_uninterrupted_run(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    tiny = converged.Cifar10(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64),
                             rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16))
    monkeypatch.setitem(converged.ARCHITECTURES, "tiny", {"builder": "resnet_cifar", "kwargs": {"depth": 8, "width": 4},
                                                         "target_accuracy": 0.0})
    recipe = converged.Recipe(epochs=3, batch_size=32, warmup_epochs=1)
    whole = converged.train("tiny", tmp_path / "whole", tiny, recipe, log=lambda line: None)
    assert converged.train("tiny", tmp_path / "staged", tiny, recipe, stage_epochs=2, log=lambda line: None) is None
    assert (tmp_path / "staged" / "tiny.checkpoint.keras").exists()
    other = dataclasses.replace(recipe, weight_decay=1e-3)
    with pytest.raises(ValueError, match=r"weight_decay: begun with 0.005, now 0.001.*delete tiny.checkpoint.keras"):
        converged.train("tiny", tmp_path / "staged", tiny, other, stage_epochs=2, log=lambda line: None)
    with pytest.raises(ValueError, match=r"cutout: begun with 0, now 8"):
        converged.train("tiny", tmp_path / "staged", tiny, dataclasses.replace(recipe, cutout=8), log=lambda line: None)
    staged = converged.train("tiny", tmp_path / "staged", tiny, recipe, stage_epochs=2, log=lambda line: None)
    assert staged["epochs"] == whole["epochs"] == 3
    assert [row["lr"] for row in staged["history"]] == [row["lr"] for row in whole["history"]]
    first = keras.saving.load_model(tmp_path / "whole" / "tiny.keras")
    second = keras.saving.load_model(tmp_path / "staged" / "tiny.keras")
    assert not first.compiled  # saved without optimizer state
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_protocol_one_prunes_once_and_reestimates_batchnorm(cifar, tmp_path):
    subset = converged.Cifar10(cifar.x_train, cifar.y_train, cifar.x_test[::20], cifar.y_test[::20])
    rows = oneshot.run("resnet20", entries=("uniform_l1",), targets=(0.65,), out=tmp_path / "rows.json", data=subset,
                       log=lambda line: None)
    unpruned, pruned = rows
    assert unpruned["entry"] == "unpruned" and unpruned["accuracy"] > 0.85
    assert pruned["flops_kept"] <= 0.65 and pruned["flops_kept"] > 0.55
    assert 0.1 <= pruned["accuracy"] < unpruned["accuracy"]
    assert pruned["accuracy_bn"] != pruned["accuracy"]
    # Uniform L1 narrows every prunable convolution by the same ratio; the classifier keeps its 10 outputs.
    widths = pruned["channels"]
    assert "logits" not in widths and {"stem_conv", "s1b1_a_conv", "s3b3_a_conv"} <= set(widths)
    assert all(0 < kept < full for kept, full in widths.values())
    assert widths["s1b1_a_conv"][1] == 16 and widths["s3b3_a_conv"][1] == 64
    again = oneshot.run("resnet20", entries=("uniform_l1",), targets=(0.65,), out=tmp_path / "rows.json", data=subset,
                        log=lambda line: None)
    assert again == rows  # finished rows are kept, not recomputed
    oneshot.plot("resnet20", rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_protocol_one_variants_configure_the_callbacks_and_name_their_files(capsys):
    calibration = (np.zeros((256, 32, 32, 3), "float32"), np.zeros(256, "int64"))
    floored = oneshot.make_callback("nap_cost_aware", 0.5, calibration, max_layer_ratio=0.9, rounds=3)
    assert (floored.max_layer_ratio, floored.rounds, floored.cost_aware, floored.num_batches) == (0.9, 3, True, 2)
    assert oneshot.make_callback("global_l1", 0.5, calibration).max_layer_ratio == 0.9  # the callbacks' default
    assert oneshot.make_callback("psap", 0.5, calibration, rounds=2).rounds == 2
    with pytest.raises(ValueError, match="ranked entries"):
        oneshot.make_callback("eigendamage", 0.5, calibration, max_layer_ratio=0.9)
    assert oneshot.result_name("resnet20") == "oneshot_resnet20.json"
    assert oneshot.result_name("resnet20", {"rounds": 4, "max_layer_ratio": 0.9}) == \
        "oneshot_resnet20_max_layer_ratio_0.9_rounds_4.json"
    assert oneshot.result_name("resnet20", {"rounds": 4, "batchnorm_between_rounds": 1}) == \
        "oneshot_resnet20_batchnorm_between_rounds_1_rounds_4.json"
    with pytest.raises(SystemExit):  # re-estimation between rounds needs rounds
        oneshot.main(["--model", "resnet20", "--batchnorm-between-rounds"])
    assert "--batchnorm-between-rounds needs --rounds 2" in capsys.readouterr().err


def test_protocol_one_records_an_entry_that_cannot_run():
    model = oneshot.load_model("resnet20")
    shared = {"calibration_x": np.zeros((128, 32, 32, 3), "float32"), "calibration_y": np.zeros(128, "int64"),
              "batchnorm_x": np.zeros((128, 32, 32, 3), "float32")}
    row = oneshot.run_row(model, "eigendamage", 0.01, shared, data=None)
    assert "error" in row and "budget" in row["error"]


@pytest.mark.parametrize("profile_name, model_name", [("v2", "resnet20"), ("v2_mobilenetv2", "mobilenetv2")])
def test_protocol_two_starts_from_the_committed_model_with_raw_pixels(cifar, tmp_path, profile_name, model_name):
    """The protocol-2 profiles: the converged model replaces pretraining, and its data are raw pixels."""
    from benchmarks.data import load_converged
    from benchmarks.pretrain import load_pretrained, pretrain, pretrained_path
    from benchmarks.profiles import PROFILES
    from benchmarks.tfmot_peer import architecture

    data = load_converged()
    np.testing.assert_allclose(data.x_test[:4], cifar.x_test[:4].astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(data.normalise(cifar.x_train[:4]), cifar.x_train[:4].astype(np.float32), rtol=1e-6)
    from benchmarks.torch_finetune import PROFILE_OF_MODEL

    profile = PROFILES[profile_name]
    assert PROFILE_OF_MODEL[model_name] == profile_name  # the Torch-Pruning rows use the same recipe
    meta = pretrain(profile, data, tmp_path)
    manifest = json.loads((converged.MODELS_DIR / "manifest.json").read_text())["models"][model_name]
    assert meta["accuracy"] == manifest["test_accuracy"] and meta["sha256"] == manifest["sha256"]
    model = load_pretrained(pretrained_path(profile, tmp_path))
    assert converged.sha256(pretrained_path(profile, tmp_path) / "model.keras") == manifest["sha256"]
    assert "Normalization" in {type(layer).__name__ for layer in model.layers}
    if "tfmot" in profile.entries:  # the TFMOT twin rebuilds it
        assert "Normalization" in {layer["class"] for layer in architecture(model)["layers"]}


def test_saliency_check_compares_nap_with_the_exact_quadratic_and_the_measured_loss(cifar):
    from benchmarks import saliency_check

    result = saliency_check.check("resnet20", "nap_cost_aware", 0.8, cifar, log=lambda line: None, held_out_images=256)
    assert result["max_layer_ratio"] == 0.9 and result["held_out_images"] == 256
    groups = result["groups"]
    assert groups and all(row["removed"] > 0 and row["predicted"] >= 0 and row["exact_quadratic"] >= 0 for row in groups)
    # The diagnosis of docs/methods/nap.md: K-FAC's saliency is far below the exact Fisher quadratic of the removal.
    assert result["all"]["exact_quadratic"] > 5 * result["all"]["predicted"]
    assert result["all"]["measured"] > 0
    table = saliency_check.markdown(result)
    assert table.count("\n") == len(groups) + 2 and "**all at once**" in table
