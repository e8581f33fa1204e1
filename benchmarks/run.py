"""The CIFAR-10 pruning benchmark (issue 5).

Run from the repository root::

    python -m benchmarks.run --profile cpu                      # ResNet-20, <= 45 min on 2 cores
    python -m benchmarks.run --profile smoke                    # the pipeline in ~1 min (writes no docs)
    python -m benchmarks.run --profile v2                       # protocol 2 (hours; repeat until done)
    python -m benchmarks.run --profile gpu                      # ResNet-56; repeat until it says done
    python -m benchmarks.run --profile cpu --seeds 0 1 --entries unpruned nap random
    python -m benchmarks.run --profile v2 --seeds 0 1 --report-only   # the page from the finished units only

Steps: load CIFAR-10 (``--data``, default ``../shared/data/cifar10-jpeg.tar.gz``);
pretrain the profile's model once (cached under ``benchmarks/cache/``); for
each seed, fine-tune the unpruned model and, at each FLOPs budget, every
entry from the same pretrained weights with the same schedule
(`benchmarks.entries`, `benchmarks.tfmot_peer`); export float32 and int8
``.tflite`` files and time each budget's files together
(`benchmarks.measure`); write ``benchmarks/results/<profile>.json``, the
tables and goals in the profile's page (``docs/benchmarks.md`` for ``v2``, ``docs/benchmarks_quick.md`` otherwise) and
``docs/img/accuracy_vs_flops_<profile>.png`` (`benchmarks.report`); the
``smoke`` profile writes neither unless ``--docs``/``--plot`` name a file.
A profile whose finished units are kept in the repository (``v2``,
``v2_mobilenetv2``) publishes every finished unit after any invocation
(the ``--report-only`` command it records), so running some entries or
seeds adds them to the page instead of replacing it.

Stages: with ``--max-minutes`` (default for ``gpu``: 8.5) the run stops
cleanly before that time, keeping every finished unit and a checkpoint of
the one in progress, and exits with status 3; the same command continues it.
``--resume`` keeps finished units for the other profiles too (after a crash).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks import report  # noqa: E402
from benchmarks.data import DEFAULT_SOURCE, BenchData, load, load_converged  # noqa: E402
from benchmarks.entries import EntryCannotRun, entry_schedule, run_entry  # noqa: E402
from benchmarks.measure import export_model, latency_figures  # noqa: E402
from benchmarks.pretrain import load_pretrained, pretrain, pretrained_path  # noqa: E402
from benchmarks.profiles import ALL_ENTRIES, PROFILES, Profile  # noqa: E402
from benchmarks.stages import Deadline, StageIncomplete, UnitStore, code_revision  # noqa: E402
from benchmarks.tfmot_peer import run_tfmot  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
INCOMPLETE = 3
"""Exit status of a stage that stopped before the profile finished."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--data", default=str(DEFAULT_SOURCE), help="CIFAR-10 folder, .tar.gz or TFDS name")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (default: 0)")
    parser.add_argument("--entries", nargs="+", choices=ALL_ENTRIES, help="default: the profile's")
    parser.add_argument("--cache-dir", default=str(REPO_ROOT / "benchmarks" / "cache"))
    parser.add_argument("--results-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--docs", help="page to update, 'none' to leave docs alone (default: docs/benchmarks.md for v2, "
                        "docs/benchmarks_quick.md for cpu and gpu, none for smoke)")
    parser.add_argument("--plot", help="default: docs/img/accuracy_vs_flops_<profile>.png when docs are written")
    parser.add_argument("--budgets", type=float, nargs="+", help="FLOPs budgets to run (default: the profile's)")
    parser.add_argument("--max-minutes", type=float, help="stop cleanly before this (default: the profile's stage time)")
    parser.add_argument("--resume", action="store_true", help="keep finished units of an earlier run")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the finished units (and time their files together)")
    parser.add_argument("--retime", action="store_true",
                        help="export every finished unit's .tflite files again from its kept model (the current "
                             "exporter) and time each latency group anew, as a whole")
    parser.add_argument("--retrain", action="store_true", help="discard the cached pretrained model")
    parser.add_argument("--verbose", type=int, default=0, help="Keras fit verbosity")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs (or continues) a profile; returns the results dict (``{"incomplete": why}`` for a stage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    if args.docs is None:  # Benchmark v2's page; the older profiles have their own
        page = "benchmarks.md" if profile.base_model else "benchmarks_quick.md"
        args.docs = "none" if profile.name == "smoke" else str(REPO_ROOT / "docs" / page)
    if args.plot is None:
        args.plot = str(REPO_ROOT / "docs" / "img" / f"accuracy_vs_flops_{profile.name}.png")
    entries = ["unpruned"] + [e for e in ALL_ENTRIES[1:] if e in (args.entries or profile.entries)]
    cache = pathlib.Path(args.cache_dir)
    if args.retrain:
        shutil.rmtree(pretrained_path(profile, cache), ignore_errors=True)
    deadline = Deadline(args.max_minutes if args.max_minutes is not None else profile.stage_minutes)
    context = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "clock": time.perf_counter(),
        "load_start": os.getloadavg()[0],
        "command": " ".join(["python -m benchmarks.run", *argv]),
    }
    try:
        if not profile.base_model or args.report_only:
            return run_profile(profile, args, entries, cache, deadline, context)
        # A profile with kept units publishes all of them, whatever subset this invocation ran.
        run_profile(profile, args, entries, cache, deadline, context, publish=False)
        keep = pathlib.Path(args.results_dir) / profile.name / f"units-{profile.run_key()}"
        seeds, finished = finished_units(keep)
        entries = ["unpruned"] + [e for e in ALL_ENTRIES[1:] if e in set(finished) | set(entries)]
        argv = ["--profile", profile.name, "--seeds", *map(str, seeds), "--budgets", *map(str, profile.budgets),
                "--entries", *entries, "--report-only"]
        context["command"] = " ".join(["python -m benchmarks.run", *argv])
        return run_profile(profile, parse_args(argv + [f"--{k}={v}" for k, v in (("data", args.data), (
            "cache-dir", args.cache_dir), ("results-dir", args.results_dir), ("docs", args.docs), ("plot", args.plot))]),
                           entries, cache, deadline, context)
    except StageIncomplete as stop:
        print(f"Stage finished: {stop}. Run the same command again to continue.", flush=True)
        return {"incomplete": str(stop)}


def finished_units(folder: pathlib.Path) -> tuple[list[int], list[str]]:
    """The seeds and the entries of the finished units kept in ``folder`` (``s<seed>-b<budget>-<entry>.json``)."""
    seeds, entries = set(), set()
    for path in pathlib.Path(folder).glob("s*-*.json"):
        seed, _, rest = path.stem.partition("-")
        entry = "unpruned" if rest == "unpruned" else rest.partition("-")[2]
        if seed[1:].isdigit() and entry in ALL_ENTRIES:
            seeds.add(int(seed[1:]))
            entries.add(entry)
    return sorted(seeds), sorted(entries)


def run_profile(profile: Profile, args, entries: list[str], cache: pathlib.Path, deadline: Deadline, context: dict,
                publish: bool = True) -> dict:
    """Runs the units of ``entries`` (reports them with ``args.report_only``); ``publish``: write the results and docs."""
    log = _logger(context["clock"])
    data = load_converged(args.data) if profile.base_model else load(args.data, profile.train_per_class, profile.test_per_class)
    log(f"data: {len(data.x_train)} training, {len(data.x_test)} test images")
    pretrained_meta = pretrain(profile, data, cache, deadline, args.verbose)
    pretrained = pretrained_path(profile, cache)
    log(f"pretrained ({'cached' if pretrained_meta['cached'] else 'trained'}): accuracy {pretrained_meta['accuracy']:.4f}")
    # A profile on committed weights keeps its finished units in the repository (results/<profile>/units-<key>/).
    keep = pathlib.Path(args.results_dir) / profile.name / f"units-{profile.run_key()}" if profile.base_model else None
    if keep is not None:
        check_base_model(keep, pretrained_meta["sha256"])
    store = UnitStore(cache / profile.name / f"runs-{profile.run_key()}", fresh=not (profile.resumable or args.resume or args.report_only), keep=keep)
    data_path = store.root / "data.npz"
    if not data_path.exists():
        data.save(data_path)
    epoch_seconds = pretrained_meta["train_seconds"] / pretrained_meta["epochs"]
    runs, latency = [], {}
    for seed in args.seeds:
        for budget in [None, *(args.budgets or profile.budgets)]:
            group = [e for e in entries if (e == "unpruned") == (budget is None)]
            for entry in group:
                unit = _unit(seed, budget, entry)
                result = store.result(unit)
                if result is None and args.report_only:
                    log(f"{unit}: not run yet (left out of the report)")
                    continue
                if result is None:
                    pruning_epochs = entry_schedule(entry, profile).prune_end  # one fit call, not resumable
                    deadline.check(1.5 * pruning_epochs * epoch_seconds + 120, unit)
                    result = run_unit(entry, profile, data, data_path, pretrained, budget, seed, store, unit, deadline)
                    result = store.save(unit, dict(result, code_revision=code_revision()))
                runs.append(result)
                log(f"{unit}: " + (result["error"] if "error" in result else
                                   f"accuracy {result['accuracy']:.4f}, FLOPs kept {result['flops_kept']:.3f}, "
                                   f"params kept {result['params_kept']:.3f}, fit {result['fit_seconds']:.0f} s"))
            if budget is not None and any(r["seed"] == seed and r["budget"] == budget for r in runs):
                unit = _unit(seed, budget, "latency")
                group = [r for r in runs if r["seed"] == seed and r["budget"] in (None, budget) and "error" not in r]
                timed = {} if args.retime else store.result(unit) or {}
                # Not timed yet: an entry or a precision; a failed export is tried again (it may work now).
                new = _untimed(timed, {r["entry"]: r["tflite"] for r in group}) | {
                    r["entry"] for r in group if any("error" in f for f in r["tflite"].values())}
                if new:  # only these files are needed (exported again from the kept models if gone)
                    files = {r["entry"]: _tflite_files(r, store, data, profile, again=args.retime) for r in group
                             if r["entry"] in new or r["entry"] == "unpruned"}
                    files = {entry: paths for entry, paths in files.items() if paths is not None}
                    if _untimed(timed, files):
                        timed = store.save(unit, _merge_timings(timed, latency_figures(files, "unpruned", profile)))
                latency[f"{seed}/{budget}"] = timed
                log(f"{unit}: " + ", ".join(f"{k} {v['float32']['kept']:.2f}" for k, v in latency[f"{seed}/{budget}"].items()))
    results = {
        "profile": profile.name, "command": context["command"], "started": context["started"],
        "config": profile.to_dict(), "entries": entries, "seeds": list(args.seeds), "budgets": list(args.budgets or profile.budgets),
        "machine": _machine(context), "versions": _versions(runs), "pretrained": pretrained_meta,
        "runs": runs, "latency": latency, "wall_seconds": time.perf_counter() - context["clock"],
        "torch_finetune": _torch_rows(pathlib.Path(args.results_dir), profile),
    }
    results["goals"] = report.goals(results)
    if not publish:
        return results
    report.write_json(pathlib.Path(args.results_dir) / f"{profile.name}.json", results)
    if args.docs != "none":
        report.update_docs(pathlib.Path(args.docs), profile.name, report.markdown(results))
        report.plot(results, pathlib.Path(args.plot))
    log(f"done: {pathlib.Path(args.results_dir) / f'{profile.name}.json'}")
    return results


def check_base_model(folder: pathlib.Path, sha256: str) -> None:
    """Refuses kept units computed on another base model (the run key names the profile, not the weights).

    The first run writes ``base_model.json`` (the model file's sha256) into the units' folder.
    """
    record = pathlib.Path(folder) / "base_model.json"
    if record.exists():
        kept = json.loads(record.read_text())["sha256"]
        if kept != sha256:
            raise ValueError(f"The finished units in {folder} were computed on a base model with sha256 {kept[:12]}..., "
                             f"but the committed model now has {sha256[:12]}.... Move that folder aside (or delete it) "
                             "to run the profile on the new weights.")
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"sha256": sha256}, indent=1) + "\n")


def run_unit(entry, profile, data: BenchData, data_path, pretrained, budget, seed, store: UnitStore, unit, deadline) -> dict:
    """One entry at one budget and seed: figures, with the ``.tflite`` files' figures under ``tflite``."""
    folder = store.files(unit)
    if entry == "tfmot":
        # The parameter count of NAP with its defaults, the entry the goals call "NAP" (report.goals).
        matched = next((e for e in ("fisher_cost_aware", "nap") if store.result(_unit(seed, budget, e))), None)
        nap = store.result(_unit(seed, budget, matched)) if matched else None
        params_kept = nap["params_kept"] if nap else budget
        remaining = deadline.remaining()
        result = run_tfmot(load_pretrained(pretrained), data_path, params_kept, profile, seed, folder,
                           max_seconds=None if remaining is None else max(0.0, remaining - 90))  # startup, export
        if "incomplete" in result:
            raise StageIncomplete(result["incomplete"])
        return dict(result, entry="tfmot", budget=budget, seed=seed, params_target=params_kept,
                    params_target_from=matched or "budget (NAP not run)")
    try:
        model, figures = run_entry(entry, profile, data, pretrained, budget, seed, folder, deadline)
    except EntryCannotRun as error:  # a budget out of the method's reach is a result
        return {"entry": entry, "budget": budget, "seed": seed, "error": str(error)}
    store.keep_model(unit, model)
    figures["tflite"] = export_model(model, folder, data.test_sample(profile.export_samples), profile)
    return figures


def _torch_rows(results_dir: pathlib.Path, profile: Profile) -> list[dict]:
    """The fine-tuned Torch-Pruning rows of ``benchmarks.torch_finetune`` for this profile's model, if run."""
    path = results_dir / profile.name / f"finetune_torch_{profile.base_model}.json"
    if not profile.base_model or not path.exists():
        return []
    return json.loads(path.read_text())["rows"]


def _exported(files: dict) -> dict[str, set[str]]:
    """``{entry: precisions with a file}`` of a latency group's ``.tflite`` figures."""
    exported = {entry: {p for p, figures in tflite.items() if "path" in figures} for entry, tflite in files.items()}
    return {entry: precisions for entry, precisions in exported.items() if precisions}  # as `latency_figures` lists them


def _untimed(timed: dict, files: dict) -> set[str]:
    """The entries of ``files`` (not the unpruned reference) with a ``.tflite`` precision that ``timed`` lacks,
    or whose file is no longer the one timed (both record a ``sha256``, and they differ)."""
    def stale(entry: str, precision: str) -> bool:
        was, now = timed[entry][precision].get("sha256"), files[entry][precision].get("sha256")
        return bool(was and now and was != now)

    return {entry for entry, precisions in _exported(files).items()
            if entry != "unpruned" and (not precisions <= set(timed.get(entry, {}))
                                        or any(stale(entry, precision) for precision in precisions))}


def _merge_timings(timed: dict, new: dict) -> dict:
    """``timed`` with the entries of ``new`` (timed together with the unpruned model) added or replaced.

    An invocation that runs some entries times only those, beside the
    unpruned model, so the figures of entries it did not run (whose files
    may be gone with an earlier cache) are kept. Each entry's ``kept`` is
    its paired ratio to the unpruned model timed in the same run; the
    unpruned model's own figures stay those of the first run, and the
    reference's medians of a later run are recorded under
    ``reference_median_ms``. Delete the latency unit to time a whole group
    together again.
    """
    if "unpruned" not in timed:
        return {**timed, **new}
    merged = dict(timed)
    for entry, precisions in new.items():
        if entry != "unpruned":
            merged[entry] = {precision: dict(figures, reference_median_ms=new["unpruned"][precision]["median_ms"])
                             for precision, figures in precisions.items()}
    return merged


_EXPORTED_AGAIN: set[str] = set()
"""Units whose files ``--retime`` exported again in this process (the unpruned unit is in every group)."""


def _tflite_files(result: dict, store: UnitStore, data: BenchData, profile: Profile, again: bool = False) -> dict | None:
    """The unit's ``.tflite`` figures; files lost with the cache are exported again from the kept model.

    A precision whose export failed is tried again too (the export may have
    been fixed since), and the unit's record is updated with the new figures.
    With ``again`` (``--retime``) the files are exported again from the kept
    model whatever their state, once per process, so that a latency group
    compares files of one exporter; the record is updated. Returns None when
    neither the files nor a kept model exist (a TFMOT unit of an earlier
    session: its model is not kept), and the entry is not timed.
    """
    failed = any("error" in figures for figures in result["tflite"].values())
    present = all(pathlib.Path(f["path"]).exists() for f in result["tflite"].values() if "path" in f)
    unit = _unit(result["seed"], result["budget"], result["entry"])
    if present and not failed and not (again and unit not in _EXPORTED_AGAIN):
        return result["tflite"]
    kept = store.kept_model(unit)
    if kept is None or not kept.exists():
        if present:  # a failed export, or --retime, and no model to export from: the files as they are
            if again:
                print(f"{unit}: no kept model to export again; its existing files are timed", flush=True)
            return result["tflite"]
        print(f"{unit}: its .tflite files are gone and no model is kept; left out of the latency group", flush=True)
        return None
    import keras

    tflite = export_model(keras.saving.load_model(kept), store.files(unit), data.test_sample(profile.export_samples), profile)
    if failed or again:
        _EXPORTED_AGAIN.add(unit)
        result["tflite"] = tflite
        store.save(unit, result)
    return tflite


def _unit(seed: int, budget: float | None, entry: str) -> str:
    return f"s{seed}-unpruned" if budget is None else f"s{seed}-b{round(100 * budget)}-{entry}"


def _logger(clock: float):
    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - clock) / 60:5.1f} min] {message}", flush=True)

    return log


def _machine(context: dict) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
        "load_start": context["load_start"], "load_end": os.getloadavg()[0],
    }


def _versions(runs: list[dict]) -> dict:
    versions = {"python": platform.python_version()}
    for name in ("tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    for run in runs:
        if "tfmot_version" in run:
            versions["tensorflow-model-optimization"] = run["tfmot_version"]
            versions["tf_keras"] = run["tf_keras_version"]
    return versions


if __name__ == "__main__":
    outcome = main()
    sys.exit(INCOMPLETE if "incomplete" in outcome else 0)
