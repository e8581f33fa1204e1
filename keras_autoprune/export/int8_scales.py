"""Int8 activation scales that LiteRT's XNNPACK delegate accepts.

A full-integer convolution (``CONV_2D``, ``DEPTHWISE_CONV_2D``,
``FULLY_CONNECTED``, ``TRANSPOSE_CONV``) rescales its int32 accumulator to
its int8 output by the per-channel requantization scale

    r_c = s_in * s_w[c] / s_out

XNNPACK, LiteRT's default CPU delegate, refuses ``r_c >= 256`` (``failed to
create XNNPACK runtime ... failed to prepare``), and the whole file then
fails to load with default options. The converter produces such scales when
a layer is (nearly) dead on the representative data: its calibrated output
range, and so ``s_out``, is orders of magnitude below what its input and
weights could produce. Seen on a ResNet-20 compressed by RED and
fine-tuned: one block's ReLU output spanned 2e-6 on the calibration
images, ``r = 2e4``.

`admit_int8_scales` raises each such output scale to the smallest one with
``max_c r_c < 256``:

    s_out' = s_in * max_c s_w[c] / 255

Activations smaller than ``s_out' / 2`` then round to zero; they were
already below the calibrated range's ``255 * s_out``, a few millionths of
the layer's input range, so the effect on the outputs is measured by the
usual verification against Keras. Tensors that must share the raised scale
(the inputs and outputs of ``RESHAPE``, ``MAX_POOL_2D``, ``PAD``,
``CONCATENATION``, ``SPLIT`` and the other ops whose int8 kernels require
one scale, where they carried the old one) are raised with it; a constant
among them (a pad value) has its int8 values requantized. A convolution
that reads a raised tensor keeps its int32 bias exact: TFLite requires the
bias scale to be ``s_in * s_w[c]``, so the bias is requantized to the new
input scale,

    b_c' = round(b_c * s_in / s_in'),

in a tensor and buffer of its own (they may be shared). Nothing else in
the file changes.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

REQUANTIZATION_LIMIT = 256.0
"""XNNPACK refuses int8 convolutions whose requantization scale reaches this."""

_MARGIN = 255.0
"""Divisor of the raised scale: the new largest requantization scale is 255 < 256."""

_REQUANTIZING_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL")
_SAME_SCALE_OPS = (
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "MAX_POOL_2D", "AVERAGE_POOL_2D", "PAD", "PADV2", "MIRROR_PAD",
    "TRANSPOSE", "SLICE", "STRIDED_SLICE", "GATHER", "GATHER_ND", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE",
    "SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND", "SPLIT", "SPLIT_V", "CONCATENATION", "PACK", "UNPACK", "TILE",
    "BROADCAST_TO", "REVERSE_V2", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "MAXIMUM", "MINIMUM",
    "SELECT_V2",
)
"""Ops whose int8 kernels need (or whose converter gives) one scale on their data inputs and outputs."""


@dataclasses.dataclass(frozen=True)
class ScaleFix:
    """One int8 activation whose scale `admit_int8_scales` raised.

    Attributes:
        tensor: the tensor's name in the file (Keras layer paths joined by ``;``).
        old_scale: its calibrated scale.
        new_scale: the raised scale.
        requantization: the largest requantization scale that needed it (>= 256).
    """

    tensor: str
    old_scale: float
    new_scale: float
    requantization: float

    @property
    def layer(self) -> str:
        """The first Keras op of the tensor's name, e.g. ``model/block_relu/Relu``."""
        return self.tensor.split(";")[0]


def admit_int8_scales(content: bytes) -> tuple[bytes, list[ScaleFix]]:
    """Raises the int8 output scales that XNNPACK would refuse (see the module docstring).

    Args:
        content: a full-integer ``.tflite`` flatbuffer.

    Returns:
        ``(content, fixes)``: the file unchanged and ``[]`` when every
        requantization scale is below 256; otherwise the rewritten file and
        one `ScaleFix` per raised tensor (followers of equal-scale ops
        included).
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    names = [flatbuffer_utils.opcode_to_name(model, index) for index in range(len(model.operatorCodes))]
    fixes = []
    for graph in model.subgraphs:
        for op in graph.operators:
            if names[op.opcodeIndex] in _REQUANTIZING_OPS:
                fixes += _admit(model, graph, op, names)
    if not fixes:
        return content, []
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), fixes


def _activation_and_bias(op, names: list[str]) -> tuple[int, int | None]:
    """Indices in ``op.inputs`` of a requantizing op's activation input and of its bias (None: no bias)."""
    if names[op.opcodeIndex] == "TRANSPOSE_CONV":  # inputs: output shape, kernel, activations, bias
        return 2, 3 if len(op.inputs) > 3 and op.inputs[3] >= 0 else None
    if names[op.opcodeIndex] == "BATCH_MATMUL":  # two activations, no bias
        return 0, None
    return 0, 2 if len(op.inputs) > 2 and op.inputs[2] >= 0 else None


def _scale(tensor) -> np.ndarray | None:
    quantization = tensor.quantization
    if quantization is None or quantization.scale is None or len(quantization.scale) == 0:
        return None
    return np.asarray(quantization.scale, dtype=np.float64)


def _admit(model, graph, op, names: list[str]) -> list[ScaleFix]:
    activation, _ = _activation_and_bias(op, names)
    source, kernel = graph.tensors[op.inputs[activation]], graph.tensors[op.inputs[1]]
    output = graph.tensors[op.outputs[0]]
    s_in, s_w, s_out = _scale(source), _scale(kernel), _scale(output)
    if s_in is None or s_w is None or s_out is None or len(s_out) != 1:
        return []
    requantization = float(s_in[0] * s_w.max() / s_out[0])
    if requantization < REQUANTIZATION_LIMIT:
        return []
    old, new = float(s_out[0]), float(s_in[0] * s_w.max() / _MARGIN)
    raised = _same_scale_closure(graph, op.outputs[0], names)
    fixes = [_raise(model, graph, index, old, new, requantization) for index in raised]
    for reader in graph.operators:
        if names[reader.opcodeIndex] in _REQUANTIZING_OPS:
            activation, bias = _activation_and_bias(reader, names)
            if reader.inputs[activation] in raised and bias is not None:
                reader.inputs[bias] = _requantized_bias(model, graph, reader.inputs[bias], old / new)
    return fixes


def _requantized_bias(model, graph, index: int, factor: float) -> int:
    """A new tensor (and buffer) holding ``b' = round(b * factor)`` at scale ``s_b / factor``; its index.

    New, because a bias tensor or buffer may be shared with ops that keep
    reading the old scale.
    """
    tensor = copy.deepcopy(graph.tensors[index])
    values = np.frombuffer(bytes(model.buffers[tensor.buffer].data), dtype=np.int32)
    tensor.buffer = _new_buffer(model, np.round(values.astype(np.float64) * factor).astype(np.int32))
    tensor.quantization.scale = list(np.asarray(tensor.quantization.scale, dtype=np.float64) / factor)
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _new_buffer(model, values: np.ndarray) -> int:
    from tensorflow.lite.python import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = np.ascontiguousarray(values).view(np.uint8)
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def _same_scale_closure(graph, start: int, names: list[str]) -> list[int]:
    """``start`` and every tensor tied to it through equal-scale ops that had its scale.

    Equal-scale ops (`_SAME_SCALE_OPS`) require the same scale on their
    data inputs and outputs: through any of them, every input or output
    that carried the raised tensor's scale is raised with it (the other
    inputs of a concatenation, a pad value, the outputs of a split).
    """
    scale = _scale(graph.tensors[start])
    found, frontier = [start], [start]
    while frontier:
        tensor = frontier.pop()
        for op in graph.operators:
            if names[op.opcodeIndex] not in _SAME_SCALE_OPS or tensor not in [*op.inputs, *op.outputs]:
                continue
            for other in [*op.inputs, *op.outputs]:
                if other >= 0 and other not in found and np.array_equal(_scale(graph.tensors[other]), scale):
                    found.append(other)
                    frontier.append(other)
    return found


def _raise(model, graph, index: int, old: float, new: float, requantization: float) -> ScaleFix:
    """Sets the tensor's scale to ``new``; a constant one (a pad value) has its int8 values requantized."""
    tensor = graph.tensors[index]
    data = model.buffers[tensor.buffer].data  # None or empty for activations
    if data is not None and len(data):
        zero = int(tensor.quantization.zeroPoint[0]) if tensor.quantization.zeroPoint is not None else 0
        values = np.frombuffer(bytes(data), dtype=np.int8).astype(np.float64)
        requantized = np.clip(np.round((values - zero) * old / new) + zero, -128, 127).astype(np.int8)
        tensor.buffer = _new_buffer(model, requantized)
    tensor.quantization.scale = [new]
    name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
    return ScaleFix(name, old, new, requantization)


def describe(fixes: list[ScaleFix]) -> str:
    """One sentence for `ExportResult.note`."""
    layers = ", ".join(f"'{fix.layer}' ({fix.old_scale:.3g} -> {fix.new_scale:.3g})" for fix in fixes[:4])
    more = f" and {len(fixes) - 4} more" if len(fixes) > 4 else ""
    return (f"raised the int8 scale of {len(fixes)} activation(s) that were (nearly) dead on the representative "
            f"data, so that LiteRT's XNNPACK delegate accepts the file (requantization scale below 256): "
            f"{layers}{more}; their values below half the new scale round to zero")
