"""One-shot pruning (`PruningCallback.prune`) and `kap.recalibrate_batchnorm`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_autoprune as kap
from keras_autoprune.batchnorm import batchnorm_layers

L = keras.layers


def _cnn(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.Conv2D(12, 3, padding="same", name="c2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(4, name="logits")(x))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(count: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, (count, 8, 8, 3)).astype("float32"), rng.integers(0, 4, count)


def test_recalibrate_batchnorm_is_the_average_of_batch_statistics():
    model = _cnn()
    x, _ = _data(64)
    momentum = model.get_layer("bn1").momentum
    assert kap.recalibrate_batchnorm(model, x, batch_size=16) == 2
    # bn1 reads c1's output directly: its statistics are the mean over the four batches of each batch's moments.
    features = keras.Model(model.inputs, model.get_layer("c1").output).predict(x, verbose=0).reshape(4, 16, -1, 8)
    means = features.mean(axis=(1, 2))
    variances = features.var(axis=(1, 2))
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(np.asarray(bn1.moving_mean), means.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn1.moving_variance), variances.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert bn1.momentum == momentum  # restored
    kernel = model.get_layer("c1").kernel.numpy().copy()
    kap.recalibrate_batchnorm(model, x, batch_size=16)
    np.testing.assert_array_equal(model.get_layer("c1").kernel.numpy(), kernel)  # no weight is trained


def test_recalibrate_batchnorm_weights_a_short_last_batch_by_its_examples():
    model = _cnn()
    x, _ = _data(20)  # batches of 16 and 4
    kap.recalibrate_batchnorm(model, x, batch_size=16)
    features = keras.Model(model.inputs, model.get_layer("c1").output).predict(x, verbose=0)
    first, last = features[:16].reshape(-1, 8), features[16:].reshape(-1, 8)
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(np.asarray(bn1.moving_mean), (16 * first.mean(0) + 4 * last.mean(0)) / 20, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn1.moving_variance), (16 * first.var(0) + 4 * last.var(0)) / 20,
                               rtol=1e-4, atol=1e-5)


def test_recalibrate_batchnorm_reaches_nested_layers_and_respects_num_batches():
    inner = _cnn()
    inputs = keras.Input((8, 8, 3))
    outer = keras.Model(inputs, inner(inputs))
    assert len(batchnorm_layers(outer)) == 2
    x, _ = _data(64)
    before = np.asarray(inner.get_layer("bn1").moving_mean).copy()
    assert kap.recalibrate_batchnorm(outer, (x, None), batch_size=16, num_batches=1) == 2
    first = keras.Model(inner.inputs, inner.get_layer("c1").output).predict(x[:16], verbose=0)
    np.testing.assert_allclose(np.asarray(inner.get_layer("bn1").moving_mean), first.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(before, np.asarray(inner.get_layer("bn1").moving_mean))


def test_recalibrate_batchnorm_reestimates_a_frozen_backbone_and_leaves_it_frozen():
    backbone = _cnn()
    backbone.trainable = False  # Keras runs frozen BatchNormalization in inference mode, even in a training call
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, L.Dense(2)(backbone(inputs)))
    x, _ = _data(32)
    assert kap.recalibrate_batchnorm(model, x, batch_size=16) == 2
    features = keras.Model(backbone.inputs, backbone.get_layer("c1").output).predict(x, verbose=0).reshape(2, 16, -1, 8)
    np.testing.assert_allclose(np.asarray(backbone.get_layer("bn1").moving_mean), features.mean(axis=(1, 2)).mean(axis=0),
                               rtol=1e-4, atol=1e-5)
    assert not backbone.trainable and not backbone.get_layer("bn1").trainable and not backbone.trainable_weights


def test_recalibrate_batchnorm_without_batchnorm_or_data():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, L.Dense(2)(inputs))
    assert kap.recalibrate_batchnorm(plain, np.zeros((0, 4), "float32")) == 0
    with pytest.raises(ValueError, match="at least one calibration batch"):
        kap.recalibrate_batchnorm(_cnn(), iter([]))


@pytest.mark.parametrize("method", ["magnitude", "nap", "psap", "eigendamage"])
def test_prune_is_one_round_without_training(method):
    model = _cnn()
    x, y = _data(64)
    weights = [w.copy() for w in model.get_weights()]
    budget = kap.Budget(flops=0.6)
    callback = {
        "magnitude": lambda: kap.MagnitudeCallback(budget, verbose=0),
        "nap": lambda: kap.NAPCallback((x, y), budget=budget, num_batches=2, batch_size=32, verbose=0),
        "psap": lambda: kap.PSAPCallback(budget, (x, y), num_batches=2, batch_size=32, verbose=0),
        "eigendamage": lambda: kap.EigenDamageCallback((x, y), budget=kap.Budget(flops=0.8), num_batches=2, batch_size=32, verbose=0),
    }[method]()
    slim = callback.prune(model)
    assert slim is callback.pruned_model and callback.plan is not None and callback.report is not None
    kept = kap.count_flops(slim) / kap.count_flops(model)
    assert kept <= callback.budget.fraction + 1e-9
    assert kept < 0.999
    for before, after in zip(weights, model.get_weights()):  # the user's model is untouched
        np.testing.assert_array_equal(before, after)
    assert slim.predict(x[:4], verbose=0).shape == (4, 4)


def test_prune_with_several_rounds_runs_them_back_to_back_on_the_masked_model():
    model = _cnn()
    x, y = _data(64)
    weights = [w.copy() for w in model.get_weights()]
    plans = []

    class Recording(kap.NAPCallback):
        def prune_round(self, target):
            super().prune_round(target)
            plans.append({g: set(k.tolist()) for g, k in self.plan.kept.items()})

    callback = Recording((x, y), budget=kap.Budget(flops=0.4), rounds=3, num_batches=2, batch_size=32, verbose=0)
    slim = callback.prune(model)
    assert [round(h["target"], 4) for h in callback.history] == [0.8, 0.6, 0.4]  # 1 - 0.6 k / 3
    assert [h["flops_kept"] <= h["target"] + 1e-9 for h in callback.history] == [True] * 3
    for earlier, later in zip(plans, plans[1:]):  # a channel removed stays removed
        assert all(g in later and later[g] <= kept for g, kept in earlier.items())
    assert kap.count_flops(slim) <= 0.4 * kap.count_flops(model)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_an_unreachable_budget_fails_before_training():
    model = _cnn()
    kernel = model.get_layer("c1").kernel.numpy().copy()
    # The classifier and the input-side channels stay: at most a few percent of the parameters can remain
    with pytest.raises(ValueError, match=r"at its smallest .* the model keeps .*Fix: kap.Budget\(params=0\.\d+\)"):
        kap.MagnitudeCallback(kap.Budget(params=0.01), verbose=0).prune(model)
    x, y = _data(32)
    with pytest.raises(kap.BudgetUnreachableError, match="Expected a budget NAPCallback can reach"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[kap.NAPCallback((x, y), budget=kap.Budget(params=0.01), verbose=0)])
    np.testing.assert_array_equal(model.get_layer("c1").kernel.numpy(), kernel)  # no step was trained


def test_prune_reestimates_batchnorm_between_rounds_when_given_images():
    """Round 2 runs on the model masked by round 1 with its BatchNormalization statistics re-estimated."""
    model = _cnn()
    images = _data(64, seed=5)[0]
    plans = []

    class Recording(kap.MagnitudeCallback):  # magnitude plans do not read BN statistics: both runs prune alike
        def prune_round(self, target):
            super().prune_round(target)
            plans.append(self.plan)

    plain = Recording(kap.Budget(flops=0.5), rounds=2, verbose=0).prune(model)
    between = Recording(kap.Budget(flops=0.5), rounds=2, verbose=0).prune(model, batchnorm_data=images)
    first_round, final = plans[2], plans[3]
    assert final.kept.keys() == plans[1].kept.keys()
    expected = kap.mask_plan(model, first_round)
    kap.recalibrate_batchnorm(expected, images)
    kept = final.kept.get("c2", np.arange(12))
    np.testing.assert_allclose(between.get_layer("bn2").moving_mean.numpy(),
                               expected.get_layer("bn2").moving_mean.numpy()[kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain.get_layer("bn2").moving_mean.numpy(),
                               model.get_layer("bn2").moving_mean.numpy()[kept])  # without images: the model's own
    assert not np.allclose(between.get_layer("bn2").moving_mean.numpy(), plain.get_layer("bn2").moving_mean.numpy())
    with pytest.raises(ValueError, match="used between rounds"):
        kap.MagnitudeCallback(kap.Budget(flops=0.5), verbose=0).prune(model, batchnorm_data=images)
    with pytest.raises(ValueError, match="one-shot iterator"):
        kap.MagnitudeCallback(kap.Budget(flops=0.5), rounds=3, verbose=0).prune(model, batchnorm_data=iter([images]))
    rounds_before = len(plans)
    with pytest.raises(ValueError, match=r"prune\(batchnorm_data=\.\.\.\) `data` does not fit model"):  # checked before the first round
        Recording(kap.Budget(flops=0.5), rounds=2, verbose=0).prune(model, batchnorm_data=images[:, :4])
    assert len(plans) == rounds_before
    from_generator = Recording(kap.Budget(flops=0.5), rounds=2, verbose=0).prune(model, batchnorm_data=iter([images]))
    np.testing.assert_allclose(from_generator.get_layer("bn2").moving_mean.numpy(),
                               between.get_layer("bn2").moving_mean.numpy(), rtol=1e-5, atol=1e-6)
