"""MetaPruning: genes, the PruningNet, the evolutionary search, latency tables, `search`."""

from __future__ import annotations

import importlib
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_autoprune as kap
from keras_autoprune import metapruning as mp
from keras_autoprune.surgery.importance import channel_l1
from tests.helpers import randomize, relative_error

L = keras.layers
SMALL = mp.SearchSettings(population=6, parents=2, mutations=2, crossovers=2, iterations=2)


def _residual_net(seed: int = 0) -> keras.Model:
    """Conv(8) -> BN -> relu -> [Conv(8) -> BN] + shortcut -> relu -> Conv(6) -> GAP -> Dense(4)."""
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn1")(L.Conv2D(8, 3, padding="same", name="c1")(inputs)))
    y = L.BatchNormalization(name="bn2")(L.Conv2D(8, 3, padding="same", name="c2")(x))
    x = L.ReLU()(L.Add()([x, y]))
    x = L.ReLU()(L.Conv2D(6, 1, name="c3")(x))
    model = keras.Model(inputs, L.Dense(4, name="head")(L.GlobalAveragePooling2D()(x)), name="residual_net")
    randomize(model, seed, kernels=False)
    return model


def _data(count: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (count, 8, 8, 3)).astype("float32"), rng.integers(0, 4, count)


# -- genes ----------------------------------------------------------------------------
def test_gene_space_has_one_gene_per_prunable_group_and_residual_channels_share_one():
    space = mp.GeneSpace(kap.DependencyGraph(_residual_net()), scales=(0.25, 0.5, 1.0))
    assert [(g.id, g.size) for g in space.groups] == [("c1", 8), ("c3", 6)]  # c1 and c2 are tied by the Add
    assert space.widths == ((2, 4, 8), (2, 3, 6))
    assert space.full == (2, 2) and space.uniform(1) == (1, 1)
    plan = space.plan((0, 1))
    assert {k: list(v) for k, v in plan.kept.items()} == {"c1": [0, 1], "c3": [0, 1, 2]}
    assert space.plan(space.full) == kap.PrunePlan({})


def test_genes_keep_whole_normalization_groups_and_every_layer_of_a_group():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GroupNormalization(groups=4, name="gn")(keras.layers.Conv2D(16, 3, name="c1")(inputs))
    halves = keras.layers.Concatenate()([keras.layers.Conv2D(4, 1, name="a")(x), keras.layers.Conv2D(4, 1, name="b")(x)])
    x = keras.layers.Add()([halves, keras.layers.Conv2D(8, 1, name="wide")(x)])
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(x)))
    graph = kap.DependencyGraph(model)
    space = mp.GeneSpace(graph, scales=(0.1, 0.3, 0.6, 1.0))
    gn, tied = (space.groups.index(graph.group(name)) for name in ("c1", "a"))
    assert space.widths[gn] == (4, 4, 8, 16)  # 1, 1, 2, 4 of the 4 normalization groups of 4 channels
    assert space.widths[tied] == (2, 3, 5, 8)  # channel 4 (layer "b"'s first) added back below 0.6
    assert list(space.plan(space.uniform(0)).kept[graph.group("a").id]) == [0, 4]
    for choice in range(3):  # every uniform gene is a valid plan: apply_plan would raise otherwise
        slim = kap.apply_plan(model, space.plan(space.uniform(choice)))
        assert slim.get_layer("c1").filters == space.widths[gn][choice]


def test_mutation_and_crossover_keep_genes_valid():
    space = mp.GeneSpace(kap.DependencyGraph(_residual_net()))
    rng = np.random.default_rng(0)
    genes = [space.random(rng) for _ in range(50)]
    for a, b in zip(genes, genes[1:]):
        child = space.crossover(a, b, rng)
        assert all(k in (x, y) for k, x, y in zip(child, a, b))
        mutant = space.mutate(a, rng, probability=0.5)
        assert space.check(mutant) == mutant and space.check(child) == child
    assert space.mutate(genes[0], rng, probability=1e-12) == genes[0]
    with pytest.raises(ValueError, match="one choice per prunable group"):
        space.check((1,))
    with pytest.raises(ValueError, match="index `scales`"):
        space.check((0, 31))
    with pytest.raises(ValueError, match="strictly increasing"):
        mp.GeneSpace(kap.DependencyGraph(_residual_net()), scales=(0.5, 0.25))


# -- PruningNet ----------------------------------------------------------------------------
def test_warm_started_pruningnet_equals_the_model_at_full_width_and_leaves_it_unchanged():
    model = _residual_net()
    x, _ = _data(8)
    before = [np.array(w) for w in model.get_weights()]
    net = mp.PruningNet(model, scales=(0.25, 0.5, 1.0))
    np.testing.assert_array_equal(np.asarray(net(x)), np.asarray(model(x)))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_generated_weights_have_the_cropped_shapes_of_a_gene_and_match_the_pruningnet():
    model = _residual_net()
    net = mp.PruningNet(model, scales=(0.25, 0.5, 1.0), warm_start=False, seed=1)
    x, _ = _data(8)
    net.set_gene((0, 1))  # c1/c2: 2 channels, c3: 3 channels
    expected = np.asarray(net(x))
    slim = net.materialize()
    assert slim.get_layer("c1").kernel.shape == (3, 3, 3, 2)
    assert slim.get_layer("c2").kernel.shape == (3, 3, 2, 2)
    assert slim.get_layer("c3").kernel.shape == (1, 1, 2, 3)
    assert slim.get_layer("head").kernel.shape == (3, 4)
    assert relative_error(np.asarray(slim(x)), expected) < 1e-5
    # Another gene gives other weights: the generator depends on the encoding.
    first = np.asarray(slim.get_layer("c3").kernel)
    other = net.materialize((1, 1))
    assert other.get_layer("c3").kernel.shape == (1, 1, 4, 3)
    assert not np.allclose(np.asarray(other.get_layer("c3").kernel)[:, :, :2, :], first)
    # Every kernel of a winner trains, also those the gene leaves at full width (copied from ``base``).
    full = net.materialize(net.space.full)
    assert all(full.get_layer(name).kernel.trainable for name in ("c1", "c2", "c3", "head"))
    assert len(full.trainable_weights) == len(other.trainable_weights)


def test_one_sgd_step_moves_a_warm_started_generated_weight_by_lr_times_one_plus_h_squared_over_h():
    """``W(e) = relu(e A + a) B / sqrt(H) + b`` with ``B = 0``: a step of rate ``lr`` on the gradient ``G`` of ``W``
    moves ``W(e)`` by ``-lr (1 + |h(e)|^2 / H) G``, about ``-2 lr G``, not ``-H lr G``."""
    import tensorflow as tf

    net = mp.PruningNet(_residual_net(), scales=(0.25, 0.5, 1.0), hidden=16)
    net.set_gene((0, 1))
    generator = net._generators[id(net.base.get_layer("c3").kernel)]
    before = np.asarray(generator.value())
    gradient = np.random.default_rng(0).normal(0, 1, before.shape).astype("float32")
    hidden = np.maximum(np.asarray(net.encoding(generator.variable)) @ np.asarray(generator.first)
                        + np.asarray(generator.first_bias), 0)
    variables = [generator.first, generator.first_bias, generator.second, generator.second_bias]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(generator.value() * gradient)
    keras.optimizers.SGD(0.01).apply_gradients(zip(tape.gradient(loss, [v.value for v in variables]), variables))
    step = 0.01 * (1 + float(np.sum(hidden**2)) / 16)
    assert 1 < step / 0.01 < 3  # the generator adds at most about one lr (|h|^2 / H ~ |e|^2), not H of them
    np.testing.assert_allclose(np.asarray(generator.value()), before - step * gradient, rtol=1e-5, atol=1e-6)


def test_l1_channel_order_starts_every_gene_from_the_strongest_trained_channels():
    model = _residual_net()
    net = mp.PruningNet(model, scales=(0.25, 0.5, 1.0), channel_order="l1")
    scores = channel_l1(kap.DependencyGraph(model))
    kept = net.space.plan((0, 1)).kept
    for group, width in (("c1", 2), ("c3", 3)):
        assert sorted(kept[group].tolist()) == sorted(np.argsort(-scores[group])[:width].tolist())
        assert min(scores[group][kept[group]]) >= max(np.delete(scores[group], kept[group]))
    x, _ = _data(8)
    net.set_gene((0, 1))
    slim = net.materialize()
    # Warm start: the generated weights are the trained ones at the kept channels, and the slim model matches the net.
    np.testing.assert_allclose(np.asarray(slim.get_layer("c3").kernel),
                               np.asarray(model.get_layer("c3").kernel)[:, :, kept["c1"], :][..., kept["c3"]], rtol=1e-6)
    assert relative_error(np.asarray(slim(x)), np.asarray(net(x))) < 1e-5
    assert mp.fingerprint(net, 20) != mp.fingerprint(mp.PruningNet(model, scales=(0.25, 0.5, 1.0)), 20)
    with pytest.raises(ValueError, match="channel_order"):
        mp.PruningNet(model, channel_order="taylor")
    with pytest.raises(ValueError, match="permutation of range\\(8\\)"):
        mp.GeneSpace(kap.DependencyGraph(model), channel_order={"c1": np.zeros(8, int)})
    with pytest.raises(ValueError, match="not prunable groups"):
        mp.GeneSpace(kap.DependencyGraph(model), channel_order={"head": np.arange(4)})


def test_frozen_layers_are_generated_too():
    model = _residual_net()
    model.trainable = False
    net = mp.PruningNet(model, scales=(0.25, 0.5, 1.0), warm_start=False, seed=1)
    assert len(net._generators) == 4  # c1, c2, c3, head kernels
    x, _ = _data(8)
    net.set_gene((0, 1))
    assert relative_error(np.asarray(net.materialize()(x)), np.asarray(net(x))) < 1e-5
    assert not model.trainable  # the user's model is left as it was


def test_removed_channels_leave_the_shared_batchnorm_statistics_alone():
    net = mp.PruningNet(_residual_net(), scales=(0.25, 0.5, 1.0))
    x, _ = _data(16)
    bn = net.base.get_layer("bn1")
    before = np.asarray(bn.moving_variance).copy()
    net.set_gene((0, 2))  # c1/c2 keep channels 0 and 1 of 8
    net(x, training=True)
    after = np.asarray(bn.moving_variance)
    assert np.array_equal(after[2:], before[2:]) and not np.allclose(after[:2], before[:2])


def test_training_with_the_gene_sampler_draws_a_gene_per_batch_and_updates_the_generators():
    model = _residual_net()
    # From scratch (B != 0): a warm start's B = 0 gives A and a no gradient until B has moved, a second-order
    # change that float32 may not register in 4 steps.
    net = mp.PruningNet(model, scales=(0.25, 0.5, 1.0), warm_start=False)
    x, y = _data(64)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(self.model.gene)

    start = [np.array(w) for w in net.trainable_weights]
    mp.train_pruningnet(net, (x, y), epochs=1, batch_size=16, callbacks=[Spy()], verbose=0)
    assert len(seen) == 4 and len(set(seen)) > 1
    genes, seen[:] = list(seen), []
    twin = mp.PruningNet(model, scales=(0.25, 0.5, 1.0), warm_start=False)
    mp.train_pruningnet(twin, (x, y), epochs=1, batch_size=16, callbacks=[Spy()], verbose=0)
    assert seen == genes  # same seed: same genes, same batches, the same network up to float reduction order
    assert all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6) for a, b in zip(net.weights, twin.weights))
    assert net.gene == net.space.full  # left at full width after training
    # every generator (A, a, B, b) and shared variable trained, but the biases of c1 and c2: BatchNormalization
    # follows them, and in training mode it subtracts the batch mean, so their gradient is 0 up to float noise
    before_batchnorm = {"c1/bias", "c2/bias"}
    for variable, initial in zip(net.trainable_weights, start):
        if variable.path in before_batchnorm:
            np.testing.assert_allclose(np.asarray(variable), initial, atol=1e-6, err_msg=variable.path)
        else:
            assert not np.array_equal(np.asarray(variable), initial), variable.path
    assert len(net.trainable_weights) == 24 and before_batchnorm <= {v.path for v in net.trainable_weights}
    sampler = mp.GeneSampler()
    sampler.set_model(_residual_net())
    with pytest.raises(TypeError, match="GeneSampler drives"):
        sampler.on_train_begin()


# -- search --------------------------------------------------------------------------------
def test_genes_outside_the_window_are_rejected_before_scoring():
    net = mp.PruningNet(_residual_net(), scales=(0.25, 0.5, 0.75, 1.0))
    cost = mp.cost_function(net, kap.Budget(flops=0.5))
    scored = []

    def score(gene):
        scored.append(gene)
        return -abs(cost(gene) - 0.45)

    search = mp.EvolutionarySearch(net.space, score, cost, high=0.5, low=0.3, settings=SMALL, seed=0, verbose=0)
    best, value = search.run()
    assert scored and all(0.3 <= cost(g) <= 0.5 for g in scored)
    assert search.history.rejected > 0
    assert value == max(search.history.scores.values()) and best in scored
    assert search.history.best_scores == sorted(search.history.best_scores)  # elitist: never worse


def test_a_mild_budget_fills_its_population_near_the_budget():
    space, _ = _space_of(groups=12)
    cost = mp.cost_function(mp.PruningNet(space.graph.model), kap.Budget(flops=0.75))
    rng = np.random.default_rng(0)
    assert sum(0.7 <= cost(space.random(rng)) <= 0.75 for _ in range(100)) < 2  # random genes almost never land
    settings = mp.SearchSettings(population=12, parents=3, mutations=4, crossovers=4, iterations=2, max_tries=10)
    search = mp.EvolutionarySearch(space, lambda gene: float(sum(gene)), cost, high=0.75, low=0.7, settings=settings,
                                   verbose=0)
    population = search.first_population()
    assert len(population) == 12 and len(set(population)) > 6
    assert all(0.7 <= cost(g) <= 0.75 for g in population)
    best, _ = search.run()
    assert 0.7 <= cost(best) <= 0.75
    narrow = mp.EvolutionarySearch(space, lambda gene: 0.0, cost, high=0.123456, low=0.123456, settings=settings)
    with pytest.raises(ValueError, match="No gene of 12 choices has a cost in"):
        narrow.first_population()


def test_search_refuses_a_window_no_gene_reaches_before_training():
    model = _residual_net()
    net = mp.PruningNet(model, scales=(0.25, 0.5, 0.75, 1.0))
    with pytest.raises(ValueError, match="has a cost in"):
        mp.search(model, _data(64), kap.Budget(flops=0.4321), window=0.0, pruningnet=net, verbose=0)
    assert getattr(net, "optimizer", None) is None  # never compiled: the training did not start


def test_search_is_deterministic_under_a_seed(tmp_path):
    net = mp.PruningNet(_residual_net(), scales=(0.25, 0.5, 0.75, 1.0))
    cost = mp.cost_function(net, kap.Budget(flops=0.6))
    x, y = _data(64)
    scorer = mp.CandidateScorer(net, (x[:32], y[:32]), (x[32:], y[32:]), recalibration_batches=1, batch_size=32)
    runs = []
    for _ in range(2):
        search = mp.EvolutionarySearch(net.space, scorer, cost, high=0.6, low=0.2, settings=SMALL, seed=3, verbose=0)
        runs.append((search.run(), search.history.scores))
    assert runs[0] == runs[1]


def _space_of(groups: int = 5):
    """A model with ``groups`` independent conv groups, 31 scales: many genes, a cheap synthetic score."""
    inputs = keras.Input((4, 4, 2))
    x = inputs
    for i in range(groups):
        x = L.Conv2D(8, 1, name=f"c{i}")(x)
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    space = mp.GeneSpace(kap.DependencyGraph(model))
    cost = mp.cost_function(mp.PruningNet(model), kap.Budget(flops=0.5))
    return space, cost


def test_a_rerun_on_the_cache_scores_nothing_new_and_a_truncated_cache_resumes_the_same_search(tmp_path):
    space, cost = _space_of()
    settings = mp.SearchSettings(population=12, parents=3, mutations=4, crossovers=4, iterations=6)
    score = lambda gene: float(np.sin(np.dot(gene, np.arange(1, len(gene) + 1))))  # noqa: E731
    path = tmp_path / "scores.json"

    def search(scorer, key=""):
        evolution = mp.EvolutionarySearch(space, scorer, cost, high=0.5, low=0.3, settings=settings, seed=1,
                                          cache_path=path, cache_key=key, verbose=0)
        return evolution.run(), evolution.history

    calls = []
    first, history = search(lambda g: calls.append(g) or score(g))
    assert len(calls) == len(history.scores) > 40
    rerun = []
    assert search(lambda g: rerun.append(g) or score(g))[0] == first and rerun == []
    stored = json.loads(path.read_text())
    stored["scores"] = stored["scores"][:20]  # interrupted after 20 scores
    path.write_text(json.dumps(stored))
    resumed = []
    again, history_again = search(lambda g: resumed.append(g) or score(g))
    assert again == first and history_again.best_scores == history.best_scores
    assert len(resumed) == len(calls) - 20
    with pytest.raises(ValueError, match="do not apply"):
        search(score, key="another pruningnet")


def test_fingerprint_changes_with_the_weights_and_the_settings_only():
    net = mp.PruningNet(_residual_net(), seed=0)
    net(np.zeros((1, 8, 8, 3), np.float32))
    key = mp.fingerprint(net, 20, 128)
    assert mp.fingerprint(net, 20, 128) == key and len(key) == 16
    assert mp.fingerprint(net, 10, 128) != key  # other scoring settings
    net.materialize(net.space.uniform(0))  # another gene, and generated values written into the base kernels
    assert mp.fingerprint(net, 20, 128) == key
    weight = net.trainable_weights[0]
    weight.assign(weight + 1e-3)  # a net trained again: other weights, never the same scores
    assert mp.fingerprint(net, 20, 128) != key


def test_search_builds_a_winner_within_budget_that_saves_and_exports(tmp_path):
    model = _residual_net()
    x, y = _data(96)  # full batches only: TF 2.21's oneDNN can crash on some ragged last batches
    result = mp.search(model, (x[:64], y[:64]), kap.Budget(flops=0.5), validation_data=(x[64:], y[64:]), epochs=1,
                       scales=(0.25, 0.5, 0.75, 1.0), window=0.3, settings=SMALL, recalibration_batches=2,
                       batch_size=16, verbose=0)
    flops = kap.count_flops(result.model) / kap.count_flops(model)
    assert flops == pytest.approx(result.cost, abs=1e-12) and 0.2 <= flops <= 0.5
    assert result.widths == result.pruningnet.space.group_widths(result.gene)
    assert result.model.get_layer("c3").kernel.shape[-1] == result.widths["c3"]
    assert result.report.flops_kept == pytest.approx(flops)
    assert result.history.best_scores[-1] == result.score
    path = tmp_path / "winner.keras"
    result.model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x[:4])), np.asarray(result.model(x[:4])), rtol=1e-5, atol=1e-6)
    assert kap.export_tflite(result.model, str(tmp_path / "winner.tflite")).verified
    scratch = result.scratch_model()
    assert [w.shape for w in scratch.weights] == [w.shape for w in result.model.weights]
    assert not np.allclose(np.asarray(scratch.get_layer("c1").kernel), np.asarray(result.model.get_layer("c1").kernel))


def test_search_refuses_a_score_cache_written_with_other_scoring_data(tmp_path):
    model = _residual_net()
    net = mp.PruningNet(model, scales=(0.25, 0.5, 0.75, 1.0))
    x, y = _data(96)
    cache = tmp_path / "scores.json"

    def search(validation):
        return mp.search(model, (x[:64], y[:64]), kap.Budget(flops=0.5), validation_data=validation, pruningnet=net,
                         epochs=0, window=0.3, settings=SMALL, recalibration_batches=1, batch_size=16, seed=1,
                         cache_path=cache, verbose=0)

    first = search((x[64:], y[64:]))
    assert search((x[64:], y[64:])).gene == first.gene  # the same data: the cache is read back
    with pytest.raises(ValueError, match="so its scores do not apply"):
        search((x[64:], (y[64:] + 1) % 4))  # other labels: other scores
    before = [w.numpy().copy() for w in net.trained_weights()]
    with pytest.raises(ValueError, match="the PruningNet trains first.*pruningnet=result.pruningnet, epochs=0"):
        mp.search(model, (x[:64], y[:64]), kap.Budget(flops=0.5), validation_data=(x[64:], y[64:]), pruningnet=net,
                  epochs=1, window=0.3, settings=SMALL, cache_path=cache, verbose=0)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, net.trained_weights()))  # refused before training


def test_search_checks_its_arguments_before_any_work():
    model = _residual_net()
    x, y = _data(16)
    with pytest.raises(ValueError, match="held-out labelled data"):
        mp.search(model, keras.utils.PyDataset(), kap.Budget(flops=0.5))
    with pytest.raises(ValueError, match="latency table"):
        mp.search(model, (x, y), kap.Budget(latency=0.5))
    with pytest.raises(ValueError, match="`window`"):
        mp.search(model, (x, y), kap.Budget(flops=0.1), window=0.2)
    unlabelled = tf.data.Dataset.from_tensor_slices(x).batch(8)
    with pytest.raises(ValueError, match="scored by their top-1 accuracy"):
        mp.search(model, (x, y), kap.Budget(flops=0.5), validation_data=unlabelled)
    with pytest.raises(ValueError, match="`epochs`"):
        mp.search(model, (x, y), kap.Budget(flops=0.5), epochs=0)
    # Before the PruningNet's training (which would end in another error): no gene is that cheap.
    with pytest.raises(kap.BudgetUnreachableError, match=r"smallest scale \(0.5\) keeps"):
        mp.search(model, (x, y), kap.Budget(flops=0.05), window=0.01, scales=(0.5, 1.0))
    with pytest.raises(TypeError, match="`settings`"):
        mp.search(model, (x, y), kap.Budget(flops=0.5), settings={"population": 4})
    other = mp.PruningNet(_residual_net(), scales=(0.5, 1.0))
    with pytest.raises(ValueError, match="`scales` are the given `pruningnet`'s"):
        mp.search(model, (x, y), kap.Budget(flops=0.5), pruningnet=other, scales=(0.25, 1.0), epochs=0)
    inputs = keras.Input((8, 8, 3))
    unrelated = keras.Model(inputs, L.Dense(4, name="head")(L.GlobalAveragePooling2D()(L.Conv2D(5, 3, name="c1")(inputs))))
    with pytest.raises(ValueError, match="built from `model`"):
        mp.search(unrelated, (x, y), kap.Budget(flops=0.5), pruningnet=other, epochs=0)


def test_search_refuses_scoring_training_and_latency_inputs_before_building_the_pruningnet(monkeypatch):
    model = _residual_net()
    x, y = _data(32)
    held_out = (x[:8], y[:8])
    search_module = importlib.import_module("keras_autoprune.metapruning.search")  # the package's `search` is the function

    def no_net(*args, **kwargs):
        pytest.fail("the PruningNet was built before the arguments were checked")

    monkeypatch.setattr(search_module, "PruningNet", no_net)
    budget = kap.Budget(flops=0.5)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        mp.search(model, (x, y), budget, batch_size=0)
    with pytest.raises(ValueError, match="`recalibration_batches` must be an int >= 1"):
        mp.search(model, (x, y), budget, recalibration_batches=0)
    with pytest.raises(ValueError, match=r"Received: an array of shape \(8, 5, 8, "):  # 8x5 images, 8x8 model
        mp.search(model, (x, y), budget, validation_data=(x[:8, :5], y[:8]))
    repeated = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    with pytest.raises(ValueError, match="infinite tf.data.Dataset"):
        mp.search(model, repeated, budget, validation_data=held_out)
    other = keras.Sequential([keras.Input((4,)), L.Dense(3, name="d1"), L.Dense(2)])
    table = mp.LatencyTable.build(other, scales=(1.0,), runs=1, verbose=0)
    with pytest.raises(ValueError, match="built for model"):
        mp.search(model, (x, y), kap.Budget(latency=0.5), latency_table=table)


def test_train_pruningnet_refuses_inputs_it_cannot_train_on():
    model = _residual_net()
    net = mp.PruningNet(model, scales=(0.5, 1.0))
    x, y = _data(16)
    with pytest.raises(ValueError, match="infinite"):
        mp.train_pruningnet(net, tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat())
    with pytest.raises(ValueError, match="`batch_size`"):
        mp.train_pruningnet(net, (x, y), batch_size=0)
    for rate in (0.0, -0.1, float("nan"), "fast"):
        with pytest.raises(ValueError, match="`learning_rate`"):
            mp.train_pruningnet(net, (x, y), learning_rate=rate)


# -- latency -------------------------------------------------------------------------------
def test_layer_timing_interpolates_and_never_goes_below_zero():
    timing = mp.LayerTiming(in_widths=[16, 32], out_widths=[8], ms=[[0.02], [0.05]])
    assert timing.at(24, 8) == pytest.approx(0.035)
    assert timing.at(40, 8) == pytest.approx(0.065)  # linear above the grid
    assert timing.at(1, 8) == 0.0  # -0.008 by extrapolation, clamped
    with pytest.raises(ValueError, match="width fractions"):
        mp.LatencyTable.build(_residual_net(), scales=())


def test_latency_budget_is_refused_by_methods_that_count_flops():
    budget = kap.Budget(latency=0.5)
    assert budget.metric == "latency" and budget.fraction == 0.5 and str(budget) == "50% of latency"
    with pytest.raises(ValueError, match="only"):
        kap.NAPCallback(data=_data(8), budget=budget)
    with pytest.raises(ValueError, match="kap.red.compress budgets FLOPs or parameters"):
        kap.red.compress(_residual_net(), budget=budget)
    with pytest.raises(ValueError, match="exactly one quantity"):
        kap.Budget(flops=0.5, latency=0.5)


def test_latency_table_interpolates_its_grid_and_round_trips(tmp_path):
    model = _residual_net()
    table = mp.LatencyTable.build(model, scales=(0.5,), runs=5, verbose=0)  # 1.0 is always added
    assert table.savings_scale == 1.0 and table.calibration is None
    # Every convolution and the head: c1 reads 3 channels and c2 reads 8, so they are measured apart.
    assert set(table.layers) == {"c1", "c2", "c3", "head"}
    c2 = table.timings[table.layers["c2"]]
    assert c2.in_widths == [4, 8] and c2.out_widths == [4, 8]
    assert c2.at(4, 8) == pytest.approx(c2.ms[0][1]) and c2.at(6, 8) == pytest.approx((c2.ms[0][1] + c2.ms[1][1]) / 2)
    table.bind(model)
    assert table.estimate(kap.PrunePlan({})) == pytest.approx(table.full_ms)
    path = tmp_path / "table.json"
    table.save(path)
    loaded = mp.LatencyTable.load(path).bind(model)
    plan = kap.PrunePlan({"c1": [0, 1, 2, 3]})
    assert loaded.estimate(plan) == pytest.approx(table.estimate(plan))
    with pytest.raises(ValueError, match="built for model"):
        loaded.bind(keras.Sequential([keras.Input((4,)), L.Dense(3, name="d1"), L.Dense(2)]))
    wider = _residual_net()
    wider = keras.Model(wider.inputs, wider.outputs, name="same_names")
    assert loaded.bind(wider) is loaded  # same layers, configurations and shapes: accepted
    # The estimate swaps each changed layer's full-width timing for its timing at the slim widths
    # (residual group: c1 and c2 keep 4 of 8 outputs, c2 and c3 read 4). Arithmetic on the measured
    # table, not a comparison of timings, which noise on a shared machine can reorder.
    slim = kap.apply_plan(model, plan)
    expected = table.full_ms
    for name, signature in table.layers.items():
        timing, layer = table.timings[signature], slim.get_layer(name)
        widths = (layer.input.shape[-1], layer.output.shape[-1])
        expected += timing.at(*widths) - timing.at(timing.in_widths[-1], timing.out_widths[-1])
    assert [slim.get_layer(n).output.shape[-1] for n in ("c1", "c2", "c3")] == [4, 4, 6]
    assert table.estimate(plan) == pytest.approx(expected)
    check = mp.check_latency(table, model, [kap.PrunePlan({}), plan], runs=5, rounds=1)
    assert len(check.measured_ms) == 2 and all(m > 0 for m in check.measured_ms)
    assert check.predicted_ms == (pytest.approx(table.full_ms), pytest.approx(table.estimate(plan)))


def test_latency_table_times_a_depthwise_grouped_convolution_along_its_input_widths():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 1, name="expand")(inputs)
    x = L.Conv2D(16, 3, padding="same", groups=8, name="dw")(x)  # ConvNeXt-style depthwise, multiplier 2
    x = L.GlobalAveragePooling2D()(L.Conv2D(6, 1, name="pw")(x))
    model = keras.Model(inputs, L.Dense(4, name="head")(x))
    with pytest.raises(ValueError, match="`runs` must be an int >= 1"):
        mp.LatencyTable.build(model, runs=0, verbose=0)
    table = mp.LatencyTable.build(model, scales=(0.5,), runs=3, verbose=0)
    dw = table.timings[table.layers["dw"]]
    assert dw.in_widths == [4, 8] and dw.out_widths == [16]  # its outputs follow its inputs: one axis
    plan = kap.PrunePlan.uniform(kap.DependencyGraph(model), 0.5)
    slim = kap.apply_plan(model, plan)
    assert slim.get_layer("dw").get_config()["groups"] == 4 and slim.get_layer("dw").output.shape[-1] == 8
    table.bind(model)
    assert np.isfinite(table.estimate(plan)) and table.estimate(plan) != table.full_ms
    change = dw.at(4, 8) - dw.at(8, 16)
    assert change == pytest.approx(dw.ms[0][0] - dw.ms[1][0])  # the timing at 4 inputs (8 outputs), measured


def test_latency_calibration_fits_the_full_latency_and_the_savings_scale(tmp_path):
    from keras_autoprune.metapruning.latency import fit_savings_scale

    # measured = T_full + k * raw: the table's raw changes -0.2 and -0.4 ms came out as -0.1 and -0.2.
    assert fit_savings_scale([0.0, -0.2, -0.4], [1.0, 0.9, 0.8]) == (pytest.approx(1.0), pytest.approx(0.5))
    with pytest.raises(ValueError, match="at least two plans"):
        fit_savings_scale([0.0], [1.0])
    with pytest.raises(ValueError, match="fractions of channels removed"):
        mp.LatencyTable.build(_residual_net(), scales=(0.5,), runs=5, verbose=0, calibration=(1.5,))
    model = _residual_net()
    table = mp.LatencyTable.build(model, scales=(0.5,), runs=5, verbose=0, calibration=(0.5,))
    raw, measured = table.calibration["raw_predicted_ms"], table.calibration["measured_ms"]
    assert table.calibration["ratios"] == [0.5] and len(raw) == len(measured) == 2 and raw[0] == 0.0
    table.bind(model)
    half = kap.PrunePlan.uniform(kap.DependencyGraph(model), 0.5)
    # the raw change is the table's own one-layer sum for that plan (its sign is timing, not a property)
    assert raw[1] == pytest.approx(table._raw_change(half))
    full, scale = fit_savings_scale(raw, measured)
    if scale > 0:  # two plans: the fitted line passes through both measurements
        assert (table.full_ms, table.savings_scale) == (pytest.approx(full), pytest.approx(scale))
        assert table.estimate(kap.PrunePlan({})) == pytest.approx(measured[0])
        assert table.estimate(half) == pytest.approx(measured[1])
    else:  # timing noise on a tiny model swamped the savings: the table falls back to k = 1
        assert table.savings_scale == 1.0 and table.full_ms == measured[0]
    table.save(tmp_path / "table.json")
    loaded = mp.LatencyTable.load(tmp_path / "table.json")
    assert (loaded.full_ms, loaded.savings_scale, loaded.calibration) == (table.full_ms, table.savings_scale,
                                                                         table.calibration)


def test_uniform_gene_is_the_widest_uniform_width_within_the_budget():
    net = mp.PruningNet(_residual_net(), scales=(0.25, 0.5, 0.75, 1.0))
    cost = mp.cost_function(net, kap.Budget(flops=0.5))
    gene = mp.uniform_gene(net.space, cost, 0.5)
    assert len(set(gene)) == 1 and cost(gene) <= 0.5
    assert gene[0] == len(net.space.scales) - 1 or cost(net.space.uniform(gene[0] + 1)) > 0.5
    with pytest.raises(kap.BudgetUnreachableError, match="uniform width can reach"):
        mp.uniform_gene(net.space, cost, 0.001)


def test_smoothed_crossentropy_matches_keras_on_one_hot_labels():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], "float32")
    labels = np.array([0, 2])
    loss = mp.SmoothedCrossentropy(3, label_smoothing=0.1, from_logits=True)
    expected = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(np.eye(3)[labels], logits)
    assert float(loss(labels, logits)) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss(np.eye(3)[labels].astype("float32"), logits)) == pytest.approx(float(expected), rel=1e-6)


def test_pruningnet_trains_under_mirrored_strategy():
    from tests.test_callbacks import run_distributed

    result = run_distributed("PruningNet")  # 2 logical CPUs, one gene per global batch of 16
    assert result["replicas"] == 2
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    assert result["changed"] == result["trainable"]  # every generator and shared variable trained
    assert result["slim_filters"] == [2, 4]  # gene (0, 1) at scales (0.25, 0.5, 1.0) of 8 channels
    assert result["error"] < 1e-5  # the materialized slim model equals the PruningNet at that gene
