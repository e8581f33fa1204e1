"""Data-free channel importance used by `PrunePlan.uniform`."""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.surgery.weights import layer_weights


def channel_l1(graph: DependencyGraph) -> dict[str, np.ndarray]:
    """L1 norm of the weights creating each channel, per group.

    ``score_c = sum over layers creating channel c of sum |W[..., c]|`` (for
    a convolution: the whole filter producing output channel c). Groups tied
    by a residual Add sum the filters of every branch. Internal channels
    (attention heads) score the L1 norm of their weights
    (`LayerHandler.internal_l1`).

    Returns:
        ``{group_id: array of shape (size,)}`` for every group.
    """
    scores = {group.id: np.zeros(group.size) for group in graph.groups}
    for record in graph.records:
        if not record.first_call or not getattr(record.operation, "weights", None):
            continue
        weights = layer_weights(record.operation)
        pairs = list(zip(record.internal_layouts, record.handler.internal_l1(record.operation, weights)))
        if record.out_layouts:
            pairs.append((record.out_layouts[0], record.handler.output_l1(record.operation, weights)))
        for layout, l1 in pairs:
            if l1 is None:
                continue
            groups = graph.atom_group[layout]
            for g in np.unique(groups).tolist():
                at = groups == g
                np.add.at(scores[graph.groups[g].id], graph.atom_channel[layout[at]], l1[at])
    return scores
