"""Reference architectures used by the examples and the benchmarks.

``resnet_cifar(depth)``: the CIFAR ResNets of He et al. (2016), ``depth =
6n + 2`` (ResNet-20: n = 3, 0.27M parameters; ResNet-56: n = 9): a 3x3 stem,
three stages of n basic blocks with 16/32/64 channels (``width`` scales
them), stride 2 at the start of stages 2 and 3 with a 1x1 projection
shortcut, global average pooling and a Dense classifier (logits).
"""

from __future__ import annotations

import keras

L = keras.layers


def _conv_bn(x, filters: int, stride: int, name: str, relu: bool = True):
    x = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x) if relu else x


def resnet_cifar(
    depth: int = 20,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    classes: int = 10,
    width: int = 16,
) -> keras.Model:
    """A CIFAR-style ResNet of ``depth = 6n + 2`` layers (see the module docstring)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"`depth` must be 6n + 2 (20, 32, 44, 56, 110). Received: depth={depth}")
    blocks = (depth - 2) // 6
    inputs = keras.Input(input_shape)
    x = _conv_bn(inputs, width, 1, "stem")
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
