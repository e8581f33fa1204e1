"""benchmarks.red_bench: the RED sweep and uniform L1 beside it, on a tiny model."""

from __future__ import annotations

import numpy as np

import keras_autoprune as kap
from benchmarks import red_bench
from tests.test_red import _chain_model, _copy_channel


def test_sweep_rows_pair_red_with_uniform_l1_at_the_same_flops():
    model = _chain_model()
    for target in (2, 5):
        _copy_channel(model.get_layer("c1"), 0, target)
        _copy_channel(model.get_layer("bn1"), 0, target)
    x = np.random.default_rng(0).normal(0, 1, (32,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    labels = np.argmax(np.asarray(model(x)), axis=-1)

    def evaluate(m):  # agreement with the original's predictions
        return float(np.mean(np.argmax(np.asarray(m(x)), axis=-1) == labels))

    points = red_bench.sweep_points([0.05, 0.05], [0.3], merge_scale=0.05)
    assert points == [(0.05, 0.0), (0.05, 0.3)]
    saved = []
    rows = red_bench.sweep(model, "tiny", evaluate, points[:1], on_row=lambda r: saved.append(len(r)), log=lambda _: None)
    assert [r["entry"] for r in rows] == ["red", "uniform_l1_datafree"] and saved == [1, 2]
    red, uniform = rows
    slim = kap.red.compress(model, bandwidth_scale=0.05, separate_depthwise=True).model
    assert red["flops_kept"] == kap.count_flops(slim) / kap.count_flops(model)
    assert red["neurons_merged"] == 2 and red["merged_per_layer"] == {"c1": 2}
    assert red["accuracy"] == evaluate(slim)
    assert uniform["target_flops_kept"] == red["flops_kept"] and uniform["flops_kept"] <= red["flops_kept"]
    ratio, pruned = red_bench.uniform_ratio(model, red["flops_kept"])
    assert ratio == uniform["ratio"] and kap.count_flops(pruned) / kap.count_flops(model) == uniform["flops_kept"]
    # the smallest such ratio: one tolerance step less keeps more than RED's FLOPs
    less = kap.apply_plan(model, kap.PrunePlan.uniform(kap.DependencyGraph(model), ratio - red_bench.RATIO_TOLERANCE))
    assert kap.count_flops(less) / kap.count_flops(model) > red["flops_kept"]
    # resuming keeps the finished rows and adds only the new point
    rows = red_bench.sweep(model, "tiny", evaluate, points, done=rows, log=lambda _: None)
    assert [(r["entry"], r["merge_threshold"]) for r in rows][2:] == [("red", 0.3), ("uniform_l1_datafree", 0.3)]
    best = red_bench.latency_point(rows, original_accuracy=1.0)
    assert best is not None and best["entry"] == "red" and best["neurons_merged"] >= 2
    # the paper's setting (every layer hashed) adds its own rows beside the default's and leaves them alone
    both = red_bench.sweep(model, "tiny", evaluate, points[:1], done=rows, log=lambda _: None, hash_all_layers=True)
    assert both[:4] == rows
    assert [(r["entry"], r["hash_all_layers"]) for r in both[4:]] == [("red", True), ("uniform_l1_datafree", True)]
    assert red["hashing_reverted"] == ["c2", "head"] and both[4]["hashing_reverted"] == []
    assert both[4]["neurons_merged"] == red["neurons_merged"] and both[4]["flops_kept"] == red["flops_kept"]
    table = red_bench.markdown({"rows": both})
    assert table.count("| used (2 undone) |") == 2 and table.count("| all |") == 1
    # the other merge_representative adds a RED row at the merging point only, beside the same uniform row
    again = red_bench.sweep(model, "tiny", evaluate, points, done=both, log=lambda _: None,
                            merge_representative="leader")
    assert again[:6] == both and [(r["entry"], r["merge_representative"]) for r in again[6:]] == [("red", "leader")]
    assert [red_bench.representative(r) for r in again if r["entry"] == "red"] == ["", "readers", "", "leader"]
    leader = kap.red.compress(model, bandwidth_scale=0.05, merge_threshold=0.3, separate_depthwise=True,
                              merge_representative="leader").model
    assert again[6]["accuracy"] == evaluate(leader) and again[6]["flops_kept"] == rows[2]["flops_kept"]
    assert "| 0.3 | leader + bias |" in red_bench.markdown({"rows": again})
    assert red_bench.representative({"merge_threshold": 0.3}) == "leader"  # rows from before the option
    # the other snap_to adds RED rows at both hashed points; a uniform row at the same FLOPs serves them
    modes = red_bench.sweep(model, "tiny", evaluate, points, done=again, log=lambda _: None, snap_to="mode")
    assert modes[:7] == again
    assert [(r["entry"], r["snap_to"], r["merge_threshold"]) for r in modes[7:]] == [("red", "mode", 0.0),
                                                                                     ("red", "mode", 0.3)]
    assert [red_bench.snapping(r) for r in modes if r["entry"] == "red"] == ["mean"] * 4 + ["mode"] * 2
    assert modes[7]["flops_kept"] == rows[0]["flops_kept"] and modes[8]["flops_kept"] == rows[2]["flops_kept"]
    table = red_bench.markdown({"rows": modes})
    assert table.count("| 0.05 | mode |") == 2 and "not run" not in table
    assert red_bench.snapping({"bandwidth_scale": 0.05}) == "mode"  # rows from before the option
    assert red_bench.snapping({"bandwidth_scale": 0.0, "snap_to": "mean"}) == ""  # nothing hashed
    # without the bias correction: a RED row at the merging point only, its merges the same
    plain = red_bench.sweep(model, "tiny", evaluate, points, done=modes, log=lambda _: None, correct_merge_bias=False)
    assert plain[:9] == modes and [(r["entry"], r["merge_threshold"]) for r in plain[9:]] == [("red", 0.3)]
    assert plain[9]["correct_merge_bias"] is False and plain[9]["flops_kept"] == rows[2]["flops_kept"]
    assert [red_bench.merged_channel(r) for r in plain if r["merge_threshold"] > 0 and r["entry"] == "red"] == [
        "readers + bias", "leader + bias", "readers + bias", "readers"]
    assert red_bench.bias_corrected({"merge_threshold": 0.3}) is False  # rows from before the option
    assert red_bench.bias_corrected({"merge_threshold": 0.0, "correct_merge_bias": True}) is None


def test_plot_writes_a_png(tmp_path):
    rows = [
        {"entry": "red", "bandwidth_scale": 0.05, "merge_threshold": 0.0, "flops_kept": 0.9, "accuracy": 0.8},
        {"entry": "red", "bandwidth_scale": 0.05, "merge_threshold": 0.3, "flops_kept": 0.7, "accuracy": 0.6},
        {"entry": "red", "bandwidth_scale": 0.05, "merge_threshold": 0.3, "flops_kept": 0.7, "accuracy": 0.65,
         "merge_representative": "readers", "snap_to": "mean"},
        {"entry": "uniform_l1_datafree", "bandwidth_scale": 0.05, "merge_threshold": 0.0, "flops_kept": 0.89, "accuracy": 0.7},
    ]
    path = tmp_path / "red.png"
    red_bench.plot("tiny", {"original": {"accuracy": 0.85}, "rows": rows}, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_red_low_rank_table_and_plot_from_rows(tmp_path):
    """The stage-3b benchmark's table pairs each tolerance's refitted, SVD-only and uniform L1 rows with its latency."""
    from benchmarks import red_low_rank

    approximations = [{"layer": "a", "rank": 4}, {"layer": "b", "rank": 2}]
    result = {"model": "resnet20", "original": {"accuracy": 0.8926}, "rows": [
        {"entry": "red_low_rank", "separation_tolerance": 0.1, "accuracy": 0.8864, "flops_kept": 0.711,
         "params_kept": 0.683, "approximations": approximations},
        {"entry": "red_low_rank_svd_only", "separation_tolerance": 0.1, "accuracy": 0.8261, "flops_kept": 0.711,
         "params_kept": 0.683, "approximations": approximations},
        {"entry": "uniform_l1_datafree", "separation_tolerance": 0.1, "accuracy": 0.178, "flops_kept": 0.663,
         "params_kept": 0.65},
        {"entry": "uniform_l1_refit", "separation_tolerance": 0.1, "accuracy": 0.8123, "flops_kept": 0.663,
         "params_kept": 0.65},
        {"entry": "red_low_rank", "separation_tolerance": 0.9, "accuracy": 0.1, "flops_kept": 0.2,
         "params_kept": 0.2, "approximations": []},
        {"entry": "red_low_rank_svd_only", "separation_tolerance": 0.9, "accuracy": 0.1, "flops_kept": 0.2,
         "params_kept": 0.2, "approximations": []},
        {"entry": "uniform_l1_datafree", "separation_tolerance": 0.9, "error": "uniform L1 cannot keep as little"},
    ], "latency": {"points": [{"separation_tolerance": 0.1, "ratio": 1.028}]}}
    lines = red_low_rank.markdown(result).splitlines()
    assert lines[2] == "| 0.1 | 88.64% | 82.61% | 71.1% | 68.3% | 2 (4, 2) | 17.80% | 66.3% | 81.23% | 1.03× |"
    assert lines[3] == "| 0.9 | 10.00% | 10.00% | 20.0% | 20.0% | 0 () | uniform L1 cannot keep as little | | |  |"
    red_low_rank.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_red_refit_table_and_plot_from_rows(tmp_path):
    """The refit benchmark's table puts RED and uniform L1, each as it is and refitted, on one line per point."""
    from benchmarks import red_refit

    def rows(scale, threshold, red, refit, uniform, uniform_refit):
        point = {"bandwidth_scale": scale, "merge_threshold": threshold}
        return [dict(point, entry="red", accuracy=red, flops_kept=0.597, layers_refitted=[]),
                dict(point, entry="red_refit", accuracy=refit, flops_kept=0.597, layers_refitted=["a", "b"]),
                dict(point, entry="uniform_l1_datafree", accuracy=uniform, flops_kept=0.566),
                dict(point, entry="uniform_l1_refit", accuracy=uniform_refit, flops_kept=0.566)]

    result = {"model": "resnet20", "original": {"accuracy": 0.8926},
              "rows": rows(0.05, 0.9, 0.795, 0.8779, 0.6907, 0.8652) + rows(1.0, 0.0, 0.1016, 0.5776, 0.2166, 0.6943)}
    lines = red_refit.markdown(result).splitlines()
    assert lines[2] == "| 1 | 0 | 59.7% | 10.16% | 57.76% (2) | 56.6% | 21.66% | 69.43% |"  # threshold 0 first
    assert lines[3] == "| 0.05 | 0.9 | 59.7% | 79.50% | 87.79% (2) | 56.6% | 69.07% | 86.52% |"
    red_refit.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_uniform_l1_is_refitted_like_red_against_the_folded_original():
    """The benchmark's uniform L1 refit: the same kept channels and FLOPs as uniform L1, closer to the original."""
    from benchmarks import red_refit
    from keras_autoprune.red.batchnorm import fold_batchnorm
    from tests.helpers import relative_error
    from tests.test_red_low_rank import _bn_model

    model = _bn_model()
    graph = kap.DependencyGraph(model)
    reference, _ = fold_batchnorm(model, graph)
    images = np.random.default_rng(3).normal(120, 25, (64, 8, 8, 3)).astype("float32")
    refitted, names = red_refit.refitted_uniform(model, reference, graph, 0.5, images)
    slim = kap.apply_plan(model, kap.PrunePlan.uniform(graph, 0.5), graph)
    assert names == ("c1", "c2", "head")
    assert kap.count_flops(refitted) <= kap.count_flops(slim) and kap.count_params(refitted) < kap.count_params(slim)
    original = np.asarray(model(images))
    assert relative_error(np.asarray(refitted(images)), original) < 0.5 * relative_error(np.asarray(slim(images)),
                                                                                          original)
