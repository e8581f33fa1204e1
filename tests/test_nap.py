"""NAPCallback on real data (scikit-learn digits): budget, accuracy, modes, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_autoprune as kap
from keras_autoprune.evaluation import accuracy
from keras_autoprune.methods import nap
from keras_autoprune.stats import collect_kfac

L = keras.layers


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    return train_test_split(x, data.target, test_size=0.25, random_state=0)


def build(seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input((8, 8, 1))
    h = L.Conv2D(16, 3, padding="same", use_bias=False, name="c1")(i)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU()(h)
    r = L.Conv2D(16, 3, padding="same", name="c2")(h)
    h = L.Add()([h, r])
    h = L.MaxPooling2D()(h)
    h = L.Conv2D(32, 3, activation="relu", name="c3")(h)
    h = L.Flatten()(h)
    h = L.Dense(32, activation="relu", name="d1")(h)
    model = keras.Model(i, L.Dense(10, name="head")(h))
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def pretrained(digits):
    x_train, _, y_train, _ = digits
    model = build()
    model.fit(x_train, y_train, epochs=10, batch_size=64, verbose=0)
    return model.get_weights()


def fresh(pretrained):
    model = build()
    model.set_weights(pretrained)
    return model


def test_nap_keeps_accuracy_at_half_the_flops(digits, pretrained):
    x_train, x_test, y_train, y_test = digits
    reference = fresh(pretrained)
    reference.fit(x_train, y_train, epochs=4, batch_size=64, verbose=0)
    unpruned = accuracy(reference, (x_test, y_test))

    model = fresh(pretrained)
    cb = kap.NAPCallback((x_train, y_train), budget=kap.Budget(flops=0.5), rounds=2, verbose=0)
    history = model.fit(x_train, y_train, epochs=4, batch_size=64, callbacks=[cb], verbose=0)
    flops, slim_flops = kap.count_flops(model), kap.count_flops(cb.pruned_model)
    assert slim_flops <= 0.5 * flops
    # Within one chunk of the budget: putting back the cheapest removed channel would exceed it.
    assert slim_flops >= 0.5 * flops - max(kap.allocation.cost.channel_costs(model, cb.graph)[g].max() for g in cb.plan.kept)
    pruned = accuracy(cb.pruned_model, (x_test, y_test))
    assert pruned >= unpruned - 0.02, (pruned, unpruned)
    np.testing.assert_allclose(np.asarray(cb.pruned_model(x_test)), np.asarray(model(x_test)), rtol=1e-4, atol=1e-4)
    assert history.history["flops_kept"][-1] == pytest.approx(slim_flops / flops)
    assert cb.statistics_seconds > 0 and cb.report.flops_kept == pytest.approx(slim_flops / flops)


def test_default_scorer_is_the_channel_fisher_per_flop_and_kfac_stays_reachable(digits, pretrained):
    """Issue 12's default: ``scorer="fisher", cost_aware=True``; options only K-FAC has select ``"nap"``."""
    x_train, _, y_train, _ = digits
    data, budget = (x_train[:256], y_train[:256]), kap.Budget(flops=0.5)
    default = kap.NAPCallback(data, budget=budget, verbose=0)
    assert (default.scorer, default.cost_aware, default.input_side) == ("fisher", True, False)
    kfac = kap.NAPCallback(data, budget=budget, scorer="nap", verbose=0)
    assert (kfac.scorer, kfac.cost_aware, kfac.input_side) == ("nap", False, True)
    for options in (dict(obs_update=True), dict(input_side=True), dict(granularity="weight", budget=kap.Budget(params=0.5))):
        chosen = kap.NAPCallback(data, **{"budget": budget, **options}, verbose=0)
        assert (chosen.scorer, chosen.cost_aware) == ("nap", False), options
    # The default prunes exactly like the explicit pair, and differently from K-FAC's ranking.
    slim = default.prune(fresh(pretrained))
    explicit = kap.NAPCallback(data, budget=budget, scorer="fisher", cost_aware=True, verbose=0)
    assert explicit.prune(fresh(pretrained)).count_params() == slim.count_params()
    assert explicit.plan.kept.keys() == default.plan.kept.keys()
    assert all(np.array_equal(explicit.plan.kept[g], default.plan.kept[g]) for g in default.plan.kept)
    kfac.prune(fresh(pretrained))
    assert any(not np.array_equal(kfac.plan.kept[g], default.plan.kept[g]) for g in default.plan.kept)


def test_nap_ranks_by_saliency_not_by_layer(digits, pretrained):
    """Per-layer ratios come out of one global ranking: layers lose different fractions."""
    x_train, _, y_train, _ = digits
    model = fresh(pretrained)
    graph = kap.DependencyGraph(model)
    factors = collect_kfac(model, (x_train[:128], y_train[:128]), graph=graph, verbose=0)
    scores = nap.channel_saliencies(model, graph, factors)
    plan = nap.nap_plan(model, graph, factors, kap.Budget(flops=0.4))
    kept_fraction = {g: len(k) / graph.group(g).size for g, k in plan.kept.items()}
    assert len(set(np.round(list(kept_fraction.values()), 3))) > 1
    # Within every group, each removed channel scores no higher than any kept one.
    for group_id, kept in plan.kept.items():
        gone = np.setdiff1d(np.arange(graph.group(group_id).size), kept)
        assert gone.size and scores[group_id][gone].max() <= scores[group_id][kept].min()


def test_baseline_scorers_sum_output_side_members(digits, pretrained):
    """Group "c1" is produced by c1 and c2 (tied by the Add): a baseline scores it as the sum of
    both layers' output columns, nothing from the consumers; Kron-OBS is NAP's output side."""
    x_train, _, y_train, _ = digits
    model = fresh(pretrained)
    graph = kap.DependencyGraph(model)
    factors = collect_kfac(model, (x_train[:128], y_train[:128]), graph=graph, verbose=0)

    def c_obd_by_loops(name):
        f, layer = factors[name], model.get_layer(name)
        bias = layer.bias.numpy() if layer.use_bias else None
        w = f.weight_matrix(layer.kernel.numpy(), bias)
        return np.array([sum(0.5 * w[j, i] ** 2 * f.A[j, j] * f.G[i, i] for j in range(w.shape[0])) for i in range(w.shape[1])])

    scores = nap.channel_saliencies(model, graph, factors, scorer="c-obd")
    np.testing.assert_allclose(scores["c1"], c_obd_by_loops("c1") + c_obd_by_loops("c2"), rtol=1e-10)
    np.testing.assert_allclose(scores["d1"], c_obd_by_loops("d1"), rtol=1e-10)
    kron_obs = nap.channel_saliencies(model, graph, factors, scorer="kron-obs")
    output_side = nap.channel_saliencies(model, graph, factors, input_side=False)
    assert kron_obs.keys() == output_side.keys() == {"c1", "c3", "d1"}
    for gid in kron_obs:
        np.testing.assert_allclose(kron_obs[gid], output_side[gid], rtol=1e-10)
    with_input = nap.channel_saliencies(model, graph, factors)
    assert np.all(with_input["c3"] > kron_obs["c3"])  # NAP's default adds d1's input side


@pytest.mark.parametrize("scorer", ["kron-obs", "kron-obd", "c-obs", "c-obd"])
def test_baseline_scorer_end_to_end_meets_the_budget(digits, pretrained, scorer):
    x_train, x_test, y_train, _ = digits
    model = fresh(pretrained)
    cb = kap.NAPCallback((x_train[:128], y_train[:128]), budget=kap.Budget(flops=0.5), scorer=scorer, verbose=0)
    model.fit(x_train[:256], y_train[:256], epochs=1, batch_size=64, callbacks=[cb], verbose=0)
    flops, slim_flops = kap.count_flops(model), kap.count_flops(cb.pruned_model)
    assert cb.scorer == scorer and cb.input_side is False
    assert slim_flops <= 0.5 * flops
    assert slim_flops >= 0.5 * flops - max(kap.allocation.cost.channel_costs(model, cb.graph)[g].max() for g in cb.plan.kept)
    np.testing.assert_allclose(np.asarray(cb.pruned_model(x_test)), np.asarray(model(x_test)), rtol=1e-4, atol=1e-4)


def test_tolerance_mode_undoes_the_round_that_breaks_it(digits, pretrained):
    x_train, x_test, y_train, y_test = digits
    model = fresh(pretrained)
    cb = kap.NAPCallback(
        (x_train[:256], y_train[:256]), budget=kap.Budget(flops=0.02), rounds=3, max_layer_ratio=1.0,
        validation_data=(x_test, y_test), max_accuracy_drop=0.02, verbose=0,  # 2%: below the 0.9 floor's reach
    )
    model.fit(x_train, y_train, epochs=3, batch_size=64, callbacks=[cb], verbose=0)
    judged = [h for h in cb.history if "accepted" in h]
    assert judged and judged[-1]["accepted"] is False and cb.stopped
    accepted = [h for h in judged if h["accepted"]]
    expected_flops = accepted[-1]["flops_kept"] if accepted else 1.0
    assert kap.count_flops(cb.pruned_model) / kap.count_flops(model) == pytest.approx(expected_flops)
    assert accuracy(cb.pruned_model, (x_test, y_test)) >= cb.base_accuracy - 0.02 - 1e-9


def test_tolerance_mode_that_undoes_its_first_round_leaves_no_mask(digits, pretrained):
    x_train, x_test, y_train, y_test = digits
    model = fresh(pretrained)
    cb = kap.NAPCallback((x_train[:256], y_train[:256]), budget=kap.Budget(flops=0.05), max_layer_ratio=1.0,
                         validation_data=(x_test, y_test), max_accuracy_drop=0.0, verbose=0)
    model.fit(x_train[:512], y_train[:512], epochs=2, batch_size=64, callbacks=[cb], verbose=0)
    assert cb.stopped and cb.history[0]["accepted"] is False
    assert kap.count_flops(cb.pruned_model) == kap.count_flops(model)
    # The epoch after the undone round trained every channel: none is held at zero by a stale mask.
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel = layer.kernel.numpy().reshape(-1, layer.kernel.shape[-1])
            assert np.all(np.any(kernel != 0, axis=0)), layer.name


def _scripted_accuracy(monkeypatch, values):
    """The tolerance judge reads these accuracies in turn (the unpruned reference first): which round fails is then
    chosen by the test, not by the training's noise. Each call is recorded."""
    calls = []

    def scripted(model, data, batch_size=128):
        calls.append(len(calls))
        return values[len(calls) - 1]

    monkeypatch.setattr("keras_autoprune.callbacks.nap.accuracy", scripted)
    return calls


@pytest.mark.parametrize("granularity, budget", [("channel", kap.Budget(flops=0.3)), ("weight", kap.Budget(params=0.3))])
def test_tolerance_mode_judges_each_round_once_and_an_undone_round_keeps_the_earlier_ones(
        digits, pretrained, monkeypatch, granularity, budget):
    x_train, x_test, y_train, y_test = digits
    model = fresh(pretrained)
    calls = _scripted_accuracy(monkeypatch, [0.90, 0.90, 0.50, 0.895, 0.895])  # round 2 fails by 0.40
    cb = kap.NAPCallback((x_train[:256], y_train[:256]), budget=budget, rounds=3, granularity=granularity,
                         validation_data=(x_test, y_test), max_accuracy_drop=0.05, verbose=0)
    model.fit(x_train[:512], y_train[:512], epochs=4, batch_size=64, callbacks=[cb], verbose=0)
    assert len(calls) == 3 and cb.stopped  # the reference, then rounds 1 and 2; epochs 2 and 3 judge nothing
    assert [h.get("accepted") for h in cb.history] == [True, False]
    kept = cb.history[0]["flops_kept" if granularity == "channel" else "params_kept"]
    if granularity == "channel":
        assert kap.count_flops(cb.pruned_model) / kap.count_flops(model) == pytest.approx(kept)
    else:  # round 1's masks survive the undone round 2: its weights are still zeros in the result
        zeros = sum(int(np.sum(m == 0)) for m in cb.weight_masks.values())
        assert zeros > 0 and cb.measure_kept()["params"] == pytest.approx(kept)
        for name, mask in cb.weight_masks.items():
            assert np.all(cb.pruned_model.get_layer(name).kernel.numpy()[mask == 0] == 0), name


def test_tolerance_mode_checks_validation_data_before_training(digits, pretrained):
    x_train, x_test, y_train, _ = digits
    model = fresh(pretrained)
    weights = [w.copy() for w in model.get_weights()]
    cb = kap.NAPCallback((x_train[:256], y_train[:256]), budget=kap.Budget(flops=0.5), rounds=2,
                         validation_data=tf.data.Dataset.from_tensor_slices(x_test).batch(32), max_accuracy_drop=0.05,
                         verbose=0)
    with pytest.raises(ValueError, match="tolerance mode measures the top-1 accuracy"):
        model.fit(x_train[:256], y_train[:256], epochs=2, batch_size=64, callbacks=[cb], verbose=0)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)  # not one step was trained


def _separable_chain():
    """c1 (Conv2D) -> s1, s2 (SeparableConv2D, which the statistics cannot tap) -> GAP -> d (Dense)."""
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.SeparableConv2D(16, 3, padding="same", activation="relu", name="s1")(x)
    x = keras.layers.SeparableConv2D(16, 3, padding="same", activation="relu", name="s2")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="d")(keras.layers.GlobalAveragePooling2D()(x)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    return model, (rng.normal(size=(32, 12, 12, 3)).astype("float32"), rng.integers(0, 3, 32))


def test_groups_the_scorer_cannot_score_stay_whole_and_count_in_the_budget_floor():
    model, data = _separable_chain()
    graph = kap.DependencyGraph(model)
    # Fisher reads the readers (only d is tapped); NAP also the producers (c1); the baselines the producers only.
    assert nap.scorable_groups(graph, "fisher", False) == {"s2"}
    assert nap.scorable_groups(graph, "nap", True) == {"c1", "s2"}
    assert nap.scorable_groups(graph, "c-obs", False) == {"c1"}
    fisher = kap.NAPCallback(data, kap.Budget(flops=0.3), scorer="fisher", num_batches=2, batch_size=16, verbose=0)
    with pytest.raises(kap.BudgetUnreachableError, match=r"cannot score.*\['c1', 's1'\]"):
        fisher.prune(model)  # before: accepted, then each round only warned that it could not reach the budget
    cb = kap.NAPCallback(data, kap.Budget(flops=0.3), scorer="nap", num_batches=2, batch_size=16, verbose=0)
    with pytest.warns(UserWarning, match=r"reach no layer that scores group\(s\) \['s1'\]"):
        slim = cb.prune(model)
    assert "s1" not in cb.plan.kept  # before: scored 0 and removed first
    assert slim.get_layer("s1").filters == 16 and kap.count_flops(slim) <= 0.3 * kap.count_flops(model)


def test_one_shot_prune_judges_each_round_in_tolerance_mode(digits, pretrained, monkeypatch):
    x_train, x_test, y_train, y_test = digits
    model = fresh(pretrained)
    calls = _scripted_accuracy(monkeypatch, [0.90, 0.90, 0.50])  # round 2 fails by 0.40
    cb = kap.NAPCallback((x_train[:256], y_train[:256]), budget=kap.Budget(flops=0.3), rounds=3,
                         validation_data=(x_test, y_test), max_accuracy_drop=0.05, verbose=0)
    slim = cb.prune(model)
    assert len(calls) == 3 and cb.stopped and [h.get("accepted") for h in cb.history] == [True, False]
    assert kap.count_flops(slim) / kap.count_flops(model) == pytest.approx(cb.history[0]["flops_kept"])
    assert cb.history[0]["flops_kept"] > 0.3


def test_tolerance_mode_without_a_budget_aims_at_the_models_floor_when_it_is_above_its_default():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, name="c1")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(x))  # c1 keeps at least 1 of 8: 12.5% of the FLOPs
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(8, 16, 16, 3)).astype("float32"), rng.integers(0, 2, 8))
    cb = kap.NAPCallback(data, validation_data=data, max_accuracy_drop=0.99, max_layer_ratio=1.0, verbose=0)
    with pytest.raises(RuntimeError, match=r"budget_floor\(\) after `fit` or `prune` has started"):
        cb.budget_floor()
    cb.prune(model)
    floor = cb.budget_floor()  # the copy that prune() worked on
    assert floor > 0.1 and cb.budget.fraction == pytest.approx(kap.budget.round_up_fraction(floor))
    assert kap.count_flops(cb.pruned_model) <= cb.budget.fraction * kap.count_flops(model)
    with pytest.raises(kap.BudgetUnreachableError):  # a budget the user gave is still checked
        kap.NAPCallback(data, kap.Budget(flops=0.1), validation_data=data, max_accuracy_drop=0.99, max_layer_ratio=1.0,
                        verbose=0).prune(model)


def test_tolerance_mode_in_weight_granularity_defaults_to_a_parameter_budget_above_its_floor():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=4, name="dw")(inputs)  # 120 weights weight mode keeps
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, name="c1")(x))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(x))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(8, 16, 16, 3)).astype("float32"), rng.integers(0, 2, 8))
    cb = kap.NAPCallback(data, granularity="weight", validation_data=data, max_accuracy_drop=0.99, verbose=0)
    assert cb.budget.metric == "params"
    cb.prune(model)
    total = model.count_params()
    floor = (120 + 8 + 2) / total  # the depthwise layer and the biases: 12.9%, above the default 10%
    assert total == 1010 and cb.budget.fraction == pytest.approx(kap.budget.round_up_fraction(floor + 0.01)) == 0.14
    assert floor < cb.measure_kept()["params"] <= cb.budget.fraction + 1 / total  # within one weight


def test_fine_grained_mode_masks_kernels_outside_prunable_channel_groups():
    inputs = keras.Input((8,))
    x = keras.layers.LayerNormalization(name="ln")(keras.layers.Dense(5, name="b")(keras.layers.Dense(6, name="a")(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="c")(x))  # c's inputs cross the norm
    model.compile(loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(16, 8)).astype("float32"), rng.integers(0, 2, 16))
    cb = kap.NAPCallback(data, kap.Budget(params=0.6), granularity="weight", verbose=0)
    slim = cb.prune(model)
    nonzero = sum(int(np.count_nonzero(w.numpy())) for w in slim.weights)
    assert nonzero <= 0.6 * model.count_params() + 1
    assert np.count_nonzero(slim.get_layer("c").kernel.numpy() == 0) > 0  # a kernel no channel group reaches


def test_fine_grained_mode_refuses_an_unreachable_budget_before_training():
    inputs = keras.Input((8,))
    x = L.BatchNormalization(name="bn")(L.Dense(6, name="a")(inputs))
    model = keras.Model(inputs, L.Dense(2, activation="softmax", name="c")(x))  # 60 of 92 weights are kernels
    model.compile(loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x_train, y_train = rng.normal(size=(16, 8)).astype("float32"), rng.integers(0, 2, 16)
    before = [w.numpy().copy() for w in model.weights]
    cb = kap.NAPCallback((x_train, y_train), kap.Budget(params=0.3), granularity="weight", verbose=0)
    with pytest.raises(kap.BudgetUnreachableError, match=r"60 of its 92 .* keeps at least 34\.8%.*Budget\(params=0\.35\)"):
        model.fit(x_train, y_train, epochs=1, callbacks=[cb], verbose=0)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))  # no step was taken
    slim = kap.NAPCallback((x_train, y_train), kap.Budget(params=0.35), granularity="weight", verbose=0).prune(model)
    nonzero = sum(int(np.count_nonzero(w.numpy())) for w in slim.weights)
    assert nonzero <= 0.35 * model.count_params()


def test_fine_grained_mode_masks_attention_projections():
    inputs = keras.Input((4, 8))
    x = L.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    model = keras.Model(inputs, L.Dense(2, activation="softmax", name="c")(L.GlobalAveragePooling1D()(x)))
    model.compile(loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(16, 4, 8)).astype("float32"), rng.integers(0, 2, 16))
    cb = kap.NAPCallback(data, kap.Budget(params=0.5), granularity="weight", verbose=0)
    slim = cb.prune(model)
    assert set(cb.weight_masks) == {"c", "mha/query", "mha/key", "mha/value", "mha/attention_output"}
    masked = slim.get_layer("mha").query_dense.kernel.numpy()
    assert masked.shape == (8, 2, 4) and 0 < np.count_nonzero(masked) < masked.size
    zeros = sum(int(np.sum(m == 0)) for m in cb.weight_masks.values())
    assert cb.history[-1]["params_kept"] == pytest.approx(1 - zeros / model.count_params())
    assert zeros >= 0.5 * model.count_params()


def test_fine_grained_mode_masks_weights_and_strips_masks(digits, pretrained):
    x_train, x_test, y_train, y_test = digits
    model = fresh(pretrained)
    cb = kap.NAPCallback((x_train[:256], y_train[:256]), budget=kap.Budget(params=0.3), granularity="weight", verbose=0)
    model.fit(x_train, y_train, epochs=2, batch_size=64, callbacks=[cb], verbose=0)
    slim = cb.pruned_model
    assert slim.count_params() == model.count_params()  # same shapes
    nonzero = sum(int(np.count_nonzero(w.numpy())) for w in slim.weights)
    assert nonzero <= 0.3 * model.count_params() + 1
    assert all(w.constraint is None for w in slim.weights)
    np.testing.assert_allclose(np.asarray(slim(x_test)), np.asarray(model(x_test)), rtol=1e-5, atol=1e-5)
    assert accuracy(slim, (x_test, y_test)) > 0.8


def test_cost_aware_scores_rank_a_group_normalization_chunk_by_its_saliency_per_cost():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GroupNormalization(groups=2, name="gn")(keras.layers.Conv2D(8, 3, name="c1")(inputs))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c2")(keras.layers.ReLU()(x))
    model = keras.Model(inputs, keras.layers.Dense(3, name="d")(keras.layers.GlobalAveragePooling2D()(x)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(16, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 16))
    graph = kap.DependencyGraph(model)
    factors = collect_kfac(model, data, graph=graph, verbose=0)
    plain = nap.channel_saliencies(model, graph, factors)
    per_cost = nap.channel_saliencies(model, graph, factors, cost_aware=True)
    costs = kap.allocation.cost.channel_costs(model, graph, "flops")
    chunks = graph.group("c1").chunks
    assert sorted(set(chunks.tolist())) == [0, 1]  # two chunks of four channels
    for chunk in (0, 1):
        members = chunks == chunk  # what the ranking sums for the chunk: its saliency per FLOP it saves
        assert per_cost["c1"][members].sum() == pytest.approx(plain["c1"][members].sum() / costs["c1"][members].sum())
    np.testing.assert_allclose(per_cost["c2"], plain["c2"] / costs["c2"])  # single channels: as before


def test_obs_update_zeroes_removed_columns_and_moves_the_rest(digits, pretrained):
    x_train, _, y_train, _ = digits
    model = fresh(pretrained)
    graph = kap.DependencyGraph(model)
    factors = collect_kfac(model, (x_train[:128], y_train[:128]), graph=graph, verbose=0)
    plan = kap.PrunePlan({"c3": np.arange(16)})
    before = model.get_layer("c3").kernel.numpy().copy()
    assert nap.obs_update(graph, factors, plan) == ["c3"]
    after = model.get_layer("c3").kernel.numpy()
    assert np.all(after[..., 16:] == 0) and not np.allclose(after[..., :16], before[..., :16])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(data=None, budget=kap.Budget(flops=0.5)), ValueError, "data"),
        (dict(data=([0], [0])), ValueError, "budget"),
        (dict(data=([0], [0]), budget=kap.Budget(flops=0.5), granularity="filter"), ValueError, "granularity"),
        (dict(data=([0], [0]), budget=kap.Budget(flops=0.5), granularity="weight"), ValueError, "parameter budget"),
        (dict(data=([0], [0]), budget=kap.Budget(flops=0.5), fisher="exact"), ValueError, "fisher"),
        (dict(data=([0], [0]), validation_data=([0], [0])), ValueError, "max_accuracy_drop"),
        (dict(data=([0], [0]), budget=kap.Budget(flops=0.5), damping=-1), ValueError, "damping"),
        (dict(data=([0], [0]), budget=kap.Budget(flops=0.5), damping=float("nan")), ValueError, "damping"),
        (dict(data=([0], [0]), budget=kap.Budget(flops=0.5), damping=True), ValueError, "damping"),
        (dict(data=([0], [0]), validation_data=([0], [0]), max_accuracy_drop="0.01"), ValueError, "max_accuracy_drop"),
        (dict(data=([0], [0]), validation_data=iter([([0], [0])]), max_accuracy_drop=0.01), ValueError, "one-shot iterator"),
        (dict(data=([0], [0]), budget=kap.Budget(flops=0.5), scorer="obs"),
         ValueError, r"scorer. must be one of \('nap', 'kron-obs', 'kron-obd', 'c-obs', 'c-obd', 'fisher'\)\. Received: scorer='obs'"),
        (dict(data=([0], [0]), budget=kap.Budget(flops=0.5), scorer="c-obs", input_side=True), ValueError, "output side only"),
        (dict(data=([0], [0]), budget=kap.Budget(params=0.5), granularity="weight", scorer="kron-obs"),
         ValueError, "granularity='channel'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        kap.NAPCallback(**kwargs)


def test_data_that_does_not_fit_fails_before_training(digits, pretrained):
    x_train, _, y_train, _ = digits
    model = fresh(pretrained)
    before = model.get_weights()
    wrong = np.zeros((8, 4, 4, 1), "float32")
    with pytest.raises(ValueError, match="`data` does not fit model"):
        model.fit(x_train, y_train, epochs=1, callbacks=[kap.NAPCallback((wrong, y_train[:8]), kap.Budget(flops=0.5))], verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for options in ({"num_batches": 0}, {"batch_size": 0}, {"num_batches": 2.5}):  # refused by the constructor
        with pytest.raises(ValueError, match=r"Expected a positive integer. Received: (num_batches|batch_size)="):
            kap.NAPCallback((x_train[:64], y_train[:64]), kap.Budget(flops=0.5), **options)
    endless = tf.data.Dataset.from_tensor_slices((x_train[:64], y_train[:64])).batch(32).repeat()
    callback = kap.NAPCallback(endless, kap.Budget(flops=0.5), start_epoch=1)
    with pytest.raises(ValueError, match="infinite tf.data.Dataset"):  # at the start of fit, not after the first epoch
        model.fit(x_train, y_train, epochs=2, callbacks=[callback], verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_nap_under_mirrored_strategy():
    from tests.test_callbacks import run_distributed

    result = run_distributed("NAPCallback")
    assert result["replicas"] == 2 and result["flops_kept"] <= 0.5
    assert result["removed"] > 0 and result["removed_zero"] and result["error"] < 1e-4


def test_nap_under_mixed_precision(digits):
    x_train, _, y_train, _ = digits
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build()
        cb = kap.NAPCallback((x_train[:128], y_train[:128]), budget=kap.Budget(flops=0.5), verbose=0)
        model.fit(x_train[:256], y_train[:256], epochs=1, callbacks=[cb], verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("c1").compute_dtype == "float16"
    assert kap.count_flops(cb.pruned_model) <= 0.5 * kap.count_flops(model)


def test_generator_data_is_read_once_with_one_round_and_refused_with_more(digits, pretrained):
    x_train, _, y_train, _ = digits

    def batches():
        for start in range(0, 256, 64):
            yield x_train[start:start + 64], y_train[start:start + 64]

    with pytest.raises(ValueError, match="one-shot iterator"):
        kap.NAPCallback(batches(), kap.Budget(flops=0.5), rounds=2)
    model = fresh(pretrained)
    cb = kap.NAPCallback(batches(), kap.Budget(flops=0.5), verbose=0)
    model.fit(x_train[:256], y_train[:256], epochs=1, batch_size=64, callbacks=[cb], verbose=0)
    assert kap.count_flops(cb.pruned_model) / kap.count_flops(model) <= 0.5
    with pytest.raises(ValueError, match="exhausted generator"):  # the same generator, read by the first fit
        model.fit(x_train[:64], y_train[:64], epochs=1, callbacks=[cb], verbose=0)
