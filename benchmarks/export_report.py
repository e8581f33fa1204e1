"""Exports the keras.applications sweep to TFLite: float32 and int8, verified with LiteRT.

Run from the repository root (about an hour on 2 shared cores)::

    python -m benchmarks.export_report [--only NAME ...] [--timeout S]
    python -m benchmarks.export_report --table-only      # rewrite the doc from the JSON

For every architecture of `tests.zoo.ARCHITECTURES` (the same models,
weights and uniform 30% plan as the surgery sweep), in a process of its
own (a crash or an out-of-memory kill is recorded, not fatal):
`kap.export_tflite` of the pruned model in float32 and in int8, on
`tests.zoo.EXPORT_SAMPLES` random images in the model's input range, each
file run with LiteRT and judged with the export module's own criterion
(`keras_autoprune.export.verify.check_figures`): float32 to the default
relative tolerance, int8 to a top-1 agreement of at least
`tests.zoo.INT8_MIN_TOP1` (and a relative error below
`tests.zoo.INT8_MAX_RELATIVE_ERROR`), as `tests/test_export_sweep.py` does. Results go to ``benchmarks/results/export_sweep.json``
(architectures already there are skipped: delete an entry to run it again)
and a table between markers in ``docs/export.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

JSON_PATH = pathlib.Path("benchmarks/results/export_sweep.json")
DOC_PATH = pathlib.Path("docs/export.md")
BEGIN, END = "<!-- export-sweep:begin -->", "<!-- export-sweep:end -->"
EXPORTS = {"float32": None, "int8": "int8"}


def export_one(name: str, size: int) -> dict:
    """Builds, prunes and exports one architecture; figures per precision, failures as text."""
    import numpy as np

    from tests.zoo import FLOAT32_TOLERANCE, export_case, timed_export

    model, slim, x = export_case(name, size)
    classes = np.argmax(np.asarray(slim(x)), axis=-1)
    record = dict(name=name, size=size, params=model.count_params(), params_after=slim.count_params(),
                  keras_classes=len(np.unique(classes)), keras_majority=float(np.max(np.bincount(classes)) / len(x)))
    with tempfile.TemporaryDirectory() as tmp:
        for key, quantize in EXPORTS.items():
            try:
                result, seconds = timed_export(slim, os.path.join(tmp, f"{key}.tflite"), quantize, x, check=False)
            except Exception as error:  # noqa: BLE001 - reported in the table
                record[key] = dict(verified=False, failure=f"{type(error).__name__}: {error}")
                continue
            entry = dict(max_abs_error=result.max_abs_error, relative_error=result.relative_error,
                         top1_agreement=result.top1_agreement, num_samples=result.num_samples,
                         size_bytes=result.size_bytes, seconds=round(seconds, 1))
            if quantize is None and result.relative_error > FLOAT32_TOLERANCE:  # as export_tflite does when it checks
                entry["rounding"] = _rounding(slim, x, result.path)
            failure = judge(key, entry)  # Flex ops are not allowed: every file written was run
            record[key] = dict(entry, failure=failure, verified=not failure)
    return record


def _rounding(model, x, path) -> dict | None:
    """`keras_autoprune.export.rounding.rounding_check` of a float32 file: ``{"keras_error", "file_error"}`` or None."""
    import dataclasses

    from keras_autoprune.export.rounding import rounding_check
    from keras_autoprune.export.verify import keras_outputs, run_tflite

    check = rounding_check(model, [x], keras_outputs(model, [x]), run_tflite(path, model, [x]))
    return None if check is None else dataclasses.asdict(check)


def judge(key: str, entry: dict) -> str:
    """Why a file fails the export module's own check (`check_figures`) at the sweep's thresholds, or ''.

    A float32 file beyond the tolerance passes, as in `kap.export_tflite`, when its ``rounding``
    figures (the float64 yardstick, `keras_autoprune.export.rounding`) explain the difference.
    """
    from keras_autoprune.errors import VerificationError
    from keras_autoprune.export.rounding import RoundingCheck
    from keras_autoprune.export.verify import Figures, check_figures
    from tests.zoo import FLOAT32_TOLERANCE, INT8_MAX_RELATIVE_ERROR, INT8_MIN_TOP1

    figures = Figures(entry["max_abs_error"], entry["relative_error"], entry["top1_agreement"], entry["num_samples"])
    rounding = RoundingCheck(**entry["rounding"]) if entry.get("rounding") else None
    tolerance = FLOAT32_TOLERANCE if key == "float32" else None
    if tolerance is not None and rounding is not None and rounding.passes(tolerance):
        tolerance = None
    try:
        check_figures(figures, f"{key} file", tolerance, INT8_MIN_TOP1 if key == "int8" else None,
                      rounding.describe() if rounding else "")
    except VerificationError as error:
        return f"VerificationError: {error}"
    if key == "int8" and not figures.relative_error < INT8_MAX_RELATIVE_ERROR:
        return f"Received: relative error {figures.relative_error:.3g} >= {INT8_MAX_RELATIVE_ERROR:g}"
    return ""


def run_isolated(name: str, size: int, timeout: float) -> dict:
    """`export_one` in a child process; a crash, kill or timeout becomes a failure record."""
    command = [sys.executable, "-m", "benchmarks.export_report", "--one", name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        failure = f"not finished within {timeout:.0f} s"
    else:
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            return json.loads(lines[-1])
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        failure = f"process ended with code {done.returncode} ({'killed: out of memory?' if done.returncode == -9 else tail[0]})"
    return {"name": name, "size": size, **{key: dict(verified=False, failure=failure) for key in EXPORTS}}


def _cell_failure(entry: dict) -> str:
    """The failure's first line; for a verification failure, only what was received."""
    text = entry["failure"].splitlines()[0]
    if text.startswith("VerificationError") and "Received: " in text:
        text = "Received: " + text.split("Received: ", 1)[1].split(". Fix", 1)[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _row(r: dict) -> str:
    cells = [r["name"], str(r["size"])]
    for key in EXPORTS:
        e = r[key]
        if "size_bytes" not in e:
            cells += ["**fails**", "", "", ""]
            continue
        if key == "float32":
            figure = f"{e['max_abs_error']:.1e} ({e['relative_error']:.1e})"
        else:
            top1 = "n/a" if e["top1_agreement"] is None else f"{e['top1_agreement']:.0%}"
            figure = f"{top1} ({e['relative_error']:.2f})"
        cells += ["yes" if e["verified"] else "**no**", figure, f"{e['size_bytes'] / 2**20:.1f}", f"{e['seconds']:.0f}"]
    sizes = [r[k].get("size_bytes") for k in EXPORTS]
    cells.append(f"{sizes[1] / sizes[0]:.2f}" if all(sizes) else "")
    majority = f" ({r['keras_majority']:.0%})" if "keras_majority" in r else ""
    cells.append(f"{r['keras_classes']}{majority}" if "keras_classes" in r else "")
    failures = {k: _cell_failure(r[k]) for k in EXPORTS if r[k]["failure"]}
    same = len(failures) == len(EXPORTS) and len(set(failures.values())) == 1
    notes = [f"both: {failures['float32']}"] if same else [f"{k}: {text}" for k, text in failures.items()]
    rounding = r["float32"].get("rounding")
    if rounding and r["float32"]["verified"]:
        notes.insert(0, f"float32 verified against float64: Keras float32 {rounding['keras_error']:.1e} from exact, "
                        f"the file {rounding['file_error']:.1e}")
    cells.append("; ".join(notes).replace("|", "/"))
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = """Generated by `python -m benchmarks.export_report` on {machine} (TensorFlow {tf},
Keras {keras}, ai-edge-litert {litert}); figures in `{json}`. *s*: wall-clock
seconds of `export_tflite` (conversion and LiteRT verification), on cores
shared with other jobs. *MiB*: file size.
{verified32} of {total} architectures verified in float32, {verified8} of {total} in int8.{missing}

| model | input | float32 | max abs error (relative) | MiB | s | int8 | top-1 agreement (relative error) | MiB | s | int8 / float32 size | Keras classes | notes |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def _missing(records: list[dict]) -> str:
    from tests.zoo import ARCHITECTURES

    names = [name for name, _ in ARCHITECTURES if name not in {r["name"] for r in records}]
    return f"\nNot run yet ({len(names)}): {', '.join(names)}." if names else ""


def write_table(records: list[dict], doc: pathlib.Path, machine: str, json_path: pathlib.Path = JSON_PATH) -> None:
    """Replaces the text between the markers of ``doc`` with the table of ``records``."""
    import keras
    import tensorflow as tf
    from importlib.metadata import version

    for r in records:  # files that were run: judged again, at the current thresholds
        for key, entry in r.items():
            if isinstance(entry, dict) and "size_bytes" in entry:
                entry.setdefault("num_samples", 16)  # records written before it was stored
                entry["failure"] = judge(key, entry)
                entry["verified"] = not entry["failure"]
    count = {k: sum(r[k]["verified"] for r in records) for k in EXPORTS}
    head = TABLE_HEAD.format(machine=machine, tf=tf.__version__, keras=keras.__version__,
                             litert=version("ai-edge-litert"), json=json_path, total=len(records),
                             verified32=count["float32"], verified8=count["int8"], missing=_missing(records))
    table = head + "\n".join(_row(r) for r in records) + "\n"
    text = doc.read_text(encoding="utf-8")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    doc.write_text(f"{before}{BEGIN}\n{table}{END}{after}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: print one JSON record
    parser.add_argument("--only", nargs="+", help="architectures to run, in this order (default: all)")
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds per architecture")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the doc from the JSON")
    parser.add_argument("--out", default=str(DOC_PATH))
    parser.add_argument("--json", default=str(JSON_PATH), help="results file (read, extended, rewritten)")
    args = parser.parse_args()
    json_path = pathlib.Path(args.json)
    warnings.simplefilter("ignore")
    from tests.zoo import ARCHITECTURES

    sizes = dict(ARCHITECTURES)
    if args.one:
        print(json.dumps(export_one(args.one, sizes[args.one])), flush=True)
        return
    done = {r["name"]: r for r in json.loads(json_path.read_text())} if json_path.exists() else {}
    for name in [] if args.table_only else args.only or list(sizes):
        if name in done:
            continue
        done[name] = run_isolated(name, sizes[name], args.timeout)
        print(_row(done[name]), flush=True)
        records = [done[n] for n, _ in ARCHITECTURES if n in done]
        json_path.write_text(json.dumps(records, indent=1) + "\n")
    records = [done[n] for n, _ in ARCHITECTURES if n in done]
    write_table(records, pathlib.Path(args.out), f"{platform.machine()} Linux, {os.cpu_count()} cores", json_path)
    print(f"wrote {args.out} ({len(records)} architectures)")


if __name__ == "__main__":
    main()
