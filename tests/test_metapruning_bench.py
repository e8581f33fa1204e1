"""The bookkeeping of `benchmarks.metapruning_bench`: which trained rows still describe the current search."""

from __future__ import annotations

import keras

from benchmarks import metapruning_bench as bench
from benchmarks.metapruning_report import gap_rows


def _row(gene, key="net1"):
    return {"gene": list(gene), "cost": 0.24, "pruningnet_key": key}


def _trained(accuracy, widths, epochs=20):
    return {"epochs": epochs, "test_after": accuracy, "widths": dict(widths)}


def test_layer_widths_lists_convolutions_and_dense_layers_only():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(5, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(7, name="head")(x)
    assert bench.layer_widths(keras.Model(inputs, outputs)) == {"conv": 5, "head": 7}


def test_a_new_search_moves_the_rows_trained_from_the_old_widths_aside():
    results = {"search": {"flops_0.25": _row([1, 2])},
               "finetune": {"flops_0.25": {"searched_from_scratch": _trained(0.8, {"a": 3})}}}
    lines = []
    bench.replace_search_row(results, "flops_0.25", _row([2, 2]), log=lines.append)
    assert results["search"]["flops_0.25"]["gene"] == [2, 2]
    assert "flops_0.25" not in results["finetune"]
    assert results["finetune_superseded"]["flops_0.25"]["searched_from_scratch"]["test_after"] == 0.8
    assert len(lines) == 1 and "finetune_superseded" in lines[0]


def test_the_same_gene_found_again_keeps_its_trained_rows():
    trained = {"searched_from_scratch": _trained(0.8, {"a": 3})}
    results = {"search": {"flops_0.25": _row([1, 2])}, "finetune": {"flops_0.25": dict(trained)}}
    bench.replace_search_row(results, "flops_0.25", _row([1, 2]))
    assert results["finetune"]["flops_0.25"] == trained
    assert "finetune_superseded" not in results


def test_the_same_gene_found_by_another_pruningnet_moves_the_rows_aside():
    results = {"search": {"flops_0.25": _row([1, 2])},
               "finetune": {"flops_0.25": {"searched": _trained(0.4, {"a": 3}, epochs=4)}}}
    bench.replace_search_row(results, "flops_0.25", _row([1, 2], key="net2"), log=lambda line: None)
    assert results["search"]["flops_0.25"]["pruningnet_key"] == "net2"
    assert "flops_0.25" not in results["finetune"]
    assert results["finetune_superseded"]["flops_0.25"]["searched"]["test_after"] == 0.4


def test_a_trained_row_counts_only_with_the_same_widths_and_enough_epochs():
    row = _trained(0.81, {"a": 3, "b": 4})
    results = {"finetune": {}, "finetune_superseded": {"flops_0.25": {"uniform_from_scratch": row}}}
    assert bench._trained_row(results, "flops_0.25", "uniform_from_scratch", {"a": 3, "b": 4}, 20) is row
    assert bench._trained_row(results, "flops_0.25", "uniform_from_scratch", {"a": 3, "b": 5}, 20) is None
    assert bench._trained_row(results, "flops_0.25", "uniform_from_scratch", {"a": 3, "b": 4}, 21) is None
    # generated weights come from one PruningNet: another net's superseded rows are never reused
    assert bench._trained_row(results, "flops_0.25", "uniform_from_scratch", {"a": 3, "b": 4}, 20,
                              superseded=False, other_searches=False) is None
    # a search scored another way that lands on the same widths reuses the training, never another entry's
    assert bench._trained_row(results, "flops_0.25_score5000", "uniform_from_scratch", {"a": 3, "b": 4}, 20) is row
    assert bench._trained_row(results, "flops_0.25_score5000", "uniform_from_scratch_seed1", {"a": 3, "b": 4}, 20) is None
    # rows re-estimated on another search's images (from the converged weights) stay with their search
    assert bench._trained_row(results, "flops_0.25_score5000", "uniform_from_scratch", {"a": 3, "b": 4}, 20,
                              other_searches=False) is None
    assert bench._trained_row(results, "flops_0.25", "uniform_from_scratch", {"a": 3, "b": 4}, 20,
                              other_searches=False) is row


def test_a_row_without_widths_is_trained_again():
    results = {"finetune": {"flops_0.25": {"searched_from_scratch": {"epochs": 20, "test_after": 0.82}}}}
    assert bench._trained_row(results, "flops_0.25", "searched_from_scratch", {"a": 3}, 20) is None


def test_matched_uniform_widths_keep_at_most_the_searched_flops_and_the_first_channels():
    import numpy as np

    import keras_autoprune as kap
    from keras_autoprune import metapruning as mp
    from tests.test_metapruning import _residual_net

    model = _residual_net()
    net = mp.PruningNet(model, scales=(0.25, 0.5, 0.75, 1.0), seed=0)
    full = kap.count_flops(model)
    cost = kap.count_flops(net.materialize((1, 3))) / full  # a searched gene's FLOPs kept
    scratch = bench._matched_uniform(model, net, cost, "scratch", "index")
    trained = bench._matched_uniform(model, net, cost, "trained", "index")
    assert bench.layer_widths(scratch) == bench.layer_widths(trained)
    assert kap.count_flops(trained) / full <= cost
    # the searched gene keeps less than the full model, so the matched uniform widths prune too
    assert bench.layer_widths(trained) != bench.layer_widths(model)
    kept = trained.get_layer("c1").get_weights()[0]
    np.testing.assert_array_equal(kept, model.get_layer("c1").get_weights()[0][..., :kept.shape[-1]])


def test_a_seed_for_generated_weights_is_refused_before_any_work():
    import pytest

    with pytest.raises(ValueError, match="--init scratch or --init trained"):
        bench.finetune("resnet20", 0.25, 1, init="generated", seed=1, log=lambda line: None)


def test_trainings_that_need_no_generated_weights_run_without_the_cached_pruningnet(tmp_path):
    import json

    import pytest

    results = tmp_path / "metapruning_resnet20.json"
    results.write_text(json.dumps({"pruningnet": {"epochs_done": 16}}))
    paths = {"weights": tmp_path / "missing.weights.h5", "results": results, "channel_order": "index",
             "warm_start": True}
    with pytest.raises(FileNotFoundError, match="16 PruningNet epoch"):
        bench._network("resnet20", paths)
    model, net = bench._network("resnet20", paths, trained_weights=False)
    gene = [0] * len(net.space.groups)  # the narrowest scale in every group
    widths = bench.layer_widths(net.materialize(gene))
    narrowest = set(net.space.group_widths(gene).values())
    assert narrowest == {round(bench.SCALES[0] * n) for n in (16, 32, 64)}  # the 16-, 32- and 64-channel groups
    assert set(widths.values()) == narrowest | {10}  # every convolution at its group's width; the 10 logits


def test_scoring_on_all_held_out_images_re_estimates_batchnorm_on_training_images():
    import types

    import numpy as np
    import pytest

    index = np.arange(9000)
    data = types.SimpleNamespace(x_train=index[:, None], y_train=index)
    default, all_held = bench._split(data), bench._split(data, bench.HELD_OUT)
    for split in (default, all_held):  # the scored images are never trained on nor used for re-estimation
        scored = set(split["score_y"])
        assert not scored & set(split["train_y"]) and not scored & set(split["bn_x"][:, 0].astype(int))
        assert len(split["train_y"]) == 9000 - bench.HELD_OUT and len(split["bn_x"]) == 20 * 128
    assert len(default["score_y"]) == 2000 and len(all_held["score_y"]) == bench.HELD_OUT
    np.testing.assert_array_equal(all_held["score_y"][:2000], default["score_y"])  # the same held-out order
    assert set(all_held["bn_x"][:, 0].astype(int)) <= set(all_held["train_y"])
    assert not set(default["bn_x"][:, 0].astype(int)) & set(default["train_y"])
    assert bench._tag("flops", 0.25, score_images=bench.HELD_OUT) == "flops_0.25_score5000"
    assert bench._tag("flops", 0.25) == "flops_0.25"
    with pytest.raises(ValueError, match="Received: 3000"):
        bench._split(data, 3000)


def test_the_gap_table_pairs_each_searched_row_with_the_uniform_row_trained_alike():
    tuned = {"flops_0.25": {"searched_from_scratch": _trained(0.8177, {}), "uniform_from_scratch": _trained(0.8147, {}),
                            "searched_from_scratch_seed1": _trained(0.8203, {}),  # its uniform row is missing
                            "searched": _trained(0.70, {}, 4), "uniform": _trained(0.72, {}, 4)}}
    rows = gap_rows(tuned)[2:]
    assert rows == ["| flops 0.25 | generated weights | 4 | 0 | 70.00% | 72.00% | -2.00 |",
                    "| flops 0.25 | fresh weights | 20 | 0 | 81.77% | 81.47% | +0.30 |"]
    assert gap_rows({"flops_0.5": {"searched": _trained(0.7, {})}}) == []


def test_each_entry_of_a_budget_checkpoints_to_its_own_files(tmp_path):
    names = {entry: bench.checkpoint_files(tmp_path / f"scratch_resnet20_flops_0.5_{entry}")
             for entry in ("searched_from_scratch", "uniform_from_scratch")}
    searched, uniform = names["searched_from_scratch"], names["uniform_from_scratch"]
    assert searched[0].name == "scratch_resnet20_flops_0.5_searched_from_scratch.keras"
    assert searched[1].name == "scratch_resnet20_flops_0.5_searched_from_scratch.json"
    assert not set(searched) & set(uniform)


def test_row_names_say_how_a_row_was_trained():
    assert bench.row_name("searched", "generated") == "searched"
    assert bench.row_name("uniform", "trained", seed=1) == "uniform_from_trained_seed1"
    assert bench.row_name("searched", "scratch", epochs=bench.SCRATCH_EPOCHS) == "searched_from_scratch"
    assert bench.row_name("uniform", "scratch", seed=1, epochs=60) == "uniform_from_scratch_60ep_seed1"
    assert bench.row_name("uniform", "trained", epochs=60) == "uniform_from_trained"  # fine-tuning: epochs in the row


def test_exported_architectures_train_from_fresh_weights_and_are_filed_under_their_search(tmp_path, monkeypatch):
    import json

    import numpy as np
    import pytest

    from benchmarks import converged

    committed = json.loads((bench.RESULTS_DIR / "metapruning_resnet20.json").read_text())["search"]["flops_0.25"]
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path / "results")
    bench._store(tmp_path / "results" / "metapruning_resnet20.json", {"search": {"flops_0.25": committed}})
    exported = bench.export_scratch("resnet20", 0.25, tmp_path / "export", log=lambda line: None)
    searched, uniform = exported["entries"]["searched"], exported["entries"]["uniform"]
    assert {name: searched["widths"][name] for name in committed["widths"]} == committed["widths"]
    assert searched["flops_kept"] == pytest.approx(committed["cost"], rel=1e-6)
    assert uniform["flops_kept"] <= searched["flops_kept"] and len(set(uniform["widths"].values()) - {10}) == 3

    full = converged.load_cifar10()  # a real subset: 5,000 held out, 512 images trained, 256 test images
    small = converged.Cifar10(full.x_train[:bench.HELD_OUT + 512], full.y_train[:bench.HELD_OUT + 512],
                              full.x_test[:256], full.y_test[:256])
    monkeypatch.setattr(converged, "load_cifar10", lambda source=None: small)
    record = bench.train_exported(tmp_path / "export", "uniform", epochs=1, seed=1, log=lambda line: None)
    assert record["widths"] == uniform["widths"] and record["epochs"] == 1 and 0.0 <= record["test_after"] <= 1.0
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == [
        "export.json", "searched.keras", "uniform.keras", "uniform_from_scratch_1ep_seed1.json"]  # checkpoints gone

    # a training still under way leaves its checkpoint state beside the records: not a record, left alone
    (tmp_path / "export" / "checkpoint_searched_from_scratch_60ep.json").write_text(json.dumps({"epoch": 3}))
    assert bench.collect_exported(tmp_path / "export", log=lambda line: None) == ["uniform_from_scratch_1ep_seed1"]
    filed = bench._load(tmp_path / "results" / "metapruning_resnet20.json")["finetune"]["flops_0.25"]
    assert list(filed) == ["uniform_from_scratch_1ep_seed1"]
    assert filed["uniform_from_scratch_1ep_seed1"]["test_after"] == record["test_after"]
    np.testing.assert_allclose(filed["uniform_from_scratch_1ep_seed1"]["flops_kept"], uniform["flops_kept"])

    other = tmp_path / "export" / "searched_from_scratch_1ep.json"  # trained at widths that were not exported
    other.write_text(json.dumps({**record, "widths": uniform["widths"]}))
    with pytest.raises(ValueError, match="trained at the exported widths of 'searched'"):
        bench.collect_exported(tmp_path / "export")
    other.unlink()

    bench._store(tmp_path / "results" / "metapruning_resnet20.json",
                 {"search": {"flops_0.25": {**committed, "gene": [0] * len(committed["gene"])}}})
    with pytest.raises(ValueError, match="found another gene"):
        bench.collect_exported(tmp_path / "export")


def test_each_pruningnet_variant_keeps_its_own_results():
    assert bench.NetVariant().run("resnet20") == "resnet20"
    assert bench.NetVariant("l1").run("resnet20") == "resnet20_l1"
    assert bench.NetVariant(warm_start=False).run("resnet20") == "resnet20_scratchnet"
    assert bench.NetVariant("l1", warm_start=False).run("mobilenetv2") == "mobilenetv2_l1_scratchnet"
    assert (bench.NetVariant().learning_rate, bench.NetVariant(warm_start=False).learning_rate) == (0.01, 0.1)


def test_a_training_from_scratch_is_reused_from_another_nets_results_at_the_same_widths(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    row = _trained(0.8134, {"a": 3, "b": 4})
    warm = {"finetune": {"flops_0.25": {"uniform_from_scratch_seed1": row}}}
    (tmp_path / "metapruning_resnet20.json").write_text(json.dumps(warm))
    (tmp_path / "metapruning_mobilenetv2.json").write_text(json.dumps(
        {"finetune": {"flops_0.25": {"uniform_from_scratch": _trained(0.5, {"a": 3, "b": 4})}}}))
    paths = {"results": tmp_path / "metapruning_resnet20_scratchnet.json"}
    found = bench._scratch_row_of_another_net("resnet20", paths, "uniform_from_scratch_seed1", {"a": 3, "b": 4}, 20)
    assert found == row
    # another seed, other widths, more epochs, or only the model's own file: trained again
    assert bench._scratch_row_of_another_net("resnet20", paths, "uniform_from_scratch", {"a": 3, "b": 4}, 20) is None
    assert bench._scratch_row_of_another_net("resnet20", paths, "uniform_from_scratch_seed1", {"a": 3, "b": 5}, 20) is None
    assert bench._scratch_row_of_another_net("resnet20", paths, "uniform_from_scratch_seed1", {"a": 3, "b": 4}, 60) is None
    own = {"results": tmp_path / "metapruning_resnet20.json"}
    assert bench._scratch_row_of_another_net("resnet20", own, "uniform_from_scratch_seed1", {"a": 3, "b": 4}, 20) is None


def test_the_report_says_where_the_pruningnet_started():
    from benchmarks.metapruning_report import markdown

    state = {"epochs_done": 2, "seconds": [60.0, 60.0], "loss": [2.1, 1.9]}
    assert "2 epoch(s) from the converged weights, 2 min" in markdown({"pruningnet": state})
    scratch = markdown({"pruningnet": {**state, "warm_start": False}})
    assert "2 epoch(s) from a random initialisation (learning rate 0.1)" in scratch and "2.100, 1.900" in scratch
