"""RED stage 3: uneven depthwise separation of hashed convolutions.

After hashing, the k×k kernels ``K[:, :, c, o]`` that one input channel ``c``
sends to the output channels ``o`` often repeat. Let ``U_c`` be the distinct
non-zero kernels of input channel ``c`` and ``u_c = |U_c|``. Then

    y_o = sum_c conv(x_c, K[:, :, c, o])
        = sum_c sum_{m < u_c} [K[:, :, c, o] = U_c[m]] · conv(x_c, U_c[m]),

a depthwise convolution applying the distinct kernels to their channel,
followed by a 1×1 convolution whose entries are 0 or 1.

Decision (uneven multiplier with standard layers): Keras's depthwise layers
have one ``depth_multiplier`` for all channels, so the block computes **one
depthwise convolution with the largest multiplier** ``M = max_c u_c``
(channel ``c``'s unused slots hold zero kernels) followed by a 1×1
convolution from ``C_in·M`` channels, whose rows of the unused slots are 0.
Gathering channels by multiplier would need gather ops that cost memory
traffic and are not layers.

Decision (how the multiplier is written, session 26): with ``M > 1`` the
input is **tiled**, ``Concatenate([x] * M)`` (channel ``m·C_in + c`` holds
``x_c``), and a depthwise convolution with multiplier 1 applies ``U_c[m]``
to channel ``m·C_in + c``; the 1×1 rows follow that order. It is the same
arithmetic as ``DepthwiseConv2D(depth_multiplier=M)``, which LiteRT runs two
to three times slower (measured in docs/methods/red.md: a 16-channel 3×3
convolution at 32×32 takes 46.6 µs, the block with ``M = 2`` 80.9 µs with the
multiplier and 32.0 µs tiled). The block keeps the convolution's name: a
`keras.Sequential` (depthwise, 1×1) when ``M = 1``, else a small functional
`keras.Model` (tile, depthwise, 1×1) inserted by `kap.replace_layers`; the
depthwise part takes the strides, padding and dilation, the 1×1 part the
bias and activation.

Cost, at ``P`` output positions (``kap.count_flops`` formulas, computed by
`keras_autoprune.flops_formulas.call_flops` on both blocks; ``b + a``: the
bias and activation of the ``C_out·P`` outputs, the same in both):

    before: 2·K·C_in·C_out·P + b + a        after: 2·K·C_in·M·P + 2·C_in·M·C_out·P + b + a

A convolution is separated only when ``after < before``, i.e.
``M·(K + C_out) < K·C_out``. Conv1D and Conv2D with ``groups=1``,
``channels_last`` and ``"valid"``/``"same"`` padding are candidates (there is
no DepthwiseConv3D).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_autoprune.flops_formulas import call_flops
from keras_autoprune.graph.dependency import DependencyGraph, graph_of
from keras_autoprune.graph.handlers import CallInfo
from keras_autoprune.red.records import GraphIndex, clone_with
from keras_autoprune.surgery import LayerReplacement, replace_layers
from keras_autoprune.surgery.weights import layer_weights, weight_keys


@dataclasses.dataclass(frozen=True)
class Separation:
    """One separated convolution.

    Attributes:
        layer: qualified name.
        multiplier: ``M``, the depthwise multiplier.
        distinct_kernels: ``sum_c u_c``.
        flops_before: FLOPs of the convolution (all calls).
        flops_after: FLOPs of the depthwise + 1×1 block (all calls).
        kernel_error: ``‖W̃ − W‖² / ‖W‖²`` of the kernel the block computes
            (0 for the exact separation; see `keras_autoprune.red.low_rank`).
    """

    layer: str
    multiplier: int
    distinct_kernels: int
    flops_before: int
    flops_after: int
    kernel_error: float = 0.0


def distinct_kernels(kernel: np.ndarray, limit: int | None = None) -> list[list[np.ndarray]] | None:
    """Per input channel, the distinct non-zero kernels in first-seen output order.

    Kernels are compared by value (``-0.0 == 0.0``), as the 0/1 pointwise
    entries are computed, so every output uses exactly one slot.

    Args:
        kernel: ``(*taps, C_in, C_out)``.
        limit: stop and return None as soon as one input channel has more
            than ``limit`` distinct kernels (None: no limit).

    Example:

    >>> k = np.zeros((1, 2, 1, 3)); k[..., 0, 0] = k[..., 0, 2] = [1.0, 2.0]
    >>> [[u.tolist() for u in unique] for unique in distinct_kernels(k)]
    [[[[1.0, 2.0]]]]
    """
    taps = kernel.shape[:-2]
    flat = kernel.reshape((-1,) + kernel.shape[-2:])  # (K, C_in, C_out)
    out = []
    for c in range(kernel.shape[-2]):
        columns = flat[:, c, :].T  # (C_out, K): one kernel per row
        columns = columns[np.any(columns != 0, axis=1)]
        _, first = np.unique(columns, axis=0, return_index=True)
        if limit is not None and len(first) > limit:
            return None
        out.append([columns[i].reshape(taps) for i in np.sort(first)])
    return out


def separate_layer(layer: keras.layers.Layer, name: str, call: CallInfo, calls: int = 1) -> tuple[LayerReplacement, Separation] | None:
    """The depthwise + 1×1 replacement of ``layer`` if it lowers FLOPs, else None.

    Args:
        layer: a Conv1D/Conv2D layer.
        name: its qualified name (for the report).
        call: its first call (input and output shapes).
        calls: how many times the layer is called.
    """
    weights = layer_weights(layer)
    kernel = weights["kernel"]
    taps, (c_in, c_out) = int(np.prod(kernel.shape[:-2])), kernel.shape[-2:]
    # Cheaper only if M·(K + C_out) < K·C_out: stop at the first channel with more kernels.
    kernels = distinct_kernels(kernel, limit=(taps * c_out - 1) // (taps + c_out))
    if kernels is None:
        return None
    multiplier = max(1, max(len(k) for k in kernels))
    # slot (c, m) is channel m·C_in + c of the tiled input
    depthwise = np.zeros(kernel.shape[:-2] + (multiplier * c_in, 1), kernel.dtype)
    pointwise = np.zeros((1,) * (kernel.ndim - 2) + (multiplier * c_in, c_out), kernel.dtype)
    for c, unique in enumerate(kernels):
        for m, k in enumerate(unique):
            depthwise[..., m * c_in + c, 0] = k
            uses = np.all(kernel[..., c, :] == k[..., None], axis=tuple(range(kernel.ndim - 2)))
            pointwise[..., m * c_in + c, :] = uses.astype(kernel.dtype)
    found = separated_block(layer, depthwise, pointwise, weights.get("bias"), call, calls)
    if found is None:
        return None
    replacement, before, after = found
    return replacement, Separation(name, multiplier, sum(len(k) for k in kernels), before, after)


def separated_block(layer: keras.layers.Layer, depthwise: np.ndarray, pointwise: np.ndarray, bias: np.ndarray | None,
                    call: CallInfo, calls: int = 1) -> tuple[LayerReplacement, int, int] | None:
    """The depthwise + 1×1 block computing ``layer`` from the given weights, if it costs fewer FLOPs.

    Args:
        layer: the Conv1D/Conv2D layer the block replaces (its strides,
            padding, dilation, activation and dtype policy).
        depthwise: ``(*taps, M·C_in, 1)``, slot ``(c, m)`` at channel ``m·C_in + c``.
        pointwise: ``(1, …, M·C_in, C_out)`` in the same slot order.
        bias: the 1×1 part's bias, or None without one.
        call: the layer's first call; ``calls``: how many times it is called.

    Returns:
        ``(replacement, flops_before, flops_after)``, or None when the block
        costs at least as many FLOPs as the convolution.
    """
    config = layer.get_config()
    c_in, c_out = layer_weights(layer)["kernel"].shape[-2:]
    multiplier = depthwise.shape[-2] // c_in
    rank = depthwise.ndim - 2
    depthwise_class = keras.layers.DepthwiseConv1D if rank == 1 else keras.layers.DepthwiseConv2D
    conv_class = keras.layers.Conv1D if rank == 1 else keras.layers.Conv2D
    first = depthwise_class(
        kernel_size=config["kernel_size"], strides=config["strides"], padding=config["padding"],
        dilation_rate=config["dilation_rate"], use_bias=False, dtype=layer.dtype_policy, name=f"{layer.name}_depthwise",
    )
    second = conv_class(c_out, 1, activation=config["activation"], use_bias=bias is not None,
                        dtype=layer.dtype_policy, name=f"{layer.name}_pointwise")
    in_shape, out_shape = call.in_shapes[0], call.out_shapes[0]
    tiled = tuple(in_shape[:-1]) + (multiplier * c_in,)
    middle = tuple(out_shape[:-1]) + (multiplier * c_in,)
    before = calls * call_flops(layer, [in_shape], [out_shape])
    after = calls * (call_flops(first, [tiled], [middle]) + call_flops(second, [middle], [out_shape]))
    if after >= before:
        return None
    second_weights = {"kernel": pointwise}
    if bias is not None:
        second_weights["bias"] = bias
    if multiplier == 1:
        replacement = LayerReplacement([first, second], [{"kernel": depthwise}, second_weights])
    else:
        replacement = tiled_block(layer.name, first, second, [{"kernel": depthwise}, second_weights], c_in, multiplier,
                                  layer.compute_dtype)
    return replacement, before, after


def tiled_block(name: str, depthwise: keras.layers.Layer, pointwise: keras.layers.Layer, weights: list[dict],
                channels: int, copies: int, dtype: str) -> LayerReplacement:
    """The separated block with its input tiled: ``Concatenate([x] * copies)``, ``depthwise``, ``pointwise``.

    A functional `keras.Model` named ``name`` whose input has ``channels``
    channels (any spatial size); ``weights`` are those of ``depthwise`` and
    ``pointwise`` by their own keys.
    """
    rank = len(depthwise.kernel_size)
    inputs = keras.Input((None,) * rank + (channels,), dtype=dtype)
    tile = keras.layers.Concatenate(axis=-1, name=f"{name}_tile")([inputs] * copies)
    block = keras.Model(inputs, pointwise(depthwise(tile)), name=name)
    keys = dict(zip(map(id, block.weights), weight_keys(block)))
    values = {keys[id(variable)]: layer_values[key]
              for layer, layer_values in zip((depthwise, pointwise), weights)
              for key, variable in zip(weight_keys(layer), layer.weights)}
    return LayerReplacement([block], [values])


def block_parts(block: keras.Model) -> tuple[int, keras.layers.Layer, keras.layers.Layer]:
    """``(M, depthwise, pointwise)`` of a separated block: a functional `tiled_block` (tile, depthwise, 1×1) or a
    `keras.Sequential` (depthwise, 1×1, ``M = 1``)."""
    if isinstance(block, keras.Sequential):
        depthwise, pointwise = block.layers
        return 1, depthwise, pointwise
    tile, depthwise, pointwise = block.layers[1:]
    return len(tile.input), depthwise, pointwise


def is_candidate(record) -> bool:
    """Whether a graph record is the first call of a convolution that stage 3 may separate.

    Conv1D and Conv2D (not subclasses) with ``groups=1``, ``channels_last``
    and ``"valid"``/``"same"`` padding.
    """
    layer = record.operation
    if not record.first_call or type(layer) not in (keras.layers.Conv1D, keras.layers.Conv2D):
        return False
    config = layer.get_config()
    return (config.get("groups", 1) == 1 and config.get("data_format", "channels_last") == "channels_last"
            and config["padding"] in ("valid", "same"))


def separate_depthwise(model: keras.Model, graph: DependencyGraph | None = None,
                       keep=None) -> tuple[keras.Model, list[Separation]]:
    """Separates every convolution of ``model`` where that lowers FLOPs.

    Args:
        model: a built Sequential or Functional model (left unchanged),
            usually hashed.
        graph: ``DependencyGraph(model)`` if already built.
        keep: optional ``keep(layer, call, separation) -> bool``, asked
            about every block that lowers FLOPs (e.g.
            `keras_autoprune.red.block_latency.BlockTimer.keep`).

    Returns:
        ``(new_model, separations)``; with nothing separated the model is a
        copy.
    """
    return replace_candidates(model, graph, separate_layer, keep)


def replace_candidates(model: keras.Model, graph: DependencyGraph | None, separate_one,
                       keep=None) -> tuple[keras.Model, list[Separation]]:
    """Replaces every candidate convolution (`is_candidate`) for which ``separate_one`` returns a block.

    ``separate_one(layer, qualified_name, call, calls)`` returns
    ``(LayerReplacement, Separation)`` or None; ``keep(layer, call,
    separation)``, if given, can still refuse it. The model is left
    unchanged; with nothing replaced the result is a copy.
    """
    graph = graph_of(model, graph)
    index = GraphIndex(graph)
    replacements, separations = {}, []
    for record in graph.records:
        if not is_candidate(record):
            continue
        layer = record.operation
        found = separate_one(layer, record.name, record.call, index.calls[id(layer)])
        if found is not None and (keep is None or keep(layer, record.call, found[1])):
            replacements[record.name], separation = found
            separations.append(separation)
    if graph.traced and replacements:  # custom layers become their traced functional models, which name their layers
        model = clone_with(model, graph, lambda layer: None)
    return replace_layers(model, replacements), separations
