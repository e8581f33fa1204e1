"""Attention written with `keras.ops`: heads split by reshape, ``q @ transpose(k)``, ``softmax @ v``.

`keras_autoprune.graph.handlers.matmul` follows channels onto the
second-to-last axis (a transpose of the last two axes) and through
``keras.ops.matmul``: the per-head dimensions of the query/key and of the
value/output projections become prunable, exactly, in a custom layer that
is traced (issue 13, MiT's SegFormer attention).
"""

import keras
import numpy as np

import keras_autoprune as kap
from keras_autoprune.allocation.cost import PlanCost
from tests.helpers import assert_contract, randomize

L = keras.layers
ops = keras.ops


class OpsAttention(keras.layers.Layer):
    """Multi-head self-attention from Dense sublayers and `keras.ops` (SegFormer's pattern, no reduction)."""

    def __init__(self, width, heads, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.q, self.k, self.v = L.Dense(width, name="q"), L.Dense(width, name="k"), L.Dense(width, name="v")
        self.proj = L.Dense(width, name="proj")

    def call(self, x):
        batch, tokens, width = ops.shape(x)
        split = lambda t: ops.transpose(ops.reshape(t, (batch, tokens, self.heads, width // self.heads)), (0, 2, 1, 3))  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attention = ops.softmax((q @ ops.transpose(k, (0, 1, 3, 2))) * self.scale, axis=-1)
        merged = ops.reshape(ops.transpose(attention @ v, (0, 2, 1, 3)), (batch, tokens, width))
        return self.proj(merged)


def _token_model(middle) -> keras.Model:
    inputs = keras.Input((6, 5), name="tokens")
    x = L.Dense(8, name="embed")(inputs)
    x = middle(x)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D(name="pool")(x)))
    randomize(model)
    return model


def _group(graph, layer: str):
    """The group whose channels are the outputs of ``layer``."""
    return next(g for g in graph.groups if any(m.layer == layer and m.side == "output" for m in g.members))


def test_ops_attention_prunes_per_head_dimensions_exactly(tmp_path):
    model = _token_model(OpsAttention(8, 2, name="attn"))
    graph = kap.DependencyGraph(model)
    query_key, value = _group(graph, "attn/q"), _group(graph, "attn/v")
    # d = 0..3 of each head: channel d is columns d and 4 + d of both q and k; v likewise with proj's rows.
    assert (query_key.size, query_key.prunable) == (4, True) and (value.size, value.prunable) == (4, True)
    assert {m.layer for m in query_key.members} >= {"attn/q", "attn/k"}
    assert {m.layer for m in value.members} >= {"attn/v", "attn/proj"}

    plan = kap.PrunePlan.uniform(graph, ratio=0.5)
    slim, _ = assert_contract(model, plan, graph)
    inner = slim.get_layer("attn")
    assert [inner.get_layer(n).units for n in ("q", "k", "v", "proj")] == [4, 4, 4, 4]  # 2 heads x 2 dims; proj: its own group
    assert inner.get_layer("proj").kernel.shape == (4, 4)
    assert PlanCost(model, graph)(plan) == kap.count_flops(slim) < kap.count_flops(model)

    path = str(tmp_path / "slim.keras")
    slim.save(path)
    x = np.random.default_rng(0).normal(size=(2, 6, 5)).astype("float32")
    np.testing.assert_allclose(keras.saving.load_model(path, safe_mode=True)(x), slim(x), rtol=1e-6, atol=1e-6)
    assert kap.export_tflite(slim, str(tmp_path / "slim.tflite"), num_samples=4).verified


class TokenMixing(keras.layers.Layer):
    """MLP-Mixer's token mixing: transpose, Dense over tokens, transpose back, plus the input."""

    def __init__(self, tokens, **kwargs):
        super().__init__(**kwargs)
        self.mix = L.Dense(tokens, name="mix")

    def call(self, x):
        return ops.add(x, ops.swapaxes(self.mix(ops.swapaxes(x, 1, 2)), 1, 2))


def test_channels_cross_a_transpose_pair_and_are_blocked_where_nothing_tracks_them():
    through = _token_model(TokenMixing(6, name="mixing"))
    graph = kap.DependencyGraph(through)
    embed = _group(graph, "embed")
    assert embed.prunable and embed.size == 8
    plan = kap.PrunePlan.uniform(graph, ratio=0.5)
    slim, _ = assert_contract(through, plan, graph)
    assert PlanCost(through, graph)(plan) == kap.count_flops(slim)  # the token Dense runs on 4 rows, not 8

    class Activated(TokenMixing):  # Dense and element-wise activations keep the channels where they sit
        def call(self, x):
            return ops.add(x, ops.swapaxes(ops.relu(self.mix(ops.gelu(ops.swapaxes(x, 1, 2)))), 1, 2))

    activated = _token_model(Activated(6, name="mixing"))
    graph = kap.DependencyGraph(activated)
    assert _group(graph, "embed").prunable
    assert_contract(activated, kap.PrunePlan.uniform(graph, ratio=0.5), graph)

    class Convolved(TokenMixing):  # a Conv1D slides along the axis where the channels sit
        def __init__(self, tokens, **kwargs):
            super().__init__(tokens, **kwargs)
            self.conv = L.Conv1D(tokens, 3, padding="same", name="conv")

        def call(self, x):
            return ops.add(x, ops.swapaxes(self.mix(self.conv(ops.swapaxes(x, 1, 2))), 1, 2))

    blocked = kap.DependencyGraph(_token_model(Convolved(6, name="mixing")))
    group = _group(blocked, "embed")
    assert not group.prunable and "second-to-last axis" in group.reason


def test_matmul_contracting_channels_with_a_sequence_axis_blocks_them():
    class Mixer(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.scores = L.Dense(6, name="scores")

        def call(self, x):
            return self.scores(x) @ x  # contracts the Dense's 6 channels with x's 6 tokens

    graph = kap.DependencyGraph(_token_model(Mixer(name="mixer")))
    scores = _group(graph, "mixer/scores")
    assert not scores.prunable and "carries no channels" in scores.reason
    assert _group(graph, "embed").prunable  # x's channels flow to the output


def test_nap_prunes_the_per_head_dimensions_and_eigendamage_leaves_the_traced_layer_whole():
    model = _token_model(OpsAttention(8, 2, name="attn"))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    data = [(rng.normal(size=(16, 6, 5)).astype("float32"), rng.integers(0, 3, 16))]
    slim = kap.NAPCallback(data, budget=kap.Budget(flops=0.6), verbose=0).prune(model)
    assert kap.count_flops(slim) <= 0.6 * kap.count_flops(model)
    q, k, v = (slim.get_layer("attn").get_layer(n).units for n in ("q", "k", "v"))
    assert q == k and q % 2 == 0 and v % 2 == 0  # whole per-head dimensions: one column in each of 2 heads
    assert min(q, v) < 8, (q, v)  # at least one of the attention's groups was pruned

    # EigenDamage factorises layers of functional graphs only: 'embed' here, the attention's sublayers stay whole.
    callback = kap.EigenDamageCallback(data, budget=kap.Budget(flops=0.97), verbose=0)
    factorised = callback.prune(model)
    attention = factorised.get_layer("attn")  # copied as it is: still the user's class
    assert type(attention) is OpsAttention and [attention.q.units, attention.k.units, attention.v.units] == [8, 8, 8]
    assert kap.count_flops(factorised) <= 0.97 * kap.count_flops(model)


def test_channels_on_the_second_to_last_axis_stop_at_a_nested_model():
    inner_input = keras.Input((8, 6))
    nested = keras.Model(inner_input, L.Dense(6, name="mix")(inner_input), name="nested")
    inputs = keras.Input((6, 5))
    x = L.Dense(8, name="embed")(inputs)
    x = ops.swapaxes(nested(ops.swapaxes(x, 1, 2)), 1, 2)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    group = _group(kap.DependencyGraph(model), "embed")
    assert not group.prunable and "nested model 'nested'" in group.reason
