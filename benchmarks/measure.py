"""Deployment figures: verified ``.tflite`` files, their sizes, and interleaved LiteRT latency.

- `export_model`: float32 and int8 (full-integer, calibrated on normalised
  test images) ``.tflite`` files with `kap.export_tflite` (the float32 file
  is verified against Keras to 1e-4 relative error; the int8 file reports
  its top-1 agreement with Keras), and the size of each file, raw and
  gzip-compressed (level 9; what a download or an app bundle would carry).
- `latency_figures`: all files of one (seed, budget) group, the unpruned
  model's included, timed together with `kap.measure_latencies` (batch 1,
  one thread, rounds taking turns). A file's *latency kept* is the median
  over rounds of ``median(its round) / median(unpruned, same round)``
  (`benchmarks.export_latency.paired_speedup`, inverted): the two are timed
  seconds apart, so load from other processes affects both.
"""

from __future__ import annotations

import gzip
import hashlib
import pathlib
from typing import Any

from benchmarks.profiles import Profile

# Keras 3 and keras_autoprune are imported inside the functions: the TFMOT
# peer (legacy tf_keras) imports `gzip_size` from here.

PRECISIONS = ("float32", "int8")


def gzip_size(path: str | pathlib.Path) -> int:
    """Bytes of the file after ``gzip -9``."""
    return len(gzip.compress(pathlib.Path(path).read_bytes(), compresslevel=9))


def file_sha256(path: str | pathlib.Path) -> str:
    """The file's sha256 (hex): which file a size or a latency figure belongs to."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def export_model(model: Any, folder: pathlib.Path, representative, profile: Profile) -> dict:
    """Writes ``float32.tflite`` and ``int8.tflite`` in ``folder``; returns their figures.

    A precision whose export fails (`kap.ExportError`, e.g. LiteRT's XNNPACK
    refusing an int8 file) gets ``{"error": message}``: the unit's other
    figures stand, and that file is left out of the latency timing.
    """
    import keras_autoprune as kap

    figures = {}
    for precision in PRECISIONS:
        path = pathlib.Path(folder) / f"{precision}.tflite"
        try:
            result = kap.export_tflite(
                model, path, quantize=None if precision == "float32" else "int8",
                representative_data=representative, num_samples=profile.export_samples,
            )
        except kap.ExportError as error:
            figures[precision] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            continue
        figures[precision] = {
            "path": str(path),
            "bytes": result.size_bytes,
            "gzip_bytes": gzip_size(path),
            "sha256": file_sha256(path),
            "relative_error": result.relative_error,
            "top1_agreement": result.top1_agreement,
        }
    return figures


def latency_figures(files: dict[str, dict], reference: str, profile: Profile) -> dict[str, dict]:
    """Times every file of ``files`` (``{name: {precision: {"path": ...}}}``) together.

    Returns:
        ``{name: {precision: {"median_ms", "p90_ms", "kept", "sha256"}}}``;
        ``kept`` is the paired latency ratio to ``files[reference]`` of the
        same precision, ``sha256`` the timed file's.
    """
    import keras_autoprune as kap
    from benchmarks.export_latency import paired_speedup

    keys = [(name, precision) for name in files for precision in PRECISIONS
            if "path" in files[name].get(precision, {})]  # a failed export has no file to time
    timings = dict(zip(keys, kap.measure_latencies(
        [files[name][precision]["path"] for name, precision in keys], num_threads=1,
        warmup=profile.latency_warmup, runs=profile.latency_runs, rounds=profile.latency_rounds,
    )))
    figures: dict[str, dict] = {}
    for (name, precision), timing in timings.items():
        base = timings[reference, precision]
        figures.setdefault(name, {})[precision] = {
            "median_ms": timing.median_ms,
            "p90_ms": timing.p90_ms,
            "kept": 1.0 / paired_speedup(base.times_ms, timing.times_ms, profile.latency_rounds),
            "sha256": file_sha256(files[name][precision]["path"]),
        }
    return figures
