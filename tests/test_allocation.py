"""Allocation: exact plan costs without surgery, removal order, global ranking."""

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.allocation.cost import PlanCost
from keras_autoprune.allocation.ranking import global_ranking_plan, removal_order
from keras_autoprune.allocation.search import shortest_fitting_prefix, smallest_fitting_value
from tests.helpers import randomize
from tests.test_handlers import BUILDERS

L = keras.layers


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_plan_cost_equals_the_rebuilt_models_counts(builder):
    model = builder()
    randomize(model)
    graph = kap.DependencyGraph(model)
    cost = PlanCost(model, graph)
    assert cost(kap.PrunePlan({})) == kap.count_flops(model)
    for ratio in (0.3, 0.7):
        plan = kap.PrunePlan.uniform(graph, ratio)
        slim = kap.apply_plan(model, plan, graph)
        assert cost(plan, "flops") == kap.count_flops(slim)
        assert cost(plan, "params") == kap.count_params(slim)


def test_plan_cost_on_a_transfer_learning_model_with_unknown_backbone_size():
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35)
    model = keras.Sequential([keras.Input((48, 48, 3)), backbone, L.GlobalAveragePooling2D(), L.Dense(10)])
    graph = kap.DependencyGraph(model)
    plan = kap.PrunePlan.uniform(graph, 0.4)
    slim = kap.apply_plan(model, plan, graph)
    assert PlanCost(model, graph)(plan) == kap.count_flops(slim)


def two_branch_model():
    i = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(i)
    b = L.Conv2D(6, 3, padding="same", name="b")(a)
    return keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(b)))


def test_removal_order_is_by_score_keeps_one_channel_and_puts_earlier_removals_first():
    model = two_branch_model()
    graph = kap.DependencyGraph(model)
    scores = {"a": np.array([4.0, 1.0, 3.0, 0.5]), "b": np.array([2.0, 0.1, 5.0, 6.0, 0.2, 7.0])}
    order = removal_order(graph, scores)
    flat = [(g, int(c[0])) for g, c in order]
    # Sorted by score; group "b" keeps its best channel (5: score 7), "a" its best (0: score 4).
    assert flat == [("b", 1), ("b", 4), ("a", 3), ("a", 1), ("b", 0), ("a", 2), ("b", 2), ("b", 3)]
    earlier = kap.PrunePlan({"a": [0, 1, 3]})  # channel 2 of "a" went in a previous round
    assert [(g, int(c[0])) for g, c in removal_order(graph, scores, earlier)][0] == ("a", 2)


def test_global_ranking_meets_the_budget_with_the_fewest_removals():
    model = two_branch_model()
    randomize(model)
    graph = kap.DependencyGraph(model)
    scores = {"a": np.array([4.0, 1.0, 3.0, 0.5]), "b": np.array([2.0, 0.1, 5.0, 6.0, 0.2, 7.0])}
    budget = kap.Budget(flops=0.6)
    plan = global_ranking_plan(model, graph, scores, budget)
    flops = kap.count_flops(model)
    assert kap.count_flops(kap.apply_plan(model, plan, graph)) <= 0.6 * flops
    order = removal_order(graph, scores)
    removed = sum(graph.group(g).size - len(k) for g, k in plan.kept.items())
    from keras_autoprune.allocation.ranking import plan_from_prefix

    one_less = plan_from_prefix(graph, order, removed - 1)
    assert kap.count_flops(kap.apply_plan(model, one_less, graph)) > 0.6 * flops
    with pytest.warns(UserWarning, match="cannot reach"):
        global_ranking_plan(model, graph, scores, kap.Budget(flops=0.001))


def test_layer_floor_keeps_a_fraction_of_every_group():
    model = two_branch_model()
    graph = kap.DependencyGraph(model)
    scores = {"a": np.array([4.0, 1.0, 3.0, 0.5]), "b": np.array([2.0, 0.1, 5.0, 6.0, 0.2, 7.0])}
    # r = 0.5: "a" keeps ceil(0.5 * 4) = 2 channels, "b" ceil(0.5 * 6) = 3; the lowest-scored go first.
    flat = [(g, int(c[0])) for g, c in removal_order(graph, scores, max_layer_ratio=0.5)]
    assert flat == [("b", 1), ("b", 4), ("a", 3), ("a", 1), ("b", 0)]
    # r = 0.6: "a" keeps ceil(0.4 * 4) = 2, "b" ceil(0.4 * 6) = 3 (2.4 rounds up).
    assert len(removal_order(graph, scores, max_layer_ratio=0.6)) == 5
    # r = 1.0 is the order without a floor (one channel kept).
    assert len(removal_order(graph, scores, max_layer_ratio=1.0)) == len(removal_order(graph, scores)) == 8
    # A budget beyond the floor gets the maximal floored plan, with the floor named in the warning.
    with pytest.warns(UserWarning, match="max_layer_ratio=0.5"):
        plan = global_ranking_plan(model, graph, scores, kap.Budget(flops=0.1), max_layer_ratio=0.5)
    assert {g: sorted(k.tolist()) for g, k in plan.kept.items()} == {"a": [0, 2], "b": [2, 3, 5]}


def test_channels_removed_earlier_stay_removed_when_their_group_has_no_scores():
    model = two_branch_model()
    randomize(model)
    graph = kap.DependencyGraph(model)
    earlier = kap.PrunePlan({"a": [0, 2], "b": [1, 2, 3, 4, 5]})  # a round took a1, a3 and b0
    plan = global_ranking_plan(model, graph, {"b": np.arange(6.0)}, kap.Budget(flops=0.5), removed=earlier)
    assert set(plan.kept["a"].tolist()) == {0, 2}  # before: "a" was left out of the order and came back whole
    assert not np.isin([0], plan.kept["b"]).any()


def test_scores_must_name_prunable_groups_and_be_finite():
    model = two_branch_model()
    graph = kap.DependencyGraph(model)
    with pytest.raises(ValueError, match=r"e.g. \['a', 'b'\]. Received: a score for 'conv_a'"):
        removal_order(graph, {"conv_a": np.ones(4)})  # before: ignored, and a warning about the layer floor
    with pytest.raises(ValueError, match=r"finite scores for group 'a'.*channel\(s\) \[1\]"):
        removal_order(graph, {"a": np.array([50.0, np.nan, 60.0, 70.0]), "b": np.arange(6.0)})


def test_plan_costs_measure_flops_or_params_only_and_params_need_no_shapes():
    model = two_branch_model()
    graph = kap.DependencyGraph(model)
    with pytest.raises(ValueError, match="latency table"):
        global_ranking_plan(model, graph, {"a": np.ones(4)}, kap.Budget(latency=0.5))  # before: counted as FLOPs
    with pytest.raises(ValueError, match="Received: metric='param'"):
        PlanCost(model, graph)(kap.PrunePlan({}), "param")
    from keras_autoprune.allocation.cost import channel_costs

    with pytest.raises(ValueError, match="metric"):
        channel_costs(model, graph, "latency")
    i = keras.Input((None, None, 3))
    open_size = keras.Model(i, L.GlobalAveragePooling2D()(L.Conv2D(6, 3, name="b")(L.Conv2D(4, 3, name="a")(i))))
    graph = kap.DependencyGraph(open_size)
    assert PlanCost(open_size, graph)(kap.PrunePlan({"a": [0, 1]}), "params") == (3 * 9 * 2 + 2) + (2 * 9 * 6 + 6)
    fixed = keras.Model(j := keras.Input((8, 8, 3)), open_size(j))
    assert PlanCost(open_size, graph, input_shape=(8, 8, 3))(kap.PrunePlan({})) == kap.count_flops(fixed)


def test_a_ranked_callbacks_floor_is_the_rankings_floor():
    from keras_autoprune.allocation.ranking import layer_floor

    i = keras.Input((4, 4, 3))
    model = keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(100, 1, name="wide")(i))))
    callback = kap.MagnitudeCallback(kap.Budget(flops=0.5), max_layer_ratio=0.29, verbose=0)
    callback.set_model(model)
    callback.graph = kap.DependencyGraph(model)
    kept = len(callback.smallest_plan().kept["wide"])
    assert kept == layer_floor(100, 0.29) == 71  # PrunePlan.uniform's floor(0.29 * 100) = 28 removed keeps 72


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1, True, "0.9"])
def test_layer_floor_rejects_ratios_outside_the_unit_interval(ratio):
    with pytest.raises(ValueError, match="max_layer_ratio"):
        kap.MagnitudeCallback(kap.Budget(flops=0.5), max_layer_ratio=ratio)
    graph = kap.DependencyGraph(two_branch_model())
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        removal_order(graph, {"a": np.ones(4)}, max_layer_ratio=ratio)


def test_layer_floor_in_a_callback_stops_collapse_and_checks_the_budget():
    model = two_branch_model()
    randomize(model)
    # Channel "a" scores are tiny: without a floor, global L1 empties "a" down to one channel.
    model.get_layer("a").kernel.assign(model.get_layer("a").kernel * 1e-3)
    model.get_layer("a").bias.assign(np.zeros(4))
    free = kap.MagnitudeCallback(kap.Budget(flops=0.45), verbose=0).prune(model)
    assert free.get_layer("a").filters == 1
    floored = kap.MagnitudeCallback(kap.Budget(flops=0.45), max_layer_ratio=0.5, verbose=0).prune(model)
    assert floored.get_layer("a").filters == 2 and kap.count_flops(floored) <= 0.45 * kap.count_flops(model)
    # Below what the floor allows: a clear error before any work.
    with pytest.raises(ValueError, match=r"layer floor `max_layer_ratio` keeps\) the model keeps .*Fix: kap.Budget"):
        kap.MagnitudeCallback(kap.Budget(flops=0.05), max_layer_ratio=0.5, verbose=0).prune(model)


def _saving_of_one_channel(model, graph, group_id: str, channel: int) -> float:
    """FLOPs saved by removing one channel of a group, counted exactly on the rebuilt model's shapes."""
    size = next(g.size for g in graph.prunable_groups if g.id == group_id)
    cost = PlanCost(model, graph)
    return cost(kap.PrunePlan({})) - cost(kap.PrunePlan({group_id: [c for c in range(size) if c != channel]}))


def test_channel_costs_count_a_pass_through_layer_once_and_a_residual_convolution_on_both_sides():
    from keras_autoprune.allocation.cost import channel_costs

    L = keras.layers
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(6, 1, name="expand")(inputs)
    x = L.BatchNormalization(name="bn")(L.DepthwiseConv2D(3, padding="same", name="dw")(x))
    y = L.Conv2D(4, 1, name="project")(x)
    z = L.Add(name="add")([y, L.Conv2D(4, 1, name="mix")(y)])  # mix's input and output are one group
    model = keras.Model(inputs, L.Conv2D(3, 1, name="head")(z))
    graph = kap.DependencyGraph(model)
    costs = channel_costs(model, graph)
    flops = {row.layer: row.flops for row in kap.accounting.flops_table(model)}
    # expand -> dw -> bn -> project: dw and bn hold each channel on both sides and save its share once.
    expected = flops["expand"] / 6 + flops["dw"] / 6 + flops["bn"] / 6 + flops["project"] / 6
    assert costs["expand"] == pytest.approx(np.full(6, expected))
    # project -> mix -> add -> head: mix mixes channels, so its input and its output both shrink; add once.
    expected = flops["project"] / 4 + 2 * flops["mix"] / 4 + flops["add"] / 4 + flops["head"] / 4
    assert costs["project"] == pytest.approx(np.full(4, expected))
    for group in ("expand", "project"):  # a first-order share (biases included): within 15% of the exact saving
        assert costs[group][0] == pytest.approx(_saving_of_one_channel(model, graph, group, 0), rel=0.15)


def test_bisections_return_the_smallest_fitting_value_and_only_values_that_fit():
    assert shortest_fitting_prefix(lambda count: count >= 37, 0, 100) == 37
    calls = []

    def fits(value):
        calls.append(value)
        return value >= 0.3

    found = smallest_fitting_value(fits, 0.0, 1.0, steps=30)
    assert 0.3 <= found < 0.3 + 1e-8 and len(calls) == 30
    scale = smallest_fitting_value(lambda value: value >= 7.0, 0.1, 10.0, steps=40, geometric=True)
    assert 7.0 <= scale < 7.0 * (1 + 1e-9)
    assert smallest_fitting_value(lambda value: False, 0.0, 1.0, steps=5) == 1.0  # only `high` was known to fit
