"""EigenDamage: KFE importance, composed bases, exact factorised cost, the callback on real data."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_autoprune as kap
from keras_autoprune.evaluation import accuracy
from keras_autoprune.methods import eigendamage
from keras_autoprune.scoring.eigenbasis import direction_scores, kfe_importance
from keras_autoprune.stats import collect_kfac
from keras_autoprune.stats.kfac import KFACFactors
from keras_autoprune.surgery.factorization import FactorizationPlan, LayerFactorization
from tests.helpers import relative_error
from tests.test_nap import build, digits, pretrained  # noqa: F401  (fixtures)


def spd(n: int, seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).normal(size=(n, n))
    return m @ m.T / n + 0.1 * np.eye(n)


def layer_factors(a_channel, g) -> KFACFactors:
    return KFACFactors("layer", "dense", None, a_channel, g, 1.0, 4.0, False, (a_channel.shape[0], g.shape[0]), "true")


# -- scoring ---------------------------------------------------------------------
def test_kfe_importance_by_hand():
    core = np.array([[[1.0, 2.0], [3.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])  # (k=2, n_in=2, n_out=2)
    s_in, s_out = np.array([2.0, 0.5]), np.array([1.0, 3.0])
    # I[j, i] = (C[0,j,i]² + C[1,j,i]²) s_in[j] s_out[i]
    expected = np.array([[(1 + 0) * 2 * 1, (4 + 1) * 2 * 3], [(9 + 1) * 0.5 * 1, (0 + 1) * 0.5 * 3]])
    importance = kfe_importance(core, s_in, s_out)
    np.testing.assert_allclose(importance, expected)
    scores_in, scores_out = direction_scores(importance)
    np.testing.assert_allclose(scores_in, [32.0, 6.5])
    np.testing.assert_allclose(scores_out, [7.0, 31.5])
    with pytest.raises(ValueError, match="eigenvalues of shapes"):
        kfe_importance(core, s_in[:1], s_out)


def test_direction_scores_are_the_kfac_loss_of_removing_that_direction():
    """Σ_i I_ji = vec(ΔW)ᵀ (A ⊗ G) vec(ΔW) for ΔW = the part of W along input eigen-direction j (likewise outputs)."""
    a, g = spd(5, 1), spd(4, 2)
    w = np.random.default_rng(3).normal(size=(5, 4))  # Dense kernel (Cin, Cout)
    bases, importance = eigendamage.rotate(layer_factors(a, g), w, None)
    scores_in, scores_out = direction_scores(importance)

    def kfac_quadratic(dw):  # vec(dW)ᵀ (A ⊗ G) vec(dW) = tr(A dW G dWᵀ) for dW (Cin, Cout)
        return np.trace(a @ dw @ g @ dw.T)

    assert importance.sum() == pytest.approx(kfac_quadratic(w), rel=1e-10)
    for j in range(5):
        q = bases.q_in[:, [j]]
        assert scores_in[j] == pytest.approx(kfac_quadratic(q @ q.T @ w), rel=1e-9)
    for i in range(4):
        q = bases.q_out[:, [i]]
        assert scores_out[i] == pytest.approx(kfac_quadratic(w @ q @ q.T), rel=1e-9)


def test_rotation_composes_bases_within_the_kept_subspace():
    a, g = spd(6, 4), spd(5, 5)
    rng = np.random.default_rng(6)
    current = LayerFactorization(np.linalg.qr(rng.normal(size=(6, 6)))[0][:, :4], np.linalg.qr(rng.normal(size=(5, 5)))[0][:, :3])
    bases, importance = eigendamage.rotate(layer_factors(a, g), rng.normal(size=(3, 3, 6, 5)), current)
    assert importance.shape == (4, 3)
    for q, old, factor in ((bases.q_in, current.q_in, a), (bases.q_out, current.q_out, g)):
        np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-12)
        np.testing.assert_allclose(q @ q.T, old @ old.T, atol=1e-12)  # same subspace
        core_factor = q.T @ factor @ q
        np.testing.assert_allclose(core_factor, np.diag(np.diag(core_factor)), atol=1e-12)  # diagonal in the new basis


# -- cost and allocation ----------------------------------------------------------
@pytest.fixture(scope="module")
def trained(digits, pretrained):  # noqa: F811
    model = build()
    model.set_weights(pretrained)
    x_train, _, y_train, _ = digits
    graph = kap.DependencyGraph(model)
    layers = eigendamage.eligible_layers(graph)
    factors = collect_kfac(model, (x_train[:256], y_train[:256]), layers=list(layers), full_input_factor=False, verbose=0)
    return model, eigendamage.FactorizedCost(model, layers), factors


def test_eligible_layers_leave_the_classifier_whole(trained):
    model, cost, _ = trained
    assert list(cost.layers) == ["c1", "c2", "c3", "d1"]  # not "head"


def test_factorised_cost_is_exact_and_guards_size(trained):
    model, cost, _ = trained
    plan = FactorizationPlan({
        "c2": LayerFactorization(np.eye(16)[:, :5], np.eye(16)[:, :7]),
        "d1": LayerFactorization(np.eye(128)[:, :10], np.eye(32)[:, :9]),
    })
    factorised = plan.apply(model)
    kept = cost.kept(plan)
    assert kept["flops"] == kap.count_flops(factorised) / kap.count_flops(model)
    assert kept["params"] == kap.count_params(factorised) / kap.count_params(model)
    # c2 (3x3, 16 -> 16) at full width: 16·16 + 9·256 + 16·16 + 16 params > 9·256 + 16: the guard keeps it whole.
    costs, factorised_c2 = cost.layer_cost("c2", 16, 16)
    assert not factorised_c2 and costs == cost.original["c2"] == {"flops": 2 * 9 * 16 * 16 * 64 + 16 * 64, "params": 9 * 256 + 16}
    costs, factorised_c2 = cost.layer_cost("c2", 4, 4)
    assert factorised_c2 and costs["params"] == 16 * 4 + 9 * 16 + 4 * 16 + 16


@pytest.mark.parametrize("budget", [kap.Budget(flops=0.5), kap.Budget(params=0.3)])
def test_plan_meets_the_budget_counting_rotations(trained, budget):
    model, cost, factors = trained
    plan = eigendamage.eigendamage_plan(model, factors, cost, budget, max_layer_ratio=0.9)
    factorised = plan.apply(model)
    kept = budget.cost(factorised) / budget.cost(model)
    assert kept <= budget.fraction
    assert kept >= budget.fraction - 0.05  # the shortest prefix: not far under
    assert "head" not in plan.layers
    for name, f in plan.layers.items():
        cin, cout = model.get_layer(name).kernel.shape[-2:]
        assert f.rank[0] >= max(1, cin - int(0.9 * cin)) and f.rank[1] >= max(1, cout - int(0.9 * cout))
    assert relative_error(np.asarray(factorised(factors_inputs())), np.asarray(plan.project(model)(factors_inputs()))) <= 1e-5


def factors_inputs():
    return np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype("float32")


def test_cost_aware_ranking_divides_by_the_exact_cost_of_one_direction(trained):
    model, cost, factors = trained
    for name, layer in cost.layers.items():
        cin, cout = layer.kernel.shape[-2:]
        for metric in ("flops", "params"):
            step_in, step_out = cost.marginal(name, cin - 1, cout - 2, metric)
            coefficients = cost._coefficients[name][metric]
            at = lambda a, b: eigendamage._evaluate(coefficients, a, b)  # noqa: E731 - the factorised layer's own cost
            assert step_in == at(cin - 1, cout - 2) - at(cin - 2, cout - 2) > 0
            assert step_out == at(cin - 1, cout - 2) - at(cin - 1, cout - 3) > 0
    budget = kap.Budget(flops=0.5)
    plain = eigendamage.eigendamage_plan(model, factors, cost, budget, max_layer_ratio=0.9)
    aware = eigendamage.eigendamage_plan(model, factors, cost, budget, max_layer_ratio=0.9, cost_aware=True)
    assert cost.kept(aware)["flops"] <= 0.5 and {n: f.rank for n, f in aware.layers.items()} != {n: f.rank for n, f in plain.layers.items()}
    # One of d1's directions costs 320 FLOPs, one of c2's 20,480: per FLOP, c2 gives more and d1 stays whole.
    assert cost.marginal("d1", 128, 32, "flops") == (320, 320) and cost.marginal("c2", 16, 16, "flops") == (20480, 20480)
    assert "d1" in plain.layers and "d1" not in aware.layers
    # c2 keeps fewer directions in all (input plus output side: which side loses them moves with float noise)
    assert sum(aware.layers["c2"].rank) < sum(plain.layers["c2"].rank)


def test_later_rounds_only_shrink_the_subspaces(trained):
    model, cost, factors = trained
    first = eigendamage.eigendamage_plan(model, factors, cost, kap.Budget(flops=0.5), target=0.75)
    projected = first.project(model)
    again = collect_kfac(projected, factors_inputs(), layers=list(cost.layers), full_input_factor=False, verbose=0)
    second = eigendamage.eigendamage_plan(projected, again, cost, kap.Budget(flops=0.5), current=first)
    assert set(first.layers) <= set(second.layers)
    for name, f in first.layers.items():
        g = second.layers[name]
        assert g.rank[0] <= f.rank[0] and g.rank[1] <= f.rank[1]
        np.testing.assert_allclose(f.q_in @ f.q_in.T @ g.q_in, g.q_in, atol=1e-9)  # inside the first subspace
        np.testing.assert_allclose(f.q_out @ f.q_out.T @ g.q_out, g.q_out, atol=1e-9)


def test_unreachable_target_warns_and_returns_the_maximal_plan(trained):
    model, cost, factors = trained
    with pytest.warns(UserWarning, match="cannot reach"):
        plan = eigendamage.eigendamage_plan(model, factors, cost, kap.Budget(flops=0.01), max_layer_ratio=0.5)
    assert cost.kept(plan)["flops"] > 0.01


# -- the callback -------------------------------------------------------------------
def test_callback_meets_budget_keeps_accuracy_and_exports(digits, pretrained, tmp_path):  # noqa: F811
    x_train, x_test, y_train, y_test = digits
    model = build()
    model.set_weights(pretrained)
    original = kap.count_flops(model)
    cb = kap.EigenDamageCallback((x_train[:512], y_train[:512]), budget=kap.Budget(flops=0.5), rounds=2, verbose=0)
    history = model.fit(x_train, y_train, epochs=4, batch_size=64, callbacks=[cb], verbose=0)

    slim = cb.pruned_model
    assert kap.count_flops(slim) / original <= 0.5
    assert history.history["flops_kept"][-1] == pytest.approx(kap.count_flops(slim) / original, abs=1e-12)
    assert len(cb.history) == 2 and cb.history[0]["flops_kept"] > cb.history[1]["flops_kept"]
    # Training kept every kernel in its subspace, so the three-layer model is the trained model.
    for name, f in cb.plan.layers.items():
        kernel = model.get_layer(name).kernel.numpy()
        np.testing.assert_allclose(f.project(kernel), kernel, atol=1e-5)
    x = x_test[:32]
    assert relative_error(np.asarray(slim(x)), np.asarray(model(x))) <= 1e-5
    assert accuracy(slim, (x_test, y_test)) >= 0.85
    # Standard layers only: .keras round trip and TFLite; the plan reloads from JSON.
    slim.save(tmp_path / "slim.keras")
    np.testing.assert_allclose(np.asarray(keras.models.load_model(tmp_path / "slim.keras")(x)), np.asarray(slim(x)), atol=1e-5)
    assert kap.export_tflite(slim, tmp_path / "slim.tflite", representative_data=x_test[:16]).verified
    again = FactorizationPlan.from_json(cb.plan.to_json())
    assert relative_error(np.asarray(again.apply(model)(x)), np.asarray(slim(x))) <= 1e-6
    # The report sums each factorised block into its layer's row.
    assert cb.report.flops_kept == kap.count_flops(slim) / original
    rows = {row.layer: row for row in cb.report.layers}
    assert set(rows) >= set(cb.plan.layers) and all(rows[n].channels_after == rows[n].channels_before for n in cb.plan.layers)
    assert json.loads(json.dumps(cb.report.to_dict()))["plan"]["format"] == "keras-autoprune/factorization"
    # Constraints are gone: a later fit does not project.
    assert all(model.get_layer(n).kernel.constraint is None for n in cb.plan.layers)


def _pruned_at_half_the_flops(digits, pretrained, count: int, **options) -> kap.EigenDamageCallback:
    """The digits CNN pruned once to 50% FLOPs with ``options`` (the budget checked); returns the callback."""
    x_train, _, y_train, _ = digits
    model = build()
    model.set_weights(pretrained)
    cb = kap.EigenDamageCallback((x_train[:count], y_train[:count]), budget=kap.Budget(flops=0.5), verbose=0, **options)
    assert kap.count_flops(cb.prune(model)) <= 0.5 * kap.count_flops(model)
    return cb


def test_reduce_approximation_changes_the_bases_and_still_meets_the_budget(digits, pretrained):  # noqa: F811
    plans = {}
    for approximation in ("expand", "reduce"):
        cb = _pruned_at_half_the_flops(digits, pretrained, 256, kfac_approximation=approximation)
        plans[approximation] = cb.plan
    assert cb.kfac_approximation == "reduce"
    # Other factors, other eigenbases: the layers' kept input subspaces differ.
    name = sorted(set(plans["expand"].layers) & set(plans["reduce"].layers))[0]
    q_expand, q_reduce = plans["expand"].layers[name].q_in, plans["reduce"].layers[name].q_in
    assert q_expand.shape != q_reduce.shape or not np.allclose(q_expand @ q_expand.T, q_reduce @ q_reduce.T, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(budget=kap.Budget(flops=0.5), max_layer_ratio=1.0), ValueError, "max_layer_ratio"),
    (dict(budget=kap.Budget(flops=0.5), fisher="exact"), ValueError, "fisher"),
    (dict(budget=kap.Budget(flops=0.5), kfac_approximation="mean"), ValueError, "kfac_approximation"),
    (dict(budget=kap.Budget(flops=0.5), cost_aware="yes"), ValueError, "cost_aware"),
    (dict(budget=kap.Budget(flops=0.5), scorer="obs"), ValueError, "scorer"),
    (dict(budget=0.5), TypeError, "kap.Budget"),
    (dict(budget=kap.Budget(flops=0.5), num_batches=0), ValueError, "num_batches=0"),
    (dict(budget=kap.Budget(flops=0.5), batch_size=True), ValueError, "batch_size=True"),
])
def test_bad_arguments_fail_in_init(kwargs, error, match):
    with pytest.raises(error, match=match):
        kap.EigenDamageCallback(np.zeros((4, 8, 8, 1), "float32"), **kwargs)


def test_model_without_factorisable_layers_fails_before_training():
    # The only Dense layer is the classifier (its output is the model's), which EigenDamage leaves whole.
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="only")(keras.layers.BatchNormalization()(inputs)))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = [w.copy() for w in model.get_weights()]
    cb = kap.EigenDamageCallback(np.zeros((8, 6), "float32"), budget=kap.Budget(flops=0.5), verbose=0)
    x, y = np.ones((8, 6), "float32"), np.arange(8) % 3
    with pytest.raises(ValueError, match="no layer EigenDamage can factorise"):
        model.fit(x, y, epochs=1, callbacks=[cb], verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))  # not a single step was taken


def test_eigendamage_under_mirrored_strategy():
    from tests.test_callbacks import run_distributed

    result = run_distributed("EigenDamageCallback")
    assert result["replicas"] == 2 and result["flops_kept"] <= 0.5
    assert result["removed"] > 0 and result["removed_zero"] and result["error"] < 1e-4


# -- the exact Fisher of a direction ---------------------------------------------------
def test_direction_fisher_is_the_per_example_gate_gradient_squared():
    """``½ mean_b (∂ℓ_b/∂m)²`` for a gate on one row (column) of c2's core kernel, from per-example gradients."""
    from keras_autoprune.stats import collect_direction_fisher

    keras.utils.set_random_seed(0)
    f64 = "float64"
    inputs = keras.Input((6, 6, 2), dtype=f64)
    h = keras.layers.Conv2D(3, 3, padding="same", activation="relu", dtype=f64, name="c1")(inputs)
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", dtype=f64, name="c2")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, dtype=f64, name="head")(keras.layers.GlobalAveragePooling2D(dtype=f64)(h)))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 6, 6, 2)), rng.integers(0, 3, 6)
    q_in = np.linalg.qr(rng.normal(size=(3, 3)))[0][:, :2]  # 2 of 3 input directions kept
    q_out = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    kernel = model.get_layer("c2").kernel.numpy()
    model.get_layer("c2").kernel.assign(np.einsum("hwco,cj,dj->hwdo", kernel, q_in, q_in))  # projected, as during fit
    result = collect_direction_fisher(model, (x, y), {"c2": (q_in, q_out)}, fisher="empirical", batch_size=4, verbose=0)

    features = np.asarray(keras.Model(inputs, model.get_layer("c1").output)(x))
    core = np.einsum("hwco,cj,oi->hwji", model.get_layer("c2").kernel.numpy(), q_in, q_out)
    bias, head = model.get_layer("c2").bias.numpy(), model.get_layer("head")

    def per_example_gate_gradients(side):
        gates = tf.Variable(np.ones(q_in.shape[1] if side == "in" else q_out.shape[1]))
        rows = []
        for b in range(len(x)):
            with tf.GradientTape() as tape:
                gated = core * (gates[:, None] if side == "in" else gates[None, :])
                kernel_b = tf.einsum("hwji,cj,oi->hwco", gated, q_in, q_out)
                out = tf.nn.conv2d(features[b : b + 1], kernel_b, strides=2, padding="SAME") + bias
                logits = head(tf.reduce_mean(out, axis=[1, 2]))
                loss = keras.losses.sparse_categorical_crossentropy(y[b : b + 1], logits, from_logits=True)[0]
            rows.append(tape.gradient(loss, gates).numpy())
        return 0.5 * np.mean(np.square(rows), axis=0)

    np.testing.assert_allclose(result["c2"][0], per_example_gate_gradients("in"), rtol=1e-9)
    np.testing.assert_allclose(result["c2"][1], per_example_gate_gradients("out"), rtol=1e-9)
    assert set(result) == {"c2"}


def test_fisher_scorer_meets_the_budget_and_ranks_otherwise(digits, pretrained):  # noqa: F811
    x_train, _, y_train, _ = digits
    plans = {}
    for scorer in ("kfac", "fisher"):
        cb = _pruned_at_half_the_flops(digits, pretrained, 128, scorer=scorer, cost_aware=False, batch_size=64)
        assert cb.statistics_seconds > 0
        plans[scorer] = {name: f.rank for name, f in cb.plan.layers.items()}
    assert plans["fisher"] != plans["kfac"]
    with pytest.raises(ValueError, match="read 2 times per round"):
        kap.EigenDamageCallback(iter([(x_train[:8], y_train[:8])]), budget=kap.Budget(flops=0.5), scorer="fisher")


def test_directions_removable_follow_the_channel_rankings_layer_floor():
    from keras_autoprune.allocation.ranking import layer_floor
    from keras_autoprune.methods.eigendamage import removable

    for width in (1, 3, 16, 64, 100):
        for ratio in (0.29, 0.5, 0.9, 1.0):
            assert removable(width, ratio) == width - layer_floor(width, ratio)
    assert removable(100, 0.29) == 29  # int(0.29 * 100) is 28: the float edge where they disagreed
    assert removable(1, 1.0) == 0 and removable(3, 1.0) == 2  # one direction always stays


def test_direction_fisher_refuses_bases_that_do_not_fit_their_layer():
    from keras_autoprune.stats import collect_direction_fisher

    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, name="c1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h)))
    data = (np.zeros((4, 6, 6, 2), "float32"), np.zeros(4, "int64"))
    good = np.eye(3)
    cases = [({"nope": (good, np.eye(3))}, "no layer of that name"),
             ({"c1": (good, np.eye(3))}, "Q_in of layer 'c1' to be a finite 2 x n"),  # c1 has 2 inputs
             ({"c1": (np.eye(2), np.ones((3, 2)))}, "orthonormal"),
             ({"c1": (np.eye(2), np.full((3, 3), np.nan))}, "NaN"),
             ({"c1": np.eye(2)}, "a pair")]
    for bases, message in cases:
        with pytest.raises(ValueError, match=message):
            collect_direction_fisher(model, data, bases, fisher="empirical", verbose=0)
