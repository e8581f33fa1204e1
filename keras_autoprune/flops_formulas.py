"""Per-call FLOPs formulas of Keras 3 layers and `keras.ops` nodes.

Costs come from layer configs and the static shapes of each call, at batch
size 1, without running the model. One FLOP is one floating-point operation:
a multiply-accumulate (MAC) counts 2. Below, ``P`` is the number of output
positions (output elements divided by output channels), ``N_out`` / ``N_in``
the number of output / input elements, ``K`` the number of kernel taps
(``prod(kernel_size)``) and ``b`` is ``N_out`` when the layer has a bias and
0 otherwise.

Exact multiply-accumulates (the dominant term):

- ``Conv1D/2D/3D``: ``2·K·(C_in/groups)·C_out·P + b``.
- ``Conv1D/2D/3DTranspose``: ``2·K·C_in·C_out·P_in + b``, with ``P_in`` the
  input positions (each input pixel is scattered through the whole kernel).
- ``DepthwiseConv1D/2D``: ``2·K·C·M·P + b`` (``M`` the depth multiplier).
- ``SeparableConv1D/2D``: ``2·K·C_in·M·P + 2·C_in·M·C_out·P + b``.
- ``Dense`` on any rank: ``2·C_in·C_out·P + b`` (``P`` = all leading axes).
- ``EinsumDense`` (``x, W -> y`` by its equation): ``2·N_out·Π_c n_c + b``
  over the contracted letters ``c`` (in ``x`` or ``W``, not in ``y``; ``n_c``
  their sizes): a two-operand einsum visits every combination of its
  distinct letters once, and the output letters (with ``...``) make ``N_out``
  (the einsum formula below, on ``x`` and the kernel).
- ``keras.ops.matmul`` nodes: ``2·k·N_out`` (``k`` the contracted size).
- ``keras.ops.einsum`` nodes of two operands: ``2·N_out·Π_c n_c`` over the
  letters ``c`` summed away (as EinsumDense); of one operand: ``N_in`` when
  it sums a letter away, else 0 (a transpose, a diagonal). An einsum of
  three or more operands has no formula (its cost depends on the
  contraction order the backend picks).
- ``MultiHeadAttention`` (``H`` heads of key size ``K`` and value size
  ``V``; ``T`` query and ``S`` key/value positions; input widths ``D_q``,
  ``D_k``, ``D_v``; output width ``D_o``): the projections
  ``2·T·D_q·H·K + 2·S·D_k·H·K + 2·S·D_v·H·V + 2·T·H·V·D_o`` (+ their
  biases), the query scaling ``T·H·K``, the scores ``2·H·T·A·K``, their
  softmax ``5·H·T·A`` and the weighted sum ``2·H·T·A·V``, where ``A`` is
  the number of key positions each query attends to: ``S``, or with
  ``attention_axes`` the product of the key's sizes on those axes (with
  ``use_gate``: ``2·T·D_q·H·V`` + bias + ``T·H·V``). The key is taken to be
  the value unless a third tensor of the value's shape is passed.
- ``Attention`` (dot-product, ``T`` query and ``S`` value positions, query
  and key width ``D``, value width ``V``): scores ``2·T·S·D`` (+ ``T·S``
  with ``use_scale``), or with ``score_mode="concat"`` ``2·T·S·D + T·S``
  (broadcast add, sum, weight; + ``T·S·D`` with ``use_scale``);
  ``AdditiveAttention``: ``(2 + use_scale)·T·S·D``; then the softmax
  ``5·T·S`` and the weighted sum ``2·T·S·V`` (masks and dropout: 0).

Cheaper element-wise work, as TensorFlow's profiler counts it:

- ``BatchNormalization`` (inference): ``2·N_out`` (scale and shift).
- ``LayerNormalization``: ``(6 + 2·scale + center)·N_out`` (mean, squared
  deviation, variance, normalise; ``γ`` folds into the inverse deviation and
  is applied, ``β`` is added); ``GroupNormalization``: ``6·N_out``.
- ``Rescaling``, ``Normalization``: ``2·N_out``; ``PReLU``: ``4·N_out``.
- ``Add``, ``Subtract``, ``Multiply``, ``Maximum``, ``Minimum`` layers:
  ``(n_inputs − 1)·N_out``; ``Average``: ``n_inputs·N_out``.
- Arithmetic op nodes (``x * 2.0``, ``x + y``, ``keras.ops.divide``, ...):
  ``N_out``; ``keras.ops.mean`` / ``sum``: ``N_in``.
- ``MaxPooling*`` / ``AveragePooling*``: ``prod(pool_size)·N_out``.
- ``GlobalAveragePooling*`` / ``GlobalMaxPooling*``: ``N_in``.
- Activations (an ``Activation`` layer, the ``activation=`` of a conv or
  dense layer, activation layers and op nodes): ``c·N_out`` with ``c`` from
  `ACTIVATION_FLOPS` (relu, sigmoid, tanh: 0; swish: 2; softmax: 5, ...;
  the ``keras.ops.gelu`` node with its default ``approximate=True``: 7).

Moving data costs 0: reshapes, flatten, padding, cropping, nearest-neighbour
up-sampling, concatenation, dropout and noise layers, Identity, Embedding
lookups, and the `keras.ops` nodes ``pad``, ``split``, ``slice``, ``x[...]``,
``take``, ``transpose``, ``repeat``, ``tile``, ``reshape``, ``stack``, ...
(`FREE_OPS`).

**Layers and ops without a formula** (custom layers, ``Lambda``, bilinear
up-sampling, ``keras.ops.exp``, an activation not in `ACTIVATION_FLOPS`, ...)
count 0 FLOPs: `has_formula` is False for them, and `keras_autoprune.accounting`
marks their rows and warns rather than hiding them.

Relation to TensorFlow's profiler (``tf.compat.v1.profiler`` float operations
of the frozen ``tf.function`` at batch 1), measured on TF 2.21: convolution,
depthwise, dense and bias terms are identical, and so are pooling, ``Mean``
(global average pooling), merges and arithmetic ops. The differences:

- the profiler also counts a few operations per channel or per row on
  frozen statistics (``6·C`` per ``BatchNormalization`` for
  ``rsqrt(var + ε)·γ`` ..., ``C`` per ``Normalization``, about 4 per
  normalised row of ``LayerNormalization``), which we leave out;
- for transposed convolutions it uses ``P_out / stride²`` instead of
  ``P_in``, which over-counts when the kernel is larger than the stride
  (``2·K·C_in·C_out·P_in`` is the exact MAC count);
- it counts 0 for grouped convolutions (they run as a nested function the
  profiler does not enter) and for ``GlobalMaxPooling`` (``Max`` is not
  registered), and ``N_in − N_out`` for ``Sum``.

On ResNet50, MobileNetV2, VGG16, EfficientNetB0 and DenseNet121 at 224×224
the totals agree with the profiler to better than 0.02% (VGG16: exactly).

`call_flops` applies these formulas to one call with given shapes;
`has_formula` says whether a layer or op has one. `keras_autoprune.accounting`
walks a model's graph and sums them (`count_flops`, `flops_table`).
"""

from __future__ import annotations

import math
from typing import Any

import keras

Shape = tuple[int | None, ...]

ACTIVATION_FLOPS: dict[str, int] = {
    "linear": 0, "relu": 0, "relu6": 0, "sigmoid": 0, "tanh": 0, "elu": 0,
    "selu": 0, "softplus": 0, "softsign": 0, "exponential": 0, "leaky_relu": 0,
    "silu": 2, "swish": 2, "hard_sigmoid": 2, "hard_silu": 3, "hard_swish": 3,
    "gelu": 4, "mish": 1, "softmax": 5,
}
"""FLOPs per element of each activation, as TF's profiler counts the ops that
Keras's TensorFlow backend emits: comparisons and transcendental functions
(``exp``, ``erf``, ``sigmoid``) are free, each ``+ − × ÷`` costs 1, softmax 5.
Activations not listed count 0."""

_OP_ACTIVATIONS = {
    "Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "Silu": "silu", "HardSigmoid": "hard_sigmoid", "HardSilu": "hard_silu",
    "Gelu": "gelu", "Softmax": "softmax",
}
_OP_ELEMENTWISE = {
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum",
    "Power", "Negative", "Square",
}
_OP_REDUCTIONS = {"Mean", "Sum"}
_OP_ACTIVATIONS.update({
    "LeakyRelu": "leaky_relu", "Elu": "elu", "Selu": "selu", "Softplus": "softplus", "Softsign": "softsign",
})
FREE_OPS: frozenset[str] = frozenset({
    "Pad", "Split", "Slice", "GetItem", "Take", "TakeAlongAxis", "Transpose", "Repeat", "Tile",
    "Reshape", "Swapaxes", "Moveaxis", "ExpandDims", "Squeeze", "Concatenate", "Stack", "Cast",
    "Flip", "Roll", "Ravel",
})
"""`keras.ops` node classes that only move data: 0 FLOPs, counted."""

_L = keras.layers
_CONV = (_L.Conv1D, _L.Conv2D, _L.Conv3D)
_CONV_TRANSPOSE = (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)
_DEPTHWISE = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)
_SEPARABLE = (_L.SeparableConv1D, _L.SeparableConv2D)
_POOL = (_L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D,
         _L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D)
_GLOBAL_POOL = (_L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D,
                _L.GlobalAveragePooling3D, _L.GlobalMaxPooling1D,
                _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D)
_MERGE = (_L.Add, _L.Subtract, _L.Multiply, _L.Maximum, _L.Minimum)
_WITH_FORMULA = (
    _CONV + _CONV_TRANSPOSE + _DEPTHWISE + _SEPARABLE + _POOL + _GLOBAL_POOL + _MERGE
    + (_L.Dense, _L.EinsumDense, _L.MultiHeadAttention, _L.Attention, _L.BatchNormalization, _L.LayerNormalization, _L.GroupNormalization, _L.Rescaling,
       _L.Normalization, _L.PReLU, _L.Average, _L.Activation, _L.Softmax, _L.ReLU, _L.LeakyReLU, _L.ELU)
)
_FREE_LAYERS = (
    _L.InputLayer, _L.Reshape, _L.Flatten, _L.Permute, _L.RepeatVector, _L.Concatenate, _L.Identity,
    _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D, _L.Cropping1D, _L.Cropping2D, _L.Cropping3D,
    _L.UpSampling1D, _L.UpSampling3D, _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D,
    _L.SpatialDropout3D, _L.GaussianDropout, _L.GaussianNoise, _L.AlphaDropout,
    _L.ActivityRegularization, _L.Embedding,
)


def call_flops(operation: Any, in_shapes: list[Shape], out_shapes: list[Shape],
               inputs_by_name: dict[str, int] | None = None) -> int:
    """FLOPs of one call of a layer or op node with the given shapes (batch axis first).

    ``inputs_by_name``: where named operands sit in ``in_shapes``
    (`accounting.inputs_by_name`): a MultiHeadAttention call's ``query``,
    ``value`` and ``key`` (masks and keyword order make positions
    unreliable); a matmul's ``x1`` and ``x2`` (one may be a constant, absent
    from ``in_shapes``). None reads them by position.
    """
    if isinstance(operation, _L.MultiHeadAttention):
        return int(_attention_flops(operation, _attention_roles(in_shapes, inputs_by_name), out_shapes))
    if isinstance(operation, _L.Attention):
        return int(_dot_attention_flops(operation, _attention_roles(in_shapes, None)))
    if type(operation).__name__ == "Einsum":
        return int(_einsum_flops(operation.subscripts, in_shapes, out_shapes))
    if isinstance(operation, keras.layers.Layer):
        return int(_layer_flops(operation, in_shapes, out_shapes))
    return int(_op_flops(operation, in_shapes, out_shapes, inputs_by_name))


def has_formula(operation: Any) -> bool:
    """Whether `call_flops` knows what ``operation`` computes (0-cost data movement included)."""
    if isinstance(operation, keras.layers.Layer):
        if isinstance(operation, _L.UpSampling2D):
            return operation.interpolation == "nearest"
        if isinstance(operation, _FREE_LAYERS):
            return True
        if not isinstance(operation, _WITH_FORMULA):
            return False
        activation = getattr(operation, "activation", None)
        name = getattr(activation, "__name__", activation)
        return activation is None or (isinstance(name, str) and name in ACTIVATION_FLOPS)
    kind = type(operation).__name__
    if kind == "Einsum":
        return operation.subscripts.count(",") <= 1
    return kind in FREE_OPS or kind in _OP_ELEMENTWISE or kind in _OP_REDUCTIONS or kind in _OP_ACTIVATIONS or kind == "Matmul"



def _dim(d: int | None) -> int:
    return 1 if d is None else int(d)


def _numel(shape: Shape) -> int:
    """Number of elements at batch 1 (every unknown dimension counts 1)."""
    return math.prod(_dim(d) for d in shape)


def _channel_axis(layer: Any) -> int:
    return 1 if getattr(layer, "data_format", None) == "channels_first" else -1


def _activation_flops(activation: Any, n: int) -> int:
    name = getattr(activation, "__name__", activation)
    return ACTIVATION_FLOPS.get(name, 0) * n if isinstance(name, str) else 0


def _layer_flops(layer: Any, ins: list[Shape], outs: list[Shape]) -> int:
    """FLOPs of one call of a Keras layer (see the module docstring)."""
    n_out = sum(_numel(s) for s in outs)
    if not ins:
        return 0
    x, n_in = ins[0], _numel(ins[0])
    axis = _channel_axis(layer)
    bias = n_out if getattr(layer, "use_bias", False) else 0
    act = _activation_flops(getattr(layer, "activation", None), n_out)
    cin = _dim(x[axis])
    if isinstance(layer, _CONV):
        taps = math.prod(layer.kernel_size)
        return 2 * taps * (cin // layer.groups) * n_out + bias + act
    if isinstance(layer, _CONV_TRANSPOSE):
        taps = math.prod(layer.kernel_size)
        return 2 * taps * n_in * layer.filters + bias + act
    if isinstance(layer, _DEPTHWISE):
        return 2 * math.prod(layer.kernel_size) * n_out + bias + act
    if isinstance(layer, _SEPARABLE):
        positions = n_out // layer.filters
        mid = cin * layer.depth_multiplier
        macs = math.prod(layer.kernel_size) * mid * positions + mid * n_out
        return 2 * macs + bias + act
    if isinstance(layer, _L.Dense):
        return 2 * _dim(x[-1]) * n_out + bias + act
    if isinstance(layer, _L.EinsumDense):
        out = einsum_dense_output_shape(layer, x)
        n_out = _numel(out)
        bias = n_out if getattr(layer, "bias", None) is not None else 0
        kernel = tuple(int(d) for d in layer.kernel.shape)
        return _einsum_flops(layer.equation, [x, kernel], [out]) + bias + _activation_flops(layer.activation, n_out)
    if isinstance(layer, _L.BatchNormalization):
        return 2 * n_out
    if isinstance(layer, _L.LayerNormalization):
        return (6 + 2 * int(layer.scale) + int(layer.center)) * n_out
    if isinstance(layer, _L.GroupNormalization):
        return 6 * n_out
    if isinstance(layer, (_L.Rescaling, _L.Normalization)):
        return 2 * n_out
    if isinstance(layer, _L.PReLU):
        return 4 * n_out
    if isinstance(layer, _MERGE):
        return (len(ins) - 1) * n_out
    if isinstance(layer, _L.Average):
        return len(ins) * n_out
    if isinstance(layer, _POOL):
        return math.prod(layer.pool_size) * n_out
    if isinstance(layer, _GLOBAL_POOL):
        return n_in
    if isinstance(layer, _L.Activation):
        return act
    if isinstance(layer, _L.Softmax):
        return ACTIVATION_FLOPS["softmax"] * n_out
    return 0


def _letter_sizes(specs: list[str], shapes: list[Shape]) -> dict[str, int | None]:
    """``{letter: size}`` of einsum operand specs on their shapes; a spec's letters sit to the right of a leading
    ``...``, else from the left. The first operand holding a letter gives its size (None for a batch axis)."""
    sizes: dict[str, int | None] = {}
    for spec, shape in zip(specs, shapes):
        letters = spec.replace("...", "")
        axes = shape[len(shape) - len(letters):] if spec.startswith("...") else shape[:len(letters)]
        for letter, d in zip(letters, axes):
            sizes.setdefault(letter, d)
    return sizes


def einsum_dense_output_shape(layer: Any, x: Shape) -> Shape:
    """The output shape of an EinsumDense call on input shape ``x``, from its equation.

    Keras leaves an axis given as None in ``output_shape`` unknown in the
    symbolic output (``"abc,cd->abd"`` with ``output_shape=(None, 64)`` on
    ``(None, 10, 32)`` records ``(None, None, 64)``); the input knows it.
    A letter's size comes from the input, or from the kernel where the
    input lacks it.
    """
    operands, output = layer.equation.split("->")
    in_spec, kernel_spec = operands.split(",")
    sizes = _letter_sizes([in_spec, kernel_spec], [x, tuple(int(d) for d in layer.kernel.shape)])
    ellipsis = tuple(x[:len(x) - len(in_spec.replace("...", ""))]) if "..." in output else ()
    head, _, tail = output.partition("...")
    return tuple(sizes[c] for c in head) + ellipsis + tuple(sizes[c] for c in tail)


def _attention_roles(ins: list[Shape], inputs_by_name: dict[str, int] | None) -> list[Shape]:
    """``[query, value, key]`` shapes: by name where known, else by position (a third tensor is the key only if
    it has the value's shape up to the last axis; the key defaults to the value)."""
    named = inputs_by_name or {}
    if named.get("query") is not None and named.get("value") is not None:
        key = named.get("key")
        return [ins[named["query"]], ins[named["value"]], ins[named["value"] if key is None else key]]
    query, value = ins[0], ins[1] if len(ins) > 1 else ins[0]
    key = ins[2] if len(ins) > 2 and len(ins[2]) == len(value) and ins[2][:-1] == value[:-1] else value
    return [query, value, key]


def _attention_flops(layer: Any, ins: list[Shape], outs: list[Shape]) -> int:
    """FLOPs of one MultiHeadAttention call (formula in the module docstring); ``ins``: query, value, key."""
    query, value, key = ins
    heads, k, v = layer.num_heads, layer.key_dim, layer.value_dim or layer.key_dim
    t, s = _numel(query[:-1]), _numel(value[:-1])
    axes = getattr(layer, "_attention_axes", None)  # normalised by Keras when built; None: every position axis
    attended = s if axes is None else math.prod(_dim(value[a]) for a in ((axes,) if isinstance(axes, int) else axes))
    d_out = _numel(outs[0]) // max(t, 1)
    bias = int(layer.use_bias)
    flops = 2 * t * _dim(query[-1]) * heads * k + 2 * s * _dim(key[-1]) * heads * k + 2 * s * _dim(value[-1]) * heads * v
    flops += 2 * t * heads * v * d_out + bias * (t * heads * k + s * heads * (k + v) + t * d_out)
    flops += t * heads * k + heads * t * attended * (2 * k + 5 + 2 * v)
    if getattr(layer, "_use_gate", False):
        flops += 2 * t * _dim(query[-1]) * heads * v + bias * t * heads * v + t * heads * v
    return flops


def _dot_attention_flops(layer: Any, ins: list[Shape]) -> int:
    """FLOPs of one Attention or AdditiveAttention call (formula in the module docstring); ``ins``: query, value, key."""
    query, value, _ = ins
    t, s, d, v = _numel(query[1:-1]), _numel(value[1:-1]), _dim(query[-1]), _dim(value[-1])
    scale = int(bool(layer.use_scale))
    if isinstance(layer, _L.AdditiveAttention):
        scores = (2 + scale) * t * s * d
    elif layer.score_mode == "concat":
        scores = 2 * t * s * d + t * s + scale * t * s * d
    else:
        scores = 2 * t * s * d + scale * t * s
    return scores + ACTIVATION_FLOPS["softmax"] * t * s + 2 * t * s * v


def _einsum_flops(subscripts: str, ins: list[Shape], outs: list[Shape]) -> int:
    """FLOPs of one ``keras.ops.einsum`` call of one or two operands (formula in the module docstring);
    ``ins``: the shape of every operand, constants included (`accounting.einsum_operand_shapes`)."""
    specs, _, output = subscripts.replace(" ", "").partition("->")
    if len(ins) > 2:
        return 0  # no formula (`has_formula`): the cost depends on the contraction order
    sizes = _letter_sizes(specs.split(","), ins)
    if not output and "->" not in subscripts:  # implicit output: the letters seen once, in alphabetical order
        output = "".join(sorted(c for c in sizes if specs.count(c) == 1))
    contracted = set(sizes) - set(output)
    if len(ins) == 1:
        return _numel(ins[0]) if contracted else 0
    return 2 * sum(_numel(s) for s in outs) * math.prod(_dim(sizes[c]) for c in contracted)


def _contracted(ins: list[Shape], inputs_by_name: dict[str, int] | None) -> int:
    """The size a matmul ``x1 @ x2`` contracts: ``x1``'s last axis, or ``x2``'s second-to-last where
    ``x1`` is a constant (``x2``'s only axis if it is a vector)."""
    named = {"x1": 0} if inputs_by_name is None else inputs_by_name
    if "x1" in named:
        return _dim(ins[named["x1"]][-1])
    x2 = ins[named["x2"]]
    return _dim(x2[-2] if len(x2) >= 2 else x2[-1])


def _op_flops(op: Any, ins: list[Shape], outs: list[Shape], inputs_by_name: dict[str, int] | None = None) -> int:
    """FLOPs of one call of a `keras.ops` operation node."""
    kind = type(op).__name__
    n_out = sum(_numel(s) for s in outs)
    if kind in _OP_ELEMENTWISE:
        return n_out
    if kind in _OP_REDUCTIONS:
        return _numel(ins[0]) if ins else 0
    if kind == "Matmul" and ins:
        return 2 * _contracted(ins, inputs_by_name) * n_out
    if kind == "Gelu" and getattr(op, "approximate", False):
        return 7 * n_out  # tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    if kind in _OP_ACTIVATIONS:
        return ACTIVATION_FLOPS[_OP_ACTIVATIONS[kind]] * n_out
    return 0
