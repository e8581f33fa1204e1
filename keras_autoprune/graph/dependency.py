"""`DependencyGraph`: coupled channel groups of a Keras 3 functional model.

The graph is built by walking the model's nodes in topological order (the
same order Keras uses to run it), recursing into nested models, and asking
each layer's handler how channels flow from its inputs to its outputs (see
`keras_autoprune.graph.atoms`). The result is a list of `ChannelGroup`s: sets
of channel positions, across layers, that must be pruned together (built from
the walk by `keras_autoprune.graph.groups`).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any

import keras
import numpy as np

from keras_autoprune.errors import UnsupportedModelError
from keras_autoprune.graph.atoms import AtomTable
from keras_autoprune.graph.context import WalkContext
from keras_autoprune.graph.groups import ChannelGroup, ChannelMember, build_groups  # noqa: F401 - ChannelMember: importable from here too
from keras_autoprune.graph.handlers import CallInfo, LayerHandler, TensorRef, get_handler
from keras_autoprune.graph.handlers.matmul import rows_of, with_rows
from keras_autoprune.graph.trace import expand_outputs, see_through

_BLOCKER = LayerHandler()


@dataclasses.dataclass
class CallRecord:
    """One walked call of an operation (internal to the graph and surgery)."""

    name: str
    operation: Any
    handler: LayerHandler
    call: CallInfo
    input_keys: list[int]
    output_keys: list[int]
    out_layouts: list[np.ndarray]
    first_call: bool
    internal_layouts: list[np.ndarray] = dataclasses.field(default_factory=list)


def check_model(model: Any) -> keras.Model:
    """Returns the walkable functional form of ``model`` or raises clearly."""
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            "Expected a Keras 3 `keras.Model` (Functional or Sequential). "
            f"Received: model of type {type(model).__module__}.{type(model).__name__}. "
            "tf.keras / tf_keras models are not supported: rebuild the model with `import keras`."
        )
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise UnsupportedModelError(
                "Expected a built Sequential model with a known input shape. "
                f"Received: model '{model.name}', which is not built. "
                "Fix: start the model with `keras.Input(shape=...)` or call `model.build(input_shape)`."
            )
        return functional
    from keras.src.models.functional import Functional

    if not isinstance(model, Functional):
        raise UnsupportedModelError(
            "Expected a Functional or Sequential model, whose graph can be walked. "
            f"Received: subclassed model '{model.name}' of type {type(model).__name__}. "
            "Fix: rebuild it with the functional API, e.g. "
            "`inputs = keras.Input(shape); outputs = ...; keras.Model(inputs, outputs)`."
        )
    return model


class DependencyGraph:
    """Coupled channel groups of a Keras 3 Sequential or Functional model.

    Args:
        model: a built `keras.Sequential` or Functional `keras.Model`. It is
            only read.

    Attributes:
        model: the model analysed.
        groups: list of `ChannelGroup`, in topological order.
        unknown_layers: qualified names of layers without a handler (their
            channels are not prunable).
        nested: ``{id(layer): (functional model, input layouts of its first
            call)}`` for every nested model and every traced custom layer.
        traced: ``{id(custom layer): traced functional model}``: custom
            layers seen through (`keras_autoprune.graph.trace`); the
            surgery puts a clone of the traced model in their place.

    Example:

    >>> import keras, keras_autoprune as kap
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> x = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> outputs = keras.layers.Conv2D(2, 1, name="c2")(x)
    >>> graph = kap.DependencyGraph(keras.Model(inputs, outputs))
    >>> [(g.id, g.size, g.prunable) for g in graph.groups]
    [('input:image', 3, False), ('c1', 4, True), ('c2', 2, False)]
    """

    def __init__(self, model: keras.Model):
        functional = check_model(model)
        self.model = model
        self.atoms = AtomTable()
        self.records: list[CallRecord] = []
        self.unknown_layers: list[str] = []
        #: tensor key -> key of the tensor it is: a nested model's (or traced layer's) output tensor in the
        #: enclosing graph -> the inner output's key for that call. Records hold resolved keys already.
        self.tensor_alias: dict[int, int] = {}
        self._walked_inner: set[int] = set()  # nested models and traced layers walked once already
        self._fresh_keys = itertools.count(-1, -1)  # keys of a later call's inner tensors (never an id)
        self.nested: dict[int, tuple[keras.Model, list[np.ndarray]]] = {}
        self.traced: dict[int, keras.Model] = {}
        self._untraced: dict[int, str] = {}
        self._space_cache: dict[int, dict[int, np.ndarray]] = {}
        self._first_inputs: dict[int, list[np.ndarray]] = {}
        self.input_layouts = [
            self.atoms.new_space(_width(t.shape), f"input:{_input_name(t)}") for t in functional.inputs
        ]
        for layout in self.input_layouts:
            self.atoms.fix(layout, "it is a model input")
        self.output_layouts = self._walk(functional, self.input_layouts, prefix="")
        for layout in self.output_layouts:
            self.atoms.fix(layout, "it is a model output")
            self._block_rows(layout, "it is a model output")
        if self.unknown_layers:
            warnings.warn(
                "keras_autoprune: no pruning handler for "
                + ", ".join(self.unknown_layers)
                + ". Channels crossing these layers will not be pruned. If such a layer "
                "transforms channels in a known way, declare it with "
                "`keras_autoprune.register_handler(LayerClass, handler)`.",
                stacklevel=2,
            )
        self._build_groups()

    # -- walking --------------------------------------------------------
    def _walk(self, functional, in_layouts: list[np.ndarray], prefix: str, keys: dict[int, int] | None = None,
              fresh: bool = False) -> list[np.ndarray]:
        """Walks ``functional``'s calls; returns its output layouts.

        ``keys`` maps this graph's tensors to the keys the records use (a
        nested call's inputs: the enclosing tensors' keys); other tensors are
        keyed by ``id``, or, with ``fresh`` (a nested model's later call), by
        new keys, so that every call of a nested model has its own tensors.
        """
        keys = {} if keys is None else keys

        def key(tensor) -> int:
            if fresh:
                return keys.setdefault(id(tensor), next(self._fresh_keys))
            return keys.get(id(tensor), id(tensor))

        layouts = _Layouts((id(t), layout) for t, layout in zip(functional.inputs, in_layouts))
        nodes_by_depth = functional._nodes_by_depth
        # Within a depth, follow the order in which the layers were created so
        # that group ids name the branch the user wrote first.
        position = {id(op): i for i, op in enumerate(functional.operations)}
        for depth in sorted(nodes_by_depth, reverse=True):
            for node in sorted(nodes_by_depth[depth], key=lambda n: position.get(id(n.operation), 0)):
                if node.is_input:
                    continue
                tensors = list(node.arguments.keras_tensors)
                node_in = [layouts[id(t)] for t in tensors]
                operation = node.operation
                inner = self._inner_model(operation, node)
                if inner is not None:
                    # Surgery rebuilds a nested model's inputs with the last axis only: rows stop at its boundary.
                    node_in = [self._block_rows(layout, f"it enters nested model '{prefix + operation.name}'")
                               for layout in node_in]
                    self.nested.setdefault(id(operation), (inner, node_in))
                    inner_keys = {id(i): key(o) for i, o in zip(inner.inputs, tensors)}
                    again = id(operation) in self._walked_inner
                    self._walked_inner.add(id(operation))
                    node_out = self._walk(inner, node_in, prefix + operation.name + "/", inner_keys, fresh=again)
                    inner_out = list(inner.outputs)
                    if id(operation) in self.traced:
                        # A traced layer's constant outputs (placeholders) carry none of its input channels;
                        # their layouts are made only if read (an unused placeholder adds no group).
                        node_out = expand_outputs(inner, node_out, lambda i, _: self._constant_layout(operation, node.outputs[i]))
                        inner_out = expand_outputs(inner, inner_out, lambda i, _: None)
                    for outer, inner_tensor in zip(node.outputs, inner_out):
                        if inner_tensor is not None:
                            resolved = inner_keys.get(id(inner_tensor), id(inner_tensor))
                            keys[id(outer)] = resolved
                            self.tensor_alias[id(outer)] = resolved
                else:
                    node_out = self._walk_call(operation, node, tensors, node_in, prefix, key)
                for tensor, layout in zip(node.outputs, node_out):
                    layouts[id(tensor)] = layout
        return [layouts[id(t)] for t in functional.outputs]

    def _constant_layout(self, operation, tensor) -> "_Lazy":
        def make() -> np.ndarray:
            layout = self.atoms.new_space(_width(tensor.shape), operation.name)
            self.atoms.fix(layout, f"it is a constant output of traced layer '{operation.name}'")
            return layout

        return _Lazy(make)

    def _inner_model(self, operation, node) -> keras.Model | None:
        """The functional model to walk for ``operation``: a nested model, a traced custom layer, or None."""
        if isinstance(operation, keras.Model) and _is_graph_model(operation):
            return check_model(operation)
        traced, reason = see_through(operation, node)
        if traced is None:
            if reason:
                self._untraced[id(operation)] = reason
            return None
        self.traced[id(operation)] = traced
        return traced

    def _walk_call(self, operation, node, tensors, in_layouts, prefix, key_of=id) -> list[np.ndarray]:
        name = prefix + operation.name
        handler = get_handler(operation)
        if handler is None:
            why = self._untraced.get(id(operation))
            self.unknown_layers.append(f"'{name}' ({type(operation).__name__}{'; not traced: ' + why if why else ''})")
            handler = _BLOCKER
        args, kwargs = call_refs(node, tensors)
        call = CallInfo(
            in_layouts=in_layouts,
            in_shapes=[tuple(t.shape) for t in tensors],
            out_shapes=[tuple(t.shape) for t in node.outputs],
            args=args,
            kwargs=kwargs,
        )
        key = id(operation)
        ctx = WalkContext(self.atoms, name, self._space_cache.setdefault(key, {}))
        carried_rows = self._carried_rows(handler, operation, call, ctx, name)
        first_call = key not in self._first_inputs
        if first_call:
            self._first_inputs[key] = in_layouts
        elif handler.has_channel_weights:
            for first, current in zip(self._first_inputs[key], in_layouts):
                ctx.tie(first, current)
        try:
            out_layouts = handler.propagate(operation, call, ctx)
        except Exception as error:  # a handler must never produce a wrong model
            warnings.warn(
                f"keras_autoprune: handler {type(handler).__name__} failed on '{name}' ({error!r}); "
                "its channels will not be pruned.",
                stacklevel=3,
            )
            handler = _BLOCKER
            for layout in ctx.internal + [r for r in map(rows_of, in_layouts) if r is not None]:
                ctx.fix(layout, f"handler {type(handler).__name__} failed on '{name}'")
            out_layouts = _BLOCKER.propagate(operation, call, ctx)
        if not getattr(handler, "reads_rows", False):  # rows leave a call only where it keeps them
            out_layouts = [with_rows(np.asarray(layout), carried_rows) for layout in out_layouts]
        self.records.append(
            CallRecord(
                name=name,
                operation=operation,
                handler=handler,
                call=call,
                input_keys=[key_of(t) for t in tensors],
                output_keys=[key_of(t) for t in node.outputs],
                out_layouts=out_layouts,
                first_call=first_call,
                internal_layouts=list(ctx.internal),
            )
        )
        return out_layouts

    def _block_rows(self, layout, reason: str):
        """``layout`` without its rows, which are blocked (`keras_autoprune.graph.handlers.matmul`)."""
        if isinstance(layout, np.ndarray) and rows_of(layout) is not None:
            self.atoms.fix(rows_of(layout), reason)
            return np.asarray(layout)
        return layout

    @staticmethod
    def _carried_rows(handler, operation, call: CallInfo, ctx: WalkContext, name: str) -> np.ndarray | None:
        """Channels on the inputs' second-to-last axis that the call keeps there; any others are blocked.

        See `keras_autoprune.graph.handlers.matmul`: handlers with
        ``reads_rows`` place them themselves; a one-input call whose handler
        `keeps_rows` (Dense, element-wise activations) passes them on.
        """
        rows = [rows_of(layout) for layout in call.in_layouts]
        if all(r is None for r in rows) or getattr(handler, "reads_rows", False):
            return None
        same_axis = len(call.out_shapes) == 1 and len(call.out_shapes[0]) == len(call.in_shapes[0]) and \
            call.out_shapes[0][-2] == call.in_shapes[0][-2]
        if len(rows) == 1 and same_axis and handler.keeps_rows(operation, call):
            return rows[0]
        for r in rows:
            if r is not None:
                ctx.fix(r, f"'{name}' ({type(operation).__name__}) does not keep channels on the second-to-last axis")
        return None

    # -- groups ---------------------------------------------------------
    def _build_groups(self) -> None:
        self.groups, self.atom_group, self.atom_channel = build_groups(self.atoms, self.records)
        self._index = {group.id: i for i, group in enumerate(self.groups)}

    # -- queries --------------------------------------------------------
    def group(self, group_id: str) -> ChannelGroup:
        """The group named ``group_id`` (KeyError listing valid ids if absent)."""
        if group_id not in self._index:
            raise KeyError(f"No channel group {group_id!r}. Valid ids: {sorted(self._index)}")
        return self.groups[self._index[group_id]]

    def group_index(self, group_id: str) -> int | None:
        return self._index.get(group_id)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def summary(self) -> str:
        """One line per group: id, size, members, prunable or why not."""
        lines = [f"{'group':40s} {'size':>6s} {'members':>8s}  status"]
        for g in self.groups:
            status = "prunable" if g.prunable else f"blocked ({g.reason})"
            lines.append(f"{g.id:40s} {g.size:6d} {len(g.members):8d}  {status}")
        return "\n".join(lines)


def graph_of(model: keras.Model, graph: DependencyGraph | None = None) -> DependencyGraph:
    """``graph`` if it was built for ``model``, else ``DependencyGraph(model)`` when it is None.

    Every function taking an optional, already built graph calls this: a graph
    of another model (a clone with the same layer names included) keys its
    layers by identity, so its plans would silently miss ``model``'s layers.

    Raises:
        ValueError: ``graph`` belongs to another model.
    """
    if graph is None:
        return DependencyGraph(model)
    if graph.model is not model:
        raise ValueError(
            "`graph` was built for another model. Pass `DependencyGraph(model)` of this model, "
            f"or leave `graph` out. Received: graph of '{graph.model.name}', model '{model.name}'"
        )
    return graph


def _is_graph_model(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


class _Lazy:
    """A layout made on first use (a traced layer's constant output)."""

    def __init__(self, make):
        self.make = make


class _Layouts(dict):
    """Tensor key -> layout; `_Lazy` layouts are made when first read."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, _Lazy):
            value = value.make()
            self[key] = value
        return value


def _width(shape) -> int:
    return int(shape[-1]) if len(shape) >= 2 and shape[-1] is not None else 0


def _input_name(tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history else tensor.name


def call_refs(node, tensors) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``node``'s call with each tensor replaced by `TensorRef` (its index in ``tensors``)."""
    index = {id(t): i for i, t in enumerate(tensors)}

    def ref(obj):
        if isinstance(obj, keras.KerasTensor):
            return TensorRef(index[id(obj)])
        if isinstance(obj, (list, tuple)):
            return type(obj)(ref(o) for o in obj)
        if isinstance(obj, dict):
            return {k: ref(v) for k, v in obj.items()}
        return obj

    return ref(tuple(node.arguments.args)), ref(dict(node.arguments.kwargs))
