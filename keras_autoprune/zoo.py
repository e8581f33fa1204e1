"""Reference architectures used by the examples and the benchmarks.

``resnet_cifar(depth)``: the CIFAR ResNets of He et al. (2016), ``depth =
6n + 2`` (ResNet-20: n = 3, 0.27M parameters; ResNet-56: n = 9): a 3x3 stem,
three stages of n basic blocks with 16/32/64 channels (``width`` scales
them), stride 2 at the start of stages 2 and 3 with a 1x1 projection
shortcut, global average pooling and a Dense classifier (logits).

``mobilenetv2_cifar(alpha)``: MobileNetV2 with strides for 32x32 inputs.

Both take ``pixel_statistics=(mean, variance)`` (per channel, in the units of
the raw input) to put a `keras.layers.Normalization` first, so that the model
reads raw pixels in [0, 255].
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

L = keras.layers


def _conv_bn(x, filters: int, stride: int, name: str, relu: bool = True):
    x = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x) if relu else x


def _inputs(input_shape, pixel_statistics):
    """The model's input and the tensor its first layer reads (normalised if statistics are given)."""
    inputs = keras.Input(input_shape)
    if pixel_statistics is None:
        return inputs, inputs
    mean, variance = pixel_statistics
    return inputs, L.Normalization(mean=list(map(float, mean)), variance=list(map(float, variance)), name="normalize")(inputs)


def resnet_cifar(
    depth: int = 20,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    classes: int = 10,
    width: int = 16,
    pixel_statistics: tuple[Sequence[float], Sequence[float]] | None = None,
) -> keras.Model:
    """A CIFAR-style ResNet of ``depth = 6n + 2`` layers (see the module docstring)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"`depth` must be 6n + 2 (20, 32, 44, 56, 110). Received: depth={depth}")
    blocks = (depth - 2) // 6
    inputs, x = _inputs(input_shape, pixel_statistics)
    x = _conv_bn(x, width, 1, "stem")
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"s{stage + 1}b{block + 1}"
            y = _conv_bn(x, filters, stride, f"{name}_a")
            y = _conv_bn(y, filters, 1, f"{name}_b", relu=False)
            if stride != 1 or x.shape[-1] != filters:
                x = L.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
                x = L.BatchNormalization(name=f"{name}_proj_bn")(x)
            x = L.ReLU(name=f"{name}_out")(L.Add(name=f"{name}_add")([x, y]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name=f"resnet{depth}")


MOBILENETV2_CIFAR_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
"""MobileNetV2's ``(expansion t, channels c, repeats n, first stride s)`` rows, for 32x32 inputs:
the stem and the second row keep stride 1 (ImageNet's have stride 2), so the
feature maps are 32, 16, 8 and 4 pixels wide."""


def _scaled(channels: float, divisor: int = 8) -> int:
    """``channels`` rounded to a multiple of ``divisor``, never more than 10% below it (MobileNetV2's rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _inverted_residual(x, expansion: int, filters: int, stride: int, name: str):
    """1x1 expansion -> 3x3 depthwise -> 1x1 linear bottleneck, with a residual add when shapes allow."""
    inputs, channels = x, x.shape[-1]
    if expansion != 1:
        x = L.Conv2D(channels * expansion, 1, use_bias=False, name=f"{name}_expand")(x)
        x = L.BatchNormalization(name=f"{name}_expand_bn")(x)
        x = L.ReLU(6.0, name=f"{name}_expand_relu")(x)
    x = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = L.BatchNormalization(name=f"{name}_dw_bn")(x)
    x = L.ReLU(6.0, name=f"{name}_dw_relu")(x)
    x = L.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(x)
    x = L.BatchNormalization(name=f"{name}_project_bn")(x)
    if stride == 1 and channels == filters:
        x = L.Add(name=f"{name}_add")([inputs, x])
    return x


def mobilenetv2_cifar(
    alpha: float = 0.5,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    classes: int = 10,
    last_channels: int = 1280,
    pixel_statistics: tuple[Sequence[float], Sequence[float]] | None = None,
) -> keras.Model:
    """MobileNetV2 (Sandler et al., 2018) for 32x32 images: inverted residuals,
    depthwise 3x3 convolutions and linear bottlenecks (`MOBILENETV2_CIFAR_BLOCKS`).

    ``alpha`` scales every width but ``last_channels`` (as in the paper for
    ``alpha < 1``). ``alpha=0.5``: 0.72M parameters and 57.8M FLOPs per
    image by `count_flops` (ResNet-20: 0.27M and 82.1M).
    """
    inputs, x = _inputs(input_shape, pixel_statistics)
    x = L.Conv2D(_scaled(32 * alpha), 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    for row, (expansion, channels, repeats, stride) in enumerate(MOBILENETV2_CIFAR_BLOCKS):
        for block in range(repeats):
            x = _inverted_residual(x, expansion, _scaled(channels * alpha), stride if block == 0 else 1, f"b{row + 1}_{block + 1}")
    x = L.Conv2D(last_channels, 1, use_bias=False, name="head_conv")(x)
    x = L.BatchNormalization(name="head_bn")(x)
    x = L.ReLU(6.0, name="head_relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name=f"mobilenetv2_cifar_{alpha:g}")
