"""Two models compared layer by layer, by qualified name, for `PruningReport`.

Layers are matched by their qualified names (``outer/inner`` inside nested
models, as `flops_table` names them). This module holds what is measured per
layer and how the two sides are matched:

- `_costs_by_layer`: ``{name: (kind, FLOPs summed over every call, params)}``
  from `flops_table` (see `keras_autoprune.flops_formulas` for what each
  layer costs);
- `_channels_by_layer`: ``{name: output channels}``, the number of filters
  or units, else the size of the first output's channel axis (the rule is
  spelled out in `keras_autoprune.report`);
- `_merge_replaced`: a layer replaced by a block (``name/inner`` layers,
  `kap.replace_layers`) gets the block's summed costs;
- `_check_outputs`, `_check_layers`: the two models must have the same
  outputs and the same layer names and kinds.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_autoprune.accounting import flops_table
from keras_autoprune.graph.dependency import check_model


def _costs_by_layer(model: keras.Model, input_shape: Any) -> dict[str, tuple[str, int, int]]:
    """``{qualified name: (kind, FLOPs over all calls, params)}``, in execution order."""
    costs: dict[str, tuple[str, int, int]] = {}
    for row in flops_table(model, input_shape):
        _, flops, params = costs.get(row.layer, (row.kind, 0, 0))
        costs[row.layer] = (row.kind, flops + row.flops, params + row.params)
    return costs


def _merge_replaced(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, tuple]:
    """Folds the rows of a replacement block (``name/inner``, `kap.replace_layers`) into the layer ``name`` it replaced."""
    merged: dict[str, tuple] = {}
    for name, (kind, flops, params) in after.items():
        owner = next((prefix for prefix in _prefixes(name) if prefix in before and prefix not in after), None)
        if owner is None:
            merged[name] = (kind, flops, params)
            continue
        _, flops_sum, params_sum = merged.get(owner, (before[owner][0], 0, 0))
        merged[owner] = (before[owner][0], flops_sum + flops, params_sum + params)
    return merged


def _prefixes(name: str) -> list[str]:
    """``"a/b/c"`` -> ``["a/b", "a"]``: the layers a qualified name is nested in, innermost first."""
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _channels_by_layer(model: keras.Model, prefix: str = "") -> dict[str, int | None]:
    """``{qualified name: output channels}`` (see `keras_autoprune.report`)."""
    channels: dict[str, int | None] = {}
    for op in check_model(model).operations:
        if isinstance(op, keras.Model):
            channels.update(_channels_by_layer(op, f"{prefix}{op.name}/"))
        else:
            channels[prefix + op.name] = _output_channels(op)
    return channels


def _output_channels(op: Any) -> int | None:
    """Filters or units, else the size of the output's channel axis (or None)."""
    for width in ("filters", "units"):
        if isinstance(getattr(op, width, None), int):
            return getattr(op, width)
    try:
        shape = tuple(keras.tree.flatten(op.output)[0].shape)
    except (AttributeError, IndexError, ValueError):
        return None
    axis = getattr(op, "axis", None)
    if not isinstance(axis, int):
        axis = 1 if getattr(op, "data_format", None) == "channels_first" else -1
    if not shape or not -len(shape) <= axis < len(shape) or shape[axis] is None:
        return None
    return int(shape[axis])


def _check_outputs(original: keras.Model, pruned: keras.Model) -> None:
    shapes_before, shapes_after = ([tuple(t.shape[1:]) for t in check_model(m).outputs]
                                   for m in (original, pruned))
    if shapes_before != shapes_after:
        raise ValueError(
            "Expected `pruned` to have the same outputs as `original` (pruning never "
            "changes a model's outputs). Received: output shapes "
            f"original={shapes_before}, pruned={shapes_after} (without the batch axis). "
            "Fix: pass the model that `pruned` was made from, e.g. "
            "`PruningReport.from_models(model, apply_plan(model, plan))`."
        )


def _check_layers(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    only_before = [name for name in before if name not in after]
    only_after = [name for name in after if name not in before]
    other_kind = [f"{name} ({before[name][0]} vs {after[name][0]})"
                  for name in before if name in after and before[name][0] != after[name][0]]
    if not (only_before or only_after or other_kind):
        return
    common = "no layer names in common" if len(only_before) == len(before) else "different layers"
    raise ValueError(
        "Expected two models of the same architecture, whose layers are matched by their "
        f"qualified names and kinds. Received: {common}; only in original: {only_before[:8]}, "
        f"only in pruned: {only_after[:8]}, different kinds: {other_kind[:8]}. "
        "Fix: pass the model that `pruned` was made from, e.g. "
        "`PruningReport.from_models(model, apply_plan(model, plan))` (layers that Keras "
        "names automatically get new names in a model rebuilt by hand)."
    )
