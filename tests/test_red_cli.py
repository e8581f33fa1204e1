"""``keras-autoprune red``: a saved model compressed with RED from the command line."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.cli import main
from tests.helpers import relative_error
from tests.test_red import _chain_model, _copy_channel, _inputs


@pytest.fixture(scope="module")
def duplicates_file(tmp_path_factory):
    """The chain model (conv+BN, conv, flatten, dense) with channels 2 and 5 of c1 copying channel 0."""
    model = _chain_model()
    for target in (2, 5):
        _copy_channel(model.get_layer("c1"), 0, target)
        _copy_channel(model.get_layer("bn1"), 0, target)
    path = tmp_path_factory.mktemp("red_cli") / "model.keras"
    model.save(path)
    return path, model


def test_red_subcommand_writes_a_smaller_exact_model(duplicates_file, tmp_path, capsys):
    path, model = duplicates_file
    out, tflite = tmp_path / "red.keras", tmp_path / "red.tflite"
    status = main(["red", str(path), str(out), "--bandwidth-scale", "0.05", "--tflite", str(tflite)])
    printed = capsys.readouterr().out
    assert status == 0
    loaded = keras.saving.load_model(out, safe_mode=True)
    assert kap.count_params(loaded) < kap.count_params(model) and kap.count_flops(loaded) < kap.count_flops(model)
    assert loaded.get_layer("c1").filters == 6  # 0, 2 and 5 became one channel
    hashed = kap.red.compress(model, bandwidth_scale=0.05).hashed_model
    x = _inputs(model, batch=4)
    assert relative_error(np.asarray(loaded(x)), np.asarray(hashed(x))) <= 1e-5
    for figure in ("batchnorm_folded", "merged", "distinct values after hashing", "c1: kernel",
                   "neurons merged: 2", "  c1: 2", "layers separated: 0", "max abs error", "top-1 agreement",
                   "hashing undone (it enabled no merge or separation): c2, head"):
        assert figure in printed
    assert "c2: kernel" not in printed
    assert tflite.is_file() and str(out) in printed.splitlines()[-1]


def test_red_subcommand_hash_all_layers_keeps_every_layer_hashed(duplicates_file, tmp_path, capsys):
    path, model = duplicates_file
    out = tmp_path / "red.keras"
    assert main(["red", str(path), str(out), "--bandwidth-scale", "0.05", "--hash-all-layers"]) == 0
    printed = capsys.readouterr().out
    assert "c2: kernel" in printed and "head: kernel" in printed and "hashing undone" not in printed
    hashed = kap.red.compress(model, bandwidth_scale=0.05, hash_all_layers=True).hashed_model
    x = _inputs(model, batch=4)
    assert relative_error(np.asarray(keras.saving.load_model(out)(x)), np.asarray(hashed(x))) <= 1e-5


def test_red_subcommand_passes_the_merge_distance(duplicates_file, tmp_path, capsys):
    path, model = duplicates_file
    out = tmp_path / "red.keras"
    assert main(["red", str(path), str(out), "--merge-threshold", "0.8", "--merge-distance", "layer"]) == 0
    expected = kap.red.compress(model, merge_threshold=0.8, merge_distance="layer").model
    channel = kap.red.compress(model, merge_threshold=0.8).model  # at 0.8 the two distances merge differently
    assert kap.count_params(keras.saving.load_model(out)) == kap.count_params(expected) < kap.count_params(channel)
    with pytest.raises(SystemExit):
        main(["red", str(path), str(out), "--merge-distance", "absolute"])
    assert "invalid choice" in capsys.readouterr().err


def _check_flag(duplicates_file, tmp_path, capsys, flags, option, knobs):
    """`red` with ``flags`` writes ``compress(**knobs, **option)``, which differs from ``compress(**knobs)``; the
    flag's last value replaced by a bad one is a usage error. Returns what the good run printed."""
    path, model = duplicates_file
    out = tmp_path / "red.keras"
    assert main(["red", str(path), str(out), *flags]) == 0
    printed = capsys.readouterr().out
    x = _inputs(model, batch=4)
    expected = kap.red.compress(model, **knobs, **option).model
    default = kap.red.compress(model, **knobs).model
    assert relative_error(np.asarray(default(x)), np.asarray(expected(x))) > 1e-4  # the flag matters here
    assert relative_error(np.asarray(keras.saving.load_model(out)(x)), np.asarray(expected(x))) <= 1e-5
    with pytest.raises(SystemExit):
        main(["red", str(path), str(out), *flags[:-1], "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
    return printed


def test_red_subcommand_passes_the_merge_representative(duplicates_file, tmp_path, capsys):
    # clusters of near-identical channels at 1.0
    _check_flag(duplicates_file, tmp_path, capsys, ["--merge-threshold", "1.0", "--merge-representative", "leader"],
                {"merge_representative": "leader"}, {"merge_threshold": 1.0})


def test_red_subcommand_passes_snap_to(duplicates_file, tmp_path, capsys):
    printed = _check_flag(duplicates_file, tmp_path, capsys, ["--bandwidth-scale", "0.5", "--snap-to", "mode"],
                          {"snap_to": "mode"}, {"bandwidth_scale": 0.5})
    assert "snap_to='mode'" in printed


def test_red_subcommand_can_leave_the_reader_biases_alone(duplicates_file, tmp_path, capsys):
    path, model = duplicates_file
    out = tmp_path / "red.keras"
    assert main(["red", str(path), str(out), "--merge-threshold", "1.0", "--no-merge-bias-correction"]) == 0
    assert "reader biases corrected" not in capsys.readouterr().out
    plain = kap.red.compress(model, merge_threshold=1.0, correct_merge_bias=False).model
    corrected = kap.red.compress(model, merge_threshold=1.0)
    assert corrected.bias_corrected == ("c1",)
    shift = np.abs(corrected.model.get_layer("c2").bias.numpy() - plain.get_layer("c2").bias.numpy()).max()
    assert shift > 1e-4  # the flag matters here
    np.testing.assert_array_equal(keras.saving.load_model(out).get_layer("c2").bias.numpy(),
                                  plain.get_layer("c2").bias.numpy())


def test_red_subcommand_counts_a_model_of_unknown_input_size_at_input_shape(tmp_path, capsys):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    path, out = tmp_path / "dynamic.keras", tmp_path / "red.keras"
    model.save(path)
    assert main(["red", str(path), str(out)]) == 2
    assert "input_shape" in capsys.readouterr().err and not out.exists()
    assert main(["red", str(path), str(out), "--input-shape", "8,8,3"]) == 0
    folded = keras.saving.load_model(out)
    assert kap.count_flops(folded, input_shape=(8, 8, 3)) < kap.count_flops(model, input_shape=(8, 8, 3))
    assert f"{kap.count_flops(model, input_shape=(8, 8, 3)):,}" in capsys.readouterr().out


def test_red_subcommand_with_a_budget_and_separation(duplicates_file, tmp_path, capsys):
    path, model = duplicates_file
    out = tmp_path / "red.keras"
    assert main(["red", str(path), str(out), "--budget", "flops=0.9", "--separate-depthwise"]) == 0
    printed = capsys.readouterr().out
    assert "layers separated:" in printed
    loaded = keras.saving.load_model(out)
    separated = int(printed.split("layers separated:")[1].split()[0].strip(",;."))
    blocks = [layer for layer in loaded.layers if isinstance(layer, keras.Model)
              and any(isinstance(inner, keras.layers.DepthwiseConv2D) for inner in layer.layers)]
    assert separated == len(blocks)  # the printed count is what the written model holds
    assert kap.count_flops(keras.saving.load_model(out)) <= 0.9 * kap.count_flops(model)


def test_red_subcommand_restores_the_batchnorms(duplicates_file, tmp_path, capsys):
    path, model = duplicates_file
    out = tmp_path / "red.keras"
    assert main(["red", str(path), str(out), "--bandwidth-scale", "0.05", "--restore-batchnorm"]) == 0
    assert "batchnorm_restored" in capsys.readouterr().out
    loaded = keras.saving.load_model(out, safe_mode=True)
    assert isinstance(loaded.get_layer("bn1"), keras.layers.BatchNormalization) and loaded.get_layer("c1").filters == 6
    hashed = kap.red.compress(model, bandwidth_scale=0.05).hashed_model
    x = _inputs(model, batch=4)
    assert relative_error(np.asarray(loaded(x)), np.asarray(hashed(x))) <= 1e-5


def test_red_subcommand_budget_by_merge_threshold(duplicates_file, tmp_path, capsys):
    path, model = duplicates_file
    out = tmp_path / "red.keras"
    args = ["red", str(path), str(out), "--budget", "flops=0.8", "--budget-knob", "merge_threshold", "--bandwidth-scale", "0"]
    assert main(args) == 0
    assert "merge_threshold=" in capsys.readouterr().out
    assert kap.count_flops(keras.saving.load_model(out)) <= 0.8 * kap.count_flops(model)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bandwidth-scale", "-1"], "bandwidth_scale"),
        (["--merge-threshold", "nan"], "merge_threshold"),
        (["--budget", "flops"], "--budget"),
        (["--budget", "flops=1.5"], "1.5"),
        (["--bandwidth-scale", "0", "--budget", "flops=0.5"], "bandwidth_scale=0"),
        (["--tflite", "red.bin"], ".tflite"),
        (["--input-shape", "8,x"], "--input-shape"),
    ],
)
def test_red_subcommand_rejects_bad_arguments_before_work(extra, message, tmp_path, capsys):
    path = tmp_path / "corrupt.keras"  # loading it fails: a load before the checks would show that error
    path.write_bytes(b"not a model")
    out = tmp_path / "red.keras"
    assert main(["red", str(path), str(out)] + extra) == 2
    error = capsys.readouterr().err
    assert "keras-autoprune red: error:" in error and message in error
    assert not out.exists()


def test_red_subcommand_rejects_bad_paths(duplicates_file, tmp_path, capsys):
    path, _ = duplicates_file
    assert main(["red", str(tmp_path / "missing.keras"), str(tmp_path / "red.keras")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["red", str(path), str(tmp_path / "red.h5")]) == 2
    assert "OUT=" in capsys.readouterr().err
    before = path.read_bytes()
    assert main(["red", str(path), str(path)]) == 2  # would overwrite the model it reads
    assert "other than the input model" in capsys.readouterr().err and path.read_bytes() == before
    with pytest.raises(SystemExit) as exit_info:  # argparse: not a number
        main(["red", str(path), str(tmp_path / "red.keras"), "--bandwidth-scale", "wide"])
    assert exit_info.value.code == 2


def _repeating_kernels_model():
    """A 3x3 convolution whose input channels send two distinct kernels each: stage 3 separates it."""
    rng = np.random.default_rng(10)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(16, 3, padding="same", name="repeats", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="head")(x))
    kernel = np.zeros((3, 3, 4, 16), "float32")
    for c in range(4):
        choices = rng.normal(0, 0.5, (2, 3, 3))
        pick = rng.integers(0, 3, 16)
        for o in range(16):
            kernel[:, :, c, o] = 0 if pick[o] == 2 else choices[pick[o]]
    model.get_layer("repeats").kernel.assign(kernel)
    model.get_layer("repeats").bias.assign(rng.normal(0, 0.1, 16).astype("float32"))
    return model


def test_separated_model_exports_to_a_verified_tflite(tmp_path, capsys):
    from ai_edge_litert.interpreter import Interpreter

    model = _repeating_kernels_model()
    path, out, tflite = tmp_path / "model.keras", tmp_path / "red.keras", tmp_path / "red.tflite"
    model.save(path)
    assert main(["red", str(path), str(out), "--bandwidth-scale", "0", "--separate-depthwise", "--tflite", str(tflite)]) == 0
    printed = capsys.readouterr().out
    assert "layers separated: 1" in printed and "repeats: multiplier 2" in printed
    loaded = keras.saving.load_model(out, safe_mode=True)
    assert kap.count_flops(loaded) < kap.count_flops(model)
    block = [type(layer).__name__ for layer in loaded.get_layer("repeats").layers]
    assert block == ["InputLayer", "Concatenate", "DepthwiseConv2D", "Conv2D"]  # the input tiled twice
    x = _inputs(model, batch=1)
    expected = np.asarray(model(x))
    assert relative_error(np.asarray(loaded(x)), expected) <= 1e-5
    interpreter = Interpreter(model_path=str(tflite))  # LiteRT runs the separated block
    interpreter.allocate_tensors()
    assert {"CONCATENATION", "DEPTHWISE_CONV_2D"} <= {op["op_name"] for op in interpreter._get_ops_details()}
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    assert relative_error(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), expected) <= 1e-5
    assert interpreter.get_input_details()[0]["dtype"] == np.float32


def _red_on_bn_model(tmp_path, capsys, *flags):
    """`keras-autoprune red` on the saved BatchNormalization test model: ``(model, path, out, printed)``."""
    from tests.test_red_low_rank import _bn_model

    model = _bn_model()
    path, out = tmp_path / "model.keras", tmp_path / "red.keras"
    model.save(path)
    assert main(["red", str(path), str(out), *flags]) == 0
    return model, path, out, capsys.readouterr().out


def test_red_subcommand_separates_approximately(tmp_path, capsys):
    model, path, out, printed = _red_on_bn_model(tmp_path, capsys, "--separation-tolerance", "0.3",
                                                 "--reconstruction", "none")
    expected = kap.red.compress(model, separation_tolerance=0.3, reconstruction=None)
    x = np.random.default_rng(3).normal(120, 25, (4, 8, 8, 3)).astype("float32")
    loaded = keras.saving.load_model(out, safe_mode=True)
    assert relative_error(np.asarray(loaded(x)), np.asarray(expected.model(x))) <= 1e-5
    for figure in ("approximated", "layers separated approximately: 2 (separation_tolerance=0.3; 1x1 parts refitted "
                   "on none)", "  c1: rank ", "kernel error", ", not refitted"):
        assert figure in printed
    with pytest.raises(SystemExit):
        main(["red", str(path), str(out), "--reconstruction", "real"])
    from keras_autoprune.red.saved import compress_saved_model

    for wrong in ("real", np.zeros(3)):  # refused before the model is read, with the choices named
        with pytest.raises(ValueError, match=r"Expected `reconstruction` to be one of \('synthetic',\)"):
            compress_saved_model(path, out, separation_tolerance=0.3, reconstruction=wrong)


def test_red_subcommand_refits_every_changed_layer(tmp_path, capsys):
    model, path, out, printed = _red_on_bn_model(tmp_path, capsys, "--merge-threshold", "1.0", "--refit-layers", "all")
    assert "layers refitted on synthetic inputs (every changed layer): 3: c1, c2, head" in printed
    loaded = keras.saving.load_model(out, safe_mode=True)
    plain = kap.red.compress(model, merge_threshold=1.0, verbose=0)
    x = np.random.default_rng(4).normal(120, 25, (8, 8, 8, 3)).astype("float32")
    assert kap.count_flops(loaded) == kap.count_flops(plain.model)  # the same merges, other weights
    assert relative_error(np.asarray(loaded(x)), np.asarray(plain.model(x))) > 1e-3
    with pytest.raises(SystemExit):
        main(["red", str(path), str(out), "--refit-layers", "some"])
