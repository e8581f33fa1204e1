"""`LatencyTable`: a model's LiteRT latency estimated from per-layer measurements.

Built once per model and target machine (`LatencyTable.build`): for every
layer whose channels a prunable group changes (convolutions, depthwise
convolutions, Dense...) a one-layer model is converted to ``.tflite`` at
each grid point of its input and output widths and timed with
`kap.measure_latency` (batch 1, ``num_threads`` threads). Layers with the
same configuration and input shape share their measurements. A candidate's
latency is

``T(plan) = T_full + k * sum_l [t_l(c_in(plan), c_out(plan)) - t_l(c_in^full, c_out^full)]``

where ``t_l`` is bilinear interpolation in the layer's measured grid (linear
extrapolation outside it, never below 0): everything the table does not
model (additions, pooling, the interpreter's overhead) is taken as
constant. As built, ``k = 1`` and ``T_full`` is the whole model measured
once. `LatencyTable.calibrate` (opt-in: ``build(..., calibration=(0.25,
0.5, 0.75))``) fits ``T_full`` and the savings scale ``k`` by least squares
on measured whole models instead: the full model and uniform plans
removing those fractions of every group's channels. On the benchmark's
ResNet-20 it did not help (k = 0.94, and timing drift between runs was as
large as the correction; see docs/methods/metapruning.md), so it is not
the default.

The table is JSON (`save`, `load`): build it on the target device (phone,
board) with the same call, ship the file back, and search with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_autoprune.accounting import call_shapes
from keras_autoprune.allocation.cost import PlanCost
from keras_autoprune.callbacks.masks import is_prunable_layout
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.surgery.plan import PrunePlan

_WIDTH_KEYS = ("filters", "units")


@dataclasses.dataclass
class LayerTiming:
    """Measured latency of one layer signature on a grid of widths.

    Attributes:
        in_widths, out_widths: the grid (channels), increasing.
        ms: ``ms[i][j]``: median latency at ``in_widths[i]``, ``out_widths[j]``.
    """

    in_widths: list[int]
    out_widths: list[int]
    ms: list[list[float]]

    def at(self, c_in: float, c_out: float) -> float:
        """Bilinear interpolation (linear extrapolation outside the grid, never below 0)."""
        grid = np.asarray(self.ms, float)
        rows = np.array([_interp(c_out, self.out_widths, row) for row in grid])
        return max(0.0, float(_interp(c_in, self.in_widths, rows)))


class LatencyTable:
    """Per-layer latencies of one model on one machine.

    Attributes:
        model_name: the model it was built for.
        full_ms: latency of the whole model (``T_full``: fitted by
            `calibrate`, else measured once).
        savings_scale: ``k`` of the module docstring (1 before `calibrate`).
        calibration: what `calibrate` measured (``ratios``, ``measured_ms``,
            ``raw_predicted_ms``) or None.
        layers: ``{layer name: signature}``.
        timings: ``{signature: LayerTiming}``.
        num_threads: LiteRT threads used.
    """

    def __init__(self, model_name: str, full_ms: float, layers: dict[str, str], timings: dict[str, LayerTiming],
                 num_threads: int = 1, savings_scale: float = 1.0, calibration: dict | None = None):
        self.model_name = model_name
        self.full_ms = float(full_ms)
        self.layers = dict(layers)
        self.timings = dict(timings)
        self.num_threads = num_threads
        self.savings_scale = float(savings_scale)
        self.calibration = calibration
        self._cost: PlanCost | None = None

    # -- building ---------------------------------------------------------------
    @classmethod
    def build(cls, model: keras.Model, scales: Sequence[float] = (0.1, 0.4, 0.7, 1.0), num_threads: int = 1,
              runs: int = 30, verbose: int = 1, calibration: Sequence[float] = ()) -> "LatencyTable":
        """Measures ``model``'s prunable layers on a ``len(scales)``-squared grid of widths.

        Args:
            model: the unpruned model.
            scales: grid of width fractions for each layer's input and output,
                in (0, 1]; 1.0 (the full width) is always added. Start it at
                the smallest gene scale so that no estimate extrapolates.
            num_threads: LiteRT threads (1 for a phone's single big core).
            runs: timed calls per measurement.
            verbose: 1 shows a progress bar.
            calibration: fractions of every group's channels removed by the
                uniform plans that `calibrate` measures, e.g. ``(0.25, 0.5,
                0.75)`` (empty, the default: no calibration, ``k = 1``).
        """
        from keras_autoprune.export.convert import convert
        from keras_autoprune.export.latency import measure_latency

        scales = tuple(float(x) for x in scales)
        if not scales or any(not 0 < x <= 1 for x in scales):
            raise ValueError(f"`scales` are width fractions in (0, 1], e.g. (0.1, 0.4, 0.7, 1.0). Received: scales={scales}")
        for name, value in (("num_threads", num_threads), ("runs", runs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={value!r}")
        if calibration:
            _check_ratios(calibration)  # before minutes of measurements, not after
        scales = tuple(sorted(set(scales) | {1.0}))
        graph = DependencyGraph(model)
        shapes = call_shapes(model)
        layers, todo = {}, {}
        for record in _prunable_calls(graph):
            in_shape = shapes[record.name][0][0][0]
            signature = _signature(record, in_shape)
            layers[record.name] = signature
            todo.setdefault(signature, (record, in_shape))
        grids = {signature: _grid(record, graph, scales) for signature, (record, _) in todo.items()}
        bar = keras.utils.Progbar(sum(len(a) * len(b) for a, b in grids.values()) + 1, verbose=verbose,
                                  unit_name="measurement")
        timings = {}
        with tempfile.TemporaryDirectory() as scratch:
            path = pathlib.Path(scratch) / "m.tflite"

            def time_model(m: keras.Model) -> float:
                content, _ = convert(m, None, [])
                path.write_bytes(content)
                return measure_latency(path, num_threads=num_threads, runs=runs).median_ms

            for signature, (record, in_shape) in todo.items():
                in_widths, out_widths = grids[signature]
                ms = []
                for a in in_widths:
                    ms.append([time_model(_one_layer_model(record, in_shape, a, b)) for b in out_widths])
                    bar.add(len(out_widths))
                timings[signature] = LayerTiming(in_widths, out_widths, ms)
            full_ms = time_model(model)
            bar.add(1)
        table = cls(model.name, full_ms, layers, timings, num_threads)
        return table.calibrate(model, calibration, runs=runs) if calibration else table

    def calibrate(self, model: keras.Model, ratios: Sequence[float] = (0.25, 0.5, 0.75), runs: int = 30,
                  rounds: int = 3) -> "LatencyTable":
        """Fits ``T_full`` and ``k`` on measured whole models (see the module docstring).

        Measures ``model`` and, for each ratio, the uniform plan removing
        that fraction of every prunable group's channels
        (`kap.PrunePlan.uniform`), interleaved (`kap.measure_latencies`);
        then least squares of ``measured = T_full + k * raw`` with
        ``raw = sum_l [t_l(plan) - t_l(full)]``. A fit with ``k <= 0``
        (noise swamping the savings) keeps ``k = 1`` with a warning.

        Returns:
            the table itself, calibrated.
        """
        ratios = _check_ratios(ratios)
        graph = DependencyGraph(model)
        self.bind(model, graph)
        plans = [PrunePlan({})] + [PrunePlan.uniform(graph, r) for r in ratios]
        raw = np.array([self._raw_change(plan) for plan in plans])
        measured = np.array(_measure_plans(model, graph, plans, self.num_threads, runs, rounds))
        self.full_ms, self.savings_scale = fit_savings_scale(raw, measured)
        if self.savings_scale <= 0:
            warnings.warn(f"Latency calibration of '{model.name}' fitted a savings scale of {self.savings_scale:.3g} "
                          f"(the measured latencies {np.round(measured, 4).tolist()} do not fall as the table "
                          "predicts); keeping 1.", stacklevel=2)
            self.full_ms, self.savings_scale = float(measured[0]), 1.0
        self.calibration = {"ratios": list(ratios), "measured_ms": measured.tolist(), "raw_predicted_ms": raw.tolist()}
        return self

    # -- estimating -------------------------------------------------------------
    def bind(self, model: keras.Model, graph: DependencyGraph | None = None) -> "LatencyTable":
        """Attaches the model whose plans `estimate` prices (checks the table was built for it)."""
        graph = graph or DependencyGraph(model)
        shapes = call_shapes(model)
        signatures = {r.name: _signature(r, shapes[r.name][0][0][0]) for r in _prunable_calls(graph)}
        if signatures != self.layers:
            raise ValueError(
                f"This latency table was built for model '{self.model_name}' with prunable layers "
                f"{sorted(self.layers)[:5]}..., not for model '{model.name}' ({sorted(signatures)[:5]}...: "
                "other layers, configurations or input shapes). "
                "Fix: build it with `LatencyTable.build(model)` on this model."
            )
        self._cost = PlanCost(model, graph)
        return self

    def estimate(self, plan: PrunePlan) -> float:
        """Estimated latency (ms) of ``apply_plan(model, plan)`` (see the module docstring)."""
        return self.full_ms + self.savings_scale * self._raw_change(plan)

    def _raw_change(self, plan: PrunePlan) -> float:
        """``sum_l [t_l(plan) - t_l(full)]`` over the layers the plan changes (ms, <= 0 for a pruning plan)."""
        if self._cost is None:
            raise ValueError("Call `table.bind(model)` before `estimate`: the table needs the model's graph.")
        change = 0.0
        for call in self._cost.pruned_calls(plan):
            signature = self.layers.get(call.record.name)
            if signature is None:
                continue
            timing = self.timings[signature]
            full_in, full_out = timing.in_widths[-1], timing.out_widths[-1]
            c_in, c_out = call.in_shapes[0][-1], call.out_shapes[0][-1]
            change += timing.at(c_in, c_out) - timing.at(full_in, full_out)
        return change

    # -- files --------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The table as plain JSON values (`save` writes it)."""
        return {"model": self.model_name, "full_ms": self.full_ms, "num_threads": self.num_threads,
                "savings_scale": self.savings_scale, "calibration": self.calibration,
                "layers": self.layers, "timings": {k: dataclasses.asdict(v) for k, v in self.timings.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the table as JSON."""
        pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        """Reads a table written by `save`."""
        data = json.loads(pathlib.Path(path).read_text())
        timings = {k: LayerTiming(**v) for k, v in data["timings"].items()}
        return cls(data["model"], data["full_ms"], data["layers"], timings, data.get("num_threads", 1),
                   data.get("savings_scale", 1.0), data.get("calibration"))


def _check_ratios(ratios: Any) -> tuple[float, ...]:
    """The calibration ratios as floats; raises unless they are fractions of channels removed, in (0, 1)."""
    try:
        values = tuple(float(r) for r in ratios)
    except (TypeError, ValueError):
        values = ()
    if not values or any(not 0 < r < 1 for r in values):
        raise ValueError(f"`ratios` (`calibration`) are fractions of channels removed, in (0, 1), e.g. (0.25, 0.5, "
                         f"0.75). Received: {ratios!r}")
    return values


def _prunable_calls(graph: DependencyGraph) -> list:
    """First calls of one-input layers with a kernel (convolutions, Dense) that prunable channels cross."""
    calls = []
    for record in graph.records:
        layer = record.operation
        if not record.first_call or not isinstance(layer, keras.layers.Layer):
            continue
        if not any(len(w.shape) >= 2 for w in layer.weights):
            continue
        if len(record.call.in_layouts) != 1 or len(record.out_layouts) != 1:
            continue
        if is_prunable_layout(graph, record.call.in_layouts[0]) or is_prunable_layout(graph, record.out_layouts[0]):
            calls.append(record)
    return calls


def _grid(record, graph: DependencyGraph, scales: Sequence[float]) -> tuple[list[int], list[int]]:
    """Input and output widths to measure; one width where the layer's config cannot set it or it is not pruned."""
    in_layout, out_layout = record.call.in_layouts[0], record.out_layouts[0]
    config = record.operation.get_config()
    in_widths = [len(in_layout)]
    if is_prunable_layout(graph, in_layout):
        in_widths = sorted({_scaled(s, len(in_layout)) for s in scales})
    out_widths = [len(out_layout)]
    grouped = config.get("groups", 1) > 1  # a depthwise Conv2D(groups=C): its outputs follow its inputs
    if is_prunable_layout(graph, out_layout) and any(k in config for k in _WIDTH_KEYS) and not grouped:
        out_widths = sorted({_scaled(s, len(out_layout)) for s in scales})
    return in_widths, out_widths


def _signature(record, in_shape: tuple) -> str:
    config = {k: v for k, v in record.operation.get_config().items() if k not in ("name", "trainable")}
    return json.dumps({"class": type(record.operation).__name__, "config": config, "input": list(in_shape[1:])},
                      sort_keys=True, default=str)


def _one_layer_model(record, in_shape: tuple, c_in: int, c_out: int) -> keras.Model:
    """The layer alone on ``c_in`` input channels with ``c_out`` outputs (a grouped convolution keeps its
    channels per group, so its groups and outputs follow ``c_in``)."""
    config = dict(record.operation.get_config())
    config.pop("name", None)
    for key in _WIDTH_KEYS:
        if key in config:
            config[key] = c_out
    groups = config.get("groups", 1)
    if groups > 1:
        full_in = int(in_shape[-1])
        config["groups"] = max(1, c_in // (full_in // groups))
        config["filters"] = record.operation.get_config()["filters"] // groups * config["groups"]
    inputs = keras.Input(tuple(int(d) for d in in_shape[1:-1]) + (c_in,))
    return keras.Model(inputs, type(record.operation).from_config(config)(inputs))


def _scaled(scale: float, width: int) -> int:
    return max(1, int(round(scale * width)))


def _interp(x: float, xs: Sequence[int], ys: np.ndarray) -> float:
    xs = np.asarray(xs, float)
    ys = np.asarray(ys, float)
    if len(xs) == 1:
        return float(ys[0])
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = int(np.searchsorted(xs, x)) - 1
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + t * (ys[i + 1] - ys[i]))


@dataclasses.dataclass(frozen=True)
class LatencyCheck:
    """How well a `LatencyTable` predicts measured latencies.

    Attributes:
        predicted_ms, measured_ms: per model, in order.
        correlation: Pearson correlation of the two (nan for fewer than 2 models).
        mean_relative_error: mean of ``|predicted - measured| / measured``.
        max_relative_error: the largest of those.
    """

    predicted_ms: tuple[float, ...]
    measured_ms: tuple[float, ...]
    correlation: float
    mean_relative_error: float
    max_relative_error: float


def check_latency(table: LatencyTable, model: keras.Model, plans: Sequence[PrunePlan], runs: int = 50,
                  rounds: int = 5) -> LatencyCheck:
    """Converts ``apply_plan(model, plan)`` for every plan, measures them interleaved and compares with the table."""
    graph = DependencyGraph(model)
    table.bind(model, graph)
    predicted = [table.estimate(plan) for plan in plans]
    measured = _measure_plans(model, graph, plans, table.num_threads, runs, rounds)
    errors = np.abs(np.subtract(predicted, measured)) / np.asarray(measured)
    correlation = float(np.corrcoef(predicted, measured)[0, 1]) if len(plans) > 1 else float("nan")
    return LatencyCheck(tuple(predicted), tuple(measured), correlation, float(errors.mean()), float(errors.max()))


def fit_savings_scale(raw: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """Least squares ``measured_i = T_full + k * raw_i``; returns ``(T_full, k)``.

    ``raw_i = sum_l [t_l(plan_i) - t_l(full)]`` is the table's uncalibrated
    change for plan ``i`` (see the module docstring).
    """
    raw, measured = np.asarray(raw, float), np.asarray(measured, float)
    if raw.shape != measured.shape or raw.size < 2 or np.ptp(raw) == 0:
        raise ValueError(f"Fitting T_full and k needs at least two plans with different table changes. "
                         f"Received: raw={raw.tolist()}, measured={measured.tolist()}")
    (full_ms, scale), *_ = np.linalg.lstsq(np.stack([np.ones_like(raw), raw], axis=1), measured, rcond=None)
    return float(full_ms), float(scale)


def _measure_plans(model: keras.Model, graph: DependencyGraph, plans: Sequence[PrunePlan], num_threads: int,
                   runs: int, rounds: int) -> list[float]:
    """Median LiteRT latency (ms) of ``apply_plan(model, plan)`` for every plan, measured interleaved."""
    from keras_autoprune.export.convert import convert
    from keras_autoprune.export.latency import measure_latencies
    from keras_autoprune.surgery.rebuild import apply_plan

    with tempfile.TemporaryDirectory() as scratch:
        paths = []
        for i, plan in enumerate(plans):
            content, _ = convert(apply_plan(model, plan, graph=graph), None, [])
            paths.append(pathlib.Path(scratch) / f"candidate_{i}.tflite")
            paths[-1].write_bytes(content)
        return [r.median_ms for r in measure_latencies(paths, num_threads=num_threads, runs=runs, rounds=rounds)]
