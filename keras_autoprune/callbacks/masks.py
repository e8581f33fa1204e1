"""Masks enforced inside the compiled train step.

Every trainable variable that a plan can zero gets a non-trainable mask
variable and a `MaskConstraint` (``w <- w * mask``). Keras 3 optimizers apply
variable constraints after each update inside the compiled step, so masked
entries stay exactly zero with no Python per batch; changing a plan only
assigns new mask values (no retracing).

Which entries a plan zeroes is decided by the layer handlers' ``mask``
method, the same code `kap.mask_plan` uses, so the model trained under masks
is the masked model of the final plan.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.graph.handlers import ChannelwiseHandler
from keras_autoprune.surgery.keep import layer_keeps
from keras_autoprune.surgery.plan import PrunePlan
from keras_autoprune.surgery.weights import layer_weights, weight_keys


class InstalledConstraint(keras.constraints.Constraint):
    """A constraint a pruning callback puts in front of a variable's own (``previous``) for the length of a fit."""

    previous = None


def users_constraint(constraint):
    """``constraint`` without the pruning constraints in front of it.

    Keras calls ``on_train_end`` only when ``fit`` returns: a fit that raised
    (an interrupt, an out-of-memory error) leaves its callback's constraints
    on the variables, and the next install must not stack on them.
    """
    while isinstance(constraint, InstalledConstraint):
        constraint = constraint.previous
    return constraint


def warn_stale(count: int) -> None:
    """Says that ``count`` variables carried pruning constraints an interrupted fit left (if any)."""
    if count:
        warnings.warn(
            f"keras_autoprune: {count} variable(s) still carried the pruning constraints of a fit that did not end "
            "(it raised before on_train_end); they were dropped, and the variables' own constraints kept.",
            stacklevel=3,
        )


class MaskConstraint(InstalledConstraint):
    """``w * mask`` (then the variable's previous constraint, if any)."""

    def __init__(self, mask: keras.Variable, previous=None):
        self.mask = mask
        self.previous = previous

    def __call__(self, w):
        w = w * keras.ops.cast(self.mask, w.dtype)
        return self.previous(w) if self.previous is not None else w


class MaskSet:
    """The masks of one model, installed on its variables.

    Args:
        graph: dependency graph of the model (built on the live model).
        every_layer: mask every layer with trainable weights, not only those
            a prunable channel group touches (single weights can be masked
            anywhere).
    """

    def __init__(self, graph: DependencyGraph, every_layer: bool = False):
        self.graph = graph
        self._layers = maskable_layers(graph, every_layer)
        self._masks: dict[int, keras.Variable] = {}
        self._previous: dict[int, object] = {}

    def install(self, strategy=None) -> None:
        """Adds all-ones masks as constraints on the maskable variables.

        Args:
            strategy: the model's `tf.distribute` strategy; masks are created
                in its scope so that every replica reads them.
        """
        if strategy is not None:
            with strategy.scope():
                return self.install()
        stale = 0
        for handler, layer in self._layers.values():
            for variable in layer.trainable_weights:
                key = id(variable)
                if key in self._masks:
                    continue
                mask = keras.Variable(np.ones(variable.shape, "float32"), trainable=False, name="kap_mask")
                own = users_constraint(variable.constraint)
                stale += own is not variable.constraint
                self._masks[key] = mask
                self._previous[key] = own
                variable.constraint = MaskConstraint(mask, own)
        warn_stale(stale)

    def remove(self) -> None:
        """Restores the original constraints (mask values are forgotten)."""
        for handler, layer in self._layers.values():
            for variable in layer.trainable_weights:
                if id(variable) in self._previous:
                    variable.constraint = self._previous[id(variable)]
        self._masks.clear()
        self._previous.clear()

    def apply(self, plan: PrunePlan, enforce: bool = True) -> None:
        """Zeroes the entries ``plan`` masks now and, if ``enforce``, keeps them zero.

        All variables (trainable or not, e.g. BatchNormalization moving
        means) receive the handlers' masked values, so the live model equals
        ``kap.mask_plan(model, plan)`` right after this call. With
        ``enforce=False`` (soft pruning) only the filters creating the
        removed channels are zeroed (normalisation parameters are kept, so
        gradients still reach them) and the masks stay all ones: the zeroed
        weights keep training and can grow back.
        """
        keeps = layer_keeps(self.graph, plan.removed_atoms(self.graph))
        for handler, layer in self._layers.values():
            keep = keeps.get(id(layer))
            if not enforce and isinstance(handler, ChannelwiseHandler):
                keep = None  # soft: normalisation parameters stay, so gradients reach the zeroed filters
            values = layer_weights(layer)
            if keep is not None:
                ones = {k: np.ones_like(v) for k, v in values.items()}
                mask_values = handler.mask(layer, ones, keep)
                values = handler.mask(layer, values, keep)
            else:
                mask_values = {k: np.ones_like(v) for k, v in values.items()}
            for key, variable in zip(weight_keys(layer), layer.weights):
                variable.assign(values[key].astype(variable.dtype))
                if id(variable) in self._masks:
                    mask = (mask_values[key] != 0) if enforce else np.ones(variable.shape, bool)
                    self._masks[id(variable)].assign(mask.astype("float32"))


    def set_variable_mask(self, variable, mask: np.ndarray) -> None:
        """Multiplies one installed variable's mask (and value) by ``mask``."""
        if id(variable) not in self._masks:
            raise KeyError(f"No mask is installed on variable '{variable.path}'.")
        current = self._masks[id(variable)]
        combined = np.asarray(current.numpy()) * mask
        current.assign(combined.astype("float32"))
        variable.assign((np.asarray(variable.numpy()) * combined).astype(variable.dtype))


def maskable_layers(graph: DependencyGraph, every_layer: bool = False) -> dict[int, tuple]:
    """``{id(layer): (handler, layer)}``: the layers with trainable weights that a prunable group touches (all of
    them with ``every_layer``)."""
    layers = {}
    for record in graph.records:
        layer = record.operation
        if not (record.first_call and isinstance(layer, keras.layers.Layer) and layer.trainable_weights):
            continue
        layouts = list(record.call.in_layouts) + list(record.out_layouts) + list(record.internal_layouts)
        if every_layer or any(is_prunable_layout(graph, l) for l in layouts):
            layers[id(layer)] = (record.handler, layer)
    return layers


def is_prunable_layout(graph: DependencyGraph, layout: np.ndarray) -> bool:
    """Whether a tensor with channel ``layout`` (atom per position) carries channels of a prunable group."""
    prunable = [graph.group_index(g.id) for g in graph.prunable_groups]
    return bool(len(layout) and np.isin(graph.atom_group[layout], prunable).any())
