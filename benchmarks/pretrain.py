"""The pretrained baseline of a profile: trained once, cached, shared by every entry.

``<cache>/<profile>/pretrain-<key>/model.keras`` (``key`` digests the
architecture, data subset and schedule, `Profile.pretrain_key`) and
``meta.json`` (test accuracy, epochs, training seconds). A profile with a
deadline (``gpu``) saves ``checkpoint.keras`` (weights and optimizer state)
when it stops early and continues from it on the next invocation.
Pretraining always uses seed 0: the ``--seeds`` of a run vary the
fine-tuning only. A profile with a ``base_model`` (``v2``) is not
pretrained: the committed converged model is copied into the folder.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import keras

from benchmarks.data import BenchData
from benchmarks.profiles import Profile, learning_rate
from benchmarks.stages import Deadline, StageIncomplete
from benchmarks.training import compile_model, fit_epochs
from keras_autoprune.evaluation import accuracy
from keras_autoprune.zoo import resnet_cifar

PRETRAIN_SEED = 0


CPU_EPOCH_SECONDS = 360.0
"""Seconds of one 50,000-image ResNet-20 epoch on two CPU cores (measured), the stage planning of a converged base model."""


def _manifest_entry(name: str) -> dict:
    """The committed converged model ``name``'s entry of ``benchmarks/models/manifest.json``."""
    from benchmarks import converged

    return json.loads((converged.MODELS_DIR / "manifest.json").read_text())["models"][name]


def _use_converged(name: str, folder: pathlib.Path) -> dict:
    """Copies the committed converged model ``name`` into ``folder``; its manifest entry becomes the meta."""
    from benchmarks import converged

    entry = _manifest_entry(name)
    source = converged.MODELS_DIR / entry["file"]
    if converged.sha256(source) != entry["sha256"]:
        raise ValueError(f"{source} differs from its manifest entry (sha256); run `python -m benchmarks.converged verify`.")
    shutil.copyfile(source, folder / "model.keras")
    # ``train_seconds`` plans stages on the CPU; ``trained_seconds`` is what the committed training took, where it ran.
    meta = {"accuracy": entry["test_accuracy"], "epochs": entry["epochs"], "train_seconds": CPU_EPOCH_SECONDS * entry["epochs"],
            "trained_seconds": entry["train_seconds"], "base_model": name, "sha256": entry["sha256"],
            "trained_on": entry["machine"]}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return dict(meta, cached=False)


def pretrained_path(profile: Profile, cache_root: pathlib.Path) -> pathlib.Path:
    """Folder of the profile's pretrained model."""
    return pathlib.Path(cache_root) / profile.name / f"pretrain-{profile.pretrain_key()}"


def load_pretrained(folder: pathlib.Path) -> keras.Model:
    """A fresh copy of the cached pretrained model (not compiled)."""
    return keras.saving.load_model(pathlib.Path(folder) / "model.keras", compile=False)


def pretrain(
    profile: Profile,
    data: BenchData,
    cache_root: pathlib.Path,
    deadline: Deadline | None = None,
    verbose: int = 0,
) -> dict:
    """Trains (or resumes, or reuses) the pretrained model; returns its ``meta.json`` content.

    Raises:
        StageIncomplete: the deadline stopped training; the checkpoint is saved.
    """
    folder = pretrained_path(profile, cache_root)
    meta_path = folder / "meta.json"
    if meta_path.exists() and (folder / "model.keras").exists():
        meta = json.loads(meta_path.read_text())
        if profile.base_model is None or meta.get("sha256") == _manifest_entry(profile.base_model)["sha256"]:
            return dict(meta, cached=True)
    folder.mkdir(parents=True, exist_ok=True)
    if profile.base_model is not None:  # first use, or the committed model changed since the copy
        return _use_converged(profile.base_model, folder)
    checkpoint, progress_path = folder / "checkpoint.keras", folder / "checkpoint.json"
    if checkpoint.exists() and progress_path.exists():
        model = keras.saving.load_model(checkpoint)
        progress = json.loads(progress_path.read_text())
    else:
        keras.utils.set_random_seed(PRETRAIN_SEED)
        model = resnet_cifar(profile.depth, width=profile.width)
        compile_model(model, keras, profile.pretrain_lr, profile.weight_decay)
        progress = {"epochs": 0, "seconds": 0.0}
    fit = fit_epochs(
        model, data, batch_size=profile.batch_size, seed=PRETRAIN_SEED, first=progress["epochs"],
        last=profile.pretrain_epochs, keras_module=keras, deadline=deadline, verbose=verbose,
        learning_rate=lambda e: learning_rate(e, profile.pretrain_lr, profile.pretrain_epochs, profile.pretrain_schedule),
    )
    progress = {"epochs": fit.end_epoch, "seconds": progress["seconds"] + fit.seconds}
    if fit.end_epoch < profile.pretrain_epochs:
        model.save(checkpoint)
        progress_path.write_text(json.dumps(progress))
        raise StageIncomplete(f"pretraining stopped after epoch {fit.end_epoch} of {profile.pretrain_epochs}")
    meta = {
        "accuracy": accuracy(model, (data.x_test, data.y_test)),
        "epochs": profile.pretrain_epochs,
        "train_seconds": progress["seconds"],
        "key": profile.pretrain_key(),
    }
    model.save(folder / "model.keras")
    meta_path.write_text(json.dumps(meta, indent=1))
    for stale in (checkpoint, progress_path):
        stale.unlink(missing_ok=True)
    return dict(meta, cached=False)
