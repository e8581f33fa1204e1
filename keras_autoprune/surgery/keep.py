"""Per-layer `LayerKeep`s for a set of removed channels.

Walks the graph's calls in topological order, propagating the value that
each removed channel carries in the masked model (0 after a zeroed
convolution; ``sigmoid(0) = 0.5`` after an activation; NaN when it is not a
constant). At every layer's inputs this decides, per removed channel:

- value 0: nothing to do, removing it changes nothing;
- a constant ``c`` and a layer that can fold it: `prune` adds ``c``'s
  contribution to the bias (``LayerKeep.fold``);
- anything else: `mask` zeroes the weights reading it, so both models ignore
  it (``LayerKeep.zero_rows``).
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.graph.handlers import LayerKeep


def layer_keeps(graph: DependencyGraph, removed: np.ndarray) -> dict[int, LayerKeep]:
    """``{id(layer): LayerKeep}`` for every layer touched by ``removed``.

    Args:
        graph: the model's dependency graph.
        removed: boolean array over the graph's atoms (see
            `PrunePlan.removed_atoms`).
    """
    values: dict[int, np.ndarray] = {}
    keeps: dict[int, LayerKeep] = {}

    def value_of(key: int, width: int) -> np.ndarray:  # records hold resolved keys (`DependencyGraph._walk`)
        return values.get(key, np.full(width, np.nan))

    for record in graph.records:
        in_removed = [removed[layout] for layout in record.call.in_layouts]
        out_removed = [removed[layout] for layout in record.out_layouts]
        internal_removed = [removed[layout] for layout in record.internal_layouts]
        if not any(r.any() for r in in_removed + out_removed + internal_removed):
            continue
        in_values = [value_of(k, len(l)) for k, l in zip(record.input_keys, record.call.in_layouts)]
        out_values = record.handler.constants(record.operation, record.call, in_values)
        values.update(zip(record.output_keys, out_values))

        can_fold = record.handler.can_fold(record.operation)
        fold, zero_rows = [], []
        for gone, value in zip(in_removed, in_values):
            foldable = gone & np.isfinite(value) & (value != 0) & can_fold
            fold.append(np.where(foldable, value, 0.0))
            zero_rows.append(gone & ~foldable & ~(value == 0))
        key = id(record.operation)
        if key not in keeps:
            keeps[key] = LayerKeep(
                inputs=[~r for r in in_removed],
                outputs=[~r for r in out_removed],
                fold=fold,
                zero_rows=zero_rows,
                internal=[~r for r in internal_removed],
                call=record.call,
            )
        else:  # a shared layer: fold only what every call folds identically
            first = keeps[key]
            for i, (f, z) in enumerate(zip(fold, zero_rows)):
                differs = first.fold[i] != f
                first.zero_rows[i] |= z | differs
                first.fold[i] = np.where(differs, 0.0, first.fold[i])
    return keeps
