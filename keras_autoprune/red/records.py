"""Who produces and who reads each tensor of a `DependencyGraph`.

RED needs a few facts about the walked graph that pruning does not: which
call produced a tensor, how many calls (and model outputs) read it, how
often a layer is called, and cloning a model with some layers' weights
changed. Tensor keys follow the graph's convention (``id`` of the
`KerasTensor`), with nested-model boundaries resolved through
``graph.tensor_alias``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import keras
import numpy as np

from keras_autoprune.graph.dependency import CallRecord, DependencyGraph, check_model
from keras_autoprune.surgery.clone import clone_layers, copy_layer, layer_from_config
from keras_autoprune.surgery.rebuild import nested_models

_L = keras.layers
#: Layer families whose weights RED hashes and whose outputs it can absorb a
#: BatchNormalization into (exact classes: a subclass may override ``call``).
LINEAR_CLASSES = (
    _L.Conv1D, _L.Conv2D, _L.Conv3D,
    _L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose,
    _L.Dense,
    _L.DepthwiseConv1D, _L.DepthwiseConv2D,
    _L.SeparableConv1D, _L.SeparableConv2D,
)


def is_linear_layer(layer) -> bool:
    """Whether ``layer`` is exactly one of `LINEAR_CLASSES`."""
    return type(layer) in LINEAR_CLASSES


class GraphIndex:
    """Producer and reader lookups over a graph's walked calls.

    Args:
        graph: a `DependencyGraph`.

    Attributes:
        graph: the graph.
        calls: ``{id(operation): number of calls}``.
    """

    def __init__(self, graph: DependencyGraph):
        self.graph = graph
        self.calls = collections.Counter(id(r.operation) for r in graph.records)
        self._producer: dict[int, CallRecord] = {}
        self._readers: collections.Counter = collections.Counter()
        for record in graph.records:
            for key in record.output_keys:
                self._producer[key] = record
            for key in record.input_keys:
                self._readers[self.resolve(key)] += 1
        for tensor in check_model(graph.model).outputs:
            self._readers[self.resolve(id(tensor))] += 1
        self._first = {r.name: r for r in graph.records if r.first_call}
        self._position = {name: position for position, name in enumerate(self._first)}
        self._by_operation = {id(r.operation): r for r in self._first.values()}

    def resolve(self, key: int) -> int:
        """The key of the tensor that ``key`` stands for across nested-model boundaries."""
        seen = set()
        while key in self.graph.tensor_alias and key not in seen:
            seen.add(key)
            key = self.graph.tensor_alias[key]
        return key

    def producer(self, key: int) -> CallRecord | None:
        """The call that produced tensor ``key`` (None for model inputs)."""
        return self._producer.get(self.resolve(key))

    def readers(self, key: int) -> int:
        """How many calls (and model outputs) read tensor ``key``."""
        return self._readers[self.resolve(key)]

    def record(self, name: str) -> CallRecord:
        """The first call of the layer with qualified name ``name``."""
        return self._first[name]

    def record_of(self, operation) -> CallRecord:
        """The first call of ``operation`` (a layer of the graph's model)."""
        return self._by_operation[id(operation)]

    def position(self, name: str) -> int:
        """Where the first call of layer ``name`` comes in the graph's walk (earlier calls: smaller)."""
        return self._position[name]


#: ``change(layer) -> (new unbuilt layer, weights)`` or None to copy the layer.
Change = Callable[[keras.layers.Layer], "tuple[keras.layers.Layer, dict[str, np.ndarray]] | None"]


def clone_with(model: keras.Model, graph: DependencyGraph, change: Change,
               drop: frozenset[int] = frozenset()) -> keras.Model:
    """Clones ``model`` (left unchanged), letting ``change`` replace layers.

    `keras_autoprune.surgery.clone.clone_layers` with ``graph``'s nested
    models and traced custom layers cloned layer by layer
    (`keras_autoprune.surgery.rebuild.nested_models`), so ``change`` sees
    every layer the graph walked, those inside custom layers included (a
    traced custom layer becomes its traced functional model, as in
    `kap.apply_plan`). Layers that ``change`` leaves alone (returning None)
    are copied with `copy_layer`; changed ones get their weights by variable
    path. Layers whose ``id`` is in ``drop`` map their first input to their
    output unchanged and disappear (``clone_layers``'s ``drop``).
    """

    def rebuild(layer):
        replaced = change(layer)
        return replaced if replaced is not None else copy_layer(layer)

    return clone_layers(model, rebuild, nested=nested_models(graph), drop=drop)


def with_weights(model: keras.Model, graph: DependencyGraph, weights: dict[int, dict[str, np.ndarray]]) -> keras.Model:
    """A clone of ``model`` (``graph`` its graph) where layer ``id -> {key: value}`` get new weight values."""

    def change(layer):
        if id(layer) not in weights:
            return None
        return layer_from_config(layer, layer.get_config()), weights[id(layer)]

    return clone_with(model, graph, change)
