"""Approximate cost of each channel, for cost-aware ranking.

A layer's FLOPs (or parameters) are spread evenly over the positions of its
channel axis on each side it is pruned on; a channel's cost is the sum over
the group's members of ``cost_layer * positions_of_channel / width``. For a
convolution with ``C_in`` inputs and ``C_out`` outputs this is
``cost / C_out`` per output channel and ``cost / C_in`` per input channel:
the first-order saving of removing that channel alone.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_autoprune.accounting import flops_table
from keras_autoprune.graph.dependency import DependencyGraph


def channel_costs(model: keras.Model, graph: DependencyGraph, metric: str = "flops") -> dict[str, np.ndarray]:
    """``{group_id: per-channel cost}`` for every prunable group.

    Args:
        model: the model of ``graph``.
        graph: its dependency graph.
        metric: ``"flops"`` or ``"params"``.
    """
    per_layer: dict[str, float] = {}
    for row in flops_table(model):
        per_layer[row.layer] = per_layer.get(row.layer, 0.0) + float(getattr(row, metric))
    widths = {}
    for record in graph.records:
        if record.first_call:
            widths[(record.name, "input")] = [len(l) for l in record.call.in_layouts]
            widths[(record.name, "output")] = [len(l) for l in record.out_layouts]
    costs = {}
    for group in graph.prunable_groups:
        cost = np.zeros(group.size)
        for member in group.members:
            layer_cost = per_layer.get(member.layer, 0.0)
            width = widths.get((member.layer, member.side), [0])[member.tensor_index]
            if layer_cost and width:
                np.add.at(cost, member.channels, layer_cost / width)
        costs[group.id] = cost
    return costs
