"""Nested models: transfer learning backbones and shared (siamese) towers."""

import keras
import numpy as np

import keras_autoprune as kap
from tests.helpers import assert_contract, randomize

L = keras.layers


def test_transfer_learning_backbone_with_unknown_spatial_size():
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35)
    model = keras.Sequential([keras.Input((48, 48, 3)), backbone, L.GlobalAveragePooling2D(), L.Dense(10)])
    randomize(model, scale=0.1, kernels=False)
    graph = kap.DependencyGraph(model)
    assert graph.groups[1].id == f"{backbone.name}/Conv1"
    plan = kap.PrunePlan.uniform(graph, 0.3)
    slim, _ = assert_contract(model, plan, graph)
    assert isinstance(slim, keras.Sequential)
    assert slim.count_params() < model.count_params()
    assert kap.count_flops(slim) < kap.count_flops(model)
    # The backbone's last conv (1280 channels) feeds the head: the head's Dense shrinks too.
    kept = len(plan.kept[f"{backbone.name}/Conv_1"])
    assert slim.layers[-1].kernel.shape == (kept, 10)


def test_shared_nested_tower_is_pruned_once_for_both_calls():
    tower_in = keras.Input((6, 6, 3))
    t = L.Conv2D(6, 3, padding="same", name="t1")(tower_in)
    t = L.BatchNormalization(name="tbn")(t)
    t = L.Conv2D(4, 1, name="t2")(t)
    tower = keras.Model(tower_in, t, name="tower")
    left, right = keras.Input((6, 6, 3)), keras.Input((6, 6, 3))
    merged = L.Concatenate()([tower(left), tower(right)])
    model = keras.Model([left, right], L.Dense(2)(L.Flatten()(merged)))
    randomize(model)
    graph = kap.DependencyGraph(model)
    assert graph.group("tower/t1").prunable and graph.group("tower/t2").prunable
    plan = kap.PrunePlan({"tower/t1": [0, 2, 5], "tower/t2": [1, 3]})
    slim, _ = assert_contract(model, plan, graph)
    inner = slim.get_layer("tower")
    assert inner.get_layer("t1").filters == 3 and inner.get_layer("t2").filters == 2
    np.testing.assert_array_equal(
        inner.get_layer("t2").kernel.numpy(), model.get_layer("tower").get_layer("t2").kernel.numpy()[:, :, [0, 2, 5]][..., [1, 3]]
    )
