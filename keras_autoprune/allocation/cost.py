"""Costs of channels and of plans.

`PlanCost`: the exact FLOPs / parameters of a plan's pruned model, computed
without building it.

`channel_costs`: approximate cost of each channel, for cost-aware ranking.

A layer's FLOPs (or parameters) are spread evenly over the positions of its
channel axis on each side it is pruned on; a channel's cost is the sum over
the group's members of ``cost_layer * positions_of_channel / width``. For a
convolution with ``C_in`` inputs and ``C_out`` outputs this is
``cost / C_out`` per output channel and ``cost / C_in`` per input channel:
about the first-order saving of removing that channel alone (exactly so on
the output side; on the input side slightly more, as the layer's bias and
activation, which an input channel does not cost, are spread too).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_autoprune.accounting import call_flops, call_shapes, flops_table, inputs_by_name
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.graph.handlers.matmul import rows_of
from keras_autoprune.surgery.keep import layer_keeps
from keras_autoprune.surgery.plan import PrunePlan
from keras_autoprune.surgery.weights import layer_weights


def channel_costs(model: keras.Model, graph: DependencyGraph, metric: str = "flops") -> dict[str, np.ndarray]:
    """``{group_id: per-channel cost}`` for every prunable group.

    A channel's cost is about the first-order saving of removing it alone (see the module docstring): the sum,
    over the layers its group touches, of ``layer cost / width`` of the side
    it sits on. A layer that passes channels through (its output carries
    its input's channels: a depthwise convolution, BatchNormalization, an
    element-wise ``Add``) saves its per-channel cost once, though the group
    holds the channel on its input and its output side; a layer that mixes
    channels (a convolution whose input and output a residual addition ties
    together) saves on both sides.

    Args:
        model: the model of ``graph``.
        graph: its dependency graph.
        metric: ``"flops"`` or ``"params"``.
    """
    check_metric(metric)
    per_layer: dict[str, float] = {}
    for row in flops_table(model):
        per_layer[row.layer] = per_layer.get(row.layer, 0.0) + float(getattr(row, metric))
    widths, passes_through = {}, set()
    for record in graph.records:
        if record.first_call:
            widths[(record.name, "input")] = [len(l) for l in record.call.in_layouts]
            widths[(record.name, "output")] = [len(l) for l in record.out_layouts]
            widths[(record.name, "internal")] = [len(l) for l in record.internal_layouts]
            if any(np.intersect1d(o, i).size for o in record.out_layouts for i in record.call.in_layouts):
                passes_through.add(record.name)
    costs = {}
    for group in graph.prunable_groups:
        cost = np.zeros(group.size)
        counted = set()
        for member in group.members:
            if member.layer in passes_through:
                if member.layer in counted:  # its other side holds the same channels: one saving, not two
                    continue
                counted.add(member.layer)
            layer_cost = per_layer.get(member.layer, 0.0)
            width = widths.get((member.layer, member.side), [0])[member.tensor_index]
            if layer_cost and width:
                np.add.at(cost, member.channels, layer_cost / width)
        costs[group.id] = cost
    return costs


class PlanCost:
    """Exact FLOPs / parameters of ``apply_plan(model, plan)`` without building it.

    Uses the same per-call formulas as `kap.count_flops` (`accounting.call_flops`)
    on the pruned shapes (each channel axis shortened to its kept positions)
    and on the pruned layer configs (`LayerHandler.prune`, without creating
    variables); parameters are the sizes of the pruned weights. About a
    hundred times faster than rebuilding the model, which matters when a
    budget is met by bisection.

    Args:
        model: the model of ``graph``.
        graph: its dependency graph.
        input_shape: for a model whose inputs have unknown sizes, the shape
            at which FLOPs are counted (as in `kap.count_flops`); parameters
            need none.
    """

    def __init__(self, model: keras.Model, graph: DependencyGraph, input_shape=None):
        self.graph = graph
        self._model, self._input_shape = model, input_shape
        self._call_shapes = None  # read on the first FLOPs count: parameters need no shapes
        self._weights = {id(r.operation): layer_weights(r.operation) for r in graph.records
                         if r.first_call and getattr(r.operation, "weights", None)}

    def __call__(self, plan: PrunePlan, metric: str = "flops") -> int:
        """Cost of the pruned model: ``"flops"`` or ``"params"``."""
        check_metric(metric)
        total = 0
        for call in self.pruned_calls(plan, shapes=metric != "params"):
            if metric == "params":
                if call.record.first_call:
                    total += sum(int(np.prod(w.shape)) for w in call.weights.values())
            else:
                total += call_flops(call.layer, call.in_shapes, call.out_shapes, inputs_by_name(call.layer, call.record.call))
        return total

    def pruned_calls(self, plan: PrunePlan, shapes: bool = True):
        """Every call of the pruned model, as a `PrunedCall`, in execution order.

        Args:
            plan: the plan.
            shapes: also shorten the input and output shapes (skip it when
                only the weights are needed).
        """
        removed = plan.removed_atoms(self.graph)
        keeps = layer_keeps(self.graph, removed)
        calls: dict[str, int] = {}
        for record in self.graph.records:
            index = calls.get(record.name, 0)
            calls[record.name] = index + 1
            operation = record.operation
            keep = keeps.get(id(operation))
            weights = self._weights.get(id(operation), {})
            config = None
            if keep is not None and isinstance(operation, keras.layers.Layer):
                config, weights = record.handler.prune(operation, operation.get_config(), weights, keep)
            ins = outs = None
            if shapes:
                ins, outs = self._shapes()[record.name][index]
                ins = [_shorten(s, layout, removed) for s, layout in zip(ins, record.call.in_layouts)]
                outs = [_shorten(s, layout, removed) for s, layout in zip(outs, record.out_layouts)]
            layer = type(operation).from_config(config) if config is not None else operation
            yield PrunedCall(record, layer, ins, outs, weights)

    def _shapes(self) -> dict:
        if self._call_shapes is None:
            self._call_shapes = call_shapes(self._model, self._input_shape)
        return self._call_shapes


def check_metric(metric: str) -> None:
    """Raises ValueError unless ``metric`` is one that counting measures: ``"flops"`` or ``"params"``."""
    if metric not in ("flops", "params"):
        raise ValueError(f"Expected metric 'flops' or 'params' (counted from the model). Received: metric={metric!r}"
                         + (". A latency budget needs a measured latency table: kap.metapruning.search."
                            if metric == "latency" else "."))


@dataclasses.dataclass(frozen=True)
class PrunedCall:
    """One call of a plan's pruned model, computed without building it.

    Attributes:
        record: the original call (`DependencyGraph.records`).
        layer: the pruned layer (unbuilt, from the pruned config), or the
            original operation when the plan does not change it.
        in_shapes, out_shapes: pruned shapes (batch 1), or None when not asked for.
        weights: the pruned weights, keyed as `layer_weights` names them.
    """

    record: object
    layer: object
    in_shapes: list | None
    out_shapes: list | None
    weights: dict


def _shorten(shape: tuple, layout: np.ndarray, removed: np.ndarray) -> tuple:
    """``shape`` with the removed channels of its last axis (and of its second-to-last, `rows_of`) gone."""
    shape, rows = tuple(shape), rows_of(layout)
    if rows is not None and len(rows) and len(shape) >= 2 and removed[rows].any():
        shape = shape[:-2] + (int(np.sum(~removed[rows])),) + shape[-1:]
    if not len(layout) or not removed[layout].any():
        return shape
    return shape[:-1] + (int(np.sum(~removed[layout])),)
