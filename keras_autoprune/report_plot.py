"""The PNG figure of a `PruningReport` (`PruningReport.plot`).

Two panels: left, the kept channel ratio of each layer (bars); right, FLOPs
before and after per layer (grouped bars, on a log scale when the largest
layer costs over ``_LOG_SPREAD`` = 100 times the smallest). Layer names
longer than ``_NAME_WIDTH`` = 32 characters are shown as head…tail.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from keras_autoprune.report import PruningReport

_LOG_SPREAD = 100  # plot FLOPs on a log scale when max / min (nonzero) exceeds this
_NAME_WIDTH = 32  # longer layer names are plotted as head…tail


def plot_report(report: PruningReport, path: str | os.PathLike, dpi: int = 100) -> str:
    """Writes ``report`` as a PNG to ``path`` and returns ``path`` (see `PruningReport.plot`)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "`PruningReport.plot` needs matplotlib, which is not installed. "
            'Fix: `pip install "keras-autoprune[demo]"`.'
        ) from error
    rows = report.layers
    y = np.arange(len(rows))
    font = 8 if len(rows) <= 30 else 6
    figure = Figure(figsize=(12, max(3.0, 0.22 * len(rows) + 1.6)), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, sharey=True)

    ratios = np.array([np.nan if r.channels_kept is None else r.channels_kept for r in rows])
    left.barh(y, ratios, height=0.7, color="tab:blue")
    left.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    left.set_xlim(0, max(1.05, float(np.nanmax(ratios, initial=0)) * 1.05))
    left.set_xlabel("output channels kept (after / before)")
    left.set_yticks(y, [_short_name(r.layer) for r in rows], fontsize=font)
    left.set_ylim(len(rows) - 0.5, -0.5)  # first layer on top, no empty margins

    before = np.array([r.flops_before for r in rows], float)
    after = np.array([r.flops_after for r in rows], float)
    positive = np.concatenate([before, after])
    positive = positive[positive > 0]
    if positive.size and positive.max() > _LOG_SPREAD * positive.min():
        right.set_xscale("log")
    right.barh(y - 0.2, before, height=0.4, color="tab:gray", label="before")
    right.barh(y + 0.2, after, height=0.4, color="tab:orange", label="after")
    right.set_xlabel("FLOPs per layer")
    right.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=8, frameon=False)
    figure.suptitle(str(report), fontsize=10)
    figure.savefig(path, format="png", dpi=dpi)
    return os.fspath(path)


def _short_name(name: str) -> str:
    """``name``, or its head and tail around "…" when it is too long to plot."""
    if len(name) <= _NAME_WIDTH:
        return name
    head = (_NAME_WIDTH - 1) // 2
    return name[:head] + "…" + name[-(_NAME_WIDTH - 1 - head):]
