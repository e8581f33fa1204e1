"""The Torch-Pruning peer (`benchmarks.torch_peer`): twins equal to the Keras models, one-shot pruning at a FLOPs target."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tp = pytest.importorskip("torch_pruning")

from benchmarks import converged, torch_peer  # noqa: E402

TINY = {
    "family": "resnet", "mean": [120.0, 115.0, 100.0], "variance": [3600.0, 3500.0, 4000.0], "stem": 4, "classes": 10,
    "blocks": [{"name": "s1b1", "in": 4, "out": 4, "stride": 1, "proj": False},
               {"name": "s2b1", "in": 4, "out": 8, "stride": 2, "proj": True}],
}


@pytest.fixture(scope="module")
def cifar():
    if not converged.DEFAULT_SOURCE.is_file():
        pytest.skip(f"needs the CIFAR-10 archive {converged.DEFAULT_SOURCE}")
    return converged.load_cifar10()


def _tiny_twin(seed=0):
    torch.manual_seed(seed)
    return torch_peer.build_twin(TINY).eval()


def test_same_padding_matches_keras():
    assert [torch_peer.same_padding(n, k, s) for n, k, s in [(32, 3, 2), (16, 3, 2), (32, 3, 1), (32, 1, 2), (7, 3, 2)]] == [
        (0, 1), (0, 1), (1, 1), (0, 0), (1, 1)]


@pytest.mark.parametrize("name, blocks", [("resnet20", 9), ("mobilenetv2", 17)])
def test_twin_equals_committed_keras_model(cifar, name, blocks):
    keras = pytest.importorskip("keras")
    model = keras.saving.load_model(converged.MODELS_DIR / f"{name}.keras", compile=False)
    twin = torch_peer.twin_from_keras(model)
    images = cifar.x_test[::1250].astype(np.float32)  # 8 images, one per 1,250 (the test set is sorted by class)
    error = torch_peer.relative_error(model.predict(images, verbose=0), torch_peer.predict(twin, images))
    assert len(twin.blocks) == blocks
    assert error < 1e-4, f"{name}: max |keras - torch| / max |keras| = {error:.2e}"


def test_hessian_gradients_equal_per_sample_backward():
    """vmap's per-sample gradients equal the documented loop: one backward per sample, squares averaged."""
    twin = _tiny_twin()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    labels = np.array([1, 7, 3])
    fisher = torch_peer.hessian_gradients(twin, images, labels)
    expected = {name: torch.zeros_like(p) for name, p in twin.named_parameters()}
    for i in range(3):
        twin.zero_grad()
        torch.nn.functional.cross_entropy(twin(torch_peer.to_nchw(images[i : i + 1])), torch.tensor(labels[i : i + 1])).backward()
        for name, p in twin.named_parameters():
            expected[name] += p.grad.pow(2) / 3
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-9)


def test_reestimate_batchnorm_is_the_cumulative_average():
    twin = _tiny_twin()
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        features = twin.stem.conv(twin.normalize(torch_peer.to_nchw(images)))
    torch_peer.reestimate_batchnorm(twin, images, batch_size=3)
    assert not twin.training and twin.stem.bn.momentum == pytest.approx(0.01)
    # two equal batches: the average of the batch means is the mean; the variances are the unbiased batch ones
    torch.testing.assert_close(twin.stem.bn.running_mean, features.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    batch_vars = [features[i : i + 3].var((0, 2, 3), unbiased=True) for i in (0, 3)]
    torch.testing.assert_close(twin.stem.bn.running_var, (batch_vars[0] + batch_vars[1]) / 2, rtol=1e-5, atol=1e-5)


def test_prune_to_flops_meets_the_target_on_resnet20(cifar):
    twin = torch_peer.load_twin("resnet20")
    example = torch_peer.to_nchw(cifar.x_test[:1])
    pruned, found = torch_peer.prune_to_flops(twin, "l1", True, 0.5, example, iterations=8, tolerance=0.01)
    assert abs(found["flops_kept"] - 0.5) <= 0.02
    assert 0.3 < found["params_kept"] < 0.9
    assert (pruned.fc.out_features, twin.fc.in_features) == (10, 64) and pruned.fc.in_features < 64
    assert twin.stem.conv.out_channels == 16  # the base model is untouched
    logits = torch_peer.predict(pruned, cifar.x_test[::500])
    assert logits.shape == (20, 10) and np.isfinite(logits).all()


def test_oneshot_rows_on_a_tiny_twin_record_values_and_errors():
    """Rows on random data; a target out of range becomes an error row and the run goes on."""
    rng = np.random.default_rng(2)
    images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    data = converged.Cifar10(images(1), np.zeros(1, np.int64), images(40), rng.integers(0, 10, 40))
    protocol = {"calibration_x": images(32).astype(np.float32), "calibration_y": rng.integers(0, 10, 32),
                "batchnorm_x": images(64).astype(np.float32)}
    lines = []
    entries = ["tp_l1_uniform", "tp_hessian_global"]
    rows = torch_peer.oneshot_rows("tiny", data, entries=entries, targets=[0.6, 1.5], twin=_tiny_twin(), protocol=protocol,
                                   hessian_images=8, log=lines.append)
    assert [(r["entry"], r["target"]) for r in rows] == [(e, t) for e in entries for t in (0.6, 1.5)]
    assert len(lines) == 4
    for row in rows[0::2]:
        assert "error" not in row, row
        assert abs(row["flops_kept"] - 0.6) < 0.1 and 0 <= row["accuracy"] <= 1 and 0 <= row["accuracy_bn"] <= 1
    assert rows[2]["gradient_images"] == 8 and "first 8 of the 32" in rows[2]["note"]
    assert all(row["error"].startswith("ValueError: Expected a FLOPs fraction") for row in rows[1::2])


def test_module_imports_without_torch_or_keras():
    import subprocess
    import sys

    code = "import sys, benchmarks.torch_peer; print(sorted(m for m in ('torch', 'keras', 'torch_pruning', 'keras_autoprune') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_a_fine_tuning_step_equals_keras_sgd_with_weight_decay():
    """The peer's step (`torch_finetune.train_step`) moves the twin's weights as Keras' SGD moves the model's."""
    keras = pytest.importorskip("keras")
    from benchmarks.torch_finetune import train_step
    from benchmarks.training import compile_model
    from keras_autoprune.zoo import resnet_cifar

    keras.utils.set_random_seed(0)
    model = resnet_cifar(8, width=4, pixel_statistics=([120.0, 115.0, 100.0], [60.0, 59.0, 63.0]))
    twin = torch_peer.twin_from_keras(model)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 16)
    initial = model.get_layer("stem_conv").get_weights()[0].transpose(3, 2, 0, 1)
    compile_model(model, keras, 0.05, 0.01)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    twin.train()
    for _ in range(2):  # the second step reads the momentum of the first
        keras_loss = float(model.train_on_batch(images, labels)[0])
        torch_loss = train_step(twin, optimizer, images, labels, 0.05, 0.01)
        assert torch_loss == pytest.approx(keras_loss, rel=1e-4)
    kernel = model.get_layer("stem_conv").get_weights()[0].transpose(3, 2, 0, 1)
    moved = twin.keras_layers()["stem_conv"].conv.weight.detach().numpy()
    assert np.max(np.abs(moved - kernel)) < 1e-3 * np.max(np.abs(kernel - initial))  # both moved, the same way
    np.testing.assert_allclose(twin.fc.weight.detach().numpy(), model.get_layer("logits").get_weights()[0].T, rtol=1e-3, atol=1e-5)


def test_fine_tuned_row_prunes_in_rounds_to_the_target():
    import dataclasses

    from benchmarks.data import BenchData
    from benchmarks.profiles import PROFILES
    from benchmarks.torch_finetune import finetune_row

    rng = np.random.default_rng(3)
    data = BenchData(rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 32),
                     rng.integers(0, 256, (20, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 20),
                     np.zeros(3, np.float32), np.full(3, 1 / 255, np.float32))
    profile = dataclasses.replace(PROFILES["v2"], batch_size=8, calibration_batches=2, finetune_epochs=3, rounds=2)
    twin = _tiny_twin()
    before = {name: p.detach().clone() for name, p in twin.named_parameters()}
    lines = []
    row = finetune_row(twin, "tp_taylor_global", 0.5, 0, data, profile, model_name="tiny", log=lines.append)
    assert row["round_targets"] == [0.75, 0.5] and row["epochs"] == 3 and len(lines) == 3
    assert abs(row["flops_kept"] - 0.5) < 0.1 and row["params_kept"] < 1 and 0 <= row["accuracy"] <= 1
    assert 0 < row["pruning_seconds"] < row["fit_seconds"]
    assert all(torch.equal(p, before[name]) for name, p in twin.named_parameters())  # the twin itself is left alone
    with pytest.raises(ValueError, match="Expected an entry among"):
        finetune_row(twin, "tp_l2_global", 0.5, 0, data, profile)
