"""PrunePlan: construction, validation errors, JSON round trip."""

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from tests.helpers import randomize

L = keras.layers


@pytest.fixture(scope="module")
def graph():
    i = keras.Input((6, 6, 3))
    a = L.Conv2D(10, 3, padding="same", name="a")(i)
    b = L.Conv2D(16, 1, name="b")(a)
    b = L.GroupNormalization(groups=4, name="gn")(b)
    model = keras.Model(i, L.Conv2D(2, 1, name="head")(b))
    randomize(model)
    return kap.DependencyGraph(model)


def test_uniform_counts_and_round_to(graph):
    plan = kap.PrunePlan.uniform(graph, 0.3)
    assert len(plan.kept["a"]) == 7  # floor(0.3 * 10) = 3 removed
    assert len(plan.kept["b"]) == 12  # in whole GroupNorm chunks of 4: 1 of 4 chunks removed
    assert len(kap.PrunePlan.uniform(graph, 0.3, round_to=4).kept["a"]) == 8
    assert kap.PrunePlan.uniform(graph, 0.0).kept == {}
    assert len(kap.PrunePlan.uniform(graph, 0.99).kept["a"]) == 1  # at least one stays


def test_a_ratio_whose_product_rounds_below_a_whole_count_removes_that_count():
    inputs = keras.Input((4,))
    graph = kap.DependencyGraph(keras.Model(inputs, L.Dense(3, name="head")(L.Dense(100, name="wide")(inputs))))
    assert 0.29 * 100 < 29 and 0.57 * 100 < 57  # 28.999999999999996 and 56.99999999999999 in binary floats
    assert len(kap.PrunePlan.uniform(graph, 0.29).kept["wide"]) == 71
    assert len(kap.PrunePlan.uniform(graph, 0.57).kept["wide"]) == 43


def test_uniform_l1_keeps_the_largest_filters(graph):
    kernel = graph.model.get_layer("a").kernel.numpy()
    norms = np.abs(kernel).sum(axis=(0, 1, 2))
    plan = kap.PrunePlan.uniform(graph, 0.5)
    np.testing.assert_array_equal(plan.kept["a"], np.sort(np.argsort(-norms)[:5]))
    last = kap.PrunePlan.uniform(graph, 0.5, importance="last")
    np.testing.assert_array_equal(last.kept["a"], np.arange(5))


@pytest.mark.parametrize(
    "kept,message",
    [
        ({"nope": [0]}, "not in this model's graph.*Prunable groups"),
        ({"head": [0]}, "cannot be pruned because it is a model output"),
        ({"a": [0, 10]}, r"in \[0, 10\).*\[10\]"),
        ({"a": [1, 1, 2]}, "duplicates: \\[1\\]"),
        ({"a": []}, "zero channels"),
        ({"b": [0, 1, 2]}, "whole normalization groups"),
    ],
)
def test_validation_errors(graph, kept, message):
    with pytest.raises(kap.PlanError, match=message):
        kap.PrunePlan(kept).validate(graph)


def test_bad_constructor_arguments(graph):
    with pytest.raises(kap.PlanError, match="mapping"):
        kap.PrunePlan([0, 1])
    with pytest.raises(kap.PlanError, match="integers"):
        kap.PrunePlan({"a": [0.5]})
    with pytest.raises(kap.PlanError, match="ratio"):
        kap.PrunePlan.uniform(graph, 1.0)
    with pytest.raises(kap.PlanError, match="round_to"):
        kap.PrunePlan.uniform(graph, 0.5, round_to=0)
    with pytest.raises(TypeError, match="PrunePlan"):
        kap.apply_plan(graph.model, {"a": [0]})


def test_json_round_trip(graph):
    plan = kap.PrunePlan.uniform(graph, 0.4)
    text = plan.to_json()
    again = kap.PrunePlan.from_json(text)
    assert again == plan and again.kept.keys() == plan.kept.keys()
    assert again.to_json() == text
    with pytest.raises(kap.PlanError, match="to_json"):
        kap.PrunePlan.from_json('{"kept": {}}')
    with pytest.raises(kap.PlanError, match="JSON"):
        kap.PrunePlan.from_json("not json")


def test_plan_fails_before_any_work_and_model_is_untouched(graph):
    model = graph.model
    before = model.get_layer("a").kernel.numpy().copy()
    with pytest.raises(kap.PlanError):
        kap.apply_plan(model, kap.PrunePlan({"a": [99]}))
    np.testing.assert_array_equal(model.get_layer("a").kernel.numpy(), before)
    other = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    with pytest.raises(ValueError, match="built for another model"):
        kap.apply_plan(other, kap.PrunePlan({}), graph)


def test_a_layer_cannot_be_emptied_and_uniform_never_does_it():
    i = keras.Input((4, 4, 3))
    a = L.Conv2D(2, 1, name="a")(i)
    b = L.Conv2D(6, 1, name="b")(i)
    wide = L.Conv2D(8, 1, name="wide")(i)
    x = L.Add()([L.Concatenate()([a, b]), wide])  # a, b and wide: one group of 8
    model = keras.Model(i, L.Conv2D(2, 1)(x))
    randomize(model)
    graph = kap.DependencyGraph(model)
    assert graph.group("a").size == 8
    with pytest.raises(kap.PlanError, match="layer 'a'.*zero channels"):
        kap.PrunePlan({"a": [2, 3, 4, 5, 6, 7]}).validate(graph)
    plan = kap.PrunePlan.uniform(graph, 0.9)
    plan.validate(graph)
    assert np.isin([0, 1], plan.kept["a"]).any() and np.isin(np.arange(2, 8), plan.kept["a"]).any()


def test_uniform_and_from_ratios_refuse_bad_input_with_a_clear_error():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(6, name="a")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    graph = kap.DependencyGraph(model)
    with pytest.raises(kap.PlanError, match="not the model"):
        kap.PrunePlan.uniform(model, 0.5)
    assert kap.PrunePlan.uniform(graph, np.float32(0.5)).kept["a"].size == 3  # a numpy ratio is a ratio
    scores = {"a": np.arange(6.0), "out": np.arange(2.0)}
    with pytest.raises(kap.PlanError, match=r"in \[0, 1\). Received: ratio=1.5"):
        kap.PrunePlan.from_ratios(graph, {"a": 1.5}, scores)
    with pytest.raises(kap.PlanError, match="'out', blocked"):
        kap.PrunePlan.from_ratios(graph, {"out": 0.5}, scores)
    with pytest.raises(kap.PlanError, match="'nope', not a group"):
        kap.PrunePlan.from_ratios(graph, {"nope": 0.5}, scores)
    with pytest.raises(kap.PlanError, match=r"one score per channel of group 'a' \(6\). Received: scores of shape \(5,\)"):
        kap.PrunePlan.from_ratios(graph, {"a": 0.5}, {"a": np.arange(5.0)})
