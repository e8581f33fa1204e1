"""The benchmark suite: the `smoke` profile end to end, and its parts on their own."""

import hashlib
import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

from benchmarks import report
from benchmarks.data import DEFAULT_SOURCE, BenchData, train_dataset
from benchmarks.profiles import PROFILES, STRUCTURED_ENTRIES, learning_rate
from benchmarks.stages import Deadline, StageIncomplete, UnitStore
from benchmarks.tfmot_peer import architecture

needs_cifar = pytest.mark.skipif(not DEFAULT_SOURCE.is_file(), reason="../shared/data/cifar10-jpeg.tar.gz is not present")


@needs_cifar
def test_smoke_profile_reports_every_entry_and_figure(tmp_path):
    from benchmarks.run import REPO_ROOT, main

    published = [*sorted((REPO_ROOT / "docs").glob("benchmarks*.md")), *sorted((REPO_ROOT / "docs" / "img").glob("*.png"))]
    before = {path: path.read_bytes() for path in published}
    results = main(["--profile", "smoke", "--results-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    assert {path: path.read_bytes() for path in published} == before  # smoke never rewrites the published page or plots
    assert not (REPO_ROOT / "docs" / "img" / "accuracy_vs_flops_smoke.png").exists()
    saved = json.loads((tmp_path / "smoke.json").read_text())
    # --report-only runs nothing: the same units, an entry never run is left out.
    again = main(["--profile", "smoke", "--results-dir", str(tmp_path / "again"), "--cache-dir", str(tmp_path / "cache"),
                  "--report-only", "--entries", "unpruned", "nap", "random", "--seeds", "0", "1"])
    assert [(r["entry"], r["budget"], r["fit_seconds"]) for r in again["runs"]] == [
        (r["entry"], r["budget"], r["fit_seconds"]) for r in results["runs"] if r["entry"] in ("unpruned", "nap", "random")]
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    profile = PROFILES["smoke"]
    assert saved["entries"] == list(profile.entries)
    expected = {("unpruned", None)} | {(e, b) for e in profile.entries if e != "unpruned" for b in profile.budgets}
    assert {(r["entry"], r["budget"]) for r in saved["runs"]} == expected
    assert len(saved["runs"]) == len(expected)

    for run in saved["runs"]:
        assert "error" not in run
        assert 0.0 <= run["accuracy"] <= 1.0
        assert 0.0 < run["params_kept"] <= 1.0 and run["fit_seconds"] > 0
        if run["entry"] in STRUCTURED_ENTRIES:
            assert run["flops_kept"] <= run["budget"] + 1e-12
            assert run["params_kept"] < 1.0
            assert run["pruning_seconds"] > 0
        else:
            assert run["flops_kept"] == 1.0 and run["pruning_seconds"] == 0.0
        data_free = run["entry"] in ("unpruned", "uniform_l1", "global_l1", "random", "red")
        assert (run["statistics_seconds"] > 0) == (not data_free), run["entry"]  # a calibration pass per round
        if run["entry"] == "psap_scratch":  # 1 + 1 epochs from the initialisation, its one round after the first
            assert (run["epochs"], run["round_epochs"]) == (2, [1])
        elif run["entry"] in STRUCTURED_ENTRIES:
            assert (run["epochs"], run["round_epochs"]) == (1, [0])
        float32, int8 = run["tflite"]["float32"], run["tflite"]["int8"]
        assert float32["relative_error"] <= 1e-4 and int8["bytes"] < float32["bytes"]
        assert 0 < int8["bytes"] and 0 < float32["gzip_bytes"] < float32["bytes"], run["entry"]
        if run["entry"] != "eigendamage":  # at width 8, three layers' int8 scales and zero points outweigh the kernels
            assert int8["bytes"] < float32["bytes"], run["entry"]

    unpruned = next(r for r in saved["runs"] if r["entry"] == "unpruned")
    for budget in profile.budgets:
        group = saved["latency"][f"0/{budget}"]
        assert set(group) == set(profile.entries)
        for entry, figures in group.items():
            for precision in ("float32", "int8"):
                assert 0 < figures[precision]["median_ms"] <= figures[precision]["p90_ms"]
                assert figures[precision]["kept"] > 0
        assert group["unpruned"]["float32"]["kept"] == 1.0
        pruned = [r for r in saved["runs"] if r["budget"] == budget]
        assert all(r["tflite"]["float32"]["bytes"] < unpruned["tflite"]["float32"]["bytes"] for r in pruned)

    assert saved["pretrained"]["epochs"] == 1
    assert len(saved["goals"]) == 1 + 4 + 4 + 2 + 1  # issue 5's goals, then EigenDamage's (issue 6)
    text = report.markdown(saved)
    for entry in profile.entries:
        assert f"| {report.LABELS[entry]} |" in text
    assert report.LABELS["psap_scratch"] == "PSAP from scratch (no pretraining)"
    assert "trained 2 epochs with the pretraining's learning rate" in text
    report.plot(saved, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_learning_rate_schedules():
    assert learning_rate(0, 0.1, 4, "cosine") == pytest.approx(0.1)
    assert learning_rate(2, 0.1, 4, "cosine") == pytest.approx(0.05)
    assert learning_rate(3, 0.1, 4, "cosine") == pytest.approx(0.05 * (1 + math.cos(3 * math.pi / 4)))
    assert [learning_rate(e, 0.1, 8, "step") for e in (0, 3, 4, 5, 6, 7)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ValueError, match="Received: schedule='linear'"):
        learning_rate(0, 0.1, 4, "linear")


def _tiny_data(count=12):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return BenchData(x, np.arange(count) % 10, np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int64),
                     np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))


def test_train_dataset_is_deterministic_per_seed_and_epoch():
    data = _tiny_data()
    batches = lambda seed, first, last: [x.numpy() for x, _ in train_dataset(data, 4, seed, first, last)]  # noqa: E731
    two_epochs = batches(0, 0, 2)
    assert len(two_epochs) == 6 and two_epochs[0].shape == (4, 32, 32, 3)
    # A resumed run (starting at epoch 1) sees exactly the batches it would have seen.
    np.testing.assert_array_equal(np.stack(batches(0, 1, 2)), np.stack(two_epochs[3:]))
    assert not np.array_equal(two_epochs[0], batches(1, 0, 1)[0])
    # Every image of an epoch is used once: labels are a permutation.
    labels = np.concatenate([y.numpy() for _, y in train_dataset(data, 4, 0, 0, 1)])
    assert sorted(labels.tolist()) == sorted(data.y_train.tolist())


def test_bench_data_round_trip_and_normalisation(tmp_path):
    data = _tiny_data()
    data.save(tmp_path / "d.npz")
    again = BenchData.load_npz(tmp_path / "d.npz")
    np.testing.assert_array_equal(again.x_train, data.x_train)
    x, y = data.calibration(5)
    assert x.shape == (5, 32, 32, 3) and x.dtype == np.float32 and y.shape == (5,)
    np.testing.assert_allclose(data.normalise(np.full((1, 1, 1, 3), 255, np.uint8)), 2.0)


def test_unit_store_and_deadline(tmp_path):
    store = UnitStore(tmp_path / "units")
    assert store.result("a") is None
    store.save("a", {"x": 1})
    assert UnitStore(tmp_path / "units").result("a") == {"x": 1}
    assert UnitStore(tmp_path / "units", fresh=True).result("a") is None
    assert Deadline(None).allows(1e9)
    with pytest.raises(StageIncomplete, match="pretraining"):
        Deadline(0.0).check(1.0, "pretraining")


def test_kept_units_survive_the_loss_of_the_cache_and_their_files_are_exported_again(tmp_path):
    import shutil

    import keras

    from benchmarks.run import _tflite_files

    store = UnitStore(tmp_path / "cache", keep=tmp_path / "repo")
    store.save("s0-b50-nap", {"x": 1})
    shutil.rmtree(tmp_path / "cache")
    again = UnitStore(tmp_path / "cache", fresh=True, keep=tmp_path / "repo")
    assert again.result("s0-b50-nap") == {"x": 1} and (tmp_path / "repo" / "s0-b50-nap.json").exists()
    assert again.kept_model("s0-b50-nap") == tmp_path / "repo" / "s0-b50-nap.keras"
    assert UnitStore(tmp_path / "other").kept_model("s0-b50-nap") is None
    (tmp_path / "cache" / "s0-b50-nap.json").write_text('{"x": 2}')  # a stale working copy
    assert again.result("s0-b50-nap") == {"x": 1}  # the repository's copy wins

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.fit(np.zeros((2, 32, 32, 3)), np.zeros((2, 10)), verbose=0)  # momentum slots exist
    again.keep_model("s0-b50-nap", model)
    kept = keras.saving.load_model(again.kept_model("s0-b50-nap"))
    assert getattr(kept, "optimizer", None) is None and all(np.array_equal(a, b) for a, b in zip(kept.get_weights(), model.get_weights()))
    gone = {"float32": {"path": str(tmp_path / "cache" / "lost" / "float32.tflite")}}
    row = {"entry": "nap", "seed": 0, "budget": 0.5, "tflite": gone}
    data, profile = _tiny_data(), PROFILES["smoke"]
    files = _tflite_files(row, again, data, profile)
    assert set(files) == {"float32", "int8"} and all(pathlib.Path(f["path"]).exists() for f in files.values())
    assert files["float32"]["relative_error"] < 1e-5 and files["float32"]["bytes"] > 0
    assert _tflite_files(dict(row, tflite=files), again, data, profile) == files  # present files are not exported again
    assert _tflite_files(dict(row, entry="tfmot"), again, data, profile) is None  # no kept model: not timed
    # --retime: exported again from the kept model (once per process), the record updated.
    pathlib.Path(files["int8"]["path"]).write_bytes(b"an older exporter's file")
    current = dict(row, tflite=files)
    retimed = _tflite_files(current, again, data, profile, again=True)
    assert pathlib.Path(retimed["int8"]["path"]).read_bytes() != b"an older exporter's file"
    assert again.result("s0-b50-nap")["tflite"] == retimed
    pathlib.Path(retimed["int8"]["path"]).write_bytes(b"touched after")
    assert _tflite_files(current, again, data, profile, again=True) == retimed  # not a second time
    assert pathlib.Path(retimed["int8"]["path"]).read_bytes() == b"touched after"


def test_architecture_describes_the_residual_graph():
    from keras_autoprune.zoo import resnet_cifar

    description = architecture(resnet_cifar(8, width=8))
    layers = {layer["name"]: layer for layer in description["layers"]}
    assert description["output"] == "logits"
    assert layers["s1b1_add"]["inputs"] == ["stem_relu", "s1b1_b_bn"]
    assert layers["s2b1_proj"]["config"] == {"filters": 16, "kernel_size": [1, 1], "strides": [2, 2], "padding": "valid",
                                             "dilation_rate": [1, 1], "use_bias": False, "activation": "linear"}
    assert [layer["class"] for layer in description["layers"]].count("Conv2D") == 9


def test_architecture_describes_depthwise_layers_and_capped_relus():
    from keras_autoprune.zoo import mobilenetv2_cifar

    description = architecture(mobilenetv2_cifar(alpha=0.25, last_channels=32))
    layers = {layer["name"]: layer for layer in description["layers"]}
    assert layers["b1_1_dw"]["class"] == "DepthwiseConv2D"
    assert layers["b1_1_dw"]["config"] == {"kernel_size": [3, 3], "strides": [1, 1], "padding": "same", "depth_multiplier": 1,
                                           "dilation_rate": [1, 1], "use_bias": False, "activation": "linear"}
    assert layers["stem_relu"]["config"]["max_value"] == 6.0


def test_taylor_scores_sum_gradient_times_weight_over_the_creating_filters():
    import keras

    import keras_autoprune as kap
    from benchmarks.entries import taylor_scores
    from keras_autoprune.stats import collect_gradient_stats
    from keras_autoprune.zoo import resnet_cifar

    keras.utils.set_random_seed(0)  # an unseeded initialisation can leave a channel with no gradient
    model = resnet_cifar(8, width=8)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    graph = kap.DependencyGraph(model)
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(16, 32, 32, 3)).astype("float32"), np.arange(16) % 10)
    stats = collect_gradient_stats(model, data, fisher="empirical", batch_size=16, graph=graph, verbose=0)
    scores = taylor_scores(graph, stats)
    assert set(scores) == {g.id for g in graph.prunable_groups}

    def filters(name):
        return np.abs(stats[name].kernel_grad * model.get_layer(name).kernel.numpy()).sum(axis=(0, 1, 2))

    np.testing.assert_allclose(scores["s1b1_a_conv"], filters("s1b1_a_conv"), rtol=1e-12)
    # A residual group sums every conv creating its channels (the projection and the block's last conv).
    np.testing.assert_allclose(scores["s2b1_proj"], filters("s2b1_proj") + filters("s2b1_b_conv"), rtol=1e-12)
    assert np.all(scores["s2b1_proj"] > 0)


def test_fine_tuning_resumes_after_a_deadline(tmp_path):
    """A stage stops after the pruning epoch and one more; the next call finishes the same run."""
    import dataclasses

    import keras

    from benchmarks.entries import run_entry
    from keras_autoprune.zoo import resnet_cifar

    data = _tiny_data(40)
    profile = dataclasses.replace(PROFILES["smoke"], finetune_epochs=3, batch_size=8, calibration_batches=1)
    (tmp_path / "pre").mkdir()
    resnet_cifar(8, width=8).save(tmp_path / "pre" / "model.keras")
    folder = tmp_path / "unit"
    folder.mkdir()
    with pytest.raises(StageIncomplete, match="stopped after epoch 2"):
        run_entry("global_l1", profile, data, tmp_path / "pre", 0.5, 0, folder, Deadline(0.0))
    state = json.loads((folder / "state.json").read_text())
    assert state["end_epoch"] == 2 and state["flops_kept"] <= 0.5
    model, figures = run_entry("global_l1", profile, data, tmp_path / "pre", 0.5, 0, folder, Deadline(None))
    assert isinstance(model, keras.Model) and not (folder / "checkpoint.keras").exists()
    assert figures["flops_kept"] == state["flops_kept"] and figures["fit_seconds"] > state["fit_seconds"]
    assert 0.0 <= figures["accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(
    not (importlib.util.find_spec("tensorflow_model_optimization") and importlib.util.find_spec("tf_keras")),
    reason="the TFMOT peer needs tf_keras and tensorflow-model-optimization (the bench extra)",
)
@pytest.mark.parametrize("builder", ["resnet", "mobilenetv2"])
def test_tfmot_peer_matches_the_parameter_target_and_resumes(tmp_path, builder):
    """TFMOT leaves depthwise kernels dense: on MobileNetV2 the Conv2D/Dense kernels alone meet the target."""
    import dataclasses

    from benchmarks.tfmot_peer import run_tfmot
    from keras_autoprune.zoo import mobilenetv2_cifar, resnet_cifar

    data = _tiny_data(40)
    data.x_test, data.y_test = data.normalise(data.x_train[:4]), data.y_train[:4]  # non-zero logits
    data.save(tmp_path / "data.npz")
    profile = dataclasses.replace(PROFILES["smoke"], finetune_epochs=3, batch_size=8, export_samples=4)
    model = resnet_cifar(8, width=8) if builder == "resnet" else mobilenetv2_cifar(alpha=0.25, last_channels=32)
    params_kept = 0.3
    stage = run_tfmot(model, tmp_path / "data.npz", params_kept, profile, 0, tmp_path, max_seconds=0.0)
    assert stage == {"incomplete": "TFMOT fine-tuning stopped after epoch 2"}
    result = run_tfmot(model, tmp_path / "data.npz", params_kept, profile, 0, tmp_path)
    assert "error" not in result, result
    assert result["twin_relative_error"] <= 1e-4
    assert result["params_kept"] == pytest.approx(params_kept, abs=0.01)  # non-zero parameters after strip_pruning
    assert result["tflite"]["float32"]["relative_error"] <= 1e-4
    assert result["tflite"]["float32"]["gzip_bytes"] < 0.6 * result["tflite"]["float32"]["bytes"]
    assert not (tmp_path / "peer_state.json").exists()


def test_red_merge_entry_reaches_the_budget_by_near_identical_merging():
    import keras

    import keras_autoprune as kap
    from benchmarks.entries import compress_one_shot
    from keras_autoprune.zoo import resnet_cifar

    keras.utils.set_random_seed(3)
    pretrained = resnet_cifar(8, width=8)
    model, figures = compress_one_shot("red_merge", pretrained, 0.5)
    expected = kap.red.compress(pretrained, budget=kap.Budget(flops=0.5), budget_knob="merge_threshold",
                                merge_distance="layer")  # data-free, hence deterministic
    assert figures["merge_threshold"] == expected.merge_threshold > 0 and figures["bandwidth_scale"] == 0.05
    assert figures["snap_to"] == expected.snap_to == "mean"
    assert figures["bias_corrected_groups"] == len(expected.bias_corrected)
    assert figures["neurons_merged"] == expected.neurons_merged > 0
    assert kap.count_flops(model) == kap.count_flops(expected.model) <= 0.5 * kap.count_flops(pretrained)


def _restored_one_shot(entry: str, seed: int):
    """A ``*_bn`` one-shot entry at 50% on a random ResNet-8: ``(pretrained, model, figures)``, after checking
    that every folded normalisation is back and the budget counts them."""
    import keras

    import keras_autoprune as kap
    from benchmarks.entries import compress_one_shot
    from keras_autoprune.zoo import resnet_cifar

    keras.utils.set_random_seed(seed)
    pretrained = resnet_cifar(8, width=8)
    model, figures = compress_one_shot(entry, pretrained, 0.5)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == figures["batchnorm_folded"] > 0
    assert kap.count_flops(model) <= 0.5 * kap.count_flops(pretrained)  # the restored normalisations counted
    return pretrained, model, figures


def test_red_merge_bn_entry_restores_the_batchnorms_within_the_budget():
    import keras_autoprune as kap

    pretrained, model, figures = _restored_one_shot("red_merge_bn", seed=3)
    expected = kap.red.compress(pretrained, budget=kap.Budget(flops=0.5), budget_knob="merge_threshold",
                                merge_distance="layer", restore_batchnorm=True)
    assert figures["merge_threshold"] == expected.merge_threshold and figures["neurons_merged"] > 0
    assert kap.count_flops(expected.model) == kap.count_flops(model)


def test_red_low_rank_bn_entry_separates_approximately_within_the_budget_with_the_batchnorms_back():
    _, _, figures = _restored_one_shot("red_low_rank_bn", seed=4)
    assert figures["convolutions_approximated"] > 0 and 0 < figures["separation_tolerance"] <= 1
    assert figures["bandwidth_scale"] == 0 and figures["neurons_merged"] == 0


def test_red_entry_compresses_without_data_then_fine_tunes_like_the_others(tmp_path):
    """``red``: `kap.red.compress` to the FLOPs budget before epoch 0, then the common fine-tuning, no callback."""
    import dataclasses

    import keras

    import keras_autoprune as kap
    from benchmarks.entries import EntryCannotRun, run_entry
    from benchmarks.run import run_unit
    from keras_autoprune.zoo import resnet_cifar

    data = _tiny_data(40)
    profile = dataclasses.replace(PROFILES["smoke"], finetune_epochs=2, batch_size=8, calibration_batches=1)
    (tmp_path / "pre").mkdir()
    keras.utils.set_random_seed(3)
    pretrained = resnet_cifar(8, width=8)
    pretrained.save(tmp_path / "pre" / "model.keras")
    compressed = kap.red.compress(pretrained, budget=kap.Budget(flops=0.5))  # data-free, hence deterministic
    folder = tmp_path / "unit"
    folder.mkdir()
    model, figures = run_entry("red", profile, data, tmp_path / "pre", 0.5, 0, folder)
    assert (figures["epochs"], figures["round_epochs"]) == (2, [0])
    assert figures["statistics_seconds"] == 0.0 and figures["pruning_seconds"] > 0
    assert figures["bandwidth_scale"] == compressed.bandwidth_scale > 0.05
    assert figures["neurons_merged"] == compressed.neurons_merged > 0
    assert figures["batchnorm_folded"] == 9
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert figures["flops"] == kap.count_flops(model) == kap.count_flops(compressed.model)
    assert figures["flops_kept"] == kap.count_flops(model) / kap.count_flops(pretrained) <= 0.5
    assert figures["params"] == kap.count_params(compressed.model) < kap.count_params(pretrained)
    kernels = [(w.numpy(), v.numpy()) for w, v in zip(model.weights, compressed.model.weights) if w.path.endswith("kernel")]
    assert len(kernels) == 10 and all(not np.array_equal(a, b) for a, b in kernels)  # fine-tuned from RED's weights
    assert 0.0 <= figures["accuracy"] <= 1.0 and figures["fit_seconds"] > 0

    with pytest.raises(EntryCannotRun, match="cannot reach the budget"):
        run_entry("red", profile, data, tmp_path / "pre", 0.001, 0, folder)
    store = UnitStore(tmp_path / "units")
    row = run_unit("red", profile, data, None, tmp_path / "pre", 0.001, 1, store, "s1-b0-red", Deadline(None))
    assert row["entry"] == "red" and row["budget"] == 0.001 and row["seed"] == 1
    assert row["error"].startswith("BudgetUnreachableError: RED cannot reach the budget")
    # A callback's budget out of reach (checked before its first epoch) is a result too, not a crash.
    row = run_unit("eigendamage", profile, data, None, tmp_path / "pre", 0.001, 0, store, "s0-b0-eigendamage", Deadline(None))
    assert row["entry"] == "eigendamage" and row["budget"] == 0.001
    assert row["error"].startswith("BudgetUnreachableError: Expected a budget EigenDamage can reach")
    assert "red" in PROFILES["v2"].entries and "red" in STRUCTURED_ENTRIES and "red" in PROFILES["smoke"].entries


def test_pretraining_resumes_from_its_checkpoint(tmp_path):
    import dataclasses

    from benchmarks.pretrain import load_pretrained, pretrain, pretrained_path
    from keras_autoprune.zoo import resnet_cifar

    data = _tiny_data(16)
    profile = dataclasses.replace(PROFILES["smoke"], pretrain_epochs=2, batch_size=8)
    with pytest.raises(StageIncomplete, match="after epoch 1 of 2"):
        pretrain(profile, data, tmp_path, Deadline(0.0))
    folder = pretrained_path(profile, tmp_path)
    assert json.loads((folder / "checkpoint.json").read_text())["epochs"] == 1
    meta = pretrain(profile, data, tmp_path, Deadline(None))
    assert meta["epochs"] == 2 and meta["cached"] is False and not (folder / "checkpoint.keras").exists()
    assert pretrain(profile, data, tmp_path)["cached"] is True
    assert load_pretrained(folder).count_params() == resnet_cifar(profile.depth, width=profile.width).count_params()


def test_run_key_ignores_the_entry_list_but_not_the_schedule():
    import dataclasses

    cpu = PROFILES["cpu"]
    # Adding an entry keeps the finished units of the others (benchmarks/cache/<profile>/runs-<key>).
    assert dataclasses.replace(cpu, entries=("unpruned", "nap")).run_key() == cpu.run_key()
    assert dataclasses.replace(cpu, resumable=True, stage_minutes=5.0).run_key() == cpu.run_key()
    assert dataclasses.replace(cpu, finetune_lr=0.01).run_key() != cpu.run_key()
    assert dataclasses.replace(cpu, budgets=(0.5,)).run_key() != cpu.run_key()


def test_scratch_schedule_covers_pretraining_and_fine_tuning():
    from benchmarks.entries import Schedule, entry_schedule, scratch_schedule

    assert scratch_schedule(PROFILES["cpu"]) == Schedule(21, 1, 8, 0.1, "cosine")
    assert scratch_schedule(PROFILES["smoke"]) == Schedule(2, 1, 2, 0.05, "cosine")
    assert scratch_schedule(PROFILES["gpu"]) == Schedule(204, 1, 69, 0.1, "step")
    assert entry_schedule("psap", PROFILES["cpu"]) == Schedule(6, 0, 2, 0.02, "cosine")
    assert entry_schedule("psap_scratch", PROFILES["cpu"]).learning_rate(0) == pytest.approx(0.1)
    assert "psap_scratch" not in PROFILES["gpu"].entries and "psap_scratch" in PROFILES["cpu"].entries


def test_psap_scratch_starts_from_the_initialisation_and_meets_the_budget(tmp_path):
    """psap_scratch trains the pretraining's initial weights, not the pretrained ones, and prunes while training."""
    import dataclasses

    import keras

    import keras_autoprune as kap
    from benchmarks.entries import run_entry, starting_model
    from benchmarks.pretrain import PRETRAIN_SEED
    from keras_autoprune.zoo import resnet_cifar

    data = _tiny_data(40)
    profile = dataclasses.replace(PROFILES["smoke"], pretrain_epochs=1, finetune_epochs=2, batch_size=8,
                                  calibration_batches=1)
    (tmp_path / "pre").mkdir()
    keras.utils.set_random_seed(7)
    resnet_cifar(8, width=8).save(tmp_path / "pre" / "model.keras")  # stands for the pretrained model
    keras.utils.set_random_seed(PRETRAIN_SEED)
    initial = resnet_cifar(8, width=8).get_weights()
    pretrained = keras.saving.load_model(tmp_path / "pre" / "model.keras").get_weights()

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b))

    for seed in (0, 1):
        assert same(starting_model("psap_scratch", profile, tmp_path / "pre", seed).get_weights(), initial)
    assert same(starting_model("psap", profile, tmp_path / "pre", 1).get_weights(), pretrained)
    assert not same(initial, pretrained)

    folder = tmp_path / "unit"
    folder.mkdir()
    model, figures = run_entry("psap_scratch", profile, data, tmp_path / "pre", 0.5, 0, folder)
    # 1 + 2 epochs; rounds at epochs 1 .. 3 // 3 (one here), the slim model after.
    assert (figures["epochs"], figures["round_epochs"]) == (3, [1])
    assert figures["flops_kept"] <= 0.5 and figures["params_kept"] < 1.0
    assert kap.count_flops(model) == figures["flops"] and figures["statistics_seconds"] > 0


def test_goals_judge_nap_with_its_defaults_where_that_entry_ran():
    def run(entry, accuracy, seed=0):
        return {"entry": entry, "budget": None if entry == "unpruned" else 0.5, "seed": seed, "accuracy": accuracy,
                "flops_kept": 0.5, "pruning_seconds": 10.0, "fit_seconds": 100.0}

    results = {"budgets": [0.5], "latency": {}, "runs": [run("unpruned", 0.90), run("uniform_l1", 0.85), run("nap", 0.84)]}
    first = report.goals(results)[0]
    assert first["goal"].startswith("NAP at 50%") and first["detail"] == "-6.00 points" and first["met"] is False
    results["runs"] += [run("fisher_cost_aware", 0.895)]
    first, ahead = report.goals(results)[:2]
    assert first["goal"].startswith("NAP (defaults) at 50%") and first["detail"] == "-0.50 points" and first["met"] is True
    assert ahead["goal"] == "NAP (defaults) ahead of uniform L1 at 50% FLOPs" and ahead["detail"] == "+4.50 points"


def test_the_table_compares_an_entry_with_the_unpruned_model_on_the_seeds_it_ran():
    def run(entry, accuracy, seed, fit):
        return {"entry": entry, "budget": None if entry == "unpruned" else 0.5, "seed": seed, "accuracy": accuracy,
                "flops_kept": 0.5, "params_kept": 0.5, "pruning_seconds": 1.0, "statistics_seconds": 0.5,
                "fit_seconds": fit, "tflite": {"float32": {}, "int8": {}}}

    results = {"entries": ["unpruned", "taylor", "nap"], "budgets": [0.5], "latency": {},
               "runs": [run("unpruned", 0.88, 0, 100.0), run("unpruned", 0.90, 1, 200.0), run("taylor", 0.86, 0, 50.0),
                        run("nap", 0.86, 0, 50.0), run("nap", 0.87, 1, 100.0)]}
    assert report.paired_against_unpruned(results, "taylor", 0.5, "accuracy") == [(0.86, 0.88)]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in report.budget_table(results, 0.5).splitlines()[2:]}
    assert rows["| first-order Taylor"][2] == "-2.00"  # seed 0 only: not against the two seeds' mean 0.89
    assert rows["| first-order Taylor"][-1] == "50 (0.50) |"
    assert rows["| NAP, K-FAC OBS"][2] == "-2.50" and rows["| NAP, K-FAC OBS"][-1] == "75 (0.50) |"
    # An entry timed in a later run than the unpruned row is marked, and the table says what that means.
    results["latency"] = {"0/0.5": {"unpruned": {"float32": {"median_ms": 1.0, "p90_ms": 1.0, "kept": 1.0}},
                                    "taylor": {"float32": {"median_ms": 0.4, "p90_ms": 0.4, "kept": 0.5,
                                                           "reference_median_ms": 0.8}}}}
    table = report.budget_table(results, 0.5)
    assert "0.400 (0.50)\u2020" in table and "compare the ratio in brackets" in table
    assert "\u2020" not in next(line for line in table.splitlines() if line.startswith("| NAP, K-FAC OBS"))


def test_goal_against_torch_pruning_compares_each_seed_with_its_best_fine_tuned_row():
    def run(entry, accuracy, seed):
        return {"entry": entry, "budget": None if entry == "unpruned" else 0.25, "seed": seed, "accuracy": accuracy,
                "flops_kept": 0.25, "pruning_seconds": 10.0, "fit_seconds": 100.0}

    def torch_row(entry, accuracy, seed):
        return {"entry": entry, "target": 0.25, "seed": seed, "accuracy": accuracy, "flops_kept": 0.248,
                "params_kept": 0.3, "pruning_seconds": 5.0, "fit_seconds": 300.0}

    results = {"budgets": [0.25], "latency": {}, "runs": [run("fisher_cost_aware", 0.81, 0), run("fisher_cost_aware", 0.80, 1)],
               "torch_finetune": [torch_row("tp_l1_global", 0.79, 0), torch_row("tp_taylor_global", 0.80, 0),
                                  torch_row("tp_taylor_global", 0.805, 1)]}
    goal = next(g for g in report.goals(results) if "Torch-Pruning" in g["goal"])
    assert goal["detail"] == "mean +0.25 points; per seed +1.00, -0.50" and goal["met"] is False  # seed 1 loses
    table = report.torch_table(results, 0.25)
    assert "| tp_taylor_global | 1 | 80.50 | 0.248 |" in table and table.count("\n| tp_") == 3
    assert report.torch_table(results, 0.5) == ""


def test_a_failed_export_is_recorded_and_left_out_of_the_timing(tmp_path):
    import keras

    from benchmarks.measure import export_model, latency_figures

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))))
    profile = PROFILES["smoke"]
    files = export_model(model, tmp_path, _tiny_data().test_sample(2), profile)
    broken = {"float32": files["float32"], "int8": {"error": "ExportError: XNNPACK failed to prepare"}}
    timed = latency_figures({"unpruned": files, "red": broken}, "unpruned", profile)
    assert set(timed["unpruned"]) == {"float32", "int8"} and set(timed["red"]) == {"float32"}
    digest = hashlib.sha256((tmp_path / "float32.tflite").read_bytes()).hexdigest()
    assert files["float32"]["sha256"] == timed["red"]["float32"]["sha256"] == digest
    results = {"budgets": [0.5], "latency": {"0/0.5": timed}, "runs": [
        {"entry": "red", "budget": 0.5, "seed": 0, "accuracy": 0.5, "flops_kept": 0.5, "params_kept": 0.5,
         "fit_seconds": 1.0, "pruning_seconds": 0.0, "statistics_seconds": 0.0, "tflite": broken}]}
    run = results["runs"][0]
    assert report.figure(results, run, 0.5, "tflite_int8_bytes") is None
    assert report.figure(results, run, 0.5, "tflite_float32_bytes") == files["float32"]["bytes"]


def test_kept_units_are_refused_for_another_base_model(tmp_path):
    from benchmarks.run import check_base_model

    check_base_model(tmp_path / "units-key", "a" * 64)  # first run: records the model
    assert json.loads((tmp_path / "units-key" / "base_model.json").read_text()) == {"sha256": "a" * 64}
    check_base_model(tmp_path / "units-key", "a" * 64)  # the same model: accepted
    with pytest.raises(ValueError, match=r"sha256 aaaaaaaaaaaa\.\.\., but the committed model now has bbbbbbbbbbbb"):
        check_base_model(tmp_path / "units-key", "b" * 64)


def test_a_run_of_some_entries_times_only_those_and_keeps_the_latency_of_the_others():
    from benchmarks.run import _merge_timings, _untimed

    def figures(ms, kept):
        return {"median_ms": ms, "p90_ms": ms, "kept": kept}

    timed = {"unpruned": {"float32": figures(1.0, 1.0)}, "nap": {"float32": figures(0.6, 0.6)},
             "tfmot": {"float32": figures(0.99, 0.99)}}
    files = {"unpruned": {"float32": {"path": "u"}}, "random": {"float32": {"path": "r"}, "int8": {"error": "refused"}}}
    assert _untimed(timed, files) == {"random"}  # the unpruned model is the reference, never "new"
    new = {"unpruned": {"float32": figures(1.2, 1.0)}, "random": {"float32": figures(0.84, 0.7)}}
    merged = _merge_timings(timed, new)
    assert merged["nap"] == timed["nap"] and merged["tfmot"] == timed["tfmot"] and merged["unpruned"] == timed["unpruned"]
    assert merged["random"] == {"float32": dict(figures(0.84, 0.7), reference_median_ms=1.2)}
    assert _untimed(merged, files) == set()
    # A precision that failed before and exports now is timed again; a first group is kept as timed.
    assert _untimed(merged, {"nap": {"float32": {"path": "n"}, "int8": {"path": "n8"}}}) == {"nap"}
    assert _merge_timings({}, new) == new
    # A file exported again since it was timed (another sha256) is timed again; records without one stay timed.
    sealed = {"unpruned": timed["unpruned"], "nap": {"float32": dict(figures(0.6, 0.6), sha256="a" * 64)}}
    assert _untimed(sealed, {"nap": {"float32": {"path": "n", "sha256": "b" * 64}}}) == {"nap"}
    assert _untimed(sealed, {"nap": {"float32": {"path": "n", "sha256": "a" * 64}}}) == set()
    assert _untimed(timed, {"nap": {"float32": {"path": "n", "sha256": "b" * 64}}}) == set()


def test_a_partial_run_publishes_every_finished_unit(tmp_path):
    from benchmarks.run import finished_units

    for name in ("s0-unpruned", "s0-b50-nap", "s0-b25-psap", "s1-b25-uniform_l1", "s0-b25-latency", "base_model"):
        (tmp_path / f"{name}.json").write_text("{}")
    (tmp_path / "s0-b50-nap.keras").write_text("")
    # The seeds and entries of every finished unit (not latency groups or records), whatever one invocation ran.
    assert finished_units(tmp_path) == ([0, 1], ["nap", "psap", "uniform_l1", "unpruned"])


def test_units_record_the_code_revision_they_ran():
    import subprocess

    from benchmarks.stages import code_revision

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    revision = code_revision()
    if not head:
        assert revision is None  # not a git checkout
    else:
        assert revision in (head, head + "+changes")
