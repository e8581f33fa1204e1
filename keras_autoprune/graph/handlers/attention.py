"""MultiHeadAttention: whole attention heads as an internal channel group.

A `keras.layers.MultiHeadAttention` with ``H`` heads projects the query,
key and value inputs with kernels ``W_q (D_q, H, K)``, ``W_k (D_k, H, K)``,
``W_v (D_v, H, V)`` (biases ``(H, K)``/``(H, V)``), attends per head, and
projects the concatenated heads back with ``W_o (H, V, D_out)`` (bias
``(D_out,)``)::

    out = Σ_h softmax(q_h k_hᵀ / √K) v_h W_o[h] + b_o

Heads. The heads are channels that live inside the layer, on no tensor: the
handler creates them as an *internal* space of ``H`` channels, one per head
(`WalkContext.internal_space`; group members with side ``"internal"``).
Nothing outside the layer ties them, so they form their own prunable group,
named after the layer, and removing a channel removes a whole head: its
``K`` columns of ``W_q``/``W_k`` (and biases), its ``V`` columns of ``W_v``
(and the gate's, with ``use_gate``), its ``V`` rows of ``W_o``; the pruned
layer has ``num_heads`` = heads kept.

Masking a head zeroes all of those. Exactness does not rest on the query and
key columns (a head with zero ``q`` and ``k`` still has uniform, non-zero
attention weights): it rests on ``v_h = 0`` (value columns and bias zeroed)
and ``W_o[h] = 0``, either of which makes the head's term vanish, so the
masked and the pruned layer agree exactly.

Streams. The query/key/value input widths and the output width are ordinary
channels: the inputs are read like a Dense layer's inputs (rows of
``W_q``/``W_k``/``W_v``; a removed channel's constant folds into the
projection biases, exact since every position sees every row), the output
is a fresh space like a Dense layer's (columns of ``W_o`` and ``b_o``; the
pruned layer gets an explicit ``output_shape``). In a transformer both sit on
the residual stream, which `LayerNormalization` blocks, so usually only the
heads are prunable.

Not supported (everything crossing the layer is blocked): quantized layers;
``return_attention_scores=True`` blocks only the heads (the scores carry
them on axis 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_autoprune.graph.handlers.base import (
    CallInfo,
    LayerHandler,
    LayerKeep,
    SublayerMember,
    TensorRef,
    channels,
    weights_format_problem,
)

#: Parameter names of `MultiHeadAttention.call`, in order.
CALL_ARGS = (
    "query", "value", "key", "query_mask", "value_mask", "key_mask", "attention_mask",
    "return_attention_scores", "training", "use_causal_mask",
)
#: Projection sublayers reading each input (gate: the query), by weight-key prefix.
_READERS = {"query": ("query", "gate"), "key": ("key",), "value": ("value",)}
_HEAD_AXIS = {"query": 1, "key": 1, "value": 1, "gate": 1, "attention_output": 0}


def _bound(call: CallInfo) -> dict[str, Any]:
    bound = dict(zip(CALL_ARGS, call.args))
    bound.update(call.kwargs)
    return bound


def attention_inputs(call: CallInfo) -> dict[str, int]:
    """``{"query": i, "key": j, "value": k}``: tensor indices of one call (key defaults to value)."""
    bound = _bound(call)
    indices = {name: bound[name].index for name in ("query", "value") if isinstance(bound.get(name), TensorRef)}
    key = bound.get("key")
    indices["key"] = key.index if isinstance(key, TensorRef) else indices.get("value")
    return indices


def _returns_scores(call: CallInfo) -> bool:
    return bool(_bound(call).get("return_attention_scores", False)) or len(call.out_shapes) > 1


class MultiHeadAttentionHandler(LayerHandler):
    """Heads as an internal group; query/key/value and output widths as Dense-like channels."""

    has_channel_weights = True

    def propagate(self, layer, call: CallInfo, ctx):
        indices = attention_inputs(call)
        heads = ctx.internal_space(layer.num_heads)
        outputs = [ctx.new_space(channels(call.out_shapes[0]))]
        bound = _bound(call)
        for name in ("query_mask", "value_mask", "key_mask", "attention_mask"):
            if isinstance(bound.get(name), TensorRef):
                ctx.fix(call.in_layouts[bound[name].index], f"it is an attention mask of layer '{layer.name}'")
        problem = weights_format_problem(layer)
        if problem is None and None in indices.values():
            problem = "query or value passed in an unrecognised way"
        if problem:
            reason = f"layer '{layer.name}' uses {problem}, which is not supported for pruning"
            for layout in [*call.in_layouts, heads, outputs[0]]:
                ctx.fix(layout, reason)
        if _returns_scores(call):
            ctx.fix(heads, f"layer '{layer.name}' returns its attention scores, which carry the heads")
            for i, shape in enumerate(call.out_shapes[1:], start=1):
                outputs.append(ctx.fix(ctx.new_space(channels(shape), i), "attention scores are not channels"))
        return outputs

    def constants(self, layer, call, in_values):
        # A removed output channel has zero kernel columns and bias.
        return [np.zeros(channels(call.out_shapes[0]))] + [
            np.full(channels(s), np.nan) for s in call.out_shapes[1:]
        ]

    def can_fold(self, layer) -> bool:
        return True

    # -- surgery --------------------------------------------------------
    def prune(self, layer, config, weights, keep: LayerKeep):
        weights, config = dict(weights), dict(config)
        indices = self._indices(layer, keep)
        heads = keep.internal[0]
        out_keep = keep.outputs[0]
        if any(np.any(keep.fold[indices[name]]) for name in _READERS) and not config["use_bias"]:
            config["use_bias"] = True
            for name in _projections(weights):
                kernel = weights[f"{name}/kernel"]
                weights[f"{name}/bias"] = np.zeros(kernel.shape[2:] if name == "attention_output" else kernel.shape[1:], kernel.dtype)
        for source, names in _READERS.items():
            in_keep, fold = keep.inputs[indices[source]], keep.fold[indices[source]]
            for name in names:
                if f"{name}/kernel" not in weights:
                    continue
                kernel = weights[f"{name}/kernel"]
                if np.any(fold) and f"{name}/bias" in weights:
                    shift = np.tensordot(fold.astype(np.float64), kernel.astype(np.float64), axes=(0, 0))
                    weights[f"{name}/bias"] = (weights[f"{name}/bias"] + shift).astype(kernel.dtype)
                weights[f"{name}/kernel"] = np.compress(heads, kernel[in_keep], axis=1)
                if f"{name}/bias" in weights:
                    weights[f"{name}/bias"] = np.compress(heads, weights[f"{name}/bias"], axis=0)
        kernel = np.compress(heads, weights["attention_output/kernel"], axis=0)
        weights["attention_output/kernel"] = kernel[..., out_keep]
        if "attention_output/bias" in weights:
            weights["attention_output/bias"] = weights["attention_output/bias"][..., out_keep]
        config["num_heads"] = int(heads.sum())
        config["output_shape"] = tuple(int(d) for d in weights["attention_output/kernel"].shape[2:])
        return config, weights

    def mask(self, layer, weights, keep: LayerKeep):
        weights = {k: np.array(v) for k, v in weights.items()}
        indices = self._indices(layer, keep)
        removed_heads = ~keep.internal[0]
        for key, value in weights.items():
            name, _, kind = key.partition("/")
            if name not in _HEAD_AXIS:
                continue
            axis = _HEAD_AXIS[name] if kind == "kernel" else 0
            if name == "attention_output" and kind == "bias":
                continue
            index = [slice(None)] * value.ndim
            index[axis] = removed_heads
            value[tuple(index)] = 0
        for source, names in _READERS.items():
            rows = keep.zero_rows[indices[source]]
            for name in names:
                if f"{name}/kernel" in weights:
                    weights[f"{name}/kernel"][rows] = 0
        removed_out = ~keep.outputs[0]
        weights["attention_output/kernel"][..., removed_out] = 0
        if "attention_output/bias" in weights:
            weights["attention_output/bias"][..., removed_out] = 0
        return weights

    @staticmethod
    def _indices(layer, keep: LayerKeep) -> dict[str, int]:
        if keep.call is None:
            raise ValueError(f"Layer '{layer.name}': pruning a MultiHeadAttention needs `LayerKeep.call`.")
        return attention_inputs(keep.call)

    # -- scoring --------------------------------------------------------
    def output_l1(self, layer, weights):
        kernel = np.abs(weights["attention_output/kernel"])
        return kernel.reshape(-1, kernel.shape[-1]).sum(axis=0)

    def internal_l1(self, layer, weights):
        total = np.zeros(layer.num_heads)
        for key, value in weights.items():
            name, _, kind = key.partition("/")
            if name in _HEAD_AXIS and kind == "kernel":
                total += np.moveaxis(np.abs(value), _HEAD_AXIS[name], 0).reshape(layer.num_heads, -1).sum(axis=1)
        return [total]

    def internal_members(self, layer, index: int) -> list[SublayerMember]:
        heads, key_dim, value_dim = layer.num_heads, layer.key_dim, layer.value_dim or layer.key_dim
        members = []
        for sublayer, width in ((layer.query_dense, key_dim), (layer.key_dense, key_dim), (layer.value_dense, value_dim)):
            members.append(SublayerMember(sublayer, "output", np.arange(heads * width), np.repeat(np.arange(heads), width)))
        members.append(
            SublayerMember(layer.output_dense, "input", np.arange(heads * value_dim), np.repeat(np.arange(heads), value_dim))
        )
        return members


def _projections(weights: dict) -> list[str]:
    return sorted({key.partition("/")[0] for key in weights if key.endswith("/kernel")})
