"""`apply_plan` and `mask_plan`: the two ways to execute a `PrunePlan`.

Both clone the model with `keras_autoprune.surgery.clone.clone_layers`
(recursively through nested models). A layer the plan does not touch is
copied as it is (state and weights, never rebuilt from its config), so a
custom or non-serialisable layer only blocks the channels around itself.

- `apply_plan` rebuilds every touched layer from a sliced config (fewer
  filters/units, fewer GroupNormalization groups, a new Reshape target) and
  assigns the sliced weights (by variable path, else by position with shape
  checks): the channels are physically gone. A touched `keras.ops` node
  whose arguments name channel positions (split points, slice bounds, take
  indices) is called with rewritten arguments (`LayerHandler.prune_operation`).
- `mask_plan` copies every layer and zeroes the removed channels'
  parameters in the touched ones (what masks do during training).

Contract, checked by the tests on every handler and architecture:
``apply_plan(m, p)(x) == mask_plan(m, p)(x)`` to 1e-5 relative error.
The input model is never modified.
"""

from __future__ import annotations

import keras

from keras_autoprune.graph.dependency import DependencyGraph, graph_of
from keras_autoprune.graph.handlers import LayerHandler, get_handler
from keras_autoprune.surgery.clone import Nested, clone_layers, copy_layer, layer_from_config
from keras_autoprune.surgery.keep import layer_keeps
from keras_autoprune.surgery.plan import PrunePlan
from keras_autoprune.surgery.weights import layer_weights


def apply_plan(model: keras.Model, plan: PrunePlan, graph: DependencyGraph | None = None) -> keras.Model:
    """Returns a new model with the plan's removed channels physically removed.

    Args:
        model: a built Sequential or Functional model (left unchanged).
        plan: the channels to keep, per group.
        graph: ``DependencyGraph(model)`` if already built (saves time).

    Returns:
        A new model of the same kind (Sequential or Functional), same name,
        with smaller layers and copied (sliced, bias-folded) weights.

    Example:

    >>> graph = kap.DependencyGraph(model)                  # doctest: +SKIP
    >>> slim = kap.apply_plan(model, kap.PrunePlan.uniform(graph, 0.5), graph)  # doctest: +SKIP
    """
    return _execute(model, plan, graph, masking=False)


def mask_plan(model: keras.Model, plan: PrunePlan, graph: DependencyGraph | None = None) -> keras.Model:
    """Returns a same-architecture copy with the removed channels zeroed.

    Zeroed are: the weights creating a removed channel (kernel columns and
    bias of convolutions/Dense, depthwise slices), the per-channel
    normalisation parameters that would otherwise turn 0 into a constant
    (BatchNormalization gamma/beta/moving mean, GroupNormalization
    gamma/beta), and, where a removed channel still carries a non-zero value
    that the pruned model cannot fold into a bias, the weights reading it.
    """
    return _execute(model, plan, graph, masking=True)


def _execute(model, plan: PrunePlan, graph: DependencyGraph | None, masking: bool) -> keras.Model:
    if not isinstance(plan, PrunePlan):
        raise TypeError(f"Expected a `kap.PrunePlan`. Received: plan of type {type(plan).__name__}")
    graph = graph_of(model, graph)
    removed = plan.removed_atoms(graph)
    keeps = layer_keeps(graph, removed)

    def rebuild(layer):
        keep = keeps.get(id(layer))
        handler = get_handler(layer)
        if keep is None or (type(handler).prune is LayerHandler.prune and not layer.weights):
            return copy_layer(layer)  # untouched or unchanged: copied as it is, never rebuilt from its config
        source = layer_weights(layer)
        if masking:
            new_layer, _ = copy_layer(layer)
            return new_layer, handler.mask(layer, source, keep)
        config, weights = handler.prune(layer, layer.get_config(), source, keep)
        return layer_from_config(layer, config), _in_source_order(weights, source)

    calls = {id(r.operation): r for r in graph.records if r.first_call}

    def rebuild_op(operation):
        keep, record = keeps.get(id(operation)), calls.get(id(operation))
        if masking or keep is None or record is None:
            return operation  # masked: same architecture, same operations
        return record.handler.prune_operation(operation, record.call, keep)

    return clone_layers(model, rebuild, rebuild_op, nested_models(graph, None if masking else removed))


def nested_models(graph: DependencyGraph, removed: dict | None = None) -> Nested:
    """The ``nested`` hook of `clone_layers` for ``graph``'s nested models and traced custom layers.

    Each is cloned layer by layer in its place (a traced custom layer becomes
    its traced functional model), on inputs of their original widths, or
    without the channels that ``removed`` (``PrunePlan.removed_atoms``)
    marks.
    """

    def nested(layer):
        entry = graph.nested.get(id(layer))
        if entry is None:
            return None
        functional, layouts = entry
        shapes = [tuple(t.shape) for t in functional.inputs]
        if removed is not None:
            shapes = [s[:-1] + (int((~removed[l]).sum()),) if len(l) else s for s, l in zip(shapes, layouts)]
        return functional, shapes

    return nested


def _in_source_order(weights: dict, source: dict) -> dict:
    """``weights`` ordered like the original layer's variables (for positional matching)."""
    ordered = {key: weights[key] for key in source if key in weights}
    ordered.update((key, value) for key, value in weights.items() if key not in ordered)
    return ordered
