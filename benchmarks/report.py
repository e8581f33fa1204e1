"""Results of a benchmark run: JSON, markdown tables, goals and the accuracy-vs-FLOPs plot.

The JSON (`benchmarks/results/<profile>.json`) holds every unit's figures
(``runs``), the grouped latencies (``latency``, keyed ``"<seed>/<budget>"``),
the configuration, command, machine and versions. `markdown` turns it into
one table per budget (mean over seeds, and each seed's value when there are
several) and the goals of issue 5; `update_docs` puts that between the
profile's markers in its page (``docs/benchmarks.md`` for ``v2``, ``docs/benchmarks_quick.md`` otherwise).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from benchmarks.profiles import STRUCTURED_ENTRIES

LABELS = {
    "unpruned": "unpruned (same fine-tuning)", "uniform_l1": "uniform L1", "global_l1": "global L1",
    "taylor": "first-order Taylor", "random": "random channels", "nap": "NAP, K-FAC OBS", "nap_cost_aware": "NAP, cost-aware",
    "fisher_cost_aware": "NAP default (channel Fisher, cost-aware)",
    "psap": "PSAP", "psap_scratch": "PSAP from scratch (no pretraining)", "tfmot": "TFMOT (tf_keras, unstructured)",
    "kron_obs": "Kron-OBS (NAP framework)", "kron_obd": "Kron-OBD (NAP framework)", "c_obs": "C-OBS (NAP framework)",
    "c_obd": "C-OBD (NAP framework)", "eigendamage": "EigenDamage",
    "eigendamage_capped": "EigenDamage, max_layer_ratio=0.75", "red": "RED (data-free, then fine-tuned)",
    "red_merge": "RED, budget by merging (layer distance)",
    "red_bn": "RED, BatchNormalization restored",
    "red_merge_bn": "RED, budget by merging, BatchNormalization restored",
    "red_merge_leader": "RED, budget by merging, leader kept (before session 23)",
    "red_merge_leader_bn": "RED, budget by merging, leader kept, BatchNormalization restored (before session 23)",
    "red_low_rank_bn": "RED, approximate separation refitted on synthesized images, BatchNormalization restored",
}

_LINE_STYLES = {"nap_cost_aware": "--", "psap_scratch": "--", "kron_obs": ":", "kron_obd": ":", "c_obs": ":", "c_obd": ":", "eigendamage_capped": "--"}
"""Plot line styles of the variants (solid otherwise)."""


def write_json(path: pathlib.Path, results: dict) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")


def runs_of(results: dict, entry: str, budget: float | None) -> list[dict]:
    """The runs of an entry at a budget (the unpruned runs for any budget), one per seed."""
    return [r for r in results["runs"] if r["entry"] == entry and (entry == "unpruned" or r["budget"] == budget)]


def figure(results: dict, run: dict, budget: float, name: str) -> float | None:
    """One figure of a run; the latency ones are read from the (seed, budget) group."""
    if "error" in run:
        return None
    if name.startswith("latency_"):
        _, precision, what = name.split("_", 2)
        group = results["latency"].get(f"{run['seed']}/{budget}", {}).get(run["entry"], {})
        return group.get(precision, {}).get(what)
    if name.startswith("tflite_"):
        _, precision, what = name.split("_", 2)
        return run["tflite"][precision].get(what)  # None where that export failed
    return run.get(name)


def mean_figure(results: dict, entry: str, budget: float, name: str) -> tuple[float | None, list[float]]:
    values = [figure(results, run, budget, name) for run in runs_of(results, entry, budget)]
    values = [v for v in values if v is not None]
    return (float(np.mean(values)) if values else None), values


def paired_against_unpruned(results: dict, entry: str, budget: float, name: str) -> list[tuple[float, float]]:
    """``(entry's figure, the unpruned model's figure)`` for each seed both ran: differences and ratios to the
    unpruned model are taken seed by seed, never between means over different seeds."""
    unpruned = {run["seed"]: figure(results, run, budget, name) for run in runs_of(results, "unpruned", budget)}
    pairs = []
    for run in runs_of(results, entry, budget):
        mine, theirs = figure(results, run, budget, name), unpruned.get(run["seed"])
        if mine is not None and theirs is not None:
            pairs.append((mine, theirs))
    return pairs


def _cell(results, entry, budget, name, fmt, scale=1.0, seeds=False):
    mean, values = mean_figure(results, entry, budget, name)
    if mean is None:
        return "n/a"
    text = fmt.format(mean * scale)
    if seeds and len(values) > 1:
        text += " (" + ", ".join(fmt.format(v * scale) for v in values) + ")"
    return text


def budget_table(results: dict, budget: float) -> str:
    """Markdown table of every entry at one budget."""
    header = (
        "| entry | top-1 acc. (%) | vs unpruned, same seeds (points) | FLOPs kept | params kept | .tflite float32 KiB (gzip) "
        "| .tflite int8 KiB (gzip) | latency float32 ms (kept) | latency int8 ms (kept) | pruning s (of which statistics) "
        "| fit s (vs unpruned) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for entry in results["entries"]:
        runs = runs_of(results, entry, budget)
        if not runs:
            continue
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            lines.append(f"| {LABELS[entry]} | not run: {errors[0]} |" + " |" * 9)
            continue
        accuracy_pairs = paired_against_unpruned(results, entry, budget, "accuracy")
        fit_pairs = paired_against_unpruned(results, entry, budget, "fit_seconds")
        fit, _ = mean_figure(results, entry, budget, "fit_seconds")
        kib = "{:.0f}"
        lines.append(" | ".join([
            f"| {LABELS[entry]}",
            _cell(results, entry, budget, "accuracy", "{:.2f}", 100, seeds=True),
            f"{100 * np.mean([a - u for a, u in accuracy_pairs]):+.2f}" if entry != "unpruned" and accuracy_pairs else "",
            _cell(results, entry, budget, "flops_kept", "{:.3f}"),
            _cell(results, entry, budget, "params_kept", "{:.3f}"),
            f"{_cell(results, entry, budget, 'tflite_float32_bytes', kib, 1 / 1024)} "
            f"({_cell(results, entry, budget, 'tflite_float32_gzip_bytes', kib, 1 / 1024)})",
            f"{_cell(results, entry, budget, 'tflite_int8_bytes', kib, 1 / 1024)} "
            f"({_cell(results, entry, budget, 'tflite_int8_gzip_bytes', kib, 1 / 1024)})",
            f"{_cell(results, entry, budget, 'latency_float32_median_ms', '{:.3f}')} "
            f"({_cell(results, entry, budget, 'latency_float32_kept', '{:.2f}')}){_later(results, runs, budget, 'float32')}",
            f"{_cell(results, entry, budget, 'latency_int8_median_ms', '{:.3f}')} "
            f"({_cell(results, entry, budget, 'latency_int8_kept', '{:.2f}')}){_later(results, runs, budget, 'int8')}",
            f"{_cell(results, entry, budget, 'pruning_seconds', '{:.1f}')} "
            f"({_cell(results, entry, budget, 'statistics_seconds', '{:.1f}')})",
            f"{fit:.0f} ({np.mean([a / u for a, u in fit_pairs]):.2f})" + " |",
        ]))
    if any("\u2020" in line for line in lines[1:]):
        lines += ["", "\u2020 Timed in a later run than the unpruned row, beside the unpruned model timed again (its "
                  "median then: `reference_median_ms` in the latency unit): compare the ratio in brackets, not the ms."]
    return "\n".join(lines)


def _later(results: dict, runs: list[dict], budget: float, precision: str) -> str:
    """``"\u2020"`` when an entry's latency was timed in a later run than its group's unpruned row."""
    groups = [results["latency"].get(f"{run['seed']}/{budget}", {}).get(run["entry"], {}) for run in runs]
    return "\u2020" if any("reference_median_ms" in group.get(precision, {}) for group in groups) else ""


def goals(results: dict) -> list[dict]:
    """The goals of issues 5 and 12: met when the mean over seeds and every seed pass (values in the detail).

    "NAP" is `kap.NAPCallback` with its defaults: the ``fisher_cost_aware``
    entry where it ran (the default since issue 12), else ``nap``.
    """
    budgets = results["budgets"]
    out = []
    nap = "fisher_cost_aware" if any(r["entry"] == "fisher_cost_aware" for r in results["runs"]) else "nap"
    who = "NAP" if nap == "nap" else "NAP (defaults)"

    def margins(entry, other, budget):
        mine, theirs = runs_of(results, entry, budget), runs_of(results, other, budget)
        by_seed = {r["seed"]: r["accuracy"] for r in theirs if "error" not in r}
        return [100 * (r["accuracy"] - by_seed[r["seed"]]) for r in mine if "error" not in r and r["seed"] in by_seed]

    def add(goal, values, passes, unit="points"):
        if not values:
            out.append({"goal": goal, "met": None, "detail": "not measured (entry not run)"})
            return
        mean = float(np.mean(values))
        number = "{:+.2f}" if unit == "points" else "{:.2f}"
        detail = number.format(mean) + (f" {unit}" if unit == "points" else unit)
        if len(values) > 1:
            detail = f"mean {detail}; per seed " + ", ".join(number.format(v) for v in values)
        # Met only if the mean and every seed pass: a win within the seed-to-seed noise is not claimed.
        out.append({"goal": goal, "met": bool(passes(mean) and all(passes(v) for v in values)), "detail": detail})

    if 0.5 in budgets:
        add(f"{who} at 50% FLOPs within 1 point of unpruned", margins(nap, "unpruned", 0.5), lambda m: m >= -1.0)
    for budget in budgets:
        need = 2.0 if budget <= 0.25 else 0.0
        for other in ("uniform_l1", "random"):
            add(f"{who} ahead of {LABELS[other]} at {budget:.0%} FLOPs" + (" by >= 2 points" if need else ""),
                margins(nap, other, budget), lambda m, need=need: m >= need and m > 0)
    for budget in budgets:
        for precision in ("float32", "int8"):
            quotients = []
            for run in runs_of(results, nap, budget):
                kept = figure(results, run, budget, f"latency_{precision}_kept")
                if kept:
                    quotients.append(run["flops_kept"] / kept)
            add(f"{who} {precision} latency speedup >= 0.8 x FLOPs speedup at {budget:.0%} "
                "(quotient = FLOPs kept / latency kept)", quotients, lambda m: m >= 0.8, " (quotient)")
    unpruned_fit = {u["seed"]: u["fit_seconds"] for u in runs_of(results, "unpruned", None)}
    for budget in budgets:
        overheads = [100 * r["pruning_seconds"] / unpruned_fit[r["seed"]] for r in runs_of(results, nap, budget)
                     if "error" not in r and r["seed"] in unpruned_fit]
        add(f"{who} pruning overhead (statistics + decision) <= 10% of the unpruned fit time at {budget:.0%}",
            overheads, lambda m: m <= 10.0, "%")
    for budget in budgets if results.get("torch_finetune") else ():  # profiles without the peer's rows: no goal
        best = _best_torch(results, budget)
        mine = [r for r in runs_of(results, nap, budget) if "error" not in r and r["seed"] in best]
        add(f"{who} ahead of the best Torch-Pruning entry at {budget:.0%} FLOPs (fine-tuned, same recipe)",
            [100 * (r["accuracy"] - best[r["seed"]]) for r in mine], lambda m: m > 0)
    if 0.25 in budgets:
        add("EigenDamage ahead of uniform L1 at 25% FLOPs by >= 2 points (issue 6)",
            margins("eigendamage", "uniform_l1", 0.25), lambda m: m >= 2.0)
    return out


def _torch_rows(results: dict, budget: float) -> list[dict]:
    return [r for r in results.get("torch_finetune", []) if r["target"] == budget]


def _best_torch(results: dict, budget: float) -> dict[int, float]:
    """``{seed: best accuracy}`` over the fine-tuned Torch-Pruning rows at ``budget``."""
    best: dict[int, float] = {}
    for row in _torch_rows(results, budget):
        best[row["seed"]] = max(best.get(row["seed"], 0.0), row["accuracy"])
    return best


def torch_table(results: dict, budget: float) -> str:
    """The fine-tuned Torch-Pruning rows (`benchmarks.torch_finetune`) at one budget, or ``""``."""
    rows = sorted(_torch_rows(results, budget), key=lambda r: (r["entry"], r["seed"]))
    if not rows:
        return ""
    lines = ["Torch-Pruning on the PyTorch twin, pruned in the same rounds and fine-tuned with the same batches and "
             "recipe (`benchmarks.torch_finetune`; FLOPs by its own counter):", "",
             "| entry | seed | top-1 acc. (%) | FLOPs kept | params kept | pruning s | fit s |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['entry']} | {row['seed']} | {100 * row['accuracy']:.2f} | {row['flops_kept']:.3f} | "
              f"{row['params_kept']:.3f} | {row['pruning_seconds']:.1f} | {row['fit_seconds']:.0f} |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The generated part of a profile's benchmark page."""
    config, machine, pre = results["config"], results["machine"], results["pretrained"]
    seeds = results["seeds"]
    lines = [
        f"Command: `{results['command']}` ({results['wall_seconds'] / 60:.1f} min wall-clock"
        f"{', pretraining included' if not pre.get('cached') else ', pretrained model from the cache'}; "
        f"started {results['started']}).",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_start']:.2f} at the start "
        f"and {machine['load_end']:.2f} at the end (shared with other work); "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "",
        (f"Model: the committed `{pre['base_model']}` (benchmarks/models/, {pre['epochs']} epochs"
         + (f" in {pre['trained_seconds'] / 60:.1f} min" if "trained_seconds" in pre else "")
         + f" on {pre['trained_on']}): test accuracy {100 * pre['accuracy']:.2f}%. "
         if pre.get("base_model") else
         f"Model: ResNet-{config['depth']} (width {config['width']}); pretrained for {pre['epochs']} epoch(s) "
         f"({pre['train_seconds'] / 60:.1f} min): test accuracy {100 * pre['accuracy']:.2f}%. ")
        +
        f"Fine-tuning: {config['finetune_epochs']} epoch(s), pruning at the start of the first {config['rounds']} "
        f"(one round each), {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
        f"({', '.join(map(str, seeds))}){'; cells give the mean and each seed' if len(seeds) > 1 else ''}.",
    ]
    scratch = [r for r in results["runs"] if r["entry"] == "psap_scratch" and "error" not in r]
    if scratch:
        rounds = scratch[0]["round_epochs"]
        lines += ["", (
            f"PSAP from scratch: the pretraining's initial weights (not the pretrained ones) trained "
            f"{scratch[0]['epochs']} epochs with the pretraining's learning rate ({config['pretrain_lr']}, "
            f"{config['pretrain_schedule']} over the {scratch[0]['epochs']} epochs), pruning rounds at the start of "
            f"epochs {rounds[0] + 1}-{rounds[-1] + 1} (1-based); its fit time covers all {scratch[0]['epochs']} "
            f"epochs, the others' the {config['finetune_epochs']} fine-tuning epochs only."
        )]
    for budget in results["budgets"]:
        lines += ["", f"#### Budget: {budget:.0%} of the FLOPs kept", "", budget_table(results, budget)]
        if torch_table(results, budget):
            lines += ["", torch_table(results, budget)]
        failed = [f"- {LABELS.get(r['entry'], r['entry'])} (seed {r['seed']}), {precision}: {f['error']}"
                  for r in results["runs"] if r.get("budget") == budget and "error" not in r
                  for precision, f in r.get("tflite", {}).items() if "error" in f]
        if failed:
            lines += ["", "Exports that failed (their cells say n/a; the model's other figures stand):", "", *failed]
    lines += ["", "#### Goals (issues 5, 6 and 12)", "", "| goal | met | measured |", "|---|:---:|---|"]
    for goal in results["goals"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {met} | {goal['detail']} |")
    return "\n".join(lines)


def update_docs(path: pathlib.Path, profile: str, text: str) -> None:
    """Replaces the text between the profile's markers in ``path`` (appends them if missing)."""
    path = pathlib.Path(path)
    begin, end = f"<!-- benchmarks:{profile}:begin -->", f"<!-- benchmarks:{profile}:end -->"
    block = f"{begin}\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        current = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, current, flags=re.S)
    else:
        current = current.rstrip("\n") + f"\n\n## Results: `{profile}` profile\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(current)


def plot(results: dict, path: pathlib.Path) -> None:
    """Accuracy vs FLOPs kept, one line per structured method, the unpruned model as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = results["budgets"]
    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    reference, _ = mean_figure(results, "unpruned", budgets[0], "accuracy")
    if reference is not None:
        ax.axhline(100 * reference, color="black", linestyle="--", linewidth=1, label=LABELS["unpruned"])
    ax.axhline(100 * results["pretrained"]["accuracy"], color="grey", linestyle=":", linewidth=1, label="pretrained (before fine-tuning)")
    structured = [e for e in results["entries"] if e in STRUCTURED_ENTRIES]
    colors = {entry: plt.cm.tab20(i % 20) for i, entry in enumerate(structured)}  # distinct for up to 20 entries
    for entry in structured:
        points = []
        for budget in budgets:
            acc, accs = mean_figure(results, entry, budget, "accuracy")
            flops, _ = mean_figure(results, entry, budget, "flops_kept")
            if acc is not None:
                points.append((flops, 100 * acc, 100 * (acc - min(accs)), 100 * (max(accs) - acc)))
        if points:
            x, y, low, high = map(np.array, zip(*sorted(points)))
            ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=LABELS[entry], color=colors[entry],
                        linestyle=_LINE_STYLES.get(entry, "-"))
    tfmot = [(budget, mean_figure(results, "tfmot", budget, "accuracy")[0]) for budget in budgets]
    tfmot = [(b, a) for b, a in tfmot if a is not None]
    if tfmot:
        ax.scatter([1.0] * len(tfmot), [100 * a for _, a in tfmot], marker="x", color="black",
                   label="TFMOT (dense: all FLOPs kept)")
    ax.set_xlabel("FLOPs kept (fraction of the unpruned model)")
    ax.set_ylabel("top-1 test accuracy (%)")
    model = results["config"].get("base_model") or f"ResNet-{results['config']['depth']}"
    ax.set_title(f"{results['profile']} profile: {model} on CIFAR-10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: many entries
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Re-renders docs and plot from a results JSON: ``python -m benchmarks.report benchmarks/results/cpu.json``."""
    import argparse

    root = pathlib.Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results")
    parser.add_argument("--docs", default=str(root / "docs" / "benchmarks_quick.md"))
    parser.add_argument("--plot", default=str(root / "docs" / "img" / "accuracy_vs_flops_cpu.png"))
    args = parser.parse_args(argv)
    results = json.loads(pathlib.Path(args.results).read_text())
    results["goals"] = goals(results)
    write_json(pathlib.Path(args.results), results)
    update_docs(pathlib.Path(args.docs), results["profile"], markdown(results))
    plot(results, pathlib.Path(args.plot))


if __name__ == "__main__":
    main()
