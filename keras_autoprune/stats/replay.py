"""Replaying a functional model layer by layer, recording the tapped calls.

K-FAC and gradient statistics need, for every call of a tapped layer
(`keras_autoprune.stats.taps`), its input ``a`` and its *pre-activation*
output ``s`` (and later ``∂loss/∂s``). Rather than a tap model
``keras.Model(model.inputs, [layer.input, ...])``, which cannot reach layers
inside a nested model (their symbolic tensors belong to the inner graph:
Keras 3.15 raises "Output with path `0` is not connected to `inputs`"), the
model is *replayed*: the functional graph is executed node by node
(`Functional._run_through_graph`, the same order Keras uses), recursing into
nested Functional/Sequential models and into the traced models of custom
layers (`keras_autoprune.graph.trace`), so every layer is reached under the
same qualified name as in `DependencyGraph` (``outer/inner``).

A tapped layer with a built-in activation is called with its ``activation``
attribute set to ``linear`` for the duration of the call (restored in a
``finally``; this only happens while the calibration step is traced), and the
original activation is applied to the result, so ``s`` is a tensor of the
replayed graph and ``∂loss/∂s`` comes straight from the tape.

Every layer is called with ``training=False`` (inference mode: BatchNorm uses
its moving statistics, Dropout is off). Keras masks are not propagated.

A `MultiHeadAttention` whose projections are tapped is replayed through its
own steps (`_attention_call`), so that the inputs and outputs of its
``query``, ``key``, ``value`` and ``attention_output`` projections are
tensors of the tape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from keras_autoprune.graph.dependency import _is_graph_model, check_model
from keras_autoprune.graph.trace import expand_outputs, traced_model

if TYPE_CHECKING:
    from keras_autoprune.stats.taps import Tap

L = keras.layers


@dataclasses.dataclass
class TapRecord:
    """One call of a tapped layer during a replay: its input and ``s``."""

    tap: Tap
    inputs: tf.Tensor
    pre_activation: tf.Tensor


def replay(
    model: keras.Model,
    inputs: Any,
    taps: dict[str, Tap],
    watch: Callable[[tf.Tensor], None],
) -> tuple[Any, list[TapRecord], dict[int, tuple[str, tf.Tensor]]]:
    """Runs ``model`` on ``inputs`` in inference mode, tapping ``taps``.

    Args:
        model: a Sequential or Functional model.
        inputs: one tensor per model input, in the order of ``model.inputs``.
        taps: the layers to tap, by qualified name.
        watch: called on every pre-activation tensor (``tape.watch``).

    Returns:
        ``(outputs, records, logits)``: the model outputs, one `TapRecord` per
        tapped call in execution order, and, for outputs produced by a
        softmax or sigmoid, ``id(output) -> (activation name, its input)``.
    """
    records: list[TapRecord] = []
    logits: dict[int, tuple[str, tf.Tensor]] = {}

    def run(functional, values, prefix):
        def call_fn(op, *args, **kwargs):
            if isinstance(op, keras.Model) and _is_graph_model(op):
                inner = check_model(op)
                return run(inner, args[0] if args else kwargs["inputs"], prefix + op.name + "/")
            traced = traced_model(op)
            if traced is not None:  # a custom layer seen through: its tensor arguments, in node order
                tensors = [a for a in keras.tree.flatten((args, kwargs)) if keras.ops.is_tensor(a)]
                outputs = run(traced, keras.tree.pack_sequence_as(traced._inputs_struct, tensors), prefix + op.name + "/")
                return expand_outputs(traced, keras.tree.flatten(outputs))
            name = prefix + op.name
            if "training" in getattr(op, "_call_context_args", ()):
                kwargs["training"] = False
            if isinstance(op, L.MultiHeadAttention) and any(n.startswith(name + "/") for n in taps):
                return _attention_call(op, args, kwargs, lambda sub, x: tapped(name + "/" + sub.name, sub, (x,), {}))
            return tapped(name, op, args, kwargs)

        def tapped(name, op, args, kwargs):
            tap = taps.get(name)
            if tap is None:
                outputs = op(*args, **kwargs)
                source = probability_activation(op)
                if source:
                    logits[id(outputs)] = (source, args[0])
                return outputs
            activation = op.activation
            op.activation = keras.activations.linear
            try:
                pre = op(*args, **kwargs)
            finally:
                op.activation = activation
            watch(pre)
            records.append(TapRecord(tap, args[0], pre))
            outputs = activation(pre)
            source = activation_name(activation)
            if source:
                logits[id(outputs)] = (source, pre)
            return outputs

        flat = functional._standardize_inputs(values)
        outputs = functional._run_through_graph(flat, operation_fn=lambda op: op, call_fn=call_fn)
        if isinstance(outputs, (list, tuple)) and len(outputs) == 1:
            outputs = outputs[0]
        return outputs

    functional = check_model(model)
    outputs = run(functional, keras.tree.pack_sequence_as(functional._inputs_struct, list(inputs)), "")
    return outputs, records, logits


def _attention_call(layer, args, kwargs, project):
    """`MultiHeadAttention.call` in inference mode, with ``project(sublayer, x)`` for each projection."""
    from keras_autoprune.graph.handlers.attention import CALL_ARGS

    bound = dict(zip(CALL_ARGS, args))
    bound.update(kwargs)
    query, value = bound["query"], bound["value"]
    key = bound.get("key")
    key = value if key is None else key
    mask = layer._compute_attention_mask(
        query, value, query_mask=bound.get("query_mask"), value_mask=bound.get("value_mask"),
        key_mask=bound.get("key_mask"), attention_mask=bound.get("attention_mask"),
        use_causal_mask=bound.get("use_causal_mask", False),
    )
    scores_wanted = bound.get("return_attention_scores", False)
    q, k, v = project(layer.query_dense, query), project(layer.key_dense, key), project(layer.value_dense, value)
    attended, scores = layer._compute_attention(q, k, v, mask, training=False, return_attention_scores=scores_wanted)
    if getattr(layer, "_use_gate", False):
        attended = keras.ops.multiply(attended, layer._gate_dense(query))
    output = project(layer.output_dense, attended)
    return (output, scores) if scores_wanted else output


def activation_name(activation) -> str | None:
    """``"softmax"``/``"sigmoid"`` for those Keras activation functions, else None."""
    if activation is keras.activations.softmax:
        return "softmax"
    if activation is keras.activations.sigmoid:
        return "sigmoid"
    return None


def probability_activation(op) -> str | None:
    """``"softmax"``/``"sigmoid"`` when ``op`` maps logits to probabilities."""
    from keras.src.ops import nn as ops_nn

    if isinstance(op, L.Activation):
        return activation_name(op.activation)
    if isinstance(op, L.Softmax) and op.axis in (-1, [-1], (-1,)):
        return "softmax"
    if isinstance(op, ops_nn.Softmax) and getattr(op, "axis", -1) == -1:
        return "softmax"
    if isinstance(op, ops_nn.Sigmoid):
        return "sigmoid"
    return None
