"""Which layers the statistics tap, and their im2col geometry.

K-FAC and gradient statistics need, for every call of a tapped layer, its
input ``a`` and its *pre-activation* output ``s`` (and later ``∂loss/∂s``);
`keras_autoprune.stats.replay` records them while the model is replayed.
This module chooses the layers (`resolve_taps`: Dense, Conv1D, Conv2D and
DepthwiseConv2D, under the same qualified names as in `DependencyGraph`,
``outer/inner``) and describes each as a `Tap`: ``a`` as im2col patches
``(B, T, K, Cin)``, ``∂loss/∂s`` as ``(B, T, Cout)``, and the parameters in
the same layout (`weight_matrix`, `split_weight_matrix`).

A `MultiHeadAttention` is one node of the graph, but its query, key, value
and output projections (``EinsumDense`` sublayers) are tapped as Dense
layers on their flattened feature axes (kind ``"einsum_dense"``: kernel
``(D, H, K)`` read as ``(D, H·K)``, output kernel ``(H, V, D)`` as
``(H·V, D)``), under the names ``mha/query``, ``mha/key``, ``mha/value`` and
``mha/attention_output``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.stats.replay import TapRecord, replay  # noqa: F401 - importable from here too


L = keras.layers

#: Layer classes whose statistics can be collected, by kind.
SUPPORTED_LAYERS: dict[str, type] = {
    "dense": L.Dense,
    "conv1d": L.Conv1D,
    "conv2d": L.Conv2D,
    "depthwise_conv2d": L.DepthwiseConv2D,
}
#: Projections of a MultiHeadAttention tapped as kind "einsum_dense" (the gate is not).
ATTENTION_PROJECTIONS = ("query_dense", "key_dense", "value_dense", "output_dense")


@dataclasses.dataclass(frozen=True)
class Tap:
    """A tapped layer and its im2col geometry.

    Attributes:
        name: qualified layer name (as in `DependencyGraph`).
        layer: the layer object.
        kind: ``"dense"``, ``"conv1d"``, ``"conv2d"``, ``"depthwise_conv2d"``
            or ``"einsum_dense"`` (a MultiHeadAttention projection).
        taps: kernel positions per patch ``K`` (``kh*kw``; 1 for Dense).
        in_channels: ``Cin``.
        out_channels: ``Cout`` (``Cin * depth_multiplier`` for depthwise).
        has_bias: whether the layer adds a bias.
        locations: output locations per example and call (``T``), or None
            when a spatial size is unknown.
    """

    name: str
    layer: Any
    kind: str
    taps: int
    in_channels: int
    out_channels: int
    has_bias: bool
    locations: int | None

    @property
    def depthwise(self) -> bool:
        return self.kind == "depthwise_conv2d"

    @property
    def multiplier(self) -> int:
        """Outputs per input channel (depthwise ``M``; 1 otherwise)."""
        return self.out_channels // self.in_channels if self.depthwise else 1

    @property
    def _channels_first(self) -> bool:
        return getattr(self.layer, "data_format", "channels_last") == "channels_first"

    def patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """Im2col of one call's input: ``(B, T, K, Cin)``.

        A patch is ordered ``(kh, kw, Cin)`` like ``kernel.reshape(-1, Cout)``
        (``tf.image.extract_patches``); zero padding gives zero entries.
        """
        x = _channels_last(inputs) if self._channels_first else inputs
        batch = tf.shape(x)[0]
        if self.kind in ("dense", "einsum_dense"):
            return tf.reshape(x, [batch, -1, 1, self.in_channels])
        layer = self.layer
        padding = layer.padding.upper()
        if self.kind == "conv1d":
            if padding == "CAUSAL":
                x = tf.pad(x, [[0, 0], [layer.dilation_rate[0] * (layer.kernel_size[0] - 1), 0], [0, 0]])
                padding = "VALID"
            x = x[:, None]
            sizes, strides, rates = (1, *layer.kernel_size), (1, *layer.strides), (1, *layer.dilation_rate)
        else:
            sizes, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
        patches = tf.image.extract_patches(
            x, sizes=[1, *sizes, 1], strides=[1, *strides, 1], rates=[1, *rates, 1], padding=padding
        )
        return tf.reshape(patches, [batch, -1, self.taps, self.in_channels])

    def deltas(self, delta: tf.Tensor) -> tf.Tensor:
        """``∂loss/∂s`` of one call as ``(B, T, Cout)``."""
        d = _channels_last(delta) if self._channels_first else delta
        return tf.reshape(d, [tf.shape(d)[0], -1, self.out_channels])


def _channels_last(x: tf.Tensor) -> tf.Tensor:
    rank = len(x.shape)
    return tf.transpose(x, [0, *range(2, rank), 1])


def layer_kind(layer: Any) -> str | None:
    """The supported kind of ``layer`` or None."""
    for kind, cls in SUPPORTED_LAYERS.items():
        if isinstance(layer, cls):
            return kind
    return None


def _unsupported_config(layer: Any) -> str | None:
    if getattr(layer, "quantization_mode", None):
        return f"quantization_mode={layer.quantization_mode!r}"
    if getattr(layer, "groups", 1) != 1:
        return f"groups={layer.groups}"
    return None


def resolve_taps(graph: DependencyGraph, layers: Sequence[str | Any] | None = None) -> dict[str, Tap]:
    """The layers to tap, keyed by qualified name, in topological order.

    Args:
        graph: the model's dependency graph.
        layers: qualified names or layer objects; None taps every supported
            layer (Dense, Conv1D, Conv2D, DepthwiseConv2D) and skips those
            with an unsupported configuration (grouped or quantized).

    Raises:
        ValueError: a requested layer is unknown, of an unsupported type or
            configuration.
    """
    first_calls = {}
    projections = {}
    for record in graph.records:
        first_calls.setdefault(record.name, record)
    for name, record in list(first_calls.items()):
        projections.update(attention_projections(name, record))
    names_of = {}
    for name, record in first_calls.items():
        names_of.setdefault(id(record.operation), name)
    for name, (record, sublayer) in projections.items():
        names_of.setdefault(id(sublayer), name)
    if layers is None:
        wanted = [n for n, r in first_calls.items() if layer_kind(r.operation) and not _unsupported_config(r.operation)]
        wanted += [n for n, (r, _) in projections.items() if not _unsupported_config(r.operation)]
    else:
        if isinstance(layers, (str, keras.layers.Layer)):
            layers = [layers]
        wanted = [_qualified_name(item, {**first_calls, **projections}, names_of) for item in layers]
    taps = {}
    for name in wanted:
        if name in projections:
            record, sublayer = projections[name]
            reason = _unsupported_config(record.operation)
            if reason:
                raise ValueError(f"Expected a MultiHeadAttention that is not quantized. Received: layer '{name}' with {reason}.")
            taps[name] = _projection_tap(name, record, sublayer)
            continue
        record = first_calls[name]
        kind, reason = layer_kind(record.operation), _unsupported_config(record.operation)
        if kind is None or reason:
            got = type(record.operation).__name__ if kind is None else reason
            raise ValueError(
                f"Expected layers of type {', '.join(c.__name__ for c in SUPPORTED_LAYERS.values())} "
                f"(ungrouped, not quantized). Received: layer '{name}' with {got}. "
                "Fix: leave it out of `layers`."
            )
        taps[name] = _make_tap(name, record, kind)
    return taps


def attention_projections(name: str, record) -> dict[str, tuple[Any, Any]]:
    """``{"mha/query": (record, sublayer), ...}`` for a MultiHeadAttention call (else empty)."""
    layer = record.operation
    if not (isinstance(layer, L.MultiHeadAttention) and record.first_call and layer.built):
        return {}
    subs = [getattr(layer, attribute) for attribute in ATTENTION_PROJECTIONS]
    return {f"{name}/{sub.name}": (record, sub) for sub in subs}


def _projection_tap(name: str, record, sublayer) -> Tap:
    """A MultiHeadAttention projection as a Dense layer on its flattened feature axes."""
    from keras_autoprune.graph.handlers.attention import attention_inputs

    layer = record.operation
    kernel_shape = tuple(int(d) for d in sublayer.kernel.shape)
    is_output = sublayer is layer.output_dense
    in_channels = int(np.prod(kernel_shape[:2])) if is_output else kernel_shape[0]
    out_channels = int(np.prod(kernel_shape)) // in_channels
    source = "query" if is_output or sublayer is layer.query_dense else "key" if sublayer is layer.key_dense else "value"
    shape = record.call.in_shapes[attention_inputs(record.call)[source]]
    locations = None if any(d is None for d in shape[1:-1]) else int(np.prod(shape[1:-1], dtype=np.int64))
    return Tap(name, sublayer, "einsum_dense", 1, in_channels, out_channels, sublayer.bias is not None, locations)


def _qualified_name(item, first_calls, names_of) -> str:
    if isinstance(item, str):
        if item not in first_calls:
            raise ValueError(
                f"Expected qualified layer names of the model (e.g. 'outer/inner' inside a nested model). "
                f"Received: layers containing {item!r}. Valid names: {sorted(first_calls)}"
            )
        return item
    if id(item) not in names_of:
        raise ValueError(
            f"Expected layers of this model. Received: layer object {getattr(item, 'name', item)!r}, "
            "which is not called in the model's graph."
        )
    return names_of[id(item)]


def _make_tap(name: str, record, kind: str) -> Tap:
    layer = record.operation
    kernel_shape = tuple(int(d) for d in layer.kernel.shape)
    in_channels = kernel_shape[-2]
    out_channels = kernel_shape[-1] * (in_channels if kind == "depthwise_conv2d" else 1)
    taps = int(np.prod(kernel_shape[:-2])) if kind != "dense" else 1
    out_shape = record.call.out_shapes[0]
    spatial = out_shape[2:] if getattr(layer, "data_format", None) == "channels_first" else out_shape[1:-1]
    locations = None if any(d is None for d in spatial) else int(np.prod(spatial, dtype=np.int64))
    return Tap(name, layer, kind, taps, in_channels, out_channels, layer.use_bias, locations)


def weight_matrix(kernel: Any, bias: Any, depthwise: bool, out_channels: int | None = None) -> np.ndarray:
    """``W̃``, the layer's parameters in the layout of the im2col patches (float64).

    ``[kernel.reshape(-1, Cout); bias]`` of shape ``(K·Cin [+1], Cout)``
    (``Cout = out_channels``, default the kernel's last axis; a
    MultiHeadAttention projection has several output axes, and its bias is
    flattened); depthwise (kernel ``(kh, kw, C, M)``): ``(C, K [+1], M)`` with
    ``W̃[c] = [kernel[:, :, c, :].reshape(K, M); bias[c·M:(c+1)·M]]``.
    """
    kernel = np.asarray(kernel, np.float64)
    if depthwise:
        channels, multiplier = kernel.shape[-2:]
        matrix = np.moveaxis(kernel.reshape(-1, channels, multiplier), 1, 0)
        if bias is None:
            return matrix
        return np.concatenate([matrix, np.asarray(bias, np.float64).reshape(channels, 1, multiplier)], axis=1)
    matrix = kernel.reshape(-1, out_channels or kernel.shape[-1])
    if bias is None:
        return matrix
    return np.concatenate([matrix, np.asarray(bias, np.float64).reshape(1, -1)], axis=0)


def split_weight_matrix(
    matrix: np.ndarray, kernel_shape: tuple[int, ...], has_bias: bool, depthwise: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The inverse of `weight_matrix`: ``(kernel, bias or None)``."""
    if depthwise:
        channels, multiplier = kernel_shape[-2:]
        taps = int(np.prod(kernel_shape[:-2]))
        kernel = np.moveaxis(matrix[:, :taps, :], 0, 1).reshape(kernel_shape)
        bias = matrix[:, taps, :].reshape(channels * multiplier) if has_bias else None
        return kernel, bias
    rows = int(np.prod(kernel_shape)) // matrix.shape[-1]
    return matrix[:rows].reshape(kernel_shape), (matrix[rows] if has_bias else None)
