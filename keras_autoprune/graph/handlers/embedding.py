"""Embedding: a lookup table whose columns are new channels.

``Embedding(input_dim, output_dim)`` maps each integer index to a row of
``embeddings (input_dim, output_dim)``: its output channels are a fresh
space (like a Dense layer's), removed by slicing columns of the table and
setting ``output_dim``; a masked channel has a zero column, so it outputs 0.
Its input holds indices, not channels: the input's last axis is never
pruned across it. Quantized or LoRA-enabled embeddings block pruning.
"""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.handlers.base import LayerHandler, LayerKeep, channels, weights_format_problem


class EmbeddingHandler(LayerHandler):
    """Output channels = columns of the embedding table."""

    has_channel_weights = True

    def propagate(self, layer, call, ctx):
        for layout in call.in_layouts:
            ctx.fix(layout, f"it holds the indices looked up by '{layer.name}'")
        out = ctx.new_space(channels(call.out_shapes[0]))
        problem = weights_format_problem(layer)
        if problem:
            ctx.fix(out, f"layer '{layer.name}' uses {problem}, which is not supported for pruning")
        return [out]

    def constants(self, layer, call, in_values):
        return [np.zeros(channels(call.out_shapes[0]))]

    def prune(self, layer, config, weights, keep: LayerKeep):
        kept = keep.outputs[0]
        weights = dict(weights, embeddings=weights["embeddings"][:, kept])
        return dict(config, output_dim=int(kept.sum())), weights

    def mask(self, layer, weights, keep: LayerKeep):
        weights = {k: np.array(v) for k, v in weights.items()}
        weights["embeddings"][:, ~keep.outputs[0]] = 0
        return weights

    def output_l1(self, layer, weights):
        return np.abs(weights["embeddings"]).sum(axis=0)
