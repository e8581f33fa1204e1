"""PSAP: sparsity ratios, protection, regrowth, budget, from scratch, errors."""

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.evaluation import accuracy
from keras_autoprune.methods import psap
from tests.test_nap import build, digits  # noqa: F401  (fixture)

L = keras.layers


def test_weight_sparsity_ratio_on_hand_made_weights():
    # mean |w| = (0 + 0.01 + 1 + 2 + 0.02 + 0.97) / 6 = 0.6667; eps = 0.05 * 0.6667 = 0.0333
    kernel = np.array([[0.0, 0.01, 1.0], [-2.0, 0.02, -0.97]])
    assert psap.weight_sparsity_ratio(kernel, kappa=0.05) == pytest.approx(3 / 6)
    assert psap.weight_sparsity_ratio(kernel, kappa=0.001) == pytest.approx(1 / 6)


def _two_conv_model():
    i = keras.Input((6, 6, 2))
    a = L.Conv2D(4, 1, use_bias=False, name="a")(i)
    b = L.Conv2D(4, 1, use_bias=False, name="b")(a)
    return keras.Model(i, L.Dense(2)(L.Flatten()(b)))


def test_group_sparsity_and_wsr_proportional_layer_ratios():
    model = _two_conv_model()
    a = np.ones((1, 1, 2, 4))
    a[..., 0, :] = 1e-4  # half of a's weights are below kappa * mean
    model.get_layer("a").kernel.assign(a)
    model.get_layer("b").kernel.assign(np.full((1, 1, 4, 4), 0.5))
    graph = kap.DependencyGraph(model)
    sparsity = psap.group_sparsity(graph, kappa=0.05)
    assert sparsity == {"a": pytest.approx(0.5), "b": pytest.approx(0.0)}
    params = kap.count_params(model)
    plan = psap.adaptive_plan(model, graph, kap.Budget(params=0.95), 0.95, sparsity)
    # Only the sparse layer's group loses channels (b has WSR 0, so ratio 0).
    assert set(plan.kept) == {"a"}
    assert kap.count_params(kap.apply_plan(model, plan, graph)) <= 0.95 * params
    # Out of reach for "a" alone (at most 3 of 4 channels): a common floor prunes "b" too.
    plan = psap.adaptive_plan(model, graph, kap.Budget(params=0.8), 0.8, sparsity)
    assert set(plan.kept) == {"a", "b"}
    assert kap.count_params(kap.apply_plan(model, plan, graph)) <= 0.8 * params


def test_group_sparsity_reads_a_separable_convolutions_pointwise_kernel():
    i = keras.Input((6, 6, 2))
    s = L.SeparableConv2D(4, 3, padding="same", use_bias=False, name="s")(i)
    model = keras.Model(i, L.Dense(2)(L.Flatten()(L.Conv2D(3, 1, name="c")(s))))
    pointwise = np.ones((1, 1, 2, 4))
    pointwise[..., 0, :] = 1e-4  # half of the pointwise weights are sparse; the depthwise kernel is not read
    model.get_layer("s").pointwise_kernel.assign(pointwise)
    sparsity = psap.group_sparsity(kap.DependencyGraph(model), kappa=0.05)
    assert sparsity["s"] == pytest.approx(0.5)


def test_protection_rule_keeps_large_gradient_filters_and_lets_wrongly_pruned_regrow():
    ema = {"g": np.array([5.0, 1.0, 2.0, 3.0, 9.0, 0.5])}
    zeroed = {"g": np.array([True, True, False, False, False, False])}
    protected = psap.protected_channels(ema, zeroed, protect_quantile=0.25)["g"]
    # Zeroed 0 (5.0 > median of active [2, 3, 9, 0.5] = 2.5) is protected; zeroed 1 (1.0) is not.
    # Active: the top quarter (>= 75th percentile 4.5) is channel 4 (9.0).
    np.testing.assert_array_equal(protected, [True, False, False, False, True, False])
    # The hard round: no regrowth protection, only the sparing of the top active channels.
    hard = psap.protected_channels(ema, zeroed, protect_quantile=0.25, regrow=False)["g"]
    np.testing.assert_array_equal(hard, [False, False, False, False, True, False])


def test_protection_spares_the_quantiles_count_whatever_the_ties_and_nothing_without_gradients():
    rng = np.random.default_rng(0)
    for n in (8, 10, 11, 16, 24, 32, 64):  # without ties: exactly the channels at or above the quantile, as before
        ema = rng.random(n)
        guard = psap.protected_channels({"g": ema}, {}, protect_quantile=0.1)["g"]
        np.testing.assert_array_equal(guard, ema >= np.quantile(ema, 0.9))
    tied = {"g": np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}
    assert psap.protected_channels(tied, {}, protect_quantile=0.1)["g"].tolist() == [True] + [False] * 9  # before: all
    silent = {"g": np.zeros(8)}  # no gradient statistics (a layer kind PSAP cannot tap)
    assert not psap.protected_channels(silent, {}, protect_quantile=0.1)["g"].any()  # before: every channel


def test_protected_channels_keep_their_l1_order_among_themselves():
    model = _two_conv_model()
    graph = kap.DependencyGraph(model)
    model.get_layer("a").kernel.assign(np.array([[[[0.3, 0.1, 0.4, 0.2], [0.3, 0.1, 0.4, 0.2]]]]))
    # Every channel protected (more than the ratio leaves): the removed ones are still the smallest by L1.
    plan = psap.adaptive_plan(model, graph, kap.Budget(params=0.8), 0.8, {"a": 1.0, "b": 0.0}, {"a": np.ones(4, bool)})
    gone = set(range(4)) - set(plan.kept["a"].tolist())
    by_l1 = [1, 3, 0, 2]  # channel L1 norms 0.6, 0.2, 0.8, 0.4
    assert 0 < len(gone) < 4 and gone == set(by_l1[: len(gone)])  # before: tied at inf, removed by index (0 first)


def test_protected_filters_are_never_pruned():
    model = _two_conv_model()
    graph = kap.DependencyGraph(model)
    model.get_layer("a").kernel.assign(np.array([[[[0.01, 1.0, 1.0, 1.0], [0.01, 1.0, 1.0, 1.0]]]]))
    sparsity = {"a": 1.0, "b": 0.0}
    plain = psap.adaptive_plan(model, graph, kap.Budget(params=0.95), 0.95, sparsity)
    assert 0 not in plain.kept["a"]  # the smallest filter goes...
    guarded = psap.adaptive_plan(model, graph, kap.Budget(params=0.95), 0.95, sparsity, {"a": np.array([True, False, False, False])})
    assert 0 in guarded.kept["a"]  # ...unless it is protected


def test_pretrained_budget_met_soft_then_hard_and_rebuilt_equals_masked(digits):  # noqa: F811
    x_train, x_test, y_train, y_test = digits
    model = build()
    model.fit(x_train, y_train, epochs=6, batch_size=64, verbose=0)
    cb = kap.PSAPCallback(kap.Budget(flops=0.5), (x_train[:256], y_train[:256]), end_epoch=3, verbose=0)
    model.fit(x_train, y_train, epochs=6, batch_size=64, callbacks=[cb], verbose=0)
    assert [round(h["target"], 4) for h in cb.history] == [0.6481, 0.5185, 0.5]  # cubic ramp: 1 - 0.5 (1 - (1 - k/3)^3)
    assert kap.count_flops(cb.pruned_model) <= 0.5 * kap.count_flops(model)
    np.testing.assert_allclose(np.asarray(cb.pruned_model(x_test)), np.asarray(model(x_test)), rtol=1e-4, atol=1e-4)
    assert accuracy(cb.pruned_model, (x_test, y_test)) > 0.85
    assert cb.statistics_seconds > 0 and set(cb.grad_ema) == {g.id for g in cb.graph.prunable_groups}
    # The hard round never keeps a channel that is still all zero (one that did not regrow).
    for layer in cb.pruned_model.layers:
        if isinstance(layer, (L.Conv2D, L.Dense)) and layer is not cb.pruned_model.layers[-1]:
            per_filter = np.abs(layer.kernel.numpy()).reshape(-1, layer.kernel.shape[-1]).sum(axis=0)
            assert np.all(per_filter > 0), f"{layer.name} keeps {int(np.sum(per_filter == 0))} all-zero filter(s)"


def leaky_cnn():
    """Conv-BN-LeakyReLU blocks: a zeroed filter still receives gradients."""
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 1))
    h = L.LeakyReLU(0.1)(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="c1")(i)))
    h = L.MaxPooling2D()(h)
    h = L.LeakyReLU(0.1)(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="c2")(h)))
    model = keras.Model(i, L.Dense(10)(L.Flatten()(h)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_soft_pruned_filters_can_regrow_between_rounds(digits):  # noqa: F811
    x_train, _, y_train, _ = digits
    model = leaky_cnn()
    cb = kap.PSAPCallback(kap.Budget(flops=0.5), (x_train[:256], y_train[:256]), end_epoch=3, verbose=0)
    zeroed_norms, norms_at_the_round = [], []

    def removed_norm(name):
        gone = np.setdiff1d(np.arange(16), cb.plan.kept.get(name, np.arange(16)))
        return gone.size, np.abs(model.get_layer(name).kernel.numpy()[..., gone]).sum()

    class Probe(keras.callbacks.Callback):  # after `cb` in the list: sees each round right after it
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 0:
                norms_at_the_round.extend(removed_norm(name) for name in ("c1", "c2"))

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:  # after one epoch of soft pruning: zeroed filters trained again
                zeroed_norms.extend(removed_norm(name)[1] for name in ("c1", "c2"))

    model.fit(x_train, y_train, epochs=3, batch_size=64, callbacks=[cb, Probe()], verbose=0)
    # The soft round zeroed some filters ...
    assert sum(count for count, _ in norms_at_the_round) > 0 and all(norm == 0 for _, norm in norms_at_the_round)
    # ... which were not held at zero during the next epoch.
    assert sum(zeroed_norms) > 0
    for name in cb.plan.kept:  # the last round is hard
        removed = np.setdiff1d(np.arange(16), cb.plan.kept[name])
        assert np.all(model.get_layer(name).kernel.numpy()[..., removed] == 0)


def test_from_scratch_meets_budget_and_learns(digits):  # noqa: F811
    x_train, x_test, y_train, y_test = digits
    model = build()  # random initialisation
    cb = kap.PSAPCallback(kap.Budget(flops=0.5), (x_train[:256], y_train[:256]), start_epoch=0, end_epoch=4, verbose=0)
    model.fit(x_train, y_train, epochs=8, batch_size=64, callbacks=[cb], verbose=0)
    assert kap.count_flops(cb.pruned_model) <= 0.5 * kap.count_flops(model)
    assert accuracy(cb.pruned_model, (x_test, y_test)) > 0.85


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(data=None), "data"),
        (dict(kappa=0), "kappa"),
        (dict(max_layer_ratio=1.0), "max_layer_ratio"),
        (dict(protect_quantile=-0.1), "protect_quantile"),
        (dict(ema=1.5), "ema"),
        (dict(rounds=0), "rounds"),
        (dict(num_batches=-1), "num_batches=-1"),
        (dict(batch_size=0), "batch_size=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    arguments = dict(budget=kap.Budget(flops=0.5), data=(np.zeros((2, 8, 8, 1)), np.zeros(2)))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kap.PSAPCallback(**arguments)


def test_a_budget_below_the_layer_floor_fails_before_training(digits):  # noqa: F811
    x_train, _, y_train, _ = digits
    model = build()
    cb = kap.PSAPCallback(kap.Budget(flops=0.05), (x_train[:64], y_train[:64]), verbose=0)  # floor 0.8: about 8% kept
    with pytest.raises(kap.BudgetUnreachableError, match="max_layer_ratio") as error:
        model.fit(x_train[:64], y_train[:64], epochs=1, callbacks=[cb], verbose=0)
    floor = float(str(error.value).split("model keeps ")[1].split("%")[0]) / 100
    assert 0.05 < floor < 0.2
    lower = kap.PSAPCallback(kap.Budget(flops=0.05), (x_train[:64], y_train[:64]), max_layer_ratio=0.99, verbose=0)
    assert kap.count_flops(lower.prune(model)) <= 0.05 * kap.count_flops(model)  # a lower floor reaches it


def test_gradient_statistics_read_the_real_labels(digits):  # noqa: F811
    """The protection signal is the norm of the loss gradient at the data's labels, not at sampled ones."""
    import tensorflow as tf

    x_train, _, y_train, _ = digits
    model = build()
    x, y = x_train[:128], y_train[:128]
    cb = kap.PSAPCallback(kap.Budget(flops=0.6), (x, y), num_batches=2, batch_size=64, verbose=0)
    cb.prune(model)
    assert cb.report.extra["fisher"] == "empirical"  # before: "true", labels sampled from the model
    with tf.GradientTape() as tape:
        loss = model.loss(y, model(x, training=False))
    kernel, bias = tape.gradient(loss, [model.get_layer("c3").kernel, model.get_layer("c3").bias])
    flat = np.concatenate([kernel.numpy().reshape(-1, kernel.shape[-1]), bias.numpy()[None]], axis=0)
    expected = np.linalg.norm(flat, axis=0)  # per filter of c3 (its group's only producer), the real gradient
    np.testing.assert_allclose(cb.grad_ema["c3"], expected, rtol=1e-3)
