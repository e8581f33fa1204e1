"""Inference latency of ``.tflite`` files with LiteRT.

Each file is loaded in `ai_edge_litert.interpreter.Interpreter` (with its
default XNNPACK delegate, as on a device), fed one random input at batch 1,
and ``interpreter.invoke()`` is timed with `time.perf_counter` after
``warmup`` untimed calls. `measure_latencies` times several files
interleaved, in rounds, so that a slower or busier period of the machine
affects all of them alike: use it to compare an original with a pruned
model.

Example:

>>> result = measure_latency("model.tflite", num_threads=1)   # doctest: +SKIP
>>> print(f"{result.median_ms:.2f} ms (p90 {result.p90_ms:.2f} ms)")  # doctest: +SKIP
1.84 ms (p90 1.97 ms)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    """Timings of ``runs`` calls of one file, in milliseconds.

    Attributes:
        path: the ``.tflite`` file.
        median_ms: median time of one ``invoke()``.
        p90_ms: 90th percentile (linear interpolation).
        mean_ms, min_ms: mean and fastest call.
        runs: timed calls; num_threads: LiteRT threads.
        times_ms: every timed call, in order.
    """

    path: pathlib.Path
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    num_threads: int
    times_ms: tuple[float, ...] = dataclasses.field(repr=False)


def measure_latency(
    tflite_path: str | os.PathLike,
    num_threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
) -> LatencyResult:
    """Times ``runs`` inferences of one ``.tflite`` file at batch 1.

    Args:
        tflite_path: the file.
        num_threads: LiteRT CPU threads. Defaults to 1.
        warmup: untimed calls first. Defaults to 10.
        runs: timed calls. Defaults to 50.

    Returns:
        A `LatencyResult`; ``median_ms <= p90_ms``.

    Raises:
        ValueError: for counts below 1 (``warmup`` may be 0) or a missing file.
    """
    return measure_latencies([tflite_path], num_threads, warmup, runs, rounds=1)[0]


def measure_latencies(
    tflite_paths: list[str | os.PathLike],
    num_threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    rounds: int = 5,
) -> list[LatencyResult]:
    """Times several files interleaved: ``rounds`` rounds of ``runs / rounds`` calls each.

    Args:
        tflite_paths: the files to compare.
        num_threads: LiteRT CPU threads. Defaults to 1.
        warmup: untimed calls per file before the first round. Defaults to 10.
        runs: timed calls per file, in all. Defaults to 50.
        rounds: how many times the files take turns. Defaults to 5.

    Returns:
        One `LatencyResult` per file, in order.
    """
    for name, value, low in (("num_threads", num_threads, 1), ("warmup", warmup, 0),
                             ("runs", runs, 1), ("rounds", rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Expected `{name}` to be an integer >= {low}. Received: {name}={value!r}")
    if isinstance(tflite_paths, (str, os.PathLike)):
        raise ValueError("Expected a list of .tflite paths to time side by side. Received: one path "
                         f"{str(tflite_paths)!r}. Fix: measure_latencies([{str(tflite_paths)!r}]) or measure_latency(path).")
    paths = [pathlib.Path(p) for p in tflite_paths]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"Expected an existing .tflite file. Received: tflite_path='{path}'")
    timers = [_Timer(path, num_threads) for path in paths]
    for timer in timers:
        timer.run(warmup)
    times: list[list[float]] = [[] for _ in paths]
    for r in range(rounds):
        count = runs // rounds + (1 if r < runs % rounds else 0)
        for timer, store in zip(timers, times):
            store.extend(timer.run(count))
    return [_result(path, store, num_threads) for path, store in zip(paths, times)]


class _Timer:
    """One interpreter with a random batch-1 input, ready to invoke."""

    def __init__(self, path: pathlib.Path, num_threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        rng = np.random.default_rng(0)
        for detail in self.interpreter.get_input_details():
            dtype = detail["dtype"]
            if np.issubdtype(dtype, np.integer) and detail["quantization"][0] == 0:
                value = rng.integers(0, 2, detail["shape"])  # token ids, masks: 0 or 1 is valid
            elif np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                value = rng.integers(info.min, info.max, detail["shape"], endpoint=True)
            elif dtype == np.bool_:
                value = rng.integers(0, 2, detail["shape"])
            else:
                value = rng.uniform(-1, 1, detail["shape"])
            self.interpreter.set_tensor(detail["index"], value.astype(dtype))

    def run(self, count: int) -> list[float]:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            self.interpreter.invoke()
            times.append((time.perf_counter() - start) * 1e3)
        return times


def _result(path: pathlib.Path, times: list[float], num_threads: int) -> LatencyResult:
    array = np.asarray(times)
    return LatencyResult(
        path=path,
        median_ms=float(np.median(array)),
        p90_ms=float(np.percentile(array, 90)),
        mean_ms=float(array.mean()),
        min_ms=float(array.min()),
        runs=len(times),
        num_threads=num_threads,
        times_ms=tuple(float(t) for t in times),
    )
