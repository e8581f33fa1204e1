"""The `kap.PruningReport` of a RED-compressed model against its original.

`PruningReport.from_models` requires both models to have the same layers;
RED removes the BatchNormalizations it folds, so the rows are built here
with the report's own helpers (`keras_autoprune.layer_comparison`): layers
are matched by qualified name, a removed layer has 0 FLOPs and 0 parameters
after, and a layer replaced by a block (stage 3, ``name/inner`` layers)
gets the block's summed costs. The totals still equal `kap.count_flops` /
`kap.count_params` of the two models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from keras_autoprune.layer_comparison import _channels_by_layer, _costs_by_layer, _merge_replaced
from keras_autoprune.report import LayerChange, PruningReport
from keras_autoprune.surgery import PrunePlan


def red_report(original: keras.Model, compressed: keras.Model, plan: PrunePlan | None = None,
               extra: Mapping[str, Any] | None = None) -> PruningReport:
    """Rows for every costed layer of ``original`` (and any new costed layer)."""
    before = _costs_by_layer(original, None)
    after = _merge_replaced(before, _costs_by_layer(compressed, None))
    channels_before, channels_after = _channels_by_layer(original), _channels_by_layer(compressed)
    rows = []
    for name, (kind, flops, params) in before.items():
        _, flops_after, params_after = after.get(name, (kind, 0, 0))
        if flops or params or flops_after or params_after:
            width = channels_after.get(name, channels_before.get(name)) if name in after else None
            rows.append(LayerChange(name, kind, channels_before.get(name), width, flops, flops_after, params, params_after))
    for name, (kind, flops, params) in after.items():
        if name not in before and (flops or params):
            rows.append(LayerChange(name, kind, None, channels_after.get(name), 0, flops, 0, params))
    return PruningReport(rows, plan=plan, extra=extra)
