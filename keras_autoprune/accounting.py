"""Analytic FLOPs and parameter counts of Keras 3 functional models.

Costs come from layer configs and the static shapes of each call, at batch
size 1, without running the model. One FLOP is one floating-point operation:
a multiply-accumulate (MAC) counts 2. What each layer and op costs (the
formulas, and how they compare with TensorFlow's profiler) is in
`keras_autoprune.flops_formulas`; this module walks the graph and adds them
up: `count_flops`, `count_params`, `flops_table` (one `LayerCost` per call),
`call_shapes` and `format_table`.

**Layers and ops without a formula** (custom layers, ``Lambda``, bilinear
up-sampling, ``keras.ops.exp``, an activation not in `ACTIVATION_FLOPS`, ...)
count 0 FLOPs but are not hidden: their `flops_table` rows have
``counted=False``, `format_table` marks them, and `count_flops` warns once,
naming them. Their parameters are counted. A subclassed `keras.Model`
anywhere in the graph raises `UnsupportedModelError`.

Shapes: the graph is walked node by node in execution order, recursing into
nested models (``outer/inner`` names; a layer's parameters are counted once,
its FLOPs once per call). Unknown dimensions count 1 (the batch axis), but
the model's input shapes must be known, or given as ``input_shape``. A nested
model built for unknown spatial sizes (``MobileNetV2(include_top=False)``)
is costed at the shapes it is actually called with.

Example:

>>> import keras
>>> inputs = keras.Input((8, 8, 3))
>>> x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
>>> outputs = keras.layers.BatchNormalization()(x)
>>> model = keras.Model(inputs, outputs)
>>> count_flops(model)  # 2·9·3·4·36 + 2·144
8064
>>> count_params(model)  # 108 + 4·4
124
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_autoprune.errors import UnsupportedModelError
from keras_autoprune.flops_formulas import (  # noqa: F401 - ACTIVATION_FLOPS, FREE_OPS: importable from here too
    ACTIVATION_FLOPS,
    FREE_OPS,
    Shape,
    call_flops,
    einsum_dense_output_shape,
    has_formula,
)
from keras_autoprune.graph.dependency import call_refs, check_model
from keras_autoprune.graph.handlers.attention import attention_inputs
from keras_autoprune.graph.handlers.base import CallInfo, TensorRef
from keras_autoprune.graph.handlers.matmul import matmul_operands
from keras_autoprune.graph.trace import expand_outputs, see_through


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Cost of one call of a layer or op node.

    Attributes:
        layer: qualified name (``outer_model/inner_layer`` inside nested
            models).
        kind: class name of the layer or op (``"Conv2D"``, ``"Multiply"``).
        flops: FLOPs of this call at batch size 1.
        params: weights first seen at this call (a layer called twice has
            its parameters on its first row only).
        counted: False when there is no FLOPs formula for this kind of
            layer or op (a custom layer, ``Lambda``, ``keras.ops.exp``, ...),
            or for its built-in ``activation``: ``flops`` leaves that work
            out (0 for a layer or op without a formula).
    """

    layer: str
    kind: str
    flops: int
    params: int
    counted: bool = True


def count_flops(model: keras.Model, input_shape: Any = None) -> int:
    """Returns the FLOPs (2 × multiply-accumulates) of one inference at batch 1.

    See the module docstring for what each layer costs.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        input_shape: optional input shape without the batch axis, e.g.
            ``(224, 224, 3)`` (a list of shapes for several inputs). Needed
            when the model's inputs have unknown (``None``) dimensions.
            Defaults to the model's own input shapes.

    Returns:
        The total over every layer call, ``sum(r.flops for r in
        flops_table(model))``. Layers and ops without a formula count 0;
        a warning names them (``[r.layer for r in flops_table(model) if not
        r.counted]``).

    Raises:
        UnsupportedModelError: for subclassed models.
        ValueError: when an input dimension is unknown and no ``input_shape``
            is given.
    """
    rows = flops_table(model, input_shape)
    uncounted = list(dict.fromkeys(f"'{r.layer}' ({r.kind})" for r in rows if not r.counted))
    if uncounted:
        warnings.warn(
            f"count_flops: no FLOPs formula for {len(uncounted)} layer(s)/op(s) of model "
            f"'{model.name}' (or for their activation), left out of the total: {', '.join(uncounted[:10])}"
            f"{' ...' if len(uncounted) > 10 else ''}. The total leaves out what they compute; "
            "`flops_table(model)` marks them with counted=False.",
            stacklevel=2,
        )
    return sum(row.flops for row in rows)


def count_params(model: keras.Model) -> int:
    """Returns the number of weights (trainable and non-trainable).

    Each variable is counted once, however often its layer is called; for a
    built model this equals ``model.count_params()``.

    Args:
        model: a built Sequential or Functional `keras.Model`.

    Raises:
        UnsupportedModelError: for subclassed or unbuilt models.
    """
    walker = _Walker(with_flops=False)
    functional = check_model(model)
    walker.walk(functional, "", [_shape(t) for t in functional.inputs])
    return sum(row.params for row in walker.rows)


def flops_table(model: keras.Model, input_shape: Any = None) -> list[LayerCost]:
    """Returns one `LayerCost` per layer or op call, in execution order.

    Nested models are expanded: their layers appear as ``outer/inner``.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        input_shape: see `count_flops`.

    Raises:
        UnsupportedModelError: for subclassed models.
        ValueError: when an input dimension is unknown and no ``input_shape``
            is given.
    """
    functional = check_model(model)
    shapes = _input_shapes(model, functional, input_shape)
    walker = _Walker(with_flops=True)
    walker.walk(functional, "", shapes)
    return walker.rows



def call_shapes(model: keras.Model, input_shape: Any = None) -> dict[str, list[tuple[list[Shape], list[Shape]]]]:
    """Input and output shapes of every call, as `count_flops` sees them.

    Returns:
        ``{qualified name: [(input shapes, output shapes), ...]}``, one pair
        per call in execution order (nested models built for unknown
        spatial sizes get the sizes they are called with).
    """
    functional = check_model(model)
    walker = _Walker(with_flops=True)
    walker.walk(functional, "", _input_shapes(model, functional, input_shape))
    return walker.shapes


def format_table(rows: Sequence[LayerCost]) -> str:
    """Formats `flops_table` rows as a fixed-width text table with totals."""
    header = ("layer", "kind", "FLOPs", "params")
    body = [(r.layer, r.kind, f"{r.flops:,}" if r.counted else f"{r.flops:,}?" if r.flops else "?", f"{r.params:,}")
            for r in rows]
    total = ("total", "", f"{sum(r.flops for r in rows):,}",
             f"{sum(r.params for r in rows):,}")
    widths = [max(len(line[i]) for line in [header, total, *body]) for i in range(4)]

    def fmt(line: tuple[str, ...]) -> str:
        return (f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  "
                f"{line[2]:>{widths[2]}}  {line[3]:>{widths[3]}}")

    rule = "-" * len(fmt(header))
    note = (["? = no FLOPs formula for this layer (or, after a number, for its activation): not counted"]
            if not all(r.counted for r in rows) else [])
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total), *note])


def inputs_by_name(operation: Any, call: CallInfo) -> dict[str, int] | None:
    """Where the named operands of a call sit among its tensors, for the calls whose FLOPs depend on it.

    MultiHeadAttention: ``query``, ``value`` and ``key``. ``keras.ops.matmul``:
    ``x1`` or ``x2``, whichever are tensors (the other may be a constant, which
    is not among the tensors). None for every other call (read by position).
    """
    if isinstance(operation, keras.layers.MultiHeadAttention):
        return attention_inputs(call)
    if type(operation).__name__ == "Matmul":
        return {name: ref.index for name, ref in zip(("x1", "x2"), matmul_operands(call)) if isinstance(ref, TensorRef)}
    return None


def einsum_operand_shapes(call: CallInfo) -> list[Shape]:
    """The shape of every operand of a ``keras.ops.einsum`` call, in order: a tensor's as recorded, a
    constant's (a NumPy array, which is not among the call's tensors) as it is."""
    return [call.in_shapes[a.index] if isinstance(a, TensorRef) else tuple(np.shape(a)) for a in call.args]


def _shape(tensor: Any) -> Shape:
    """The tensor's shape with the batch axis unknown: FLOPs are per example, whatever batch size a model fixes.

    A shape that has an unknown axis after the first already carries the
    (unknown) batch axis elsewhere (a transpose moved it): it is kept as is.
    """
    shape = tuple(tensor.shape)
    if not shape or any(d is None for d in shape[1:]):
        return shape
    return (None, *shape[1:])


#: Operations that keep every element (a reshape, a permutation of axes): only these can move the batch axis.
_REARRANGING_OPS = ("Reshape", "Transpose", "Swapaxes", "Moveaxis")


def _mixes_batch(operation: Any, ins: list[Shape], outs: list[Shape]) -> bool:
    """Whether a node that keeps every element has fewer elements per example after it than before
    (shapes as `_shape` records them): the batch axis was merged into another axis, or moved."""
    if isinstance(operation, keras.layers.Layer) or type(operation).__name__ not in _REARRANGING_OPS:
        return False
    if len(ins) != 1 or len(outs) != 1 or any(d is None for s in (ins[0][1:], outs[0][1:]) for d in s):
        return False
    return math.prod(ins[0][1:]) != math.prod(outs[0][1:])


def _input_shapes(model: keras.Model, functional: keras.Model, input_shape: Any) -> list[Shape]:
    recorded = [_shape(t) for t in functional.inputs]
    if input_shape is None:
        for shape in recorded:
            if any(d is None for d in shape[1:]):
                raise ValueError(
                    "Expected a model whose input shapes are known except for the batch "
                    f"axis, as FLOPs depend on them. Received: model '{model.name}' with "
                    f"input shapes {recorded}. Fix: pass the shape to count as `input_shape`, e.g. "
                    "`count_flops(model, input_shape=(224, 224, 3))` or "
                    "`kap.red.compress(model, input_shape=(224, 224, 3))`."
                )
        return recorded
    single = len(recorded) == 1 and not (isinstance(input_shape, list) and len(input_shape) == 1
                                         and isinstance(input_shape[0], (tuple, list)))
    given = [input_shape] if single else list(input_shape)
    sizes_ok = all(hasattr(s, "__iter__") and not isinstance(s, str)
                   and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in s) for s in given)
    shapes = [(None, *map(int, s)) for s in given] if sizes_ok and len(given) == len(recorded) else []
    if not shapes or any(len(s) != len(r) for s, r in zip(shapes, recorded)):
        raise ValueError(
            "Expected `input_shape` to give one shape without the batch axis per model "
            f"input, of ranks {[len(r) - 1 for r in recorded]}, in positive integers. Received: "
            f"input_shape={input_shape!r}. Fix: e.g. `input_shape=(224, 224, 3)`."
        )
    for given_shape, known in zip(shapes, recorded):
        if any(k is not None and g != k for g, k in zip(given_shape[1:], known[1:])):
            raise ValueError(
                "Expected `input_shape` to agree with the model's known input sizes (it fills the unknown "
                f"ones): {[r[1:] for r in recorded]}. Received: input_shape={input_shape!r}. Fix: give the "
                "known sizes as they are, or rebuild the model for the other size."
            )
    return shapes




class _Walker:
    """Walks a functional graph in execution order and records `LayerCost`s."""

    def __init__(self, with_flops: bool):
        self.with_flops = with_flops
        self.rows: list[LayerCost] = []
        #: qualified name -> [(input shapes, output shapes) of each call].
        self.shapes: dict[str, list[tuple[list[Shape], list[Shape]]]] = {}
        self._seen_variables: set[int] = set()

    def walk(self, functional: keras.Model, prefix: str, input_shapes: list[Shape]) -> list[Shape]:
        """Records every call of ``functional``; returns its output shapes."""
        shapes = {id(t): s for t, s in zip(functional.inputs, input_shapes)}
        for depth in sorted(functional._nodes_by_depth, reverse=True):
            for node in functional._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                op = node.operation
                ins = [shapes.get(id(t), _shape(t)) for t in node.arguments.keras_tensors]
                inner = check_model(op) if isinstance(op, keras.Model) else see_through(op, node)[0]
                if inner is not None:  # a nested model, or a custom layer seen through
                    if len(ins) != len(inner.inputs):
                        raise UnsupportedModelError(
                            f"Expected nested model '{op.name}' to be called on its "
                            f"{len(inner.inputs)} input tensor(s). Received: a call on "
                            f"{len(ins)} tensor(s). Fix: call it on a flat list of inputs."
                        )
                    outs = self.walk(inner, f"{prefix}{op.name}/", ins)
                    if not isinstance(op, keras.Model):  # a traced layer's constant outputs
                        outs = expand_outputs(inner, outs, lambda i, _: _shape(node.outputs[i]))
                else:
                    outs = self._output_shapes(node, ins)
                    self._record(prefix, op, ins, outs, node)
                for tensor, shape in zip(node.outputs, outs):
                    shapes[id(tensor)] = shape
        return [shapes.get(id(t), _shape(t)) for t in functional.outputs]

    def _record(self, prefix: str, op: Any, ins: list[Shape], outs: list[Shape], node: Any) -> None:
        params = 0
        for variable in getattr(op, "weights", []):
            if id(variable) not in self._seen_variables:
                self._seen_variables.add(id(variable))
                params += math.prod(variable.shape)
        flops = 0
        if self.with_flops:
            call = CallInfo([], ins, outs, *call_refs(node, node.arguments.keras_tensors))
            operands = einsum_operand_shapes(call) if type(op).__name__ == "Einsum" else ins
            flops = call_flops(op, operands, outs, inputs_by_name(op, call))
        self.shapes.setdefault(prefix + op.name, []).append((ins, outs))
        counted = has_formula(op) if self.with_flops else True
        self.rows.append(LayerCost(prefix + op.name, type(op).__name__, int(flops), int(params), counted))

    def _output_shapes(self, node: Any, ins: list[Shape]) -> list[Shape]:
        """Output shapes of ``node`` for input shapes ``ins``.

        The recorded shapes are used unless an input shape differs from the
        recorded one (a nested model built for ``None`` spatial sizes and
        called on a fixed size), or the node moves the batch axis
        (`_mixes_batch`): then the op's ``compute_output_spec`` infers them,
        without adding nodes to the graph, at batch 1 for the latter (``(None,
        4, 8)`` reshaped to ``(-1, 8)`` is ``(4, 8)``: 4 rows per example, and
        the layers after it are counted on 4 rows). An EinsumDense's output
        shape comes from its equation (`einsum_dense_output_shape`): Keras
        records an axis given as None in its ``output_shape`` as unknown.
        """
        recorded_ins = [_shape(t) for t in node.arguments.keras_tensors]
        recorded_outs = [_shape(t) for t in node.outputs]
        if not self.with_flops:
            return recorded_outs
        if isinstance(node.operation, keras.layers.EinsumDense):
            return [einsum_dense_output_shape(node.operation, ins[0])]
        if _mixes_batch(node.operation, recorded_ins, recorded_outs):
            ins = [(1, *s[1:]) if s and s[0] is None else s for s in ins]
        elif ins == recorded_ins:
            return recorded_outs
        new = {
            id(t): keras.KerasTensor(s, dtype=t.dtype)
            for t, s in zip(node.arguments.keras_tensors, ins)
        }
        args, kwargs = node.arguments.fill_in(new)
        try:
            spec = node.operation.compute_output_spec(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure: fall back.
            warnings.warn(
                f"Could not infer the output shape of '{node.operation.name}' for input "
                f"shapes {ins} ({type(error).__name__}: {error}); using its recorded "
                f"shapes {recorded_outs} for FLOPs counting.",
                stacklevel=4,
            )
            return recorded_outs
        return [tuple(t.shape) for t in keras.tree.flatten(spec)]
