"""Benchmark v2, RED with every changed layer refitted on synthesized images, beside uniform L1 with and without it.

Each point of the RED sweep (`red_bench.SWEEPS`: ``bandwidth_scale`` with
``merge_threshold=0``, then the merge thresholds at ``bandwidth_scale=0.05``)
compresses the committed converged model (`benchmarks.converged`) with
`kap.red.compress(separate_depthwise=True)` twice: as it is (``red``, the
rows of `red_bench`) and with ``refit_layers="all"`` (``red_refit``: every
layer whose output changed refitted by ridge least squares to the
BatchNormalization-folded original's outputs, `keras_autoprune.red.reconstruction`).
Beside each, data-free uniform L1 at the same FLOPs (`red_bench.uniform_row`,
bisected on its ratio) as it is (``uniform_l1_datafree``) and refitted the
same way (``uniform_l1_refit``: its BatchNormalizations folded, then
`reconstruct_layers` against the same folded original with its kept
channels). Every refit uses the same 256 images, synthesized once from the
model's BatchNormalization statistics (`keras_autoprune.red.synthesis`): no
training image is read by any entry, nothing is fine-tuned, and the two
refitted entries get exactly the same inputs, ridge and reference. Top-1 on
the 10,000 CIFAR-10 test images.

    python -m benchmarks.red_refit --model resnet20       # about 35 minutes on 2 shared CPUs
    python -m benchmarks.red_refit --model mobilenetv2

Rows go to ``benchmarks/results/v2/red_refit_<model>.json`` as each point
finishes (a rerun continues; ``--fresh`` starts over), the plot to
``docs/img/v2_red_refit_<model>.png`` and the table to ``docs/methods/red.md``
(between the ``benchmarks:red_refit_<model>`` markers; not with ``--out``).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from benchmarks import converged, red_bench

ENTRIES = {
    "red": "RED",
    "red_refit": "RED, every changed layer refitted",
    "uniform_l1_datafree": "uniform L1",
    "uniform_l1_refit": "uniform L1, refitted the same way",
}
"""The four entries of a point, with their labels in the table and the plot."""


def refitted_uniform(model, folded_reference, graph, ratio: float, images):
    """Uniform L1 at ``ratio``, BatchNormalization folded, every changed layer refitted to ``folded_reference``."""
    import keras_autoprune as kap
    from keras_autoprune.red.batchnorm import fold_batchnorm
    from keras_autoprune.red.reconstruction import reconstruct_layers
    from keras_autoprune.red.unfolding import kept_outputs

    plan = kap.PrunePlan.uniform(graph, ratio)
    slim = kap.apply_plan(model, plan, graph)
    folded, _ = fold_batchnorm(slim, kap.DependencyGraph(slim))
    kept = kept_outputs(graph, plan, {layer.name for layer in folded.layers})
    refitted = reconstruct_layers(folded, folded_reference, images, kept)
    return folded, refitted


def point_rows(model, model_name: str, point: tuple[float, float], images, folded_reference, graph,
               evaluate) -> list[dict]:
    """The four rows of one ``(bandwidth_scale, merge_threshold)`` point."""
    import keras_autoprune as kap

    scale, threshold = point
    base = {"model": model_name, "bandwidth_scale": scale, "merge_threshold": threshold}
    rows = []
    for entry, refit in (("red", None), ("red_refit", "all")):
        start = time.perf_counter()
        options = {"refit_layers": "all", "reconstruction": images} if refit else {}
        result = kap.red.compress(model, bandwidth_scale=scale, merge_threshold=threshold, separate_depthwise=True,
                                  verbose=0, **options)
        seconds = time.perf_counter() - start
        first, last = result.stages[0], result.stages[-1]
        rows.append(dict(base, entry=entry, flops_kept=last.flops / first.flops, params_kept=last.params / first.params,
                         accuracy=evaluate(result.model), seconds=seconds, neurons_merged=result.neurons_merged,
                         convolutions_separated=len(result.separations),
                         layers_refitted=list(result.reconstructed)))
    uniform = red_bench.uniform_row(model, model_name, rows[0], evaluate, graph)
    rows.append(dict(uniform, entry="uniform_l1_datafree"))
    if "error" in uniform:
        rows.append(dict(uniform, entry="uniform_l1_refit"))
        return rows
    start = time.perf_counter()
    refitted, names = refitted_uniform(model, folded_reference, graph, uniform["ratio"], images)
    rows.append(dict(uniform, entry="uniform_l1_refit", accuracy=evaluate(refitted),
                     seconds=time.perf_counter() - start, layers_refitted=list(names)))
    return rows


def run(model_name: str, points: list[tuple[float, float]], out: pathlib.Path, data: converged.Cifar10,
        fresh: bool = False, log=print) -> dict:
    """Runs (or continues) the sweep for one model and writes ``out`` after each point; returns the result."""
    import keras

    import keras_autoprune as kap
    from keras_autoprune.red.batchnorm import fold_batchnorm
    from keras_autoprune.red.reconstruction import RIDGE
    from keras_autoprune.red.synthesis import SYNTHESIS_STEPS, SYNTHETIC_IMAGES, synthesize_images

    model = keras.saving.load_model(converged.MODELS_DIR / f"{model_name}.keras", compile=False)

    def evaluate(candidate) -> float:
        return converged.test_accuracy(candidate, data)

    result = json.loads(out.read_text()) if out.exists() and not fresh else {}
    result.update(model=model_name, machine=converged.machine_description(),
                  command=f"python -m benchmarks.red_refit --model {model_name}")
    if "original" not in result:
        result["original"] = {"accuracy": evaluate(model), "flops": kap.count_flops(model),
                              "params": kap.count_params(model)}
    start = time.perf_counter()
    images = synthesize_images(model, verbose=0)  # deterministic: a continued run refits on the same images
    result["synthesis"] = {"images": SYNTHETIC_IMAGES, "steps": SYNTHESIS_STEPS, "ridge": RIDGE,
                           "seconds": time.perf_counter() - start}
    log(f"{model_name}: original {result['original']['accuracy']:.4f}; {SYNTHETIC_IMAGES} images synthesized in "
        f"{result['synthesis']['seconds']:.0f} s")
    graph = kap.DependencyGraph(model)
    folded_reference, _ = fold_batchnorm(model, graph)
    rows = list(result.get("rows", []))
    for index, point in enumerate(points, 1):
        if any((r["bandwidth_scale"], r["merge_threshold"]) == point for r in rows):
            continue
        new = point_rows(model, model_name, point, images, folded_reference, graph, evaluate)
        rows += new
        result["rows"] = rows
        red_bench.save_result(out, result)
        log(f"[{index}/{len(points)}] bandwidth_scale={point[0]:g} merge_threshold={point[1]:g}: "
            + "; ".join(f"{r['entry']} {r['accuracy']:.4f} at {r['flops_kept']:.3f}" for r in new if "accuracy" in r))
    result["rows"] = rows
    red_bench.save_result(out, result)
    return result


def _by_point(result: dict) -> dict[tuple[float, float], dict[str, dict]]:
    by: dict[tuple[float, float], dict[str, dict]] = {}
    for row in result["rows"]:
        by.setdefault((row["bandwidth_scale"], row["merge_threshold"]), {})[row["entry"]] = row
    return by


def markdown(result: dict) -> str:
    """The docs table: per point, RED and uniform L1, each as it is and refitted (accuracy, FLOPs kept)."""
    lines = ["| bandwidth_scale | merge_threshold | RED FLOPs kept | RED | RED refitted (layers) | uniform L1 FLOPs kept "
             "| uniform L1 | uniform L1 refitted |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def accuracy(row: dict) -> str:
        return f"{100 * row['accuracy']:.2f}%" if "accuracy" in row else str(row.get("error", ""))

    for (scale, threshold), entries in sorted(_by_point(result).items(), key=lambda item: (item[0][1], item[0][0])):
        red, refit = entries["red"], entries["red_refit"]
        uniform, uniform_refit = entries["uniform_l1_datafree"], entries["uniform_l1_refit"]
        kept = f"{uniform['flops_kept']:.1%}" if "flops_kept" in uniform else ""
        lines.append(f"| {scale:g} | {threshold:g} | {red['flops_kept']:.1%} | {accuracy(red)} "
                     f"| {accuracy(refit)} ({len(refit['layers_refitted'])}) | {kept} | {accuracy(uniform)} "
                     f"| {accuracy(uniform_refit)} |")
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    """Accuracy against FLOPs kept for the four entries; the original as a dashed line."""
    styles = {"red": ("tab:orange", "D", ":"), "red_refit": ("tab:red", "s", "-"),
              "uniform_l1_datafree": ("tab:cyan", "^", ":"), "uniform_l1_refit": ("tab:blue", "o", "-")}
    red_bench.curve_plot(result, {entry: (label, *styles[entry]) for entry, label in ENTRIES.items()},
                         f"{result['model']}: data-free (refits on 256 synthesized images), no fine-tuning", path,
                         figsize=(7.2, 4.4))


def main(argv: list[str] | None = None) -> int:
    parser = red_bench.sweep_parser("python -m benchmarks.red_refit", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    points = red_bench.parsed_points(parser, args)
    name = f"red_refit_{args.model}"
    result = run(args.model, points, (args.out or red_bench.RESULTS_DIR) / f"{name}.json",
                 converged.load_cifar10(args.data), fresh=args.fresh, log=lambda line: print(line, flush=True))
    red_bench.publish(name, result, plot, markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
