"""Folding BatchNormalization into the linear layer that feeds it.

At inference a BatchNormalization is the per-channel affine map

    BN(y) = γ (y − μ) / √(σ² + ε) + β = s · y + (β − s μ),   s = γ / √(σ² + ε).

When ``y = W x + b`` comes from a convolution or Dense layer with a linear
activation, ``BN(y) = (s W) x + (s (b − μ) + β)``: the layer absorbs the
normalisation exactly,

    W' = W · s  (on the output-channel axis),    b' = s (b − μ) + β,

and the BatchNormalization is removed: in a Functional graph its node
disappears (the producer's output takes its place); in a Sequential model it
becomes a `keras.layers.Identity` of the same name (0 FLOPs, 0 parameters). The output axis is the kernel's last one for
``Conv*``/``Dense``/grouped convolutions and ``SeparableConv*``'s pointwise
kernel, the second last for ``Conv*Transpose``, and ``(C, M)`` of a
``DepthwiseConv*`` kernel (output ``c·M + m``).

A BatchNormalization is folded only when all of these hold, so the folded
model computes the same function (to float rounding): it normalises the
last axis; its input is the only output of a `LINEAR_CLASSES` layer with a
linear activation; that tensor has no other reader (not even a model
output); and both layers are called once. Nested models and custom layers
the graph sees through are included (a traced custom layer becomes its
traced functional model, as in `kap.apply_plan`). Other BatchNormalizations (after
an Add, after an activation) stay; RED treats them as per-channel weights.
The model is used in inference mode: the folded model has no batch
statistics to update, so it is not meant to be trained from scratch
(fine-tuning it is fine).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph, graph_of
from keras_autoprune.red.records import GraphIndex, clone_with, is_linear_layer
from keras_autoprune.surgery.clone import layer_from_config
from keras_autoprune.surgery.weights import layer_weights


@dataclasses.dataclass(frozen=True)
class FoldedNorm:
    """One BatchNormalization absorbed by its producer (qualified names)."""

    norm: str
    into: str


def fold_batchnorm(model: keras.Model, graph: DependencyGraph | None = None) -> tuple[keras.Model, list[FoldedNorm]]:
    """Returns a copy of ``model`` with every foldable BatchNormalization folded.

    Args:
        model: a built Sequential or Functional model (left unchanged).
        graph: ``DependencyGraph(model)`` if already built.

    Returns:
        ``(folded_model, folds)``: the new model (folded normalisations
        removed) and the list of folds.
        With nothing to fold the model is still a copy.

    Example:

    >>> inputs = keras.Input((6, 6, 2))
    >>> x = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    >>> outputs = keras.layers.BatchNormalization(name="bn")(x)
    >>> folded, folds = fold_batchnorm(keras.Model(inputs, outputs))
    >>> folds, [layer.name for layer in folded.layers[1:]]
    ([FoldedNorm(norm='bn', into='conv')], ['conv'])
    """
    graph = graph_of(model, graph)
    index = GraphIndex(graph)
    plans: dict[int, tuple] = {}
    drop: set[int] = set()
    folds = []
    for record in graph.records:
        norm = record.operation
        producer = _foldable_producer(index, record)
        if producer is None:
            continue
        drop.add(id(norm))
        layer = producer.operation
        config, weights = _fold(layer, layer_weights(layer), layer_weights(norm), float(norm.epsilon))
        plans[id(layer)] = (layer_from_config(layer, config), weights)
        folds.append(FoldedNorm(norm=record.name, into=producer.name))
    return clone_with(model, graph, lambda layer: plans.get(id(layer)), frozenset(drop)), folds


def _foldable_producer(index: GraphIndex, record):
    norm = record.operation
    if type(norm) is not keras.layers.BatchNormalization or index.calls[id(norm)] != 1:
        return None
    rank = len(record.call.in_shapes[0])
    axis = norm.axis if isinstance(norm.axis, int) else None
    if axis is None or axis % rank != rank - 1 or len(record.input_keys) != 1:
        return None
    producer = index.producer(record.input_keys[0])
    if producer is None or len(producer.output_keys) != 1:
        return None
    layer = producer.operation
    if not is_linear_layer(layer) or index.calls[id(layer)] != 1 or index.readers(record.input_keys[0]) != 1:
        return None
    if getattr(layer.activation, "__name__", None) != "linear":
        return None
    return producer


def _fold(layer, weights: dict, norm_weights: dict, epsilon: float) -> tuple[dict, dict]:
    """Config and weights of ``layer`` with the normalisation absorbed."""
    scale, shift, mean = inference_affine(norm_weights, epsilon)
    name = output_kernel_name(weights)
    bias = weights.get("bias", np.zeros(scale.shape, weights[name].dtype)).astype(np.float64)
    dtype = weights[name].dtype
    new = dict(weights)
    new[name] = scale_outputs(layer, weights[name], scale)
    new["bias"] = (scale * (bias - mean) + shift).astype(dtype)
    return dict(layer.get_config(), use_bias=True), new


def inference_affine(norm_weights: dict, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(s, β, μ)`` of a BatchNormalization's inference map ``s·(y − μ) + β``, ``s = γ / √(σ² + ε)`` (float64)."""
    variance = norm_weights["moving_variance"].astype(np.float64)
    scale = norm_weights.get("gamma", np.ones_like(variance)).astype(np.float64) / np.sqrt(variance + epsilon)
    shift = norm_weights.get("beta", np.zeros_like(variance)).astype(np.float64)
    return scale, shift, norm_weights["moving_mean"].astype(np.float64)


def output_kernel_name(weights: dict) -> str:
    """The weight holding a linear layer's output channels: ``"pointwise_kernel"`` or ``"kernel"``."""
    return "pointwise_kernel" if "pointwise_kernel" in weights else "kernel"


def scale_outputs(layer, kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``kernel`` of ``layer`` with output channel ``o`` multiplied by ``scale[o]`` (computed in float64).

    The output axis is the last one, the second last for ``Conv*Transpose``,
    and ``(C, M)`` for a ``DepthwiseConv*`` kernel (output ``c·M + m``).
    """
    wide = kernel.astype(np.float64)
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        wide = wide * scale.reshape(kernel.shape[-2:])
    elif isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)):
        wide = wide * scale[:, None]
    else:
        wide = wide * scale
    return wide.astype(kernel.dtype)
