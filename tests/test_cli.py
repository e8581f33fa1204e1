"""The `keras-autoprune` command, run in-process through `main`, and `load_images`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_autoprune.cli import build_parser, main
from keras_autoprune.export.images import load_images
from tests.test_export import extract_cifar, needs_cifar, prune, small_cnn


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A pruned small CNN saved as .keras."""
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("model") / "slim.keras"
    prune(small_cnn(), 0.25).save(path)
    return path


def test_export_tflite_and_saved_model(model_file, tmp_path, capsys):
    status = main(["export", str(model_file), "--tflite", str(tmp_path / "slim.tflite"),
                   "--saved-model", str(tmp_path / "serving"), "--num-samples", "8"])

    out = capsys.readouterr().out
    assert status == 0
    assert (tmp_path / "slim.tflite").is_file() and (tmp_path / "serving" / "1" / "saved_model.pb").is_file()
    assert "format          tflite (float32)" in out and "format          saved_model (float32)" in out
    assert out.count("top-1 agreement 100.00%") == 2


@needs_cifar
def test_export_int8_with_an_image_folder(model_file, tmp_path, capsys):
    root = extract_cifar(tmp_path / "cifar", {"test": 5})
    status = main(["export", str(model_file), "--tflite", str(tmp_path / "int8.tflite"),
                   "--quantize", "int8", "--data", str(root), "--split", "test", "--num-samples", "30"])

    out = capsys.readouterr().out
    assert status == 0
    assert f"data: 30 images from {root} (scale=unit)" in out
    assert "format          tflite (int8)" in out and "(30 samples)" in out


@pytest.mark.parametrize("args, status, message", [
    (["--tflite", "x.tflite", "--quantize", "int8"], 2, "Expected --data with --quantize int8"),
    ([], 2, "neither --tflite nor --saved-model"),
    (["--tflite", "missing_dir/x.tflite"], 2, "directory 'missing_dir' does not exist"),
])
def test_export_errors_are_reported(args, status, message, model_file, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(model_file), *args]) == status
    assert message in capsys.readouterr().err


def test_export_checks_every_argument_before_loading_the_model(capsys, tmp_path):
    model_file = tmp_path / "corrupt.keras"  # loading it fails: a load before the checks would show that error
    model_file.write_bytes(b"not a model")
    (tmp_path / "serving" / "1").mkdir(parents=True)
    for args, message in (
        (["--tflite", str(tmp_path / "x.tflite"), "--int8-io"], "int8_io=True"),
        (["--tflite", str(tmp_path / "x.tflite"), "--tolerance", "0"], "tolerance"),
        (["--tflite", str(tmp_path / "x.tflite"), "--num-samples", "0"], "num_samples"),
        (["--tflite", str(tmp_path / "x.tflite"), "--saved-model", str(tmp_path / "serving"), "--version", "1"],
         "exists"),
    ):
        assert main(["export", str(model_file), *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "x.tflite").exists()


def test_missing_model_file_and_flex_failure(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.keras"), "--tflite", str(tmp_path / "x.tflite")]) == 2
    assert "does not exist" in capsys.readouterr().err
    inputs = keras.Input((8,))
    keras.Model(inputs, keras.ops.erf(keras.layers.Dense(4)(inputs))).save(tmp_path / "erf.keras")
    assert main(["export", str(tmp_path / "erf.keras"), "--tflite", str(tmp_path / "erf.tflite")]) == 1
    err = capsys.readouterr().err
    assert "keras-autoprune export: failed:" in err and "Flex) op(s) Erf" in err and "--allow-flex" in err


def test_parser_has_subcommands_and_rejects_bad_choices(capsys):
    parser = build_parser()
    assert parser.parse_args(["export", "m.keras", "--tflite", "m.tflite"]).command == "export"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "m.keras", "--quantize", "int4"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


# -- load_images -------------------------------------------------------------------
def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    encode = tf.io.encode_png if path.suffix == ".png" else tf.io.encode_jpeg
    tf.io.write_file(str(path), encode(array))


def test_load_images_takes_classes_in_turn_resizes_and_scales(tmp_path):
    white = np.full((8, 8, 3), 255, np.uint8)
    black = np.zeros((4, 4, 1), np.uint8)  # grey PNG of another size
    for i in range(3):
        _write(tmp_path / "a" / f"{i}.png", white)
        _write(tmp_path / "b" / f"{i}.PNG", black)
    (tmp_path / "b" / "notes.txt").write_text("not an image")

    unit = load_images(tmp_path, (6, 6, 3), num_samples=3)
    symmetric = load_images(tmp_path, (6, 6, 3), num_samples=4, scale="symmetric")
    raw = load_images(tmp_path, (6, 6, 3), num_samples=10, scale="none")

    assert unit.shape == (3, 6, 6, 3) and unit.dtype == np.float32
    np.testing.assert_array_equal(unit[:, 0, 0, 0], [1.0, 0.0, 1.0])  # a, b, a
    np.testing.assert_array_equal(symmetric[:, 0, 0, 0], [1.0, -1.0, 1.0, -1.0])
    assert raw.shape == (6, 6, 6, 3) and raw.max() == 255.0


def test_load_images_errors(tmp_path):
    with pytest.raises(ValueError, match="Received: scale='zero_one'"):
        load_images(tmp_path, (6, 6, 3), scale="zero_one")
    with pytest.raises(ValueError, match="Expected class sub-folders"):
        load_images(tmp_path, (6, 6, 3))
    with pytest.raises(ValueError, match=r"Received: image_shape=\(16,\)"):
        load_images(tmp_path, (16,))
    # Not a directory: read as a TFDS name (fails offline, or without tensorflow-datasets).
    with pytest.raises(ValueError, match="Expected an image folder.*or a TFDS name"):
        load_images(str(tmp_path / "no_such_dataset_xyz"), (6, 6, 3))
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):  # a bare name goes to TFDS, which fails here
        load_images("no_such_dataset_xyz", (6, 6, 3))



def test_demo_subcommand_rejects_a_bad_budget_before_work(capsys):
    assert main(["demo", "--flops", "1.5"]) == 2
    assert "(0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--finetune-epochs", "0"], "--finetune-epochs to be an integer >= 1"),
    (["--epochs", "-3"], "--epochs to be an integer >= 0"),
    (["--max-per-class", "0"], "--max-per-class to be an integer >= 1"),
    (["--data", "/no/such/folder/x"], "does not exist"),
    (["--image-size", "32"], "--image-size to be 2 positive integers"),
])
def test_demo_subcommand_checks_every_argument_before_work(args, message, capsys):
    assert main(["demo", *args]) == 2  # before: training ran first (or a traceback for the missing folder)
    captured = capsys.readouterr()
    assert message in captured.err and "training" not in captured.out


# -- prune and report ------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """``<root>/{train,test}/<class>/*.png``: three classes of 12 x 12 images told apart by colour."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for label, colour in enumerate(([200, 30, 30], [30, 200, 30], [30, 30, 200])):
            for index in range(count):
                image = np.clip(rng.normal(colour, 40, (12, 12, 3)), 0, 255).astype("uint8")
                _write(root / split / f"class{label}" / f"{index}.png", image)
    return root


@pytest.fixture(scope="module")
def uncompiled_cnn_file(tmp_path_factory):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = tmp_path_factory.mktemp("cnn") / "cnn.keras"
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)
    return path


@pytest.mark.parametrize("method", ["magnitude", "nap"])
def test_prune_subcommand_prunes_a_saved_model(uncompiled_cnn_file, image_folder, tmp_path, capsys, method):
    import keras_autoprune as kap

    out = tmp_path / "slim.keras"
    status = main(["prune", str(uncompiled_cnn_file), "--data", str(image_folder), "--budget", "flops=0.6",
                   "--method", method, "--epochs", "2", "--batch-size", "16", "--out", str(out), "--tflite",
                   str(tmp_path / "slim.tflite")])
    assert status == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "wrote" in printed and "|" in printed  # the report table
    original = keras.saving.load_model(uncompiled_cnn_file)
    slim = keras.saving.load_model(out)  # safe mode
    assert kap.count_flops(slim) <= 0.6 * kap.count_flops(original)
    assert (tmp_path / "slim.tflite").stat().st_size > 0


def test_prune_subcommand_on_a_single_channel_model_exports_int8_calibrated_on_every_class(image_folder, tmp_path, capsys):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, activation="relu")(inputs))
    path = tmp_path / "grey.keras"
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)
    status = main(["prune", str(path), "--data", str(image_folder), "--budget", "flops=0.7", "--method", "magnitude",
                   "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "slim.keras"),
                   "--int8", str(tmp_path / "slim_int8.tflite")])
    assert status == 0 and (tmp_path / "slim_int8.tflite").stat().st_size > 0
    assert "24 test images" in capsys.readouterr().out


def test_classes_in_turn_takes_each_class_before_any_second_example():
    from keras_autoprune.export.images import classes_in_turn

    labels = np.array([0, 0, 0, 1, 1, 2])
    assert classes_in_turn(labels, 4).tolist() == [0, 3, 5, 1]
    assert sorted(classes_in_turn(labels, 100).tolist()) == list(range(6))


@pytest.mark.parametrize("recalibrate", [True, False])
def test_prune_subcommand_re_estimates_batchnorm_after_fine_tuning(image_folder, tmp_path, recalibrate):
    import keras_autoprune as kap
    from keras_autoprune.datasets import load_images
    from keras_autoprune.prune_saved import prune_saved_model, recalibration_images

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(8, 3, name="conv")(inputs))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    path = tmp_path / "bn.keras"
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)
    lines = []
    outcome = prune_saved_model(path, image_folder, kap.Budget(flops=0.7), tmp_path / "out.keras", method="magnitude",
                                epochs=1, batch_size=16, recalibrate=recalibrate, log=lines.append)
    assert outcome.batchnorm_recalibrated == (1 if recalibrate else 0)
    assert (outcome.accuracy_finetuned is not None) == recalibrate
    assert any("re-estimated on 72 training images (1 layers)" in line for line in lines) == recalibrate
    slim = keras.saving.load_model(tmp_path / "out.keras")
    written = [np.array(w) for w in slim.get_layer("bn").non_trainable_weights]
    # re-estimation depends on the weights and images only: once done, doing it again changes nothing
    kap.recalibrate_batchnorm(slim, recalibration_images(load_images(image_folder, "train", image_size=(12, 12))[0]),
                              batch_size=16)
    again = [np.array(w) for w in slim.get_layer("bn").non_trainable_weights]
    same = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(written, again))
    assert same == recalibrate


def test_recalibration_images_draw_at_most_the_limit_in_order():
    from keras_autoprune.prune_saved import recalibration_images

    x = np.arange(10)
    np.testing.assert_array_equal(recalibration_images(x, 20), x)
    drawn = recalibration_images(x, 4)
    assert len(drawn) == 4 and len(set(drawn.tolist())) == 4 and (np.diff(drawn) > 0).all()


def test_prune_subcommand_checks_arguments_before_work(uncompiled_cnn_file, image_folder, tmp_path, capsys):
    base = ["prune", str(uncompiled_cnn_file), "--data", str(image_folder), "--out", str(tmp_path / "o.keras")]
    assert main([*base, "--budget", "flops=1.5"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert main([*base, "--budget", "latency=0.5"]) == 2
    assert "Expected --budget flops=F or params=F" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "missing.keras"), "--data", str(image_folder), "--budget", "flops=0.5",
                 "--out", str(tmp_path / "o.keras")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.keras").exists()
    for extra, message in ((["--tflite", str(tmp_path / "missing" / "m.tflite")], "existing folder"),
                           (["--tflite", str(tmp_path / "m.tflite"), "--int8", str(tmp_path / "m.tflite")], "one file per export"),
                           (["--batch-size", "0"], "--batch-size to be an integer >= 1"),
                           (["--data", str(tmp_path / "missing.tar.gz")], "which does not exist")):
        assert main([*base, "--budget", "flops=0.5", *extra]) == 2
        assert message in capsys.readouterr().err
    before = uncompiled_cnn_file.read_bytes()
    assert main(["prune", str(uncompiled_cnn_file), "--data", str(image_folder), "--budget", "flops=0.5",
                 "--out", str(uncompiled_cnn_file)]) == 2
    assert "other than the input model" in capsys.readouterr().err
    assert uncompiled_cnn_file.read_bytes() == before


def test_report_subcommand_counts_a_model_of_unknown_input_size_at_input_shape(tmp_path, capsys):
    inputs = keras.Input((None, None, 3))
    path = tmp_path / "fcn.keras"
    keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)).save(path)
    assert main(["report", str(path)]) == 2
    assert "input_shape" in capsys.readouterr().err
    assert main(["report", str(path), "--input-shape", "8,8,3"]) == 0
    assert f"{2 * 3 * 3 * 3 * 4 * 8 * 8:,} FLOPs" in capsys.readouterr().out  # 2 x k x k x Cin x Cout x H x W


def test_prune_subcommand_keeps_the_training_class_ids_in_the_test_split(tmp_path, monkeypatch):
    from keras_autoprune.prune_saved import prune_saved_model

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, classes in (("train", ("a", "b", "c")), ("test", ("a", "c"))):
        for label, name in enumerate(classes):
            for index in range(6):
                _write(root / split / name / f"{index}.png", rng.integers(0, 255, (8, 8, 3)).astype("uint8"))
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, padding="same")(inputs))
    model_path = tmp_path / "m.keras"
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(model_path)
    import keras_autoprune as kap
    from keras_autoprune import datasets

    seen, original = {}, datasets.load_images

    def recording(source, split="train", **options):  # the real loader; records the labels it returned
        result = original(source, split, **options)
        seen[split] = result[1]
        return result

    monkeypatch.setattr(datasets, "load_images", recording)
    prune_saved_model(model_path, root, kap.Budget(flops=0.8), tmp_path / "out.keras", method="magnitude",
                      epochs=1, log=lambda line: None)
    np.testing.assert_array_equal(np.unique(seen["test"]), [0, 2])  # "c" is class 2 in both splits


def test_report_subcommand_prints_layers_and_totals(uncompiled_cnn_file, capsys):
    assert main(["report", str(uncompiled_cnn_file)]) == 0
    printed = capsys.readouterr().out
    model = keras.saving.load_model(uncompiled_cnn_file)
    assert f"{model.count_params():,} parameters" in printed
    assert "prunable channel groups" in printed and "conv2d" in printed


def test_the_installed_command_prints_no_tensorflow_logs(uncompiled_cnn_file):
    import os
    import shutil
    import subprocess

    command = shutil.which("keras-autoprune")
    if command is None:
        pytest.skip("the keras-autoprune command is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([command, "report", str(uncompiled_cnn_file)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prunable channel groups" in done.stdout
    assert done.stderr == ""  # no C++ start-up lines (CUDA probing, oneDNN notices)


def test_export_loads_a_lambda_model_only_with_unsafe(tmp_path, capsys):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Lambda(lambda t: 2.0 * t)(inputs)))
    path = tmp_path / "lambda.keras"
    model.save(path)
    target = tmp_path / "lambda.tflite"
    assert main(["export", str(path), "--tflite", str(target)]) == 2  # safe mode refuses to run stored code
    assert "safe_mode" in capsys.readouterr().err and not target.exists()
    assert main(["export", str(path), "--tflite", str(target), "--unsafe"]) == 0
    assert target.exists()
