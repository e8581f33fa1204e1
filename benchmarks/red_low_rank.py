"""Benchmark v2, RED's approximate separation: accuracy against FLOPs, data-free, no fine-tuning.

Each point compresses the committed converged model (`benchmarks.converged`)
with `kap.red.compress(separation_tolerance=t)` and the library's other
defaults, twice: with the 1×1 parts refitted on images synthesized once from
the model's BatchNormalization statistics (``reconstruction``, the default;
the same images for every point) and without (``reconstruction=None``, the
truncated SVD alone). Beside each, data-free uniform L1 (`red_bench.uniform_row`:
`kap.PrunePlan.uniform` + `kap.apply_plan`, no fine-tuning, no re-estimation)
at the same FLOPs kept. No training image is read by any entry; top-1 is
measured on the 10,000 CIFAR-10 test images.

    python -m benchmarks.red_low_rank --model resnet20
    python -m benchmarks.red_low_rank --model resnet20 --separation-cost latency   # blocks kept only where faster

With ``--separation-cost latency`` a block replaces its convolution only where
LiteRT times it faster on this machine (`keras_autoprune.red.block_latency`);
those results go to ``red_low_rank_<model>_latency_cost`` (file, plot, docs markers).

Latency: every refitted point and the original are exported to float32
``.tflite`` (verified by LiteRT) and timed together with
`kap.measure_latencies` (interleaved rounds, 1 thread, batch 1). Results go to
``benchmarks/results/v2/red_low_rank_<model>.json``, the plot to
``docs/img/v2_red_low_rank_<model>.png`` and the table to ``docs/methods/red.md``
(between the ``benchmarks:red_low_rank_<model>`` markers; not with ``--out``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

from benchmarks import converged, red_bench, red_refit

TOLERANCES = {"resnet20": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3), "mobilenetv2": (0.05, 0.1, 0.2, 0.3)}
"""Default sweep of ``separation_tolerance`` per model: from where about a tenth of ResNet-20's FLOPs go to
where every layer is near rank 1."""


def red_row(model, model_name: str, tolerance: float, images, evaluate,
            separation_cost: str = "flops") -> tuple[dict, object]:
    """One point: the row and the `RedResult` (``images`` None: no refit)."""
    import keras_autoprune as kap

    start = time.perf_counter()
    result = kap.red.compress(model, separation_tolerance=tolerance, reconstruction=images, verbose=0,
                              separation_cost=separation_cost)
    seconds = time.perf_counter() - start
    first, last = result.stages[0], result.stages[-1]
    row = {"entry": "red_low_rank" if images is not None else "red_low_rank_svd_only", "model": model_name,
           "separation_tolerance": tolerance, "flops_kept": last.flops / first.flops,
           "params_kept": last.params / first.params, "accuracy": evaluate(result.model), "seconds": seconds,
           "blocks_refitted": len(result.reconstructed), "separation_cost": separation_cost,
           "block_timings": {name: [t.convolution_ms, t.block_ms] for name, t in result.block_timings.items()},
           "approximations": [{"layer": a.layer, "rank": a.multiplier, "kernel_error": a.kernel_error,
                               "flops_before": a.flops_before, "flops_after": a.flops_after}
                              for a in result.approximations]}
    return row, result


def run(model_name: str, tolerances, out: pathlib.Path, data: converged.Cifar10, latency: bool = True,
        log=print, separation_cost: str = "flops") -> dict:
    """The sweep for one model; writes ``out`` and returns the result."""
    import keras

    import keras_autoprune as kap
    from keras_autoprune.red.synthesis import SYNTHESIS_STEPS, SYNTHETIC_IMAGES, synthesize_images

    model = keras.saving.load_model(converged.MODELS_DIR / f"{model_name}.keras", compile=False)

    def evaluate(candidate) -> float:
        return converged.test_accuracy(candidate, data)

    result = {"model": model_name, "machine": converged.machine_description(),
              "command": f"python -m benchmarks.red_low_rank --model {model_name} --separation-cost {separation_cost}",
              "separation_cost": separation_cost,
              "original": {"accuracy": evaluate(model), "flops": kap.count_flops(model),
                           "params": kap.count_params(model)}}
    start = time.perf_counter()
    images = synthesize_images(model, verbose=0)
    result["synthesis"] = {"images": SYNTHETIC_IMAGES, "steps": SYNTHESIS_STEPS,
                           "seconds": time.perf_counter() - start}
    log(f"{model_name}: original {result['original']['accuracy']:.4f}; {SYNTHETIC_IMAGES} images synthesized in "
        f"{result['synthesis']['seconds']:.0f} s")
    graph = kap.DependencyGraph(model)
    rows, files = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for tolerance in tolerances:
            refitted, compressed = red_row(model, model_name, tolerance, images, evaluate, separation_cost)
            svd_only, _ = red_row(model, model_name, tolerance, None, evaluate, separation_cost)
            uniform = red_bench.uniform_row(model, model_name, {"flops_kept": refitted["flops_kept"],
                                                                "bandwidth_scale": 0.0, "merge_threshold": 0.0},
                                            evaluate, graph)
            uniform = {key: value for key, value in uniform.items() if key not in ("bandwidth_scale", "merge_threshold")}
            rows += [refitted, svd_only, dict(uniform, separation_tolerance=tolerance)]
            rows += uniform_refit_rows(model, rows[-1:], images, evaluate)
            if latency:
                path = pathlib.Path(folder) / f"tolerance_{tolerance:g}.tflite"
                export = kap.export_tflite(compressed.model, path)
                files[tolerance] = (path, export)
            log(f"separation_tolerance={tolerance:g}: refitted {refitted['accuracy']:.4f}, SVD only "
                f"{svd_only['accuracy']:.4f} at {refitted['flops_kept']:.3f} FLOPs; uniform L1 "
                + (f"{uniform['accuracy']:.4f} at {uniform['flops_kept']:.3f}" if "error" not in uniform
                   else uniform["error"]))
            red_bench.save_result(out, dict(result, rows=rows))
        if latency and files:
            original = pathlib.Path(folder) / "original.tflite"
            kap.export_tflite(model, original)
            paths = [original] + [path for path, _ in files.values()]
            timings = kap.measure_latencies(paths, num_threads=1, warmup=20, runs=300, rounds=10)
            result["latency"] = {"num_threads": 1, "runs": 300, "rounds": 10, "original_ms": timings[0].median_ms,
                                 "points": [{"separation_tolerance": tolerance, "median_ms": timing.median_ms,
                                             "ratio": timing.median_ms / timings[0].median_ms,
                                             "max_abs_error": export.max_abs_error}
                                            for (tolerance, (_, export)), timing in zip(files.items(), timings[1:])]}
            for point in result["latency"]["points"]:
                log(f"latency at separation_tolerance={point['separation_tolerance']:g}: {point['median_ms']:.3f} ms "
                    f"({point['ratio']:.3f} of the original's {timings[0].median_ms:.3f} ms)")
    result["rows"] = rows
    red_bench.save_result(out, result)
    return result


def uniform_refit_rows(model, uniform_rows: list[dict], images, evaluate) -> list[dict]:
    """``uniform_l1_refit`` beside each ``uniform_l1_datafree`` row: the same ratio, every changed layer refitted on
    ``images`` against the BatchNormalization-folded original (`red_refit.refitted_uniform`, as RED's refit)."""
    import keras_autoprune as kap
    from keras_autoprune.red.batchnorm import fold_batchnorm

    graph = kap.DependencyGraph(model)
    reference, _ = fold_batchnorm(model, graph)
    rows = []
    for uniform in uniform_rows:
        if uniform["entry"] != "uniform_l1_datafree" or "ratio" not in uniform:
            continue
        start = time.perf_counter()
        refitted, names = red_refit.refitted_uniform(model, reference, graph, uniform["ratio"], images)
        rows.append(dict(uniform, entry="uniform_l1_refit", accuracy=evaluate(refitted),
                         seconds=time.perf_counter() - start, layers_refitted=list(names)))
    return rows


def add_uniform_refit(model_name: str, out: pathlib.Path, data: converged.Cifar10, log=print) -> dict:
    """Adds the ``uniform_l1_refit`` rows to a finished result ``out`` (the images synthesized again, as `run`
    does: synthesis is deterministic) and writes it back."""
    import json

    import keras

    from keras_autoprune.red.synthesis import synthesize_images

    result = json.loads(out.read_text())
    model = keras.saving.load_model(converged.MODELS_DIR / f"{model_name}.keras", compile=False)
    images = synthesize_images(model, verbose=0)
    rows = [r for r in result["rows"] if r["entry"] != "uniform_l1_refit"]
    added = uniform_refit_rows(model, rows, images, lambda candidate: converged.test_accuracy(candidate, data))
    for row in added:
        log(f"separation_tolerance={row['separation_tolerance']:g}: uniform L1 refitted {row['accuracy']:.4f} at "
            f"{row['flops_kept']:.3f}")
    result["rows"] = rows + added
    red_bench.save_result(out, result)
    return result


def markdown(result: dict) -> str:
    """The docs table: per tolerance, refitted and SVD-only accuracy, FLOPs and params kept, uniform L1, latency."""
    by = {}
    for row in result["rows"]:
        by.setdefault(row["separation_tolerance"], {})[row["entry"]] = row
    latency = {p["separation_tolerance"]: p["ratio"] for p in result.get("latency", {}).get("points", [])}
    lines = ["| separation_tolerance | refitted (synthetic images) | SVD only | FLOPs kept | params kept "
             "| convs separated (ranks) | uniform L1 | its FLOPs kept | uniform L1 refitted the same way "
             "| LiteRT latency vs original |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for tolerance in sorted(by):
        entries = by[tolerance]
        red, svd, uniform = entries["red_low_rank"], entries["red_low_rank_svd_only"], entries["uniform_l1_datafree"]
        ranks = ", ".join(str(a["rank"]) for a in red["approximations"])
        twin = (f"{uniform['error']} | |" if "error" in uniform
                else f"{100 * uniform['accuracy']:.2f}% | {uniform['flops_kept']:.1%} |")
        ratio = f"{latency[tolerance]:.2f}×" if tolerance in latency else ""
        uniform_refit = entries.get("uniform_l1_refit", {})
        twin += f" {100 * uniform_refit['accuracy']:.2f}% |" if "accuracy" in uniform_refit else " |"
        lines.append(f"| {tolerance:g} | {100 * red['accuracy']:.2f}% | {100 * svd['accuracy']:.2f}% "
                     f"| {red['flops_kept']:.1%} | {red['params_kept']:.1%} | {len(red['approximations'])} ({ranks}) "
                     f"| {twin} {ratio} |")
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    """Accuracy against FLOPs kept: refitted, SVD only, uniform L1; the original as a dashed line."""
    cost = " (blocks kept only where faster on LiteRT)" if result.get("separation_cost") == "latency" else ""
    red_bench.curve_plot(result, {
        "red_low_rank": ("RED, approximate separation, refitted (synthetic images)", "tab:red", "s", "-"),
        "red_low_rank_svd_only": ("RED, approximate separation, SVD only", "tab:orange", "D", "-"),
        "uniform_l1_datafree": ("uniform L1, data-free", "tab:blue", "o", "-"),
        "uniform_l1_refit": ("uniform L1, every changed layer refitted (same images)", "tab:cyan", "^", ":"),
    }, f"{result['model']}: data-free, no fine-tuning{cost}", path, figsize=(6.4, 4.2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.red_low_rank", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(TOLERANCES), required=True)
    parser.add_argument("--tolerances", nargs="+", type=float, help="default: the model's TOLERANCES entry")
    parser.add_argument("--out", type=pathlib.Path, help="result folder (default: the published benchmarks/results/v2)")
    parser.add_argument("--data", default=str(converged.DEFAULT_SOURCE))
    parser.add_argument("--no-latency", action="store_true", help="skip the .tflite export and LiteRT timing")
    from keras_autoprune.red.options import SEPARATION_COSTS

    parser.add_argument("--separation-cost", choices=SEPARATION_COSTS, default="flops",
                        help="kap.red.compress's separation_cost (latency: blocks kept only where LiteRT runs them faster)")
    parser.add_argument("--add-uniform-refit", action="store_true",
                        help="only add uniform L1 refitted on the synthesized images to the finished result")
    args = parser.parse_args(argv)
    tolerances = args.tolerances or TOLERANCES[args.model]
    if any(not 0 < t <= 1 for t in tolerances):
        parser.error(f"Expected tolerances in (0, 1]. Received: {tolerances}")
    folder = args.out or red_bench.RESULTS_DIR
    name = f"red_low_rank_{args.model}" + ("" if args.separation_cost == "flops" else f"_{args.separation_cost}_cost")
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.add_uniform_refit:
        result = add_uniform_refit(args.model, folder / f"{name}.json", converged.load_cifar10(args.data), log=log)
    else:
        result = run(args.model, tolerances, folder / f"{name}.json", converged.load_cifar10(args.data),
                     latency=not args.no_latency, log=log, separation_cost=args.separation_cost)
    red_bench.publish(name, result, plot, markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
