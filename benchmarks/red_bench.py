"""Benchmark v2, RED entry: data-free compression of the converged models, no fine-tuning.

Each point compresses the committed converged model (`benchmarks.converged`,
``benchmarks/models/``) with `kap.red.compress` (stage 3 on:
``separate_depthwise=True``) at one ``(bandwidth_scale, merge_threshold)``
and measures top-1 accuracy on the 10,000 CIFAR-10 test images. No data is
read by the method, nothing is fine-tuned and BatchNormalization statistics
are not re-estimated (without data they cannot be). Beside every point,
data-free uniform L1 (`kap.PrunePlan.uniform` + `kap.apply_plan`, the same
fraction of every channel group, no fine-tuning, no re-estimation) is
bisected on its ratio to the same FLOPs kept (the smallest ratio keeping at
most RED's fraction).

    python -m benchmarks.red_bench --model resnet20          # the default sweep of the model
    python -m benchmarks.red_bench --model mobilenetv2 --bandwidth-scales 0.05 0.1 --merge-thresholds 0.1

Rows ``{entry: "red" | "uniform_l1_datafree", model, bandwidth_scale,
merge_threshold, flops_kept, params_kept, accuracy, seconds, ...}`` go to
``benchmarks/results/v2/red_<model>.json`` as they finish (a rerun skips
finished points; ``--fresh`` starts over), the plot to
``docs/img/v2_red_<model>.png`` and the table to ``docs/methods/red.md`` (between the
``benchmarks:red_<model>`` markers; not with ``--out``). ``seconds`` is the compression (RED) or the
bisection and surgery (uniform L1), not the evaluation.

``--merge-representative`` (default ``readers``, the library's default since
session 23) is recorded in each row with ``merge_threshold > 0``; rows
without it ran before the option existed and kept the leader of each
cluster (``leader``). Rows of both stay in the file, table and plot, so the
curves before and after the change are shown side by side.

``--snap-to`` (default ``mean``, the library's default since session 24) is
recorded in each row with ``bandwidth_scale > 0``; rows without it ran
before the option existed and snapped to the modes (``mode``). Rows of both
stay side by side in the same way.

``--no-bias-correction`` runs the ``merge_threshold > 0`` points with
``correct_merge_bias=False``; rows record ``correct_merge_bias`` (rows
without it ran before session 24 and were not corrected). The table's
*merged channel* column shows the representative and ``+ bias`` where the
readers' biases were corrected.

Latency: the best RED point that removes FLOPs beyond BatchNormalization
folding (the fewest FLOPs within 1 point of the original accuracy, else the
most accurate) is exported to a float32 ``.tflite`` with `kap.export_tflite`
(verified with LiteRT) and timed against the original with
`kap.measure_latencies` (interleaved rounds, 1 thread, batch 1). Where the
sweep separated convolutions (stage 3), the same setting with and without
separation is timed too, so the effect of the uneven depthwise blocks alone
is measured. ``--no-latency`` skips both.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable

from benchmarks import converged

SWEEPS = {
    "resnet20": {"bandwidth_scales": (0.05, 0.1, 0.15, 0.2, 0.3, 1.0), "merge_thresholds": (0.6, 0.7, 0.8, 0.9, 1.0)},
    "mobilenetv2": {"bandwidth_scales": (0.01, 0.02, 0.05, 0.1, 0.2, 1.0), "merge_thresholds": (0.1, 0.3, 0.5, 0.7)},
}
"""Default sweep per model: ``bandwidth_scale`` with ``merge_threshold=0``, then the merge thresholds at
``MERGE_SCALE``. Ranges from the first measurements (docs/methods/red.md): past 0.3 (ResNet-20) and 0.2
(MobileNetV2) both models are at chance; 1.0 is kept as the point where stage 3 separates convolutions.
The thresholds span from the first merge (ResNet-20: 0.6) to where about 20% (ResNet-20) and 35%
(MobileNetV2) of the FLOPs are gone; they were chosen again in session 16, when the near-identical
distance stopped counting a channel's position count as a weight (`keras_autoprune.red.merging`)."""
MERGE_SCALE = 0.05
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "v2"
PLOT_DIR = pathlib.Path(__file__).resolve().parents[1] / "docs" / "img"
DOCS_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "methods" / "red.md"
PROTOCOL = ("data-free: kap.red.compress(separate_depthwise=True), no fine-tuning, no BatchNormalization "
            "re-estimation; uniform_l1_datafree: kap.apply_plan(model, kap.PrunePlan.uniform(graph, ratio)), ratio "
            "bisected to RED's FLOPs kept; accuracy on the 10,000 CIFAR-10 test images")
RATIO_TOLERANCE = 1e-3
ACCURACY_TOLERANCE = 0.01  # the latency point: within 1 point of the original


def sweep_points(bandwidth_scales, merge_thresholds, merge_scale: float = MERGE_SCALE) -> list[tuple[float, float]]:
    """``(bandwidth_scale, merge_threshold)`` pairs: each scale at threshold 0, each threshold at ``merge_scale``."""
    points = [(float(s), 0.0) for s in bandwidth_scales] + [(float(merge_scale), float(t)) for t in merge_thresholds]
    return list(dict.fromkeys(points))


def red_row(model, model_name: str, bandwidth_scale: float, merge_threshold: float,
            evaluate: Callable, separate_depthwise: bool = True, hash_all_layers: bool = False,
            merge_distance: str = "channel", merge_representative: str = "readers",
            snap_to: str = "mean", correct_merge_bias: bool = True) -> tuple[dict, object]:
    """One RED point: the row and the `RedResult`."""
    import numpy as np

    import keras_autoprune as kap

    start = time.perf_counter()
    result = kap.red.compress(model, bandwidth_scale=bandwidth_scale, merge_threshold=merge_threshold,
                              separate_depthwise=separate_depthwise, hash_all_layers=hash_all_layers,
                              merge_distance=merge_distance, merge_representative=merge_representative,
                              snap_to=snap_to, correct_merge_bias=correct_merge_bias)
    seconds = time.perf_counter() - start
    first, last = result.stages[0], result.stages[-1]
    kernels = [t.distinct_after for t in result.hashed if t.weight != "bias"]
    row = {
        "entry": "red", "model": model_name, "bandwidth_scale": bandwidth_scale, "merge_threshold": merge_threshold,
        "hash_all_layers": hash_all_layers, "merge_distance": merge_distance,
        "merge_representative": merge_representative, "snap_to": snap_to,
        "correct_merge_bias": correct_merge_bias, "bias_corrected_groups": len(result.bias_corrected),
        "hashing_reverted": list(result.hashing_reverted),
        "flops_kept": last.flops / first.flops, "params_kept": last.params / first.params,
        "accuracy": evaluate(result.model), "seconds": seconds,
        "flops": last.flops, "params": last.params,
        "stages": {s.stage: {"flops": s.flops, "params": s.params} for s in result.stages},
        "neurons_merged": result.neurons_merged,
        "merged_per_layer": result.merged_per_layer,
        "convolutions_separated": len(result.separations),
        "separations": [{"layer": s.layer, "multiplier": s.multiplier, "flops_before": s.flops_before,
                         "flops_after": s.flops_after} for s in result.separations],
        "kernel_distinct_values_median": float(np.median(kernels)) if kernels else None,
        "distinct_values": result.distinct_values,
    }
    return row, result


def uniform_ratio(model, target: float, graph=None, tolerance: float = RATIO_TOLERANCE):
    """The smallest ratio (to ``tolerance``) whose `PrunePlan.uniform` keeps at most ``target`` of the FLOPs.

    Returns ``(ratio, slim model)``; ``(None, None)`` when even ratio 0.999 keeps more.
    """
    import keras_autoprune as kap

    graph = graph or kap.DependencyGraph(model)
    limit = target * kap.count_flops(model)
    cache: dict[tuple, object] = {}

    def slim(ratio: float):
        plan = kap.PrunePlan.uniform(graph, ratio)
        key = tuple(sorted((g, len(k)) for g, k in plan.kept.items()))
        if key not in cache:
            cache[key] = kap.apply_plan(model, plan, graph)
        return cache[key]

    low, high = 0.0, 0.999
    if kap.count_flops(slim(high)) > limit:
        return None, None
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (low, middle) if kap.count_flops(slim(middle)) <= limit else (middle, high)
    return high, slim(high)


def uniform_row(model, model_name: str, beside: dict, evaluate: Callable, graph=None) -> dict:
    """Data-free uniform L1 at the FLOPs kept of the RED row ``beside``."""
    import keras_autoprune as kap

    start = time.perf_counter()
    ratio, slim = uniform_ratio(model, beside["flops_kept"], graph)
    row = {"entry": "uniform_l1_datafree", "model": model_name, "bandwidth_scale": beside["bandwidth_scale"],
           "merge_threshold": beside["merge_threshold"], "target_flops_kept": beside["flops_kept"]}
    if slim is None:
        return dict(row, error=f"uniform L1 cannot keep as little as {beside['flops_kept']:.1%} of the FLOPs")
    seconds = time.perf_counter() - start
    return dict(row, flops_kept=kap.count_flops(slim) / kap.count_flops(model),
                params_kept=kap.count_params(slim) / kap.count_params(model),
                accuracy=evaluate(slim), seconds=seconds, ratio=ratio)


def variant(row: dict) -> bool:
    """A row's ``hash_all_layers`` (rows written before the option existed hashed every layer)."""
    return row.get("hash_all_layers", True)


def representative(row: dict) -> str:
    """A RED row's ``merge_representative``: ``""`` without near-identical merging (``merge_threshold=0``, where
    it changes nothing); ``"leader"`` for rows written before the option existed."""
    return row.get("merge_representative", "leader") if row["merge_threshold"] > 0 else ""


def bias_corrected(row: dict) -> bool | None:
    """Whether a RED row's near-identical merges corrected the readers' biases (None without near-identical
    merging; False for rows written before the option existed)."""
    return row.get("correct_merge_bias", False) if row["merge_threshold"] > 0 else None


def merged_channel(row: dict) -> str:
    """The table's and plot's label of a RED row's merges: the representative, ``+ bias`` when corrected."""
    return representative(row) + (" + bias" if bias_corrected(row) else "")


def snapping(row: dict) -> str:
    """A RED row's ``snap_to``: ``""`` without hashing (``bandwidth_scale=0``); ``"mode"`` for rows written before
    the option existed."""
    return row.get("snap_to", "mode") if row["bandwidth_scale"] > 0 else ""


def sweep(model, model_name: str, evaluate: Callable, points: list[tuple[float, float]],
          done: list[dict] | None = None, on_row: Callable | None = None, log=print,
          hash_all_layers: bool = False, merge_distance: str = "channel",
          merge_representative: str = "readers", snap_to: str = "mean", correct_merge_bias: bool = True) -> list[dict]:
    """RED at every point and uniform L1 beside it; rows in ``done`` are kept and their points skipped.

    Uniform L1 is bisected once per distinct FLOPs target; a point with the
    same target as an earlier one gets a copy (``"same_as"`` names it).
    Rows of the other ``hash_all_layers`` setting, of the other
    ``merge_representative`` or ``correct_merge_bias`` at a
    ``merge_threshold > 0`` or of the other ``snap_to`` at a
    ``bandwidth_scale > 0`` are kept and left alone; a
    uniform L1 row serves every RED row of its point with its FLOPs target.
    """
    import keras_autoprune as kap

    rows = list(done or [])
    graph = kap.DependencyGraph(model)

    def at(row: dict, point: tuple[float, float]) -> bool:
        return variant(row) == hash_all_layers and (row["bandwidth_scale"], row["merge_threshold"]) == point

    def find_red(point: tuple[float, float]) -> dict | None:
        kept = merge_representative if point[1] > 0 else ""  # what a RED row at this point must have kept
        snapped = snap_to if point[0] > 0 else ""
        corrected = correct_merge_bias if point[1] > 0 else None
        return next((r for r in rows if r["entry"] == "red" and at(r, point) and representative(r) == kept
                     and snapping(r) == snapped and bias_corrected(r) == corrected), None)

    for index, (scale, threshold) in enumerate(points, 1):
        red = find_red((scale, threshold))
        if red is None:
            red, _ = red_row(model, model_name, scale, threshold, evaluate, hash_all_layers=hash_all_layers,
                             merge_distance=merge_distance, merge_representative=merge_representative,
                             snap_to=snap_to, correct_merge_bias=correct_merge_bias)
            rows.append(red)
            _emit(on_row, rows)
        uniform = next((r for r in rows if r["entry"] == "uniform_l1_datafree" and at(r, (scale, threshold))
                        and r["target_flops_kept"] == red["flops_kept"]), None)
        if uniform is None:
            twin = next((r for r in rows if r["entry"] == "uniform_l1_datafree" and "same_as" not in r
                         and r["target_flops_kept"] == red["flops_kept"]), None)
            if twin is not None:
                uniform = dict(twin, bandwidth_scale=scale, merge_threshold=threshold,
                               same_as=[twin["bandwidth_scale"], twin["merge_threshold"]])
            else:
                uniform = uniform_row(model, model_name, red, evaluate, graph)
            uniform["hash_all_layers"] = hash_all_layers  # the RED setting it stands beside
            rows.append(uniform)
            _emit(on_row, rows)
        log(f"[{index}/{len(points)}] {model_name} bandwidth_scale={scale:g} merge_threshold={threshold:g}: RED "
            f"{red['accuracy']:.4f} at {red['flops_kept']:.3f} FLOPs ({red['neurons_merged']} merged, "
            f"{red['convolutions_separated']} separated); uniform L1 "
            + (f"{uniform['accuracy']:.4f} at {uniform['flops_kept']:.3f}" if "error" not in uniform else uniform["error"]))
    return rows


def _emit(on_row, rows):
    if on_row is not None:
        on_row(rows)


def latency_point(rows: list[dict], original_accuracy: float) -> dict | None:
    """The RED row timed: removes FLOPs beyond BN folding; the fewest FLOPs within 1 point, else the most accurate."""
    removing = [r for r in rows if r["entry"] == "red"
                and r["stages"][list(r["stages"])[-1]]["flops"] < r["stages"]["batchnorm_folded"]["flops"]]
    close = [r for r in removing if r["accuracy"] >= original_accuracy - ACCURACY_TOLERANCE]
    if close:
        return min(close, key=lambda r: (r["flops_kept"], -r["accuracy"]))
    return max(removing, key=lambda r: (r["accuracy"], -r["flops_kept"])) if removing else None


def measure_latency(model, rows: list[dict], original_accuracy: float, folder: pathlib.Path,
                    runs: int = 300, log=print, hash_all_layers: bool = False, merge_distance: str = "channel",
                    snap_to: str = "mean", correct_merge_bias: bool = True) -> dict:
    """Exports and times the original against the `latency_point` (and, if any, separated vs not) of the
    rows of one ``hash_all_layers`` and ``snap_to`` setting."""
    import functools

    import keras_autoprune as kap

    compress = functools.partial(kap.red.compress, hash_all_layers=hash_all_layers, merge_distance=merge_distance,
                                 snap_to=snap_to, correct_merge_bias=correct_merge_bias)
    rows = [r for r in rows if variant(r) == hash_all_layers and snapping(r) in ("", snap_to)
            and bias_corrected(r) in (None, correct_merge_bias)]
    folder = pathlib.Path(folder)
    out: dict = {"num_threads": 1, "runs": runs, "rounds": 10}
    best = latency_point(rows, original_accuracy)
    if best is None:
        return dict(out, note="no RED point removes FLOPs beyond BatchNormalization folding")
    files = {"original": (model, folder / "original.tflite")}
    red = compress(model, bandwidth_scale=best["bandwidth_scale"], merge_threshold=best["merge_threshold"],
                   separate_depthwise=True, merge_representative=representative(best) or "readers")
    files["red"] = (red.model, folder / "red.tflite")
    separating = [r for r in rows if r["entry"] == "red" and r["convolutions_separated"] > 0]
    if separating:
        point = min(separating, key=lambda r: r["bandwidth_scale"])
        on = compress(model, bandwidth_scale=point["bandwidth_scale"], merge_threshold=point["merge_threshold"],
                      separate_depthwise=True)
        off = compress(model, bandwidth_scale=point["bandwidth_scale"], merge_threshold=point["merge_threshold"],
                       separate_depthwise=False)
        files["separated"] = (on.model, folder / "separated.tflite")
        files["not_separated"] = (off.model, folder / "not_separated.tflite")
        out["separation_point"] = {"bandwidth_scale": point["bandwidth_scale"], "merge_threshold": point["merge_threshold"],
                                   "convolutions_separated": len(on.separations),
                                   "flops_separated": kap.count_flops(on.model),
                                   "flops_not_separated": kap.count_flops(off.model)}
    exports = {}
    for key, (keras_model, path) in files.items():
        result = kap.export_tflite(keras_model, path)
        exports[key] = {"size_bytes": result.size_bytes, "max_abs_error": result.max_abs_error,
                        "flops": kap.count_flops(keras_model)}
        log(f"exported {key}: {result.size_bytes:,} bytes, max abs error {result.max_abs_error:.2g}")
    timings = kap.measure_latencies([path for _, path in files.values()], num_threads=1, warmup=20, runs=runs, rounds=10)
    for key, timing in zip(files, timings):
        exports[key].update(median_ms=timing.median_ms, p90_ms=timing.p90_ms, min_ms=timing.min_ms)
    out.update(point={"bandwidth_scale": best["bandwidth_scale"], "merge_threshold": best["merge_threshold"],
                      "merge_representative": representative(best), "snap_to": snapping(best),
                      "correct_merge_bias": bias_corrected(best),
                      "accuracy": best["accuracy"],
                      "flops_kept": best["flops_kept"]},
               files=exports,
               latency_ratio=exports["red"]["median_ms"] / exports["original"]["median_ms"])
    if "separated" in exports:
        out["separation_latency_ratio"] = exports["separated"]["median_ms"] / exports["not_separated"]["median_ms"]
    log(f"latency (median, 1 thread): original {exports['original']['median_ms']:.3f} ms, RED "
        f"{exports['red']['median_ms']:.3f} ms (ratio {out['latency_ratio']:.3f})"
        + (f"; separated / not separated {out['separation_latency_ratio']:.3f}" if "separated" in exports else ""))
    return out


_MERGE_COLORS = {"leader": "tab:purple", "readers": "tab:green", "readers + bias": "tab:cyan",
                 "leader + bias": "tab:pink"}
"""Plot colours of the near-identical merges by `merged_channel`."""

_SNAP_STYLES = {"mean": ("tab:red", "s"), "mode": ("tab:orange", "D"), "": ("tab:red", "s")}
"""Plot colour of the ``bandwidth_scale`` line and marker of the merges by ``snap_to``."""


def plot(model_name: str, result: dict, path: pathlib.Path) -> None:
    """Accuracy against FLOPs kept: RED (the bandwidth sweep as a line in knob order, each point labelled with its
    bandwidth_scale; merge thresholds as labelled squares; the ``hash_all_layers=True`` rows faded) and uniform L1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    figure, axis = plt.subplots(figsize=(11, 5))
    for hash_all in sorted({variant(r) for r in rows if r["entry"] == "red"}):
        red = sorted((r for r in rows if r["entry"] == "red" and variant(r) == hash_all),
                     key=lambda r: (r["merge_threshold"], r["bandwidth_scale"]))
        alpha, suffix = (0.35, ", every layer hashed") if hash_all else (1.0, "")
        for snap in sorted({snapping(r) for r in red}):
            color, marker = _SNAP_STYLES[snap]
            named = f", snap_to={snap}" if snap else ""
            scale_line = [(r["flops_kept"], r["accuracy"]) for r in red  # in knob order
                          if r["merge_threshold"] == 0 and snapping(r) == snap]
            if scale_line:
                axis.plot(*zip(*scale_line), "-o", color=color, markersize=4, alpha=alpha,
                          label=f"RED, bandwidth_scale sweep{named}{suffix}")
            for kept, merge_color in _MERGE_COLORS.items():
                merges = [(r["flops_kept"], r["accuracy"]) for r in red
                          if merged_channel(r) == kept and snapping(r) == snap]
                if merges:
                    axis.plot(*zip(*merges), marker, color=merge_color, markersize=6, alpha=alpha, linestyle="none",
                              label=f"RED, bandwidth_scale={MERGE_SCALE:g}, merge_threshold > 0, {kept}{named}{suffix}")
        for r in red:
            label = f"{r['bandwidth_scale']:g}" if r["merge_threshold"] == 0 else f"t={r['merge_threshold']:g}"
            color = _MERGE_COLORS.get(merged_channel(r), _SNAP_STYLES[snapping(r)][0])
            axis.annotate(label, (r["flops_kept"], r["accuracy"]), textcoords="offset points", xytext=(-4, 4), alpha=alpha,
                          ha="right", fontsize=7, color=color)
    uniform = sorted({(r["flops_kept"], r["accuracy"]) for r in rows if r["entry"] == "uniform_l1_datafree"})
    if uniform:
        axis.plot(*zip(*uniform), "--^", color="tab:blue", markersize=4, label="uniform L1, data-free")
    axis.axhline(result["original"]["accuracy"], color="black", linewidth=0.8, label="original")
    axis.set_xlabel("FLOPs kept")
    axis.set_ylabel("top-1 accuracy (10,000 CIFAR-10 test images)")
    axis.set_title(f"{model_name}: data-free, no fine-tuning, no BN re-estimation")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no point hidden
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def latency_key(hash_all_layers: bool) -> str:
    """Where a result keeps the latency figures of one setting."""
    return "latency_hash_all_layers" if hash_all_layers else "latency"


def markdown(result: dict) -> str:
    """The table of the docs: each RED point and uniform L1 beside it (accuracy %, FLOPs and parameters kept)."""
    rows = result["rows"]
    uniform = {r["target_flops_kept"]: r for r in rows if r["entry"] == "uniform_l1_datafree"}  # by RED's FLOPs kept
    lines = ["| hashed layers | bandwidth_scale | snapped to | merge_threshold | merged channel | RED accuracy | FLOPs kept | params kept "
             "| neurons merged | convs separated | median distinct kernel values | uniform L1 accuracy | its FLOPs kept "
             "| its params kept |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    red = (r for r in rows if r["entry"] == "red")
    order = (lambda r: (not variant(r), r["merge_threshold"], r["bandwidth_scale"], merged_channel(r), snapping(r)))
    for r in sorted(red, key=order):
        u = uniform.get(r["flops_kept"], {"error": "not run"})
        hashed = "all" if variant(r) else f"used ({len(r['hashing_reverted'])} undone)"
        twin = ("| " + str(u["error"]) + " | | |" if "error" in u else
                f"| {100 * u['accuracy']:.2f}% | {u['flops_kept']:.1%} | {u['params_kept']:.1%} |")
        median = r.get("kernel_distinct_values_median")
        lines.append(f"| {hashed} | {r['bandwidth_scale']:g} | {snapping(r)} | {r['merge_threshold']:g} "
                     f"| {merged_channel(r)} "
                     f"| {100 * r['accuracy']:.2f}% | {r['flops_kept']:.1%} "
                     f"| {r['params_kept']:.1%} | {r['neurons_merged']:,} | {r['convolutions_separated']} "
                     f"| {'' if median is None else f'{median:g}'} " + twin)
    return "\n".join(lines)


def run(model_name: str, points: list[tuple[float, float]], out: pathlib.Path, data: converged.Cifar10,
        fresh: bool = False, latency: bool = True, log=print, hash_all_layers: bool = False,
        merge_distance: str = "channel", merge_representative: str = "readers", snap_to: str = "mean",
        correct_merge_bias: bool = True) -> dict:
    """Runs (or continues) the sweep for one model and one ``hash_all_layers`` setting and writes ``out``
    (the other setting's rows stay); returns the result."""
    import keras

    import keras_autoprune as kap

    model = keras.saving.load_model(converged.MODELS_DIR / f"{model_name}.keras", compile=False)
    result = json.loads(out.read_text()) if out.exists() and not fresh else {}
    if result.get("protocol") != PROTOCOL:  # the hand-written first version: start over
        result = {}
    result.update(model=model_name, protocol=PROTOCOL, machine=converged.machine_description(),
                  command=f"python -m benchmarks.red_bench --model {model_name}")
    if "original" not in result:
        result["original"] = {"accuracy": converged.test_accuracy(model, data), "flops": kap.count_flops(model),
                              "params": kap.count_params(model)}

    def save(rows):
        result["rows"] = rows
        save_result(out, result)

    started = time.perf_counter()
    rows = sweep(model, model_name, lambda m: converged.test_accuracy(m, data), points,
                 done=result.get("rows"), on_row=save, log=log, hash_all_layers=hash_all_layers,
                 merge_distance=merge_distance, merge_representative=merge_representative, snap_to=snap_to,
                 correct_merge_bias=correct_merge_bias)
    result["sweep_seconds_this_run"] = time.perf_counter() - started
    if latency:
        with tempfile.TemporaryDirectory() as folder:
            result[latency_key(hash_all_layers)] = measure_latency(model, rows, result["original"]["accuracy"],
                                                                   pathlib.Path(folder), log=log,
                                                                   hash_all_layers=hash_all_layers,
                                                                   merge_distance=merge_distance, snap_to=snap_to,
                                                                   correct_merge_bias=correct_merge_bias)
    save(rows)
    return result


def curve_plot(result: dict, styles: dict[str, tuple[str, str, str, str]], title: str, path: pathlib.Path,
               figsize: tuple[float, float]) -> None:
    """Accuracy against FLOPs kept, one line per entry of ``styles`` (``{entry: (label, colour, marker,
    line style)}``) from ``result["rows"]``, and the original's accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=figsize)
    for entry, (label, color, marker, line) in styles.items():
        points = sorted((r["flops_kept"], r["accuracy"]) for r in result["rows"] if r["entry"] == entry and "accuracy" in r)
        if points:
            axes.plot(*zip(*points), marker=marker, color=color, linestyle=line, label=label)
    axes.axhline(result["original"]["accuracy"], color="gray", linestyle="--", label="original")
    axes.set_xlabel("FLOPs kept")
    axes.set_ylabel("top-1 (10,000 test images)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_result(out: pathlib.Path, result: dict) -> None:
    """Writes ``result`` as indented JSON to ``out`` (its folder made if missing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def publish(name: str, result: dict, draw: Callable, table: Callable, out: pathlib.Path | None) -> None:
    """Draws ``v2_<name>.png`` (``draw(result, path)``; in ``out`` if given, else docs/img) and prints
    ``table(result)``; without ``out`` (the published results) the table also goes to docs/methods/red.md."""
    draw(result, (PLOT_DIR if out is None else out) / f"v2_{name}.png")
    print(table(result))
    if out is None:
        from benchmarks.report import update_docs

        update_docs(DOCS_PAGE, name, table(result))


def sweep_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments of a sweep over `SWEEPS` (model, the two knob lists, out, data, fresh)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", choices=sorted(SWEEPS), required=True)
    parser.add_argument("--bandwidth-scales", nargs="+", type=float, help="default: the model's SWEEPS entry")
    parser.add_argument("--merge-thresholds", nargs="+", type=float, help="default: the model's SWEEPS entry")
    parser.add_argument("--out", type=pathlib.Path, help="result folder (default: the published benchmarks/results/v2)")
    parser.add_argument("--data", default=str(converged.DEFAULT_SOURCE))
    parser.add_argument("--fresh", action="store_true", help="discard finished points")
    return parser


def parsed_points(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[float, float]]:
    """`sweep_points` of the parsed knob lists (the model's `SWEEPS` entry where not given); exits on a bad value."""
    sweep_spec = SWEEPS[args.model]
    scales = args.bandwidth_scales if args.bandwidth_scales is not None else sweep_spec["bandwidth_scales"]
    thresholds = args.merge_thresholds if args.merge_thresholds is not None else sweep_spec["merge_thresholds"]
    for value in list(scales) + list(thresholds):
        if not math.isfinite(value) or value < 0:
            parser.error(f"Expected finite values >= 0. Received: {value}")
    return sweep_points(scales, thresholds)


def main(argv: list[str] | None = None) -> int:
    from keras_autoprune.red.options import MERGE_DISTANCES, MERGE_REPRESENTATIVES, SNAP_TARGETS

    parser = sweep_parser("python -m benchmarks.red_bench", __doc__.split("\n\n")[0])
    parser.add_argument("--no-latency", action="store_true", help="skip the .tflite export and LiteRT timing")
    parser.add_argument("--hash-all-layers", action="store_true",
                        help="RED with hash_all_layers=True (every layer keeps its hashing, the paper's); kept "
                             "beside the default's rows")
    parser.add_argument("--merge-distance", choices=MERGE_DISTANCES, default="channel",
                        help="RED's merge_distance; 'layer' rows go to their own file, plot and table "
                             "(red_<model>_layer_distance)")
    parser.add_argument("--merge-representative", choices=MERGE_REPRESENTATIVES, default="readers",
                        help="RED's merge_representative for the merge_threshold > 0 points; rows of both are kept "
                             "side by side")
    parser.add_argument("--snap-to", choices=SNAP_TARGETS, default="mean",
                        help="RED's snap_to for the bandwidth_scale > 0 points; rows of both are kept side by side")
    parser.add_argument("--no-bias-correction", action="store_true",
                        help="RED with correct_merge_bias=False at the merge_threshold > 0 points; rows of both are "
                             "kept side by side")
    args = parser.parse_args(argv)
    points = parsed_points(parser, args)
    folder = args.out or RESULTS_DIR
    name = f"red_{args.model}" + ("" if args.merge_distance == "channel" else f"_{args.merge_distance}_distance")
    result = run(args.model, points, folder / f"{name}.json",
                 converged.load_cifar10(args.data), fresh=args.fresh, latency=not args.no_latency,
                 log=lambda line: print(line, flush=True), hash_all_layers=args.hash_all_layers,
                 merge_distance=args.merge_distance, merge_representative=args.merge_representative,
                 snap_to=args.snap_to, correct_merge_bias=not args.no_bias_correction)
    publish(name, result, lambda result, path: plot(args.model, result, path), markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
