"""Tests for `keras_autoprune.accounting`: exact hand-computed counts, plus a
cross-check against TensorFlow's own profiler (`tests/profiler_flops.py`)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_autoprune.accounting import (
    LayerCost,
    count_flops,
    count_params,
    flops_table,
    format_table,
)
from keras_autoprune.errors import UnsupportedModelError
from tests.helpers import subclassed_model
from tests.profiler_flops import profiler_flops

L = keras.layers


def _model(input_shape, *layers):
    inputs = keras.Input(input_shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


# (input shape, layer, FLOPs, params), each computed by hand.
# Conv: 2·K·C_in·C_out·P (+ N_out bias); depthwise: 2·K·C·M·P; separable:
# depthwise + 2·C_in·M·C_out·P; transposed: 2·K·C_in·C_out·P_in; dense:
# 2·C_in·C_out·P.
_LAYER_CASES = {
    # 9×9 → 4×4 (valid, stride 2), 4 filters: 2·9·3·4·16 + 64 bias.
    "conv_valid_bias": ((9, 9, 3), lambda: L.Conv2D(4, 3, strides=2), 3456 + 64, 27 * 4 + 4),
    # 9×9 → 5×5 (same, stride 2): 2·9·3·4·25.
    "conv_same_nobias": (
        (9, 9, 3), lambda: L.Conv2D(4, 3, strides=2, padding="same", use_bias=False), 5400, 108),
    "conv_same_bias": (
        (9, 9, 3), lambda: L.Conv2D(4, 3, strides=2, padding="same"), 5400 + 100, 112),
    # Grouped: 2·9·(4/2)·4·36.
    "conv_groups": ((8, 8, 4), lambda: L.Conv2D(4, 3, groups=2, use_bias=False), 5184, 72),
    # Conv1D 8 → 6 steps: 2·3·3·5·6 + 30.
    "conv1d": ((8, 3), lambda: L.Conv1D(5, 3), 570, 50),
    # 8×8 → 6×6, 3 channels × 2: 2·9·6·36 + 216.
    "depthwise_m2": ((8, 8, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2), 3888 + 216, 60),
    # Depthwise 2·9·3·36 = 1944, pointwise 2·3·5·36 = 1080, bias 180.
    "separable": ((8, 8, 3), lambda: L.SeparableConv2D(5, 3), 3204, 27 + 15 + 5),
    # 8×8 inputs → 17×17 outputs: 2·9·3·5·64 = 17280, bias 17·17·5 = 1445.
    "conv_transpose": ((8, 8, 3), lambda: L.Conv2DTranspose(5, 3, strides=2), 18725, 140),
    # (B, T=7, C=3) → (B, 7, 5): 2·3·5·7 + 35.
    "dense_3d": ((7, 3), lambda: L.Dense(5), 245, 20),
    # Softmax costs 5 per element (as TF's profiler counts it).
    "dense_softmax": ((6,), lambda: L.Dense(4, activation="softmax"), 48 + 4 + 20, 28),
    # Inference batch norm: 2 per element; 4 weights per channel.
    "batchnorm": ((5, 5, 4), lambda: L.BatchNormalization(), 200, 16),
    # 2×2 windows over 8×8×3 → 4·48; global pooling: one per input element.
    "maxpool": ((8, 8, 3), lambda: L.MaxPooling2D(2), 192, 0),
    "avgpool_3x3_s1": ((8, 8, 3), lambda: L.AveragePooling2D(3, strides=1), 9 * 108, 0),
    "global_avgpool": ((8, 8, 3), lambda: L.GlobalAveragePooling2D(), 192, 0),
    "flatten": ((8, 8, 3), lambda: L.Flatten(), 0, 0),
    # EinsumDense: 2·N_out·(contracted sizes) + N_out bias. (B, 10, 32) -> (B, 10, 64) contracting c=32:
    # 2·640·32 + 640.
    "einsum_dense_tokens": (
        (10, 32), lambda: L.EinsumDense("abc,cd->abd", output_shape=(None, 64), bias_axes="d"), 40960 + 640, 2048 + 64),
    # The Dense spelling with an ellipsis: (B, 7, 3) -> (B, 7, 5), as "dense_3d" without the bias: 2·35·3.
    "einsum_dense_ellipsis": ((7, 3), lambda: L.EinsumDense("...b,bc->...c", output_shape=5), 210, 15),
    # Two letters summed (b from the input, c from both): (B, 4, 8) -> (B, 16), 2·16·4·8.
    "einsum_dense_two_contracted": ((4, 8), lambda: L.EinsumDense("abc,bcd->ad", output_shape=16), 1024, 512),
    # A head split: (B, 6, 12) -> (B, 6, 2, 3), W (12, 2, 3), contracting c=12 with swish (2 per output): 2·36·12 + 72.
    "einsum_dense_heads": ((6, 12), lambda: L.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3), activation="swish"),
                           864 + 72, 72),
}


@pytest.mark.parametrize("case", sorted(_LAYER_CASES))
def test_single_layer_exact_counts(case):
    shape, make, flops, params = _LAYER_CASES[case]
    model = _model(shape, make())
    assert count_flops(model) == flops
    assert count_params(model) == params == model.count_params()


def test_sequential_and_table_rows():
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), L.Conv2D(4, 3, use_bias=False, name="c"),
         L.ReLU(name="r"), L.GlobalAveragePooling2D(name="g"), L.Dense(2, name="d")]
    )
    assert flops_table(model) == [
        LayerCost("c", "Conv2D", 2 * 27 * 4 * 36, 108),
        LayerCost("r", "ReLU", 0, 0),
        LayerCost("g", "GlobalAveragePooling2D", 144, 0),
        LayerCost("d", "Dense", 2 * 4 * 2 + 2, 10),
    ]
    assert count_flops(model) == 7776 + 144 + 18
    assert count_params(model) == model.count_params() == 118
    # Per example, also when the model fixes its batch size.
    batched = keras.Sequential([keras.Input((8, 8, 3), batch_size=4), *[type(l).from_config(l.get_config()) for l in model.layers]])
    assert count_flops(batched) == count_flops(model) and flops_table(batched) == flops_table(model)


def test_merges_and_op_nodes():
    inputs = keras.Input((4, 5))
    a = inputs * 2.0                                  # Multiply op node: 20
    b = a + 1.0                                       # Add op node: 20
    c = L.Add(name="add3")([inputs, a, b])            # (3 − 1)·20 = 40
    d = L.Average(name="avg")([c, b])                 # 2·20 = 40
    e = keras.ops.mean(d, axis=1)                     # one per input element: 20
    f = keras.ops.matmul(e, keras.ops.ones((5, 3)))   # 2·5·3 = 30
    model = keras.Model(inputs, f)
    kinds = [(r.kind, r.flops) for r in flops_table(model)]
    assert ("Multiply", 20) in kinds and ("Add", 20) in kinds and ("Matmul", 30) in kinds
    assert count_flops(model) == 20 + 20 + 40 + 40 + 20 + 30
    assert count_params(model) == 0 == model.count_params()


def test_a_matmul_with_a_constant_first_operand_contracts_the_second_operands_rows():
    import keras_autoprune as kap
    from keras_autoprune.allocation.cost import PlanCost

    inputs = keras.Input((4, 16))
    matrix = keras.ops.matmul(np.ones((2, 4), "float32"), inputs)     # (2, 16): 2·4·(2·16) = 256
    vector = keras.ops.matmul(np.ones((4,), "float32"), inputs)       # (16,): 2·4·16 = 128
    keyword = keras.ops.matmul(x1=np.ones((3, 4), "float32"), x2=inputs)  # (3, 16): 2·4·48 = 384
    model = keras.Model(inputs, [matrix, vector, keyword])
    assert sorted(r.flops for r in flops_table(model)) == [128, 256, 384]
    assert PlanCost(model, kap.DependencyGraph(model))(kap.PrunePlan({})) == 256 + 128 + 384


@pytest.mark.parametrize("batch_size", [None, 1])
def test_a_reshape_or_transpose_moving_the_batch_axis_counts_the_rows_it_makes(batch_size):
    from keras_autoprune.allocation.cost import PlanCost

    inputs = keras.Input((4, 8), batch_size=batch_size)
    if batch_size is None:
        rows = keras.ops.reshape(inputs, (-1, 8))          # (None, 8): 4 rows per example
    else:
        rows = keras.ops.transpose(inputs, (1, 0, 2))      # (4, 1, 8): the batch axis moved
    tokens = L.Dense(16, name="per_row")(rows)             # 4 rows: 4·(2·8·16 + 16) = 1088
    back = keras.ops.reshape(tokens, (-1, 4, 16))          # one example again
    model = keras.Model(inputs, L.Dense(2, name="head")(back))  # 4·(2·16·2 + 2) = 264
    assert {r.layer: r.flops for r in flops_table(model) if r.flops} == {"per_row": 1088, "head": 264}
    import keras_autoprune as kap

    assert PlanCost(model, kap.DependencyGraph(model))(kap.PrunePlan({})) == 1088 + 264


def test_nested_sequential_in_functional():
    inner = keras.Sequential(
        [keras.Input((8, 8, 3)), L.Conv2D(4, 3, use_bias=False, name="c"),
         L.GlobalAveragePooling2D(name="g")],
        name="inner",
    )
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, L.Dense(2, name="head")(inner(inputs)))
    rows = flops_table(model)
    assert [r.layer for r in rows] == ["inner/c", "inner/g", "head"]
    assert count_flops(model) == 7776 + 144 + 18
    assert count_params(model) == model.count_params() == 118


def test_nested_backbone_with_unknown_spatial_size_uses_call_shape():
    backbone = _model((None, None, 3), L.Conv2D(4, 3, use_bias=False, name="c"))
    model = keras.Sequential([keras.Input((8, 8, 3)), backbone])
    assert count_flops(model) == 2 * 27 * 4 * 36  # 6×6 outputs, not 1×1
    with pytest.raises(ValueError, match="input_shape"):
        count_flops(backbone)
    assert count_flops(backbone, input_shape=(8, 8, 3)) == 7776
    assert count_flops(backbone, input_shape=[(8, 8, 3)]) == count_flops(backbone, input_shape=np.array([8, 8, 3])) == 7776
    for bad in ((None, 8, 3), (0, 8, 3), (8.0, 8, 3), (8, 8)):  # before: a bare TypeError for the first and third
        with pytest.raises(ValueError, match="in positive integers"):
            count_flops(backbone, input_shape=bad)
    assert count_params(backbone) == 108


def test_layer_called_twice_counts_flops_twice_params_once():
    dense = L.Dense(3, name="shared")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, dense(dense(inputs)))
    rows = flops_table(model)
    assert [(r.layer, r.flops, r.params) for r in rows] == [("shared", 21, 12), ("shared", 21, 0)]
    assert count_flops(model) == 42
    assert count_params(model) == model.count_params() == 12


def test_nested_model_called_twice():
    block = _model((4,), L.Dense(4, name="d"))
    inputs = keras.Input((4,))
    model = keras.Model(inputs, block(block(inputs)))
    assert count_flops(model) == 2 * (2 * 16 + 4)
    assert count_params(model) == model.count_params() == 20


def test_subclassed_model_is_rejected():
    net = subclassed_model()
    with pytest.raises(UnsupportedModelError, match="functional"):
        count_flops(net)
    with pytest.raises(UnsupportedModelError):
        count_params(net)


def test_format_table():
    rows = [LayerCost("conv", "Conv2D", 1234, 10), LayerCost("b/relu", "ReLU", 0, 0)]
    assert format_table(rows).splitlines() == [
        "layer   kind    FLOPs  params",
        "-" * 29,
        "conv    Conv2D  1,234      10",
        "b/relu  ReLU        0       0",
        "-" * 29,
        "total           1,234      10",
    ]


def _relative(ours: int, reference: float) -> float:
    return abs(ours - reference) / reference


def test_matches_tf_profiler_exactly_on_small_convnet():
    # No batch norm or transposed convs, so every term agrees exactly.
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    y = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.Add()([x, y])
    x = L.MaxPooling2D(2)(x)
    x = L.SeparableConv2D(8, 3, activation="swish")(x)
    x = L.AveragePooling2D(2)(x)
    x = L.Multiply()([x, L.Reshape((1, 1, 8))(L.GlobalAveragePooling2D()(x))])
    x = L.Dense(6)(x) * 0.5
    x = L.Dense(4, activation="softmax")(L.Flatten()(x))
    model = keras.Model(inputs, x)
    assert count_flops(model) == profiler_flops(model)


def test_within_3_percent_of_tf_profiler_on_small_mobilenet():
    model = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10
    )
    assert _relative(count_flops(model), profiler_flops(model)) < 0.03
    assert count_params(model) == model.count_params()


# Profiler figures at 224×224, batch 1 (shared/KERAS3_NOTES.md).
_REFERENCE_FLOPS = {
    "ResNet50": 7.755e9,
    "MobileNetV2": 6.153e8,
    "VGG16": 3.096e10,
    "EfficientNetB0": 8.031e8,
    "DenseNet121": 5.702e9,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_REFERENCE_FLOPS))
def test_within_3_percent_of_tf_profiler_on_applications(name):
    model = getattr(keras.applications, name)(weights=None)
    ours = count_flops(model)
    assert _relative(ours, profiler_flops(model)) < 0.03
    assert _relative(ours, _REFERENCE_FLOPS[name]) < 0.03
    assert count_params(model) == model.count_params()


class _Scale(keras.layers.Layer):
    """A custom layer: ``count_flops`` counts it through its traced ``call`` (one Multiply)."""

    def call(self, x):
        return x * 2.0


def _model_with_uncounted_layers():
    inputs = keras.Input((4, 4, 3))
    x = L.Conv2D(2, 1, name="c")(inputs)                 # 2·3·2·16 + 32 = 224
    x = _Scale(name="scale")(x)
    x = L.Lambda(lambda t: t + 1.0, name="plus_one")(x)
    x = keras.ops.exp(x)
    x = keras.ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])  # moves data: counted, 0
    x = keras.ops.split(x, 2, axis=-1)[0]
    return keras.Model(inputs, L.UpSampling2D(interpolation="bilinear", name="up")(x))


def test_layers_without_a_formula_are_reported():
    model = _model_with_uncounted_layers()
    rows = flops_table(model)
    uncounted = [(r.layer, r.kind) for r in rows if not r.counted]
    assert [kind for _, kind in uncounted] == ["Lambda", "Exp", "UpSampling2D"]
    assert [r.kind for r in rows if r.counted] == ["Conv2D", "Multiply", "Pad", "Split"]
    assert [r.layer.split("/")[0] for r in rows][:2] == ["c", "scale"]  # the custom layer, traced
    with pytest.warns(UserWarning, match=r"no FLOPs formula for 3 layer\(s\)/op\(s\).*'plus_one' \(Lambda\)"):
        assert count_flops(model) == 224 + 32
    lines = format_table(rows).splitlines()
    assert [line.split()[2] for line in lines[2:-3]] == ["224", "32", "?", "?", "0", "0", "?"]
    assert lines[-1] == "? = no FLOPs formula for this layer (or, after a number, for its activation): not counted"


def test_the_layers_after_an_einsum_dense_count_the_positions_its_equation_keeps():
    """Keras records ``output_shape=(None, 64)`` as an unknown axis; the equation knows it is the input's 10."""
    inputs = keras.Input((10, 32))
    hidden = L.EinsumDense("abc,cd->abd", output_shape=(None, 64), bias_axes="d", name="e")(inputs)
    assert tuple(hidden.shape) == (None, None, 64)
    model = keras.Model(inputs, L.Dense(5, use_bias=False, name="d")(hidden))
    rows = {r.layer: r.flops for r in flops_table(model)}
    assert rows == {"e": 2 * 10 * 64 * 32 + 640, "d": 2 * 10 * 64 * 5}
    assert count_flops(model) == 41600 + 6400


@pytest.mark.parametrize("make, scores", [
    (lambda: L.Attention(), 2 * 4 * 6 * 8),                                          # q·kᵀ: 2·T·S·D
    (lambda: L.Attention(use_scale=True), 2 * 4 * 6 * 8 + 4 * 6),                    # + the scale, T·S
    (lambda: L.Attention(score_mode="concat"), 2 * 4 * 6 * 8 + 4 * 6),               # add, sum over D; weight T·S
    (lambda: L.Attention(score_mode="concat", use_scale=True), 3 * 4 * 6 * 8 + 4 * 6),
    (lambda: L.AdditiveAttention(), 3 * 4 * 6 * 8),                                  # scale·tanh(q + k), summed
    (lambda: L.AdditiveAttention(use_scale=False), 2 * 4 * 6 * 8),
])
def test_dot_product_attention_counts_its_scores_softmax_and_weighted_sum(make, scores):
    query, value, key = keras.Input((4, 8)), keras.Input((6, 5)), keras.Input((6, 8))
    model = keras.Model([query, value, key], make()([query, value, key]))
    assert count_flops(model) == scores + 5 * 4 * 6 + 2 * 4 * 6 * 5  # softmax 5·T·S, weighted sum 2·T·S·V
    assert all(r.counted for r in flops_table(model))


def test_einsum_ops_count_the_letters_they_sum_away_constants_included():
    x, y = keras.Input((4, 8)), keras.Input((6, 8))
    weights = np.ones((8, 3), "float32")
    outputs = [
        keras.ops.einsum("btd,de->bte", x, weights),      # a constant second operand: 2·(4·3)·8
        keras.ops.einsum("...d,de->...e", x, weights),   # with an ellipsis: the same
        keras.ops.einsum("btd,bsd->bts", x, y),           # two tensors: 2·(4·6)·8
        keras.ops.einsum("btd->bd", x),                   # one operand summing t: N_in = 32
        keras.ops.einsum("btd->bdt", x),                  # a transpose: 0
        keras.ops.einsum("bd,de", x[:, 0], weights),      # implicit output "be": 2·3·8
    ]
    model = keras.Model([x, y], outputs)
    rows = [r for r in flops_table(model) if r.kind == "Einsum"]
    assert len(rows) == 6 and all(r.counted for r in rows)
    flops = {r.layer: r.flops for r in rows}
    assert [flops[t._keras_history.operation.name] for t in outputs] == [2 * 12 * 8, 2 * 12 * 8, 2 * 24 * 8, 32, 0, 48]


def test_an_einsum_of_three_operands_is_reported_uncounted():
    x = keras.Input((4, 8))
    model = keras.Model(x, keras.ops.einsum("bi,bj,bk->bijk", x[:, 0], x[:, 1], x[:, 2]))
    (row,) = [r for r in flops_table(model) if r.kind == "Einsum"]
    assert not row.counted and row.flops == 0


def test_a_layer_with_an_unknown_activation_shows_what_was_counted():
    inputs = keras.Input((5, 5, 2))
    model = keras.Model(inputs, L.Conv2D(4, 3, activation="log_softmax", use_bias=False, name="c")(inputs))
    (row,) = flops_table(model)
    assert not row.counted and row.flops == 2 * 3 * 3 * 2 * 4 * 3 * 3  # the convolution, not its activation
    assert format_table([row]).splitlines()[2].split()[2] == f"{row.flops:,}?"


def test_input_shape_fills_unknown_sizes_and_must_agree_with_known_ones():
    inputs = keras.Input((8, None, 3))
    model = keras.Model(inputs, L.Conv2D(4, 3, use_bias=False)(inputs))
    assert count_flops(model, input_shape=(8, 8, 3)) == 2 * 9 * 3 * 4 * 6 * 6
    with pytest.raises(ValueError, match=r"agree with the model's known input sizes.*\(8, None, 3\)"):
        count_flops(model, input_shape=(8, 8, 5))  # before: counted as if the kernel took 5 channels


def test_attention_over_some_axes_counts_the_positions_each_query_attends_to():
    inputs = keras.Input((4, 6, 8))
    over_one = L.MultiHeadAttention(1, 2, attention_axes=(2,), use_bias=False)
    over_all = L.MultiHeadAttention(1, 2, use_bias=False)
    one = count_flops(keras.Model(inputs, over_one(inputs, inputs)))
    every = count_flops(keras.Model(inputs, over_all(inputs, inputs)))
    t, k = 24, 2  # 4 x 6 query positions, key size 2 (= value size), one head
    assert every - one == t * (24 - 6) * (2 * k + 5 + 2 * k)  # scores, softmax, weighted sum over 6 keys, not 24


def test_a_transpose_that_moves_the_batch_axis_keeps_the_other_sizes():
    inputs = keras.Input((6, 4))
    moved = keras.ops.transpose(inputs, (1, 0, 2))  # (6, None, 4)
    rows = flops_table(keras.Model(inputs, moved * 2.0))
    assert rows[-1].flops == 24  # before: 4 (the 6 taken for a batch axis)


def test_a_fully_counted_model_does_not_warn():
    inputs = keras.Input((4, 4, 3))
    x = keras.ops.transpose(L.Conv2D(2, 1, activation="swish")(inputs), [0, 2, 1, 3])
    model = keras.Model(inputs, L.UpSampling2D()(x[:, 1:3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_flops(model) == 2 * 3 * 2 * 16 + 32 + 2 * 32
    assert all(r.counted for r in flops_table(model))


@pytest.mark.parametrize("style", ["positional", "keywords", "mask"])
def test_attention_is_counted_by_its_query_value_and_key_however_it_is_called(style):
    import keras_autoprune as kap
    from keras_autoprune.allocation.cost import PlanCost

    query, value, key, mask = keras.Input((6, 16)), keras.Input((5, 12)), keras.Input((5, 10)), keras.Input((6, 5))
    attention = L.MultiHeadAttention(2, 4, name="mha")
    if style == "positional":
        model = keras.Model([query, value, key], attention(query, value, key))
    elif style == "keywords":  # the call's tensors in the order written: query, key, value
        model = keras.Model([query, value, key], attention(query=query, key=key, value=value))
    else:  # the mask is a tensor argument too
        model = keras.Model([query, value, key, mask], attention(query, value, key, attention_mask=mask))
    # t=6 query rows of 16, s=5 value rows of 12 and key rows of 10, 2 heads of 4: projections 2*6*16*8,
    # 2*5*10*8, 2*5*12*8, output 2*6*8*16, biases 6*8 + 5*2*8 + 6*16, scaling 6*8, scores and weighting
    # 2*6*5*(2*4 + 5 + 2*4).
    expected = 1536 + 800 + 960 + 1536 + 48 + 80 + 96 + 48 + 60 * 21
    assert count_flops(model) == expected == 6364
    assert PlanCost(model, kap.DependencyGraph(model))(kap.PrunePlan({})) == expected
