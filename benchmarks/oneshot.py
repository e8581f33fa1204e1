"""Benchmark v2, protocol 1: one-shot pruning curves of the converged models, no fine-tuning.

The instrument for method work: every entry prunes the committed converged
model (`benchmarks.converged`, ``benchmarks/models/``) once, to each FLOPs
target in `TARGETS`, with `kap.PruningCallback.prune` (one round, no
training) and the same calibration images (`converged.protocol_data`: 1,024
training images, 8 batches of 128). Each pruned model is evaluated on all
10,000 test images (a) as pruned and (b) after `kap.recalibrate_batchnorm`
on the same 2,048 other training images (16 batches of 128, augmented once with flips and crops
as in training: `converged.protocol_data`) for every entry.

    python -m benchmarks.oneshot --model resnet20                  # all entries and targets (resumable)
    python -m benchmarks.oneshot --model resnet20 --entries nap uniform_l1 --targets 0.5
    python -m benchmarks.oneshot --model resnet20 --max-layer-ratio 0.9  # the ranked entries with a layer floor
    python -m benchmarks.oneshot --model resnet20 --rounds 4 --entries nap --targets 0.5  # 4 rounds, no training

Rows are appended to ``benchmarks/results/v2/oneshot_<model>.json`` as they
finish (a rerun skips finished rows; ``--fresh`` starts over); the plot
``docs/img/v2_oneshot_<model>.png`` and the table in ``docs/benchmarks.md``
are redrawn from them. Variants write their own file and plot, the "after"
of a comparison: ``--max-layer-ratio r`` runs the entries of
`RANKED_ENTRIES` with that layer floor (``max_layer_ratio`` of
`kap.NAPCallback`) into ``oneshot_<model>_max_layer_ratio_<r>.json``;
``--rounds k`` prunes in ``k`` rounds back to back, statistics collected
again before each, still without training (``..._rounds_<k>.json``; both
flags: both suffixes). ``--out`` writes elsewhere (the published files are
left alone). The Torch-Pruning rows come
from `benchmarks.torch_peer` (its own process) and are drawn from
``oneshot_torch_<model>.json`` beside them when present.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from benchmarks import converged
from benchmarks.stages import code_revision
from keras_autoprune.callbacks.ranked import DEFAULT_MAX_LAYER_RATIO

TARGETS = (0.8, 0.65, 0.5, 0.35, 0.25)
ENTRIES = ("uniform_l1", "global_l1", "taylor", "random", "nap", "nap_cost_aware", "c_obd", "c_obs",
           "kron_obd", "kron_obs", "eigendamage", "eigendamage_reduce", "psap", "fisher", "fisher_cost_aware",
           "eigendamage_cost_aware", "eigendamage_reduce_cost_aware", "eigendamage_fisher", "eigendamage_fisher_cost_aware")
"""Protocol 1's entries, as in `benchmarks.entries` (TFMOT prunes individual weights and does not
remove FLOPs in one shot: it appears in protocol 2 only)."""
RANKED_ENTRIES = ("global_l1", "taylor", "random", "nap", "nap_cost_aware", "c_obd", "c_obs", "kron_obd", "kron_obs",
                  "fisher", "fisher_cost_aware")
"""The entries that rank channels over the whole model (`RankedPruningCallback`): ``--max-layer-ratio`` applies to them."""
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results" / "v2"
PLOT_DIR = pathlib.Path(__file__).resolve().parents[1] / "docs" / "img"
DOCS_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BATCH_SIZE = 128


def make_callback(entry: str, target: float, calibration: tuple[np.ndarray, np.ndarray], seed: int = 0,
                  max_layer_ratio: float | None = None, rounds: int = 1):
    """The entry's callback for ``rounds`` rounds (default one) to ``target`` FLOPs kept (``max_layer_ratio``: ranked entries only)."""
    import keras_autoprune as kap
    from benchmarks.entries import RandomCallback, TaylorCallback, UniformL1Callback

    budget = kap.Budget(flops=target)
    batches = {"num_batches": len(calibration[0]) // BATCH_SIZE, "batch_size": BATCH_SIZE}
    if max_layer_ratio is not None and entry not in RANKED_ENTRIES:
        raise ValueError(f"`max_layer_ratio` applies to the ranked entries {RANKED_ENTRIES}. Received: entry={entry!r}")
    common = {"verbose": 0, "rounds": rounds}
    ranked = common if max_layer_ratio is None else {**common, "max_layer_ratio": max_layer_ratio}
    if entry == "uniform_l1":
        return UniformL1Callback(budget, **common)
    if entry == "global_l1":
        return kap.MagnitudeCallback(budget, **ranked)
    if entry == "taylor":
        return TaylorCallback(calibration, budget, **batches, **ranked)
    if entry == "random":
        return RandomCallback(budget, seed, **ranked)
    if entry in ("nap", "nap_cost_aware"):
        return kap.NAPCallback(calibration, budget=budget, scorer="nap", cost_aware=entry == "nap_cost_aware", **batches, **ranked)
    if entry in ("c_obd", "c_obs", "kron_obd", "kron_obs"):
        return kap.NAPCallback(calibration, budget=budget, scorer=entry.replace("_", "-"), **batches, **ranked)
    if entry in ("fisher", "fisher_cost_aware"):
        return kap.NAPCallback(calibration, budget=budget, scorer="fisher", cost_aware=entry == "fisher_cost_aware",
                               **batches, **ranked)
    if entry.startswith("eigendamage"):
        approximation = "reduce" if "_reduce" in entry else "expand"
        return kap.EigenDamageCallback(calibration, budget=budget, kfac_approximation=approximation,
                                       cost_aware=entry.endswith("_cost_aware"),
                                       scorer="fisher" if "_fisher" in entry else "kfac", **batches, **common)
    if entry == "psap":
        return kap.PSAPCallback(budget, calibration, **batches, **common)
    raise ValueError(f"Expected an entry of {ENTRIES}. Received: {entry!r}")


def load_model(name: str):
    """The committed converged model, compiled with its loss (the curvature methods read it)."""
    import keras

    model = keras.saving.load_model(converged.MODELS_DIR / f"{name}.keras", compile=False)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def run_row(model, entry: str, target: float, shared: dict, data: converged.Cifar10,
            variant: dict | None = None) -> dict:
    """Prunes ``model`` once for (entry, target) and measures it; an entry that fails records its error."""
    import keras_autoprune as kap

    row = {"entry": entry, "target": target}
    row.update(variant or {})
    options = dict(variant or {})
    between = options.pop("batchnorm_between_rounds", 0)  # the calibration images, as a user has them
    start = time.perf_counter()
    try:
        callback = make_callback(entry, target, (shared["calibration_x"], shared["calibration_y"]), **options)
        if entry in RANKED_ENTRIES:
            row["max_layer_ratio"] = callback.max_layer_ratio
        slim = callback.prune(model, batchnorm_data=shared["calibration_x"] if between else None)
    except Exception as error:  # an entry that cannot reach a target is a result, not a crash
        return dict(row, error=f"{type(error).__name__}: {error}")
    row.update(
        flops_kept=kap.count_flops(slim) / kap.count_flops(model),
        params_kept=kap.count_params(slim) / kap.count_params(model),
        pruning_seconds=callback.pruning_seconds,
        statistics_seconds=getattr(callback, "statistics_seconds", 0.0),
        accuracy=converged.test_accuracy(slim, data),
        channels=pruned_widths(model, slim),
    )
    kap.recalibrate_batchnorm(slim, shared["batchnorm_x"], batch_size=BATCH_SIZE)
    row["accuracy_bn"] = converged.test_accuracy(slim, data)
    row["seconds"] = time.perf_counter() - start
    row["code_revision"] = code_revision()
    return row


WIDTH_KINDS = ("Conv1D", "Conv2D", "SeparableConv2D", "Dense")
"""Layers whose output width `pruned_widths` records (a depthwise or normalisation layer follows its input)."""


def pruned_widths(model, slim) -> dict[str, list[int]]:
    """``{layer: [channels kept, channels before]}`` for every convolution or Dense whose output width changed."""
    import keras_autoprune as kap

    report = kap.PruningReport.from_models(model, slim)
    return {change.layer: [change.channels_after, change.channels_before] for change in report.layers
            if change.kind in WIDTH_KINDS and change.channels_after != change.channels_before}


def unpruned_row(model, shared: dict, data: converged.Cifar10) -> dict:
    """The reference row: the model as committed, and after the same BN re-estimation as every entry (on a copy)."""
    import keras

    import keras_autoprune as kap

    row = {"entry": "unpruned", "target": 1.0, "flops_kept": 1.0, "params_kept": 1.0,
           "accuracy": converged.test_accuracy(model, data)}
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    kap.recalibrate_batchnorm(copy, shared["batchnorm_x"], batch_size=BATCH_SIZE)
    row["accuracy_bn"] = converged.test_accuracy(copy, data)
    return row


def run(
    model_name: str,
    entries: tuple[str, ...] = ENTRIES,
    targets: tuple[float, ...] = TARGETS,
    out: pathlib.Path | None = None,
    data: converged.Cifar10 | None = None,
    fresh: bool = False,
    log=print,
    variant: dict | None = None,
) -> list[dict]:
    """Runs (or continues) protocol 1 for one model; returns all rows of its result file."""
    out = pathlib.Path(out) if out is not None else RESULTS_DIR / result_name(model_name, variant)
    data = data or converged.load_cifar10()
    shared = converged.protocol_data(data)
    model = load_model(model_name)
    result = json.loads(out.read_text()) if out.exists() and not fresh else {"model": model_name, "rows": []}
    if result.get("batchnorm_set", "clean") != converged.BATCHNORM_SET and result["rows"]:
        # Rows re-estimated on another image set: kept for the record, measured again.
        result.setdefault("superseded", {})[result.get("batchnorm_set", "clean")] = result["rows"]
        result["rows"] = []
    result["batchnorm_set"] = converged.BATCHNORM_SET
    floor = (variant or {}).get("max_layer_ratio", DEFAULT_MAX_LAYER_RATIO)
    kept = []
    for row in result["rows"]:  # ranked rows of another layer floor (before the 0.9 default: 1.0): kept for the record
        ratio = row.get("max_layer_ratio", 1.0)
        if row["entry"] in RANKED_ENTRIES and ratio != floor:
            result.setdefault("superseded", {}).setdefault(f"max_layer_ratio={ratio:g}", []).append(row)
        else:
            kept.append(row)
    result["rows"] = kept
    done = {(row["entry"], row["target"]) for row in result["rows"]}
    started = time.perf_counter()
    if ("unpruned", 1.0) not in done:
        result["rows"].append(unpruned_row(model, shared, data))
    todo = [(e, t) for e in entries for t in targets if (e, t) not in done]
    for index, (entry, target) in enumerate(todo, 1):
        row = run_row(model, entry, target, shared, data, variant)
        result["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        figures = (f"FLOPs kept {row['flops_kept']:.3f}, accuracy {row['accuracy']:.4f}, after BN re-estimation "
                   f"{row['accuracy_bn']:.4f} ({row['seconds']:.0f} s)") if "error" not in row else row["error"]
        log(f"[{index}/{len(todo)}] {model_name} {entry} @ {target}: {figures}")
    result["seconds_this_run"] = time.perf_counter() - started
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result["rows"]


def plot(model_name: str, rows: list[dict], path: pathlib.Path) -> None:
    """Accuracy against FLOPs kept, one line per entry; left: as pruned, right: after BN re-estimation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unpruned = next((r for r in rows if r["entry"] == "unpruned"), None)
    entries = sorted({r["entry"] for r in rows if r["entry"] != "unpruned" and "error" not in r})
    colours = plt.get_cmap("tab20")
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for axis, key, title in zip(axes, ("accuracy", "accuracy_bn"), ("as pruned", "after BatchNormalization re-estimation")):
        for index, entry in enumerate(entries):
            points = sorted((r["flops_kept"], r[key]) for r in rows if r["entry"] == entry and "error" not in r)
            style = "--" if entry.startswith("tp_") else "-"
            axis.plot(*zip(*points), style, marker="o", markersize=3, color=colours(index % 20), label=entry)
        if unpruned:
            axis.axhline(unpruned[key], color="black", linewidth=0.8, label="unpruned")
        axis.set_title(f"{model_name}, one-shot, {title}")
        axis.set_xlabel("FLOPs kept")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (10,000 CIFAR-10 test images)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(rows: list[dict]) -> str:
    """The table of the docs: per entry and target, accuracy as pruned / after BN re-estimation (and FLOPs, params kept)."""
    targets = sorted({r["target"] for r in rows if r["entry"] != "unpruned"}, reverse=True)
    entries = list(dict.fromkeys(r["entry"] for r in rows if r["entry"] != "unpruned"))
    cells = {(r["entry"], r["target"]): r for r in rows}
    unpruned = next((r for r in rows if r["entry"] == "unpruned"), None)
    lines = ["| entry | " + " | ".join(f"{t:.0%} FLOPs" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    if unpruned:
        lines.append(f"| unpruned | {100 * unpruned['accuracy']:.2f} / **{100 * unpruned['accuracy_bn']:.2f}** |"
                     + " |" * (len(targets) - 1))
    for entry in entries:
        row = []
        for target in targets:
            cell = cells.get((entry, target))
            if cell is None:
                row.append("")
            elif "error" in cell:
                row.append("fails: " + cell["error"].split(":")[0])
            else:
                row.append(f"{100 * cell['accuracy']:.1f} / **{100 * cell['accuracy_bn']:.1f}** "
                           f"({cell['flops_kept']:.2f}, {cell['params_kept']:.2f})")
        lines.append(f"| {entry} | " + " | ".join(row) + " |")
    return "\n".join(lines) + ("\n\nCells: top-1 % as pruned / **after BN re-estimation** (FLOPs kept, parameters kept).")


def result_name(model_name: str, variant: dict | None = None) -> str:
    """``oneshot_<model>.json``, or with the variant's settings as suffixes (``oneshot_resnet20_max_layer_ratio_0.9.json``)."""
    suffix = "".join(f"_{key}_{value:g}" for key, value in sorted((variant or {}).items()))
    return f"oneshot_{model_name}{suffix}.json"


def all_rows(model_name: str, folder: pathlib.Path, variant: dict | None = None) -> list[dict]:
    """This protocol's rows and, when present, the Torch-Pruning peer's (``oneshot_torch_<model>.json``; not for a variant)."""
    rows = json.loads((folder / result_name(model_name, variant)).read_text())["rows"]
    peer = folder / f"oneshot_torch_{model_name}.json"
    if peer.exists() and not variant:
        loaded = json.loads(peer.read_text())
        rows += loaded["rows"] if isinstance(loaded, dict) else loaded
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.oneshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(converged.ARCHITECTURES), required=True)
    parser.add_argument("--entries", nargs="+", choices=ENTRIES,
                        help="default: every entry (with --max-layer-ratio: every ranked entry)")
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--out", type=pathlib.Path, help="result folder (default: the published benchmarks/results/v2)")
    parser.add_argument("--data", default=str(converged.DEFAULT_SOURCE))
    parser.add_argument("--fresh", action="store_true", help="discard finished rows")
    parser.add_argument("--max-layer-ratio", type=float,
                        help="layer floor of the ranked entries (e.g. 0.9), results in their own file")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds back to back without training (statistics again before each), results in their own file")
    parser.add_argument("--batchnorm-between-rounds", action="store_true",
                        help="with --rounds: re-estimate BatchNormalization statistics on the calibration images "
                             "before every round after the first (`cb.prune(model, batchnorm_data=...)`), own file")
    args = parser.parse_args(argv)
    if args.batchnorm_between_rounds and args.rounds < 2:
        parser.error("--batchnorm-between-rounds needs --rounds 2 or more")
    ratio = args.max_layer_ratio
    variant = {k: v for k, v in (("max_layer_ratio", ratio), ("rounds", args.rounds)) if v not in (None, 1)}
    if args.batchnorm_between_rounds:
        variant["batchnorm_between_rounds"] = 1
    entries = args.entries or list(ENTRIES if ratio is None else RANKED_ENTRIES)
    if ratio is not None and not set(entries) <= set(RANKED_ENTRIES):
        parser.error(f"--max-layer-ratio applies to the ranked entries {RANKED_ENTRIES}; received {entries}")
    folder = args.out or RESULTS_DIR
    name = result_name(args.model, variant)
    run(args.model, tuple(entries), tuple(args.targets), out=folder / name, data=converged.load_cifar10(args.data),
        fresh=args.fresh, log=lambda line: print(line, flush=True), variant=variant)
    rows = all_rows(args.model, folder, variant)
    print(markdown(rows))
    image = name.replace("oneshot_", "v2_oneshot_").replace(".json", ".png")
    title = ", ".join([args.model, *(f"{k}={v:g}" for k, v in sorted(variant.items()))])
    if args.out is None:  # the published results: the plot (and, without a floor, the table of docs/benchmarks.md)
        plot(title, rows, PLOT_DIR / image)
        if not variant:
            from benchmarks.report import update_docs

            update_docs(DOCS_PAGE, f"oneshot_{args.model}", markdown(rows))
    else:
        plot(title, rows, folder / image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
