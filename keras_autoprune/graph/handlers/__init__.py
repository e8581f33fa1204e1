"""Handler registry: which `LayerHandler` describes which layer class.

The registry is an explicit allow-list keyed by the exact class: a subclass
of a known layer (which may override ``call``) is unknown until registered,
because pruning it with its parent's rules could silently produce a wrong
model. Unknown layers block the channels that cross them.
"""

from __future__ import annotations

import keras
from keras.src.ops import core as _core_ops
from keras.src.ops import nn as _nn_ops
from keras.src.ops import numpy as _np_ops

from keras_autoprune.graph.handlers.applications import LayerScaleHandler, application_handlers
from keras_autoprune.graph.handlers.activation import ActivationHandler, PReLUHandler, RescalingHandler
from keras_autoprune.graph.handlers.attention import MultiHeadAttentionHandler
from keras_autoprune.graph.handlers.base import CallInfo, LayerHandler, LayerKeep, TensorRef
from keras_autoprune.graph.handlers.channelwise import (
    BatchNormHandler,
    ChannelwiseHandler,
    GroupNormHandler,
    NormalizationHandler,
    StatisticsBlockingHandler,
)
from keras_autoprune.graph.handlers.depthwise import DepthwiseHandler, SeparableHandler
from keras_autoprune.graph.handlers.embedding import EmbeddingHandler
from keras_autoprune.graph.handlers.linear import LinearHandler
from keras_autoprune.graph.handlers.merge import ConcatenateHandler, MergeHandler
from keras_autoprune.graph.handlers.passthrough import PassThroughHandler, ResizingHandler, ZeroPaddingHandler
from keras_autoprune.graph.handlers.reduction import ReductionHandler
from keras_autoprune.graph.handlers.reshape import ReshapeHandler
from keras_autoprune.graph.handlers.shape_ops import IndexMapHandler, operation_handlers

__all__ = [
    "CallInfo",
    "LayerHandler",
    "LayerKeep",
    "TensorRef",
    "get_handler",
    "register_handler",
    "registered_classes",
]

L = keras.layers

_PASS_THROUGH = [
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
    L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
    L.GaussianDropout, L.GaussianNoise, L.AlphaDropout,
    L.ActivityRegularization, L.Identity,
]
_ACTIVATIONS = [L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Softmax]
_UNARY_OPS = [
    _nn_ops.Relu, _nn_ops.Relu6, _nn_ops.Sigmoid, _nn_ops.Softplus, _nn_ops.Softsign,
    _nn_ops.Silu, _nn_ops.LogSigmoid, _nn_ops.LeakyRelu, _nn_ops.HardSigmoid,
    _nn_ops.HardSilu, _nn_ops.Elu, _nn_ops.Selu, _nn_ops.Gelu, _nn_ops.Celu,
    _nn_ops.HardTanh, _nn_ops.Softmax, _nn_ops.LogSoftmax,
    _np_ops.Abs, _np_ops.Absolute, _np_ops.Exp, _np_ops.Square, _np_ops.Sqrt,
    _np_ops.Negative, _np_ops.Tanh, _np_ops.Clip, _core_ops.Cast,
]
_MERGES = [
    L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum,
    _np_ops.Add, _np_ops.Subtract, _np_ops.Multiply, _np_ops.Divide,
    _np_ops.TrueDivide, _np_ops.Maximum, _np_ops.Minimum,
]


def _default_registry() -> dict[type, LayerHandler]:
    pass_through, activation, merge = PassThroughHandler(), ActivationHandler(), MergeHandler()
    registry: dict[type, LayerHandler] = {}
    registry.update({cls: LinearHandler("filters") for cls in (L.Conv1D, L.Conv2D, L.Conv3D)})
    registry.update(
        {cls: LinearHandler("filters", transposed=True) for cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)}
    )
    registry[L.Dense] = LinearHandler("units")
    registry[L.MultiHeadAttention] = MultiHeadAttentionHandler()
    registry[L.Embedding] = EmbeddingHandler()
    registry.update({cls: DepthwiseHandler() for cls in (L.DepthwiseConv1D, L.DepthwiseConv2D)})
    registry.update({cls: SeparableHandler() for cls in (L.SeparableConv1D, L.SeparableConv2D)})
    registry[L.BatchNormalization] = BatchNormHandler()
    registry[L.GroupNormalization] = GroupNormHandler()
    registry.update({cls: StatisticsBlockingHandler() for cls in (L.LayerNormalization, L.UnitNormalization, L.RMSNormalization)})
    registry[L.Normalization] = NormalizationHandler()
    registry[L.PReLU] = PReLUHandler()
    registry[L.Rescaling] = RescalingHandler()
    registry.update({cls: pass_through for cls in _PASS_THROUGH})
    registry.update({cls: ZeroPaddingHandler() for cls in (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D)})
    registry[L.Resizing] = ResizingHandler()
    registry.update({cls: activation for cls in _ACTIVATIONS + _UNARY_OPS})
    registry.update({cls: merge for cls in _MERGES})
    registry.update({cls: ConcatenateHandler() for cls in (L.Concatenate, _np_ops.Concatenate)})
    registry.update({cls: ReshapeHandler() for cls in (L.Flatten, L.Reshape)})
    registry.update(operation_handlers())
    registry.update({cls: ReductionHandler() for cls in (_np_ops.Mean, _np_ops.Max, _np_ops.Min)})
    registry.update(application_handlers())
    return registry


_REGISTRY = _default_registry()
_UNKNOWN = LayerHandler()


def register_handler(layer_class: type, handler: LayerHandler) -> None:
    """Declares how channels flow through ``layer_class`` (exact class).

    Args:
        layer_class: a `keras.layers.Layer` (or `keras.Operation`) subclass.
        handler: a `LayerHandler` instance. Existing handlers can be reused
            for custom layers that behave like a built-in one, e.g.
            ``register_handler(MyScale, ChannelwiseHandler())``.

    Example:

    >>> import keras, keras_autoprune as kap
    >>> class Swish(keras.layers.Layer):
    ...     def call(self, x):
    ...         return x * keras.ops.sigmoid(x)
    >>> kap.register_handler(Swish, kap.handlers.ActivationHandler())
    """
    if not isinstance(layer_class, type):
        raise TypeError(
            "`layer_class` must be a class (e.g. `MyLayer`, not `MyLayer()`). "
            f"Received: layer_class={layer_class!r}"
        )
    if not isinstance(handler, LayerHandler):
        raise TypeError(
            "`handler` must be an instance of keras_autoprune.handlers.LayerHandler "
            "(or a subclass). Received: "
            f"handler={handler!r} of type {type(handler).__name__}"
        )
    _REGISTRY[layer_class] = handler


def get_handler(layer) -> LayerHandler | None:
    """The handler registered for ``type(layer)``, or None if it is unknown."""
    return _REGISTRY.get(type(layer))


def registered_classes() -> list[type]:
    """All classes with a handler, for documentation and tests."""
    return list(_REGISTRY)


__all__ += [
    "ActivationHandler", "BatchNormHandler", "ChannelwiseHandler", "ConcatenateHandler",
    "DepthwiseHandler", "EmbeddingHandler", "GroupNormHandler", "IndexMapHandler", "LayerScaleHandler", "LinearHandler", "MergeHandler", "MultiHeadAttentionHandler",
    "NormalizationHandler", "PReLUHandler", "PassThroughHandler", "RescalingHandler",
    "ReshapeHandler", "SeparableHandler", "StatisticsBlockingHandler", "ZeroPaddingHandler",
]
