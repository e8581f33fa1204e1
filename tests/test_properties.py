"""Property-based test: random graphs of supported layers, random plans.

Hypothesis draws a stack of blocks (residual adds, concatenations, depthwise
convolutions with multipliers, squeeze-excite multiplies, plain convolutions
with various activations, pooling) and a head (global pooling or
flatten -> dense), then a random plan keeping a random non-empty subset of
every prunable group. The contract ``apply_plan == mask_plan`` must hold.
"""

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_autoprune as kap
from tests.helpers import assert_contract, randomize

L = keras.layers
ACTIVATIONS = ["relu", "sigmoid", "swish", "tanh", "softplus"]

block = st.tuples(st.integers(0, 5), st.integers(1, 5), st.sampled_from(ACTIVATIONS))


def build(blocks, flatten_head: bool) -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    x = L.BatchNormalization()(x)
    x = L.Activation("relu")(x)
    for kind, width, activation in blocks:
        channels = x.shape[-1]
        if kind == 0:  # residual
            y = L.Conv2D(width + 2, 3, padding="same", activation=activation)(x)
            y = L.BatchNormalization()(y)
            y = L.Conv2D(channels, 1)(y)
            x = L.Add()([x, y])
        elif kind == 1:  # concatenation
            x = L.Concatenate()([x, L.Conv2D(width, 1, activation=activation)(x)])
        elif kind == 2:  # depthwise with multiplier
            x = L.DepthwiseConv2D(3, depth_multiplier=1 + width % 2, padding="same")(x)
            x = L.BatchNormalization()(x)
            x = L.Activation(activation)(x)
        elif kind == 3:  # squeeze-excite
            gate = L.GlobalAveragePooling2D(keepdims=True)(x)
            gate = L.Conv2D(width, 1, activation="relu")(gate)
            gate = L.Conv2D(channels, 1, activation="sigmoid")(gate)
            x = L.Multiply()([x, gate])
        elif kind == 4:  # plain convolution
            padding = "valid" if width % 2 and x.shape[1] > 3 else "same"
            x = L.Conv2D(width + 1, 3, padding=padding)(x)
            x = L.BatchNormalization()(x)
            x = L.Activation(activation)(x)
        elif x.shape[1] >= 4:
            x = L.MaxPooling2D()(x)
    x = L.Flatten()(x) if flatten_head else L.GlobalAveragePooling2D()(x)
    x = L.Dense(5, activation="relu")(x)
    return keras.Model(inputs, L.Dense(3)(x))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block, min_size=1, max_size=4), flatten_head=st.booleans(), seed=st.integers(0, 2**16))
def test_random_graphs_satisfy_the_contract(blocks, flatten_head, seed):
    model = build(blocks, flatten_head)
    randomize(model, seed=seed, scale=0.3)
    graph = kap.DependencyGraph(model)
    rng = np.random.default_rng(seed)
    kept = {}
    for group in graph.prunable_groups:
        n = int(rng.integers(1, group.size + 1))
        chosen = set(rng.choice(group.size, n, replace=False).tolist())
        for member in group.members:  # no layer may be left without channels
            if chosen.isdisjoint(member.channels.tolist()):
                chosen.add(int(rng.choice(member.channels)))
        kept[group.id] = sorted(chosen)
    plan = kap.PrunePlan(kept)
    slim, _ = assert_contract(model, plan, graph, seed=seed)
    removed = sum(graph.group(g).size - len(k) for g, k in kept.items())
    assert (slim.count_params() < model.count_params()) == (removed > 0)
