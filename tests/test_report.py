"""PruningReport: per-layer channels, FLOPs and parameters before / after pruning."""

import json
import sys

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.report import LayerChange, PruningReport

L = keras.layers

# Hand-computed costs of `_cnn()` (P = output positions, see flops_formulas.py):
#   c1  Conv2D 3x3 same, 3 -> 8, P = 64:  2·9·3·8·64 + 8·64 = 28,160;  params 9·3·8 + 8 = 224
#   bn  BatchNormalization, 8 ch, P = 64: 2·8·64 = 1,024;               params 4·8 = 32
#   c2  Conv2D 3x3 valid, 8 -> 16, P = 36: 2·9·8·16·36 + 16·36 = 83,520; params 9·8·16 + 16 = 1,168
#   gap GlobalAveragePooling2D: N_in = 36·16 = 576
#   fc  Dense 16 -> 4: 2·16·4 + 4 = 132;                                 params 16·4 + 4 = 68
# Pruned (c1 keeps 3 channels, c2 keeps 10):
#   c1  2·9·3·3·64 + 3·64 = 10,560;  params 81 + 3 = 84
#   bn  2·3·64 = 384;                params 12
#   c2  2·9·3·10·36 + 10·36 = 19,800; params 270 + 10 = 280
#   gap 10·36 = 360
#   fc  2·10·4 + 4 = 84;             params 44
CNN_ROWS = [
    LayerChange("c1", "Conv2D", 8, 3, 28160, 10560, 224, 84),
    LayerChange("bn", "BatchNormalization", 8, 3, 1024, 384, 32, 12),
    LayerChange("c2", "Conv2D", 16, 10, 83520, 19800, 1168, 280),
    LayerChange("gap", "GlobalAveragePooling2D", 16, 10, 576, 360, 0, 0),
    LayerChange("fc", "Dense", 4, 4, 132, 84, 68, 44),
]
CNN_FLOPS = (113412, 31188)
CNN_PARAMS = (1492, 420)


def _cnn(outputs: int = 4):
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Conv2D(16, 3, name="c2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(outputs, name="fc")(x), name="cnn")


@pytest.fixture(scope="module")
def pruned_cnn():
    model = _cnn()
    graph = kap.DependencyGraph(model)
    assert [g.id for g in graph.prunable_groups] == ["c1", "c2"]
    plan = kap.PrunePlan({"c1": [0, 2, 5], "c2": list(range(10))})
    slim = kap.apply_plan(model, plan, graph)
    extra = {"method": "uniform", "statistics_seconds": 1.5, "budget": 0.25}
    return model, slim, plan, PruningReport.from_models(model, slim, plan, extra=extra)


def test_rows_hold_hand_computed_channels_flops_and_params(pruned_cnn):
    model, slim, _, report = pruned_cnn
    # The ReLU (no FLOPs, no parameters) is left out.
    assert list(report.layers) == CNN_ROWS
    totals = report.totals
    assert (totals["flops_before"], totals["flops_after"]) == CNN_FLOPS
    assert (totals["params_before"], totals["params_after"]) == CNN_PARAMS
    assert CNN_FLOPS == (kap.count_flops(model), kap.count_flops(slim))
    assert CNN_PARAMS == (kap.count_params(model), kap.count_params(slim))
    assert report.flops_kept == 31188 / 113412
    assert report.params_kept == 420 / 1492
    c2 = report.layers[2]
    assert (c2.channels_kept, c2.flops_kept, c2.params_kept) == (10 / 16, 19800 / 83520, 280 / 1168)


def test_repr_is_a_short_summary(pruned_cnn):
    report = pruned_cnn[3]
    expected = "PruningReport: FLOPs 27.5% kept (113.4K -> 31.2K), params 28.2% kept (1.5K -> 420)"
    assert repr(report) == str(report) == expected


def test_to_dict_is_json_and_round_trips(pruned_cnn):
    _, _, plan, report = pruned_cnn
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["totals"] == {
        "flops_before": 113412, "flops_after": 31188, "flops_kept": 31188 / 113412,
        "params_before": 1492, "params_after": 420, "params_kept": 420 / 1492,
    }
    assert data["layers"][0] == {
        "layer": "c1", "kind": "Conv2D", "channels_before": 8, "channels_after": 3,
        "flops_before": 28160, "flops_after": 10560, "params_before": 224, "params_after": 84,
        "channels_kept": 0.375, "flops_kept": 0.375, "params_kept": 0.375,
    }
    assert [row["layer"] for row in data["layers"]] == ["c1", "bn", "c2", "gap", "fc"]
    assert data["layers"][3]["params_kept"] is None  # no parameters before
    assert kap.PrunePlan.from_json(json.dumps(data["plan"])) == plan
    assert data["extra"] == {"method": "uniform", "statistics_seconds": 1.5, "budget": 0.25}


def test_to_markdown_has_rows_totals_and_run_facts(pruned_cnn):
    lines = pruned_cnn[3].to_markdown().splitlines()
    assert lines[0] == (
        "| layer | kind | channels before | channels after | channels kept | FLOPs before "
        "| FLOPs after | FLOPs kept | params before | params after |"
    )
    assert lines[2:7] == [
        "| c1 | Conv2D | 8 | 3 | 37.5% | 28,160 | 10,560 | 37.5% | 224 | 84 |",
        "| bn | BatchNormalization | 8 | 3 | 37.5% | 1,024 | 384 | 37.5% | 32 | 12 |",
        "| c2 | Conv2D | 16 | 10 | 62.5% | 83,520 | 19,800 | 23.7% | 1,168 | 280 |",
        "| gap | GlobalAveragePooling2D | 16 | 10 | 62.5% | 576 | 360 | 62.5% | 0 | 0 |",
        "| fc | Dense | 4 | 4 | 100.0% | 132 | 84 | 63.6% | 68 | 44 |",
    ]
    assert lines[8] == "**Total:** FLOPs 113,412 → 31,188 (27.5% kept); params 1,492 → 420 (28.2% kept)."
    assert "Only layers with FLOPs or parameters are listed" in lines[10]
    assert lines[12] == "Plan: kept channels chosen for 2 channel group(s)."
    assert lines[14] == "Run: method: uniform; statistics_seconds: 1.5; budget: 0.25."


def test_plot_writes_a_png(pruned_cnn, tmp_path):
    pytest.importorskip("matplotlib")  # in the demo / bench extras, not in test
    path = pruned_cnn[3].plot(tmp_path / "report.png")
    assert path == str(tmp_path / "report.png")
    data = (tmp_path / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_plot_without_matplotlib_says_how_to_install(pruned_cnn, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "keras-autoprune\[demo\]"'):
        pruned_cnn[3].plot(tmp_path / "report.png")
    assert not (tmp_path / "report.png").exists()


def test_nested_sequential_rows_use_qualified_names():
    inner = keras.Sequential(
        [keras.Input((6, 6, 3)), L.Conv2D(8, 3, padding="same", name="a"), L.Conv2D(4, 1, name="b")],
        name="inner",
    )
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), inner, L.GlobalAveragePooling2D(name="gap"), L.Dense(2, name="fc")],
        name="outer",
    )
    graph = kap.DependencyGraph(model)
    assert [g.id for g in graph.prunable_groups] == ["inner/a", "inner/b"]
    plan = kap.PrunePlan({"inner/a": [1, 3, 4, 6], "inner/b": [0, 1, 2]})
    report = PruningReport.from_models(model, kap.apply_plan(model, plan, graph), plan)
    # P = 36. inner/a: 2·9·3·8·36 + 8·36 -> 2·9·3·4·36 + 4·36;
    #         inner/b: 2·8·4·36 + 4·36 -> 2·4·3·36 + 3·36.
    assert list(report.layers) == [
        LayerChange("inner/a", "Conv2D", 8, 4, 15840, 7920, 224, 112),
        LayerChange("inner/b", "Conv2D", 4, 3, 2448, 972, 36, 15),
        LayerChange("gap", "GlobalAveragePooling2D", 4, 3, 144, 108, 0, 0),
        LayerChange("fc", "Dense", 2, 2, 18, 14, 10, 8),
    ]
    assert report.totals == {
        "flops_before": 18450, "flops_after": 9014, "flops_kept": 9014 / 18450,
        "params_before": 270, "params_after": 135, "params_kept": 0.5,
    }


def test_layer_called_twice_has_one_row_with_flops_summed():
    left, right = keras.Input((5,)), keras.Input((5,))
    shared = L.Dense(3, name="shared")
    model = keras.Model([left, right], L.Add(name="add")([shared(left), shared(right)]))
    report = PruningReport.from_models(model, model)
    # shared: 2·(2·5·3 + 3) FLOPs, 18 params once; add: 3.
    assert list(report.layers) == [
        LayerChange("shared", "Dense", 3, 3, 66, 66, 18, 18),
        LayerChange("add", "Add", 3, 3, 3, 3, 0, 0),
    ]
    assert (report.flops_kept, report.params_kept) == (1.0, 1.0)
    assert report.plan is None and report.extra == {}


def test_extra_is_stored_as_plain_values():
    report = PruningReport(CNN_ROWS, extra={"seconds": np.float32(0.5), "budget": kap.PrunePlan(),
                                            "sizes": (np.int64(3), 4)})
    assert report.extra == {"seconds": 0.5, "budget": "PrunePlan(0 groups)", "sizes": [3, 4]}
    assert type(report.extra["sizes"][0]) is int
    with pytest.raises(TypeError, match=r"string keys.*Received: key 1"):
        PruningReport(CNN_ROWS, extra={1: "x"})
    with pytest.raises(TypeError, match="Received: extra of type list"):
        PruningReport(CNN_ROWS, extra=[("method", "nap")])
    with pytest.raises(TypeError, match="Received: plan of type dict"):
        PruningReport(CNN_ROWS, plan={"c1": [0]})


def test_models_without_common_layers_raise():
    with pytest.raises(ValueError, match="no layer names in common"):
        PruningReport.from_models(_cnn(), keras.Sequential([keras.Input((8, 8, 3)), L.Flatten(), L.Dense(4)]))


def test_models_with_different_outputs_raise():
    with pytest.raises(ValueError, match=r"Received: output shapes original=\[\(4,\)\], pruned=\[\(5,\)\]"):
        PruningReport.from_models(_cnn(), _cnn(outputs=5))


def test_models_with_different_layers_raise():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    other = keras.Model(inputs, L.Dense(4, name="fc")(x))
    with pytest.raises(ValueError, match=r"only in original: \['bn', 'relu', 'c2'\]"):
        PruningReport.from_models(_cnn(), other)


def test_short_figures_round_before_choosing_the_unit():
    from keras_autoprune.report import _human, _percent

    assert [_human(v) for v in (950, 999, 12_345, 999_950, 999_999, 6_200_000)] == ["950", "999", "12.3K", "1.0M", "1.0M", "6.2M"]
    # A pruned model never reads as untouched, nor an enlarged one as equal.
    assert [_percent(r) for r in (1.0, 0.99951, 1.0004, 0.0, 0.0001, 0.483, None)] == [
        "100.0%", "<100.0%", ">100.0%", "0.0%", ">0.0%", "48.3%", "n/a"]
