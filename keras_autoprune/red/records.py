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
from keras_autoprune.surgery.clone import copy_layer, layer_from_config
from keras_autoprune.surgery.weights import assign_weights

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


#: ``change(layer) -> (new unbuilt layer, weights)`` or None to copy the layer.
Change = Callable[[keras.layers.Layer], "tuple[keras.layers.Layer, dict[str, np.ndarray]] | None"]


def clone_with(model: keras.Model, change: Change, drop: frozenset[int] = frozenset()) -> keras.Model:
    """Clones ``model`` (left unchanged), letting ``change`` replace layers.

    The same loop as `keras_autoprune.surgery.clone.clone_layers` (layers that
    ``change`` leaves alone, returning None, are copied with `copy_layer`;
    changed ones get their weights by variable path), plus what surgery has
    no use for: removing layers. A layer whose ``id`` is in ``drop`` must map
    its first input to its output unchanged; in a Functional graph its node
    disappears (its input tensor takes its output's place, via
    `keras.models.clone_model`'s ``call_function``), in a Sequential model it
    becomes a `keras.layers.Identity` of the same name.
    """
    new_weights = []
    placeholders: set[int] = set()

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless `keras.ops` node: reused as is
        if id(layer) in drop:
            placeholder = keras.layers.Identity(name=layer.name)
            placeholders.add(id(placeholder))
            return placeholder
        replaced = change(layer)
        new_layer, weights = replaced if replaced is not None else copy_layer(layer)
        if weights is not None:
            new_weights.append((new_layer, weights))
        return new_layer

    def call(operation, *args, **kwargs):
        if id(operation) in placeholders:
            return args[0]
        return operation(*args, **kwargs)

    functional = not isinstance(model, keras.Sequential)
    new_model = keras.models.clone_model(
        model, clone_function=clone, call_function=call if functional and drop else None, recursive=True
    )
    for layer, weights in new_weights:
        assign_weights(layer, weights)
    return new_model


def with_weights(model: keras.Model, weights: dict[int, dict[str, np.ndarray]]) -> keras.Model:
    """A clone of ``model`` where layer ``id -> {key: value}`` get new weight values."""

    def change(layer):
        if id(layer) not in weights:
            return None
        return layer_from_config(layer, layer.get_config()), weights[id(layer)]

    return clone_with(model, change)
