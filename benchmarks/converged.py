"""Benchmark v2's converged base models: data, architectures, recipe and resumable training.

The models are trained once and kept in ``benchmarks/models/`` with
``manifest.json`` (recipe, epochs, seed, test accuracy, sha256, wall time,
machine, command). Each ``.keras`` file reads raw RGB pixels in [0, 255]
(a `keras.layers.Normalization` with the training set's per-channel mean and
variance comes first) and outputs logits, so that anyone can evaluate it
with ``keras.saving.load_model(path)`` (safe mode) and no benchmark code.

Recipe (`Recipe`, the same for both models): SGD with Nesterov momentum 0.9,
batch 128, learning rate ``0.1`` after a linear warm-up of 2 epochs, then a
per-epoch cosine decay to 0; weight decay ``5e-3`` in Keras' decoupled form
(``w <- w - lr * 5e-3 * w`` each step, which under momentum 0.9 matches the
usual coupled L2 of ``5e-4``); cross-entropy on logits without label
smoothing (the softmax stays the model's likelihood, which the Fisher-based
methods read); random horizontal flip and 4-pixel zero-pad random crop, drawn
from ``numpy.random.default_rng((seed, epoch))``. No augmentation at test.
``Recipe.cutout`` (``--cutout``, 0 for the committed models) adds cutout.

Training runs on any Keras backend: on a GPU machine without TensorFlow it
runs under JAX (``KERAS_BACKEND=jax``); on the CPU under TensorFlow. It
checkpoints every ``checkpoint_every`` epochs and continues from the
checkpoint when called again, so hours of CPU training can run in stages:

    python -m benchmarks.converged train resnet20 --stage-epochs 10   # repeat until done
    python -m benchmarks.converged verify                           # committed files vs manifest

``--seconds S`` fixes the number of epochs after the warm-up from the measured
epoch time so that the run ends within about ``S`` seconds (the cosine decay
is then planned over the epochs that fit); the epochs actually run are
recorded.

Images are decoded with Pillow straight from the archive (this module needs
neither TensorFlow nor the rest of keras_autoprune: only ``keras_autoprune.zoo``),
and every benchmark v2 entry reads the same arrays (`load_cifar10`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import platform
import sys
import tarfile
import time

import numpy as np

MODELS_DIR = pathlib.Path(__file__).resolve().parent / "models"
DEFAULT_SOURCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
_PAD = 4


@dataclasses.dataclass(frozen=True)
class Cifar10:
    """CIFAR-10 as uint8 ``(N, 32, 32, 3)`` images and int64 labels (class ids in alphabetical order)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def pixel_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance of the training pixels, in [0, 255] units."""
        pixels = self.x_train.reshape(-1, 3).astype(np.float64)
        return pixels.mean(axis=0), pixels.var(axis=0)


def load_cifar10(source: str | os.PathLike = DEFAULT_SOURCE, cache: str | os.PathLike | None = None) -> Cifar10:
    """Decodes the CIFAR-10 archive (``<split>/<class>/*.jpg``) with Pillow, files in sorted order.

    The arrays are cached as ``.npz`` under ``cache`` (default
    ``$KERAS_AUTOPRUNE_CACHE`` or ``~/.cache/keras_autoprune``), keyed by the
    archive's size and modification time.
    """
    source = pathlib.Path(source)
    if not source.is_file():
        raise FileNotFoundError(
            f"Expected the CIFAR-10 archive (<split>/<class>/*.jpg in a .tar.gz). Received: {source}, which "
            "does not exist. Fix: pass --data PATH (the project's copy is ../shared/data/cifar10-jpeg.tar.gz)."
        )
    cache = pathlib.Path(cache or os.environ.get("KERAS_AUTOPRUNE_CACHE", pathlib.Path.home() / ".cache" / "keras_autoprune"))
    stat = source.stat()
    key = hashlib.sha1(repr((source.name, stat.st_size, int(stat.st_mtime))).encode()).hexdigest()[:16]
    cached = cache / "cifar10" / f"{key}.npz"
    if cached.exists():
        with np.load(cached) as arrays:
            return Cifar10(**{name: arrays[name] for name in arrays.files})
    arrays = _decode_archive(source)
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cached, **dataclasses.asdict(arrays))
    return arrays


def _decode_archive(source: pathlib.Path) -> Cifar10:
    from PIL import Image

    files: dict[tuple[str, str, str], np.ndarray] = {}
    with tarfile.open(source) as archive:
        for member in archive:
            parts = pathlib.PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            image = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
            files[parts[-3], parts[-2], parts[-1]] = np.asarray(image, dtype=np.uint8)
    splits = {}
    for split in ("train", "test"):
        keys = sorted(k for k in files if k[0] == split)
        classes = sorted({k[1] for k in keys})
        if len(classes) != 10:
            raise ValueError(f"Expected 10 class folders under '{split}/' in {source}. Received: {classes}")
        splits[split] = (np.stack([files[k] for k in keys]), np.asarray([classes.index(k[1]) for k in keys], np.int64))
    return Cifar10(*splits["train"], *splits["test"])


PROTOCOL_IMAGES = {"calibration": 1024, "batchnorm": 2048}
"""Training images every entry of the one-shot protocol reads: the methods' calibration set and the
BatchNormalization re-estimation set (`protocol_data`)."""


def protocol_data(data: Cifar10, seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed training images every entry shares (raw float32 pixels).

    ``calibration_x``/``calibration_y``: the first 1,024 of a permutation
    keyed by ``seed``, not augmented; ``batchnorm_x``: the next 2,048 (16
    batches of 128) **augmented** once (flip and crop, `augment` with
    ``(seed, epoch 0)``): BatchNormalization statistics re-estimated on the
    distribution the model was trained on. Re-estimated on the same images
    without augmentation, the unpruned ResNet-20 loses about 4 points
    (89.26% -> 85.15%); with it, nothing (see docs/benchmarks.md). Keras
    entries and the Torch-Pruning peer read the same arrays.
    """
    order = np.random.default_rng(seed).permutation(len(data.x_train))
    calibration = order[: PROTOCOL_IMAGES["calibration"]]
    batchnorm = order[PROTOCOL_IMAGES["calibration"] : PROTOCOL_IMAGES["calibration"] + PROTOCOL_IMAGES["batchnorm"]]
    batchnorm_x, _ = augment(data.x_train[batchnorm], data.y_train[batchnorm], seed=seed, epoch=0)
    return {
        "calibration_x": data.x_train[calibration].astype(np.float32),
        "calibration_y": data.y_train[calibration],
        "batchnorm_x": batchnorm_x,
    }


BATCHNORM_SET = "augmented"
"""Which re-estimation images protocol 1's rows used (`protocol_data`); result files record it, and rows
measured with another set are measured again."""


def augment(images: np.ndarray, labels: np.ndarray, seed: int, epoch: int, cutout: int = 0,
            fill: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of training data: a permutation, random flips and 4-pixel pad-and-crop, float32 pixels.

    Everything is drawn from ``default_rng((seed, epoch))``, so a resumed run
    sees the batches an uninterrupted one would have seen. ``cutout`` > 0
    then fills one ``cutout`` x ``cutout`` square per image (DeVries and
    Taylor, 2017: centre uniform over the image, clipped at its border) with
    ``fill``, by default the images' mean pixel, the value that normalisation
    maps to 0 (pass it to avoid recomputing it every epoch); its draws come
    after the others, so ``cutout=0`` gives the same batches as before.
    """
    rng = np.random.default_rng((seed, epoch))
    order = rng.permutation(len(images))
    flip = rng.random(len(images)) < 0.5
    dy, dx = rng.integers(0, 2 * _PAD + 1, size=(2, len(images)))
    padded = np.pad(images[order], ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)))
    size = images.shape[1]
    rows = dy[:, None] + np.arange(size)
    cols = dx[:, None] + np.arange(size)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    out = padded[np.arange(len(images))[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.float32)
    if cutout:
        centres = rng.integers(0, size, size=(2, len(images)))  # rows, columns
        offsets = np.arange(size)[None, None, :] - centres[:, :, None]
        inside = (offsets >= -(cutout // 2)) & (offsets < (cutout + 1) // 2)  # cutout positions, fewer at a border
        if fill is None:
            fill = images.reshape(-1, images.shape[-1]).mean(axis=0)
        out[inside[0][:, :, None] & inside[1][:, None, :]] = fill
    return out, labels[order]


ARCHITECTURES = {
    "resnet20": {"builder": "resnet_cifar", "kwargs": {"depth": 20}, "target_accuracy": 0.91},
    "mobilenetv2": {"builder": "mobilenetv2_cifar", "kwargs": {"alpha": 0.5}, "target_accuracy": 0.89},
}
"""Benchmark v2's base models: `keras_autoprune.zoo` builder, its arguments, the accuracy the issue asks for."""


def _zoo():
    """`keras_autoprune.zoo`; read from its file where the package cannot import (no TensorFlow on a JAX GPU machine)."""
    try:
        from keras_autoprune import zoo
    except ImportError:
        import importlib.util

        path = pathlib.Path(__file__).resolve().parents[1] / "keras_autoprune" / "zoo.py"
        spec = importlib.util.spec_from_file_location("keras_autoprune_zoo", path)
        zoo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(zoo)
    return zoo


def build(name: str, pixel_statistics: tuple[np.ndarray, np.ndarray]):
    """An untrained model of ``ARCHITECTURES[name]`` that reads raw pixels."""
    zoo = _zoo()
    if name not in ARCHITECTURES:
        raise ValueError(f"Expected one of {sorted(ARCHITECTURES)}. Received: {name!r}")
    spec = ARCHITECTURES[name]
    return getattr(zoo, spec["builder"])(**spec["kwargs"], pixel_statistics=pixel_statistics)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training recipe of the converged models (see the module docstring)."""

    epochs: int = 150
    batch_size: int = 128
    peak_learning_rate: float = 0.1
    warmup_epochs: int = 2
    weight_decay: float = 5e-3
    momentum: float = 0.9
    seed: int = 0
    cutout: int = 0

    def learning_rate(self, epoch: int, epochs: int) -> float:
        """Linear warm-up to the peak over ``warmup_epochs``, then cosine to 0 at ``epochs``:
        ``lr_e = peak (e + 1) / W`` for ``e < W``, else ``peak (1 + cos(pi (e - W) / (E - W))) / 2``."""
        if epoch < self.warmup_epochs:
            return self.peak_learning_rate * (epoch + 1) / self.warmup_epochs
        progress = (epoch - self.warmup_epochs) / max(1, epochs - self.warmup_epochs)
        return 0.5 * self.peak_learning_rate * (1.0 + math.cos(math.pi * progress))


def compile_with(model, recipe: Recipe) -> None:
    """Compiles ``model`` for the recipe: SGD with Nesterov momentum and decoupled weight decay, cross-entropy on logits."""
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(recipe.peak_learning_rate, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def test_accuracy(model, data: Cifar10, batch_size: int = 500) -> float:
    """Top-1 accuracy on the 10,000 test images (raw pixels in, logits out)."""
    logits = model.predict(data.x_test.astype(np.float32), batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == data.y_test))


def train(
    name: str,
    out_dir: str | os.PathLike,
    data: Cifar10,
    recipe: Recipe = Recipe(),
    *,
    seconds: float | None = None,
    stage_epochs: int | None = None,
    checkpoint_every: int = 1,
    init_from: str | os.PathLike | None = None,
    log=print,
) -> dict | None:
    """Trains (or continues) ``name`` into ``out_dir``; returns its record when training is complete.

    Writes ``<name>.keras`` and ``<name>.json`` (recipe, epochs, history,
    test accuracy, seconds, machine) when done; ``<name>.checkpoint.keras``
    and ``<name>.progress.json`` in between. Returns None when
    ``stage_epochs`` stopped it early (call again to continue).
    ``init_from`` starts from that model's weights (a second training cycle
    with a fresh optimizer) instead of a new initialisation.
    """
    import keras

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, progress_path = out_dir / f"{name}.checkpoint.keras", out_dir / f"{name}.progress.json"
    if checkpoint.exists() and progress_path.exists():
        progress = json.loads(progress_path.read_text())
        _check_same_run(progress, recipe, init_from, checkpoint)
        model = keras.saving.load_model(checkpoint)
        log(f"{name}: continuing after epoch {progress['epoch']} of {progress['epochs']}")
    else:
        keras.utils.set_random_seed(recipe.seed)
        model = keras.saving.load_model(init_from, compile=False) if init_from else build(name, data.pixel_statistics())
        compile_with(model, recipe)
        progress = {"epoch": 0, "epochs": recipe.epochs, "seconds": 0.0, "history": [], "recipe": dataclasses.asdict(recipe)}
        if init_from:
            progress["init_from"] = {"file": pathlib.Path(init_from).name, "sha256": sha256(init_from)}
    start, stage_start = time.perf_counter() - progress["seconds"], progress["epoch"]
    fill = data.pixel_statistics()[0] if recipe.cutout else None  # the mean pixel, once
    while progress["epoch"] < progress["epochs"]:
        epoch = progress["epoch"]
        lr = recipe.learning_rate(epoch, progress["epochs"])
        model.optimizer.learning_rate = lr
        epoch_start = time.perf_counter()
        x, y = augment(data.x_train, data.y_train, recipe.seed, epoch, cutout=recipe.cutout, fill=fill)
        logs = model.fit(x, y, batch_size=recipe.batch_size, epochs=1, shuffle=False, verbose=0).history
        epoch_seconds = time.perf_counter() - epoch_start  # augmentation and fit: what the time plan needs
        progress["epoch"] = epoch = epoch + 1
        progress["seconds"] = time.perf_counter() - start
        row = {"epoch": epoch, "lr": lr, "loss": logs["loss"][0], "accuracy": logs["accuracy"][0], "seconds": epoch_seconds}
        if epoch % 10 == 0 or epoch == progress["epochs"]:
            row["test_accuracy"] = test_accuracy(model, data)
        progress["history"].append(row)
        log(f"{name} epoch {epoch}/{progress['epochs']} lr {lr:.4f} loss {row['loss']:.4f} acc {row['accuracy']:.4f}"
            + (f" test {row['test_accuracy']:.4f}" if "test_accuracy" in row else "") + f" ({epoch_seconds:.1f} s)")
        if seconds is not None and epoch == recipe.warmup_epochs:
            progress["epochs"] = _epochs_that_fit(recipe, progress, seconds)
            log(f"{name}: {progress['epochs']} epochs fit in {seconds:.0f} s")
        stage_done = stage_epochs is not None and epoch - stage_start >= stage_epochs
        if epoch < progress["epochs"] and (epoch % checkpoint_every == 0 or stage_done):
            model.save(checkpoint)
            progress_path.write_text(json.dumps(progress))
        if stage_done and epoch < progress["epochs"]:
            return None
    record = {
        "model": name,
        "file": f"{name}.keras",
        "architecture": ARCHITECTURES[name],
        "recipe": dataclasses.asdict(recipe),
        "epochs": progress["epochs"],
        "test_accuracy": test_accuracy(model, data),
        "train_seconds": progress["seconds"],
        "machine": machine_description(),
        "history": progress["history"],
        **({"init_from": progress["init_from"]} if "init_from" in progress else {}),
    }
    _save_inference_model(model, out_dir / f"{name}.keras")
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
    checkpoint.unlink(missing_ok=True)
    progress_path.unlink(missing_ok=True)
    return record


def _check_same_run(progress: dict, recipe: Recipe, init_from, checkpoint: pathlib.Path) -> None:
    """Refuses to continue a checkpoint with another recipe or starting point than the one it was begun with.

    The learning rate of every epoch comes from the recipe given now, so a
    resumed stage with other options would silently train another schedule.
    ``epochs`` may differ (``--seconds`` plans it after the warm-up).
    """
    stored = {k: v for k, v in progress.get("recipe", {}).items() if k != "epochs"}
    given = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "epochs"}
    changed = {k: (stored[k], given[k]) for k in stored if k in given and stored[k] != given[k]}
    started_from = progress.get("init_from", {}).get("file")
    if init_from is not None and pathlib.Path(init_from).name != started_from:
        changed["init_from"] = (started_from, pathlib.Path(init_from).name)
    if changed:
        details = ", ".join(f"{k}: begun with {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"{checkpoint} was begun with another recipe ({details}). Repeat the command with the "
                         f"options it was begun with, or delete {checkpoint.name} and {checkpoint.stem.split('.')[0]}"
                         f".progress.json to start again.")


def _save_inference_model(model, path: pathlib.Path) -> None:
    """Saves ``model`` without its optimizer state (an uncompiled reload of it): the file users load."""
    import tempfile

    import keras

    with tempfile.TemporaryDirectory() as folder:
        model.save(pathlib.Path(folder) / "model.keras")
        keras.saving.load_model(pathlib.Path(folder) / "model.keras", compile=False).save(path)


def _epochs_that_fit(recipe: Recipe, progress: dict, seconds: float) -> int:
    """Epochs (warm-up included) that end within ``seconds``, from the slower of the warm-up epochs after the first."""
    epoch_seconds = max(row["seconds"] for row in progress["history"][1:]) if len(progress["history"]) > 1 else progress["history"][0]["seconds"]
    remaining = seconds - progress["seconds"] - 5.0  # the final evaluation and save
    return int(min(recipe.epochs, recipe.warmup_epochs + max(1, remaining // (1.1 * epoch_seconds))))


def machine_description() -> str:
    import keras

    devices = []
    if keras.backend.backend() == "jax":
        import jax

        devices = sorted({d.device_kind for d in jax.devices() if d.platform == "gpu"})
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_physical_devices("GPU")]
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Keras {keras.__version__} ({keras.backend.backend()}), " + (
        f"GPU: {', '.join(devices)}" if devices else "no GPU"
    )


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def verify(models_dir: str | os.PathLike = MODELS_DIR, data: Cifar10 | None = None, log=print) -> dict[str, float]:
    """Loads every model of ``manifest.json`` in safe mode, checks its sha256 and re-measures its test accuracy.

    Raises:
        ValueError: a file's digest or accuracy differs from the manifest (by more than 0.05 points).
    """
    import keras

    models_dir = pathlib.Path(models_dir)
    manifest = json.loads((models_dir / "manifest.json").read_text())
    data = data or load_cifar10()
    measured = {}
    for name, entry in manifest["models"].items():
        path = models_dir / entry["file"]
        if sha256(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the manifest's {entry['sha256']}")
        measured[name] = test_accuracy(keras.saving.load_model(path, compile=False), data)
        log(f"{name}: test accuracy {measured[name]:.4f} (manifest {entry['test_accuracy']:.4f})")
        if abs(measured[name] - entry["test_accuracy"]) > 5e-4:
            raise ValueError(f"{name}: measured {measured[name]:.4f}, manifest says {entry['test_accuracy']:.4f}")
    return measured


def write_manifest(models_dir: str | os.PathLike = MODELS_DIR, data: Cifar10 | None = None, notes: dict | None = None) -> dict:
    """Writes ``manifest.json`` from the training records ``<name>.json`` beside the models.

    Each entry: file, sha256, test accuracy measured now on this machine
    (and the one measured where it trained), epochs, recipe, seed, training
    seconds and machine, and the command that retrains it.
    """
    import keras

    models_dir = pathlib.Path(models_dir)
    data = data or load_cifar10()
    notes = notes or {}
    models = {}
    for name in ARCHITECTURES:
        record_path = models_dir / f"{name}.json"
        if not record_path.exists():
            continue
        record = json.loads(record_path.read_text())
        path = models_dir / record["file"]
        models[name] = {
            "file": record["file"],
            "sha256": sha256(path),
            "test_accuracy": test_accuracy(keras.saving.load_model(path, compile=False), data),
            "test_accuracy_where_trained": record["test_accuracy"],
            "target_accuracy": ARCHITECTURES[name]["target_accuracy"],
            "architecture": record["architecture"],
            "epochs": record["epochs"],
            "recipe": record["recipe"],
            "seed": record["recipe"]["seed"],
            "train_seconds": round(record["train_seconds"], 1),
            "machine": record["machine"],
            "measured_on": machine_description(),
            "retrain": f"python -m benchmarks.converged train {name} --epochs {record['epochs']} --out benchmarks/models/staging"
            " (add KERAS_BACKEND=jax on a GPU machine without TensorFlow; on the CPU repeat it with --stage-epochs N)",
            **({"notes": notes[name]} if name in notes else {}),
        }
    manifest = {"data": "CIFAR-10 JPEG archive decoded with Pillow (benchmarks.converged.load_cifar10); 10,000 test images",
                "input": "raw RGB pixels in [0, 255], float32, (N, 32, 32, 3); output: logits of 10 classes",
                "models": models}
    (models_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.converged", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="train (or continue training) a base model")
    run.add_argument("model", choices=sorted(ARCHITECTURES))
    run.add_argument("--out", default=str(MODELS_DIR / "staging"), help="folder of the checkpoint and the result")
    run.add_argument("--data", default=str(DEFAULT_SOURCE))
    run.add_argument("--epochs", type=int, default=Recipe.epochs)
    run.add_argument("--seconds", type=float, help="plan the epochs after the warm-up to end within this time")
    run.add_argument("--stage-epochs", type=int, help="stop after this many epochs (continue with the same command)")
    run.add_argument("--checkpoint-every", type=int, default=1)
    run.add_argument("--init-from", help="start from this .keras model's weights (a second cycle, fresh optimizer)")
    run.add_argument("--peak-learning-rate", type=float, default=Recipe.peak_learning_rate)
    run.add_argument("--warmup-epochs", type=int, default=Recipe.warmup_epochs)
    run.add_argument("--weight-decay", type=float, default=Recipe.weight_decay)
    run.add_argument("--seed", type=int, default=Recipe.seed)
    run.add_argument("--cutout", type=int, default=Recipe.cutout, help="side of the square each training image loses "
                     "(filled with the mean pixel; 0: none)")
    check = sub.add_parser("verify", help="check the committed models against manifest.json")
    check.add_argument("--data", default=str(DEFAULT_SOURCE))
    args = parser.parse_args(argv)
    data = load_cifar10(args.data)
    if args.command == "verify":
        verify(data=data)
        return 0
    log = lambda line: print(line, flush=True)  # noqa: E731
    recipe = Recipe(epochs=args.epochs, peak_learning_rate=args.peak_learning_rate, warmup_epochs=args.warmup_epochs,
                    weight_decay=args.weight_decay, seed=args.seed, cutout=args.cutout)
    record = train(args.model, args.out, data, recipe, seconds=args.seconds, stage_epochs=args.stage_epochs,
                   checkpoint_every=args.checkpoint_every, init_from=args.init_from, log=log)
    if record is not None:
        print(f"{args.model}: {record['test_accuracy']:.4f} after {record['epochs']} epochs in {record['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
