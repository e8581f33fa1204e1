"""`PruningReport`: what pruning removed, layer by layer, and in total.

A report compares an original model with its pruned version (as returned by
`apply_plan`). Layers are matched by their qualified names (``outer/inner``
inside nested models, as `flops_table` names them). For each layer it holds:

- output channels before / after: the number of filters or units for layers
  that have them (``Conv*``, ``Conv*Transpose``, ``SeparableConv*``,
  ``Dense``), otherwise the channel axis of the layer's first output (the
  last axis; axis 1 for ``channels_first`` layers; the ``axis`` of
  normalisation and concatenation layers); ``None`` where the output has no
  axis;
- FLOPs before / after, summed over every call of the layer (see
  `keras_autoprune.flops_formulas` for what each layer costs);
- parameters before / after (each variable counted once);
- the kept ratios ``after / before`` of FLOPs and channels (``None`` where
  the value before is 0).

**Only layers with FLOPs or parameters (before or after pruning) appear in
the table**; activations, reshapes and other free layers are left out. The
totals cover the whole model: they equal `count_flops` and `count_params`.

The per-layer measurements and the matching of the two models are in
`keras_autoprune.layer_comparison`, the figure of `PruningReport.plot` in
`keras_autoprune.report_plot`.

Example:

>>> report = PruningReport.from_models(model, slim, plan)  # doctest: +SKIP
>>> report                                                # doctest: +SKIP
PruningReport: FLOPs 27.5% kept (113.4K -> 31.2K), params 28.2% kept (1.5K -> 420)
>>> report.to_markdown()                                  # doctest: +SKIP
>>> report.plot("report.png")                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from keras_autoprune.layer_comparison import (
    _channels_by_layer,
    _check_layers,
    _check_outputs,
    _costs_by_layer,
    _merge_replaced,
)
from keras_autoprune.report_plot import plot_report
from keras_autoprune.surgery import FactorizationPlan, PrunePlan


@dataclasses.dataclass(frozen=True)
class LayerChange:
    """One layer of a `PruningReport`.

    Attributes:
        layer: qualified name (``outer_model/inner_layer`` in nested models).
        kind: class name of the layer or op (``"Conv2D"``).
        channels_before: output channels of the original layer (``None``
            where its output has no channel axis).
        channels_after: output channels of the pruned layer.
        flops_before: FLOPs of the original layer, summed over its calls.
        flops_after: FLOPs of the pruned layer, summed over its calls.
        params_before: parameters of the original layer.
        params_after: parameters of the pruned layer.
    """

    layer: str
    kind: str
    channels_before: int | None
    channels_after: int | None
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int

    @property
    def channels_kept(self) -> float | None:
        """``channels_after / channels_before`` (``None`` if unknown or 0)."""
        if self.channels_before is None or self.channels_after is None:
            return None
        return _ratio(self.channels_after, self.channels_before)

    @property
    def flops_kept(self) -> float | None:
        """``flops_after / flops_before`` (``None`` when ``flops_before`` is 0)."""
        return _ratio(self.flops_after, self.flops_before)

    @property
    def params_kept(self) -> float | None:
        """``params_after / params_before`` (``None`` when ``params_before`` is 0)."""
        return _ratio(self.params_after, self.params_before)

    def to_dict(self) -> dict[str, Any]:
        """The fields and the three kept ratios, as plain Python values."""
        return {
            **dataclasses.asdict(self),
            "channels_kept": self.channels_kept,
            "flops_kept": self.flops_kept,
            "params_kept": self.params_kept,
        }


class PruningReport:
    """Per-layer and total effect of pruning a model.

    Build it with `PruningReport.from_models`; the constructor takes rows
    that are already computed.

    Args:
        layers: one `LayerChange` per layer with FLOPs or parameters, in
            execution order.
        plan: the `PrunePlan` that was applied, if known.
        extra: facts about the run shown with the report (method name,
            budget, statistics seconds, ...). Keys must be strings; values
            are stored as plain JSON values (NumPy scalars and arrays are
            converted, other objects are stored as ``str(value)``).

    Attributes:
        layers: tuple of `LayerChange`.
        plan: the `PrunePlan`, or ``None``.
        extra: dict of run facts (a copy of ``extra``).
    """

    def __init__(
        self,
        layers: Sequence[LayerChange],
        plan: PrunePlan | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        if plan is not None and not isinstance(plan, (PrunePlan, FactorizationPlan)):
            raise TypeError(
                "Expected `plan` to be a `kap.PrunePlan`, a `kap.FactorizationPlan` or None. "
                f"Received: plan of type {type(plan).__name__}"
            )
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(
                "Expected `extra` to be a dict of run facts, e.g. "
                "`{'method': 'nap', 'statistics_seconds': 1.5}`, or None. "
                f"Received: extra of type {type(extra).__name__}"
            )
        self.layers: tuple[LayerChange, ...] = tuple(layers)
        self.plan = plan
        self.extra: dict[str, Any] = _plain(dict(extra or {}), "extra")

    @classmethod
    def from_models(
        cls,
        original: keras.Model,
        pruned: keras.Model,
        plan: PrunePlan | None = None,
        extra: Mapping[str, Any] | None = None,
        input_shape: Any = None,
        removed_layers: bool = False,
    ) -> "PruningReport":
        """Compares ``pruned`` with the ``original`` it was made from.

        Args:
            original: the model before pruning (Sequential or Functional).
            pruned: the model after pruning, of the same architecture (same
                qualified layer names and kinds, same output shapes), e.g.
                ``apply_plan(original, plan)``. A layer replaced by a block of
                layers (`kap.replace_layers`, `kap.FactorizationPlan.apply`)
                gets one row with the block's FLOPs and parameters summed and
                its output width.
            plan: the `PrunePlan` or `FactorizationPlan` that was applied, if known.
            extra: run facts to store and show (see the class docstring).
            input_shape: input shape without the batch axis, for models
                whose inputs have unknown dimensions (see `count_flops`).
            removed_layers: allow layers of ``original`` to be gone from
                ``pruned`` (rows with 0 FLOPs and parameters after, width
                None) and new costed layers in it (rows with 0 before), as
                `kap.red.compress` makes by folding BatchNormalizations.

        Returns:
            A `PruningReport`.

        Raises:
            ValueError: when the two models do not share the same layer names
                and kinds, or their outputs have different shapes.
            UnsupportedModelError: for subclassed models.
        """
        _check_outputs(original, pruned)
        before = _costs_by_layer(original, input_shape)
        after = _merge_replaced(before, _costs_by_layer(pruned, input_shape))
        if not removed_layers:
            _check_layers(before, after)
        channels_before = _channels_by_layer(original)
        channels_after = _channels_by_layer(pruned)
        layers = []
        for name, (kind, flops, params) in before.items():
            _, flops_after, params_after = after.get(name, (kind, 0, 0))
            if flops or params or flops_after or params_after:
                width = channels_after.get(name, channels_before.get(name)) if name in after else None
                layers.append(LayerChange(name, kind, channels_before.get(name), width, flops, flops_after, params, params_after))
        for name, (kind, flops, params) in after.items():
            if name not in before and (flops or params):
                layers.append(LayerChange(name, kind, None, channels_after.get(name), 0, flops, 0, params))
        return cls(layers, plan=plan, extra=extra)

    # -- totals -------------------------------------------------------------
    @property
    def totals(self) -> dict[str, Any]:
        """Whole-model FLOPs and parameters before / after and the kept fractions.

        Keys: ``flops_before``, ``flops_after``, ``flops_kept``,
        ``params_before``, ``params_after``, ``params_kept``; the counts equal
        `count_flops` / `count_params` of the two models.
        """
        totals: dict[str, Any] = {}
        for what in ("flops", "params"):
            before = sum(getattr(row, f"{what}_before") for row in self.layers)
            after = sum(getattr(row, f"{what}_after") for row in self.layers)
            totals.update({f"{what}_before": before, f"{what}_after": after,
                           f"{what}_kept": _ratio(after, before)})
        return totals

    @property
    def flops_kept(self) -> float | None:
        """Fraction of the FLOPs kept, ``flops_after / flops_before``."""
        return self.totals["flops_kept"]

    @property
    def params_kept(self) -> float | None:
        """Fraction of the parameters kept, ``params_after / params_before``."""
        return self.totals["params_kept"]

    # -- output -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Returns the report as JSON-serialisable plain Python values.

        Returns:
            ``{"layers": [...], "totals": {...}, "plan": ..., "extra": {...}}``:
            ``layers`` holds `LayerChange.to_dict` rows, ``plan`` the
            `PrunePlan.to_json` content (or ``None``). Ratios whose
            denominator is 0 are ``None``.
        """
        return {
            "layers": [row.to_dict() for row in self.layers],
            "totals": self.totals,
            "plan": None if self.plan is None else json.loads(self.plan.to_json()),
            "extra": dict(self.extra),
        }

    def to_markdown(self) -> str:
        """Returns a Markdown table, one row per layer, and a totals line.

        Only layers with FLOPs or parameters are listed (a note says so);
        the plan's size and the run facts of ``extra`` follow the totals.
        """
        header = ["layer", "kind", "channels before", "channels after", "channels kept",
                  "FLOPs before", "FLOPs after", "FLOPs kept", "params before", "params after"]
        lines = ["| " + " | ".join(header) + " |",
                 "| --- | --- |" + " ---: |" * (len(header) - 2)]
        for r in self.layers:
            cells = [r.layer.replace("|", "\\|"), r.kind, _count(r.channels_before),
                     _count(r.channels_after), _percent(r.channels_kept), _count(r.flops_before),
                     _count(r.flops_after), _percent(r.flops_kept), _count(r.params_before),
                     _count(r.params_after)]
            lines.append("| " + " | ".join(cells) + " |")
        t = self.totals
        lines += [
            "",
            f"**Total:** FLOPs {_count(t['flops_before'])} → {_count(t['flops_after'])} "
            f"({_percent(t['flops_kept'])} kept); params {_count(t['params_before'])} → "
            f"{_count(t['params_after'])} ({_percent(t['params_kept'])} kept).",
            "",
            "Only layers with FLOPs or parameters are listed; the totals cover the whole model.",
        ]
        if self.plan is not None:
            lines += ["", "Plan: " + (f"kept channels chosen for {len(self.plan.kept)} channel group(s)."
                                      if isinstance(self.plan, PrunePlan)
                                      else self.plan.describe())]
        if self.extra:
            lines += ["", "Run: " + "; ".join(f"{k}: {v}" for k, v in self.extra.items()) + "."]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, dpi: int = 100) -> str:
        """Writes a PNG with two panels and returns its path.

        Left: the kept channel ratio of each layer (bars). Right: FLOPs
        before and after per layer (grouped bars, on a log scale when the
        largest layer costs over 100 times the smallest). Layers run top to
        bottom in execution order; the figure grows with their number, so
        labels stay readable up to about 60 layers. Draws on matplotlib's
        Agg canvas: no display needed, the pyplot state is untouched.

        Args:
            path: where to write the PNG.
            dpi: resolution.

        Returns:
            ``path`` as a string.

        Raises:
            ImportError: when matplotlib is not installed.
        """
        return plot_report(self, path, dpi)

    def __repr__(self) -> str:
        t = self.totals
        return (
            f"PruningReport: FLOPs {_percent(t['flops_kept'])} kept ({_human(t['flops_before'])} -> "
            f"{_human(t['flops_after'])}), params {_percent(t['params_kept'])} kept "
            f"({_human(t['params_before'])} -> {_human(t['params_after'])})"
        )

    __str__ = __repr__


def _ratio(after: int, before: int) -> float | None:
    return None if before == 0 else after / before


def _percent(ratio: float | None) -> str:
    """``"48.3%"``; a ratio that is not exactly 1 (or 0) but rounds to it reads ``"<100.0%"``, ``">100.0%"`` (``">0.0%"``)."""
    if ratio is None:
        return "n/a"
    text = f"{100 * ratio:.1f}%"
    if text == "100.0%" and ratio != 1:
        return ("<" if ratio < 1 else ">") + text
    return ">0.0%" if text == "0.0%" and ratio > 0 else text


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _human(value: int) -> str:
    """``950``, ``12.3K``, ``6.2M``, ``4.1G``: the largest unit in which the value, rounded to one decimal, is >= 1
    (``999,950`` is ``1.0M``, not ``1000.0K``)."""
    for power, unit in ((4, "T"), (3, "G"), (2, "M"), (1, "K")):
        text = f"{value / 1000**power:.1f}"
        if abs(float(text)) >= 1 and abs(value) >= 1000 ** (power - 1) * 999.5:
            return f"{text}{unit}"
    return str(value)


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON-serialisable Python values (see `PruningReport`)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(
                    f"Expected string keys in `{where}`, so that the report is JSON. "
                    f"Received: key {key!r} of type {type(key).__name__}"
                )
        return {key: _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, where) for item in value]
    return str(value)
