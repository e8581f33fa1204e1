"""Folded BatchNormalizations put back into a RED-compressed model, for fine-tuning.

Stage 0 folds each BatchNormalization into the layer before it
(`keras_autoprune.red.batchnorm`): ``W_f = s·W``, ``b_f = s(b − μ) + β`` with
``s = γ / √(σ² + ε)``. The compressed model therefore has no normalisation
left. That is what a data-free user wants (and what a TFLite converter does
anyway), but a user who fine-tunes the compressed model afterwards trains a
network without BatchNormalization at the learning rate of one with it; on
the converged CIFAR-10 MobileNetV2 of Benchmark v2, RED's 50% model
(53.97% data-free, merged clusters keeping their leader) collapsed to
10.00% during protocol 2's fine-tuning, and reached 87.70% with its
normalisations restored (docs/methods/red.md).

`restore_batchnorm` rebuilds the original model's graph with the compressed
model's layers and puts every folded BatchNormalization back after its
producer, restricted to the channels the producer kept. With the original
``γ``, ``σ²`` and ``μ`` (so ``s`` is unchanged), the producer and the
normalisation get

    W = W_f / s   (0 where s = 0),    bias = 0 (if the original layer had one),    β' = b_f + s·μ,

so that ``BN(W x) = s·(W x − μ) + β' = W_f x + b_f``: in inference mode the
restored model computes the compressed model's function (to float rounding).
In training mode each restored BatchNormalization normalises with batch
statistics again, as the original model did when it was trained. A
normalisation created without ``center`` gets one (``β'`` carries ``b_f``).
A convolution that stage 3 separated takes its normalisation after its 1×1
part.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.red.batchnorm import FoldedNorm, inference_affine, output_kernel_name, scale_outputs
from keras_autoprune.red.separation import block_parts, tiled_block
from keras_autoprune.surgery import LayerReplacement, PrunePlan
from keras_autoprune.surgery.clone import clone_layers, copy_layer, layer_from_config
from keras_autoprune.surgery.rebuild import nested_models
from keras_autoprune.surgery.replace import is_functional, named_layers
from keras_autoprune.surgery.weights import layer_weights


def check_restorable(graph: DependencyGraph) -> None:
    """Raises ValueError for a model `restore_batchnorm` cannot rebuild (custom layers seen through), before any work."""
    if graph.traced:
        names = sorted(layer.name for layer in graph.model.layers if id(layer) in graph.traced)
        raise ValueError(
            "`restore_batchnorm=True` rebuilds the original graph with the compressed layers, which it cannot do "
            f"through custom layers that RED traced ({names or 'nested'}). Received: a model with "
            f"{len(graph.traced)} such layer(s). Fix: pass restore_batchnorm=False and fine-tune the compressed "
            "model as it is, or register a pruning handler for the custom layer (docs/extending.md)."
        )


def kept_outputs(graph: DependencyGraph, plan: PrunePlan, layers: set[str]) -> dict[str, np.ndarray]:
    """``{layer: boolean mask of its output channels that merging kept}`` for the named ``layers``.

    ``graph`` is the graph of the model merging ran on; ``plan`` the merge plan (its group ids).
    """
    removed = plan.removed_atoms(graph)
    return {r.name: ~removed[r.out_layouts[0]] for r in graph.records if r.first_call and r.name in layers}


def restore_batchnorm(original: keras.Model, graph: DependencyGraph, compressed: keras.Model,
                      folds: list[FoldedNorm], kept: dict[str, np.ndarray]) -> keras.Model:
    """The compressed model rebuilt on the original graph, folded normalisations put back.

    Args:
        original: the model RED compressed (left unchanged).
        graph: ``DependencyGraph(original)`` (`check_restorable` passed).
        compressed: RED's compressed model (left unchanged): the same layers
            as ``original`` by qualified name, the folded normalisations
            removed, channels merged, convolutions possibly separated.
        folds: the folds of stage 0.
        kept: `kept_outputs` of every fold's producer.

    Returns:
        A new model with the compressed model's weights and a
        BatchNormalization after every producer of ``folds``.
    """
    source = named_layers(compressed)
    layers = named_layers(original)
    qualified = {id(layer): name for name, layer in layers.items()}
    replaced: dict[int, tuple] = {}  # id(original layer) -> (new layer, weights)
    for fold in folds:
        norm, producer, mask = layers[fold.norm], layers[fold.into], kept[fold.into]
        scale, _, mean = inference_affine(layer_weights(norm), float(norm.epsilon))
        new_layer, weights, folded_bias = _unfolded(producer, source[fold.into], scale[mask])
        replaced[id(producer)] = (new_layer, weights)
        replaced[id(norm)] = _norm(norm, mask, folded_bias + scale[mask] * mean[mask])

    def rebuild(layer):
        if id(layer) in replaced:
            return replaced[id(layer)]
        name = qualified.get(id(layer))
        if name not in source:
            raise ValueError(f"Layer '{name or layer.name}' of '{original.name}' has no counterpart in the "
                             "compressed model.")
        return copy_layer(source[name])

    inner = nested_models(graph)

    def nested(layer):  # a nested model is cloned layer by layer, on the compressed model's input widths
        entry = inner(layer)
        return None if entry is None else (entry[0], [tuple(t.shape) for t in source[qualified[id(layer)]].inputs])

    return clone_layers(original, rebuild, nested=nested)


def _unfolded(layer, counterpart, scale: np.ndarray) -> tuple:
    """``(new layer, weights, b_f)``: ``counterpart`` (the folded, compressed ``layer``) with ``W = W_f / s``.

    A separated convolution (a Sequential block, or a functional block with
    its input tiled, `keras_autoprune.red.separation.tiled_block`) is rebuilt
    with its last (1×1) layer unfolded.
    """
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    use_bias = bool(layer.get_config().get("use_bias", True))
    if is_functional(counterpart):  # tile, depthwise, 1×1
        copies, depthwise, pointwise = block_parts(counterpart)
        last, last_weights, folded_bias = _unfolded_linear(pointwise, inverse, use_bias)
        block = tiled_block(counterpart.name, layer_from_config(depthwise, depthwise.get_config()), last,
                            [layer_weights(depthwise), last_weights], counterpart.inputs[0].shape[-1],
                            copies, counterpart.inputs[0].dtype)
        return (*block.block(counterpart.name), folded_bias)
    if isinstance(counterpart, keras.Sequential):
        inner = list(counterpart.layers)
        rebuilt = [layer_from_config(l, l.get_config()) for l in inner[:-1]]
        weights = [layer_weights(l) for l in inner[:-1]]
        last, last_weights, folded_bias = _unfolded_linear(inner[-1], inverse, use_bias)
        block = LayerReplacement(rebuilt + [last], weights + [last_weights]).block(counterpart.name)
        return (*block, folded_bias)
    return _unfolded_linear(counterpart, inverse, use_bias)


def _unfolded_linear(counterpart, inverse: np.ndarray, use_bias: bool) -> tuple:
    weights = layer_weights(counterpart)
    name = output_kernel_name(weights)
    folded_bias = weights.pop("bias").astype(np.float64)
    weights[name] = scale_outputs(counterpart, weights[name], inverse)
    if use_bias:
        weights["bias"] = np.zeros(folded_bias.shape, weights[name].dtype)
    return layer_from_config(counterpart, dict(counterpart.get_config(), use_bias=use_bias)), weights, folded_bias


def _norm(norm: keras.layers.BatchNormalization, mask: np.ndarray, shift: np.ndarray) -> tuple:
    """``norm`` over the kept channels ``mask``, with ``β' = shift``."""
    weights = {key: value[mask] for key, value in layer_weights(norm).items()}
    weights["beta"] = shift.astype(weights["moving_mean"].dtype)
    config = dict(norm.get_config(), center=True)
    rebuilt = layer_from_config(norm, config)
    ordered = {key: weights[key] for key in ("gamma", "beta", "moving_mean", "moving_variance") if key in weights}
    return rebuilt, ordered
