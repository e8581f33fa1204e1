"""CIFAR-10 for the benchmarks: subsets, normalisation, deterministic augmentation.

Images come from `keras_autoprune.datasets.load_images` (a folder, a
``.tar.gz`` such as the default ``../shared/data/cifar10-jpeg.tar.gz``, or a
TFDS name; decoded arrays are cached). Training images are kept as uint8 and
normalised per channel with the training subset's mean and standard
deviation; the same normalisation applies to test, calibration and export
data.

Augmentation is the standard CIFAR one (random horizontal flip, 4-pixel zero
padding and a random 32x32 crop) done with stateless TensorFlow ops keyed by
``(seed, epoch, image)``, and each epoch's order is a permutation keyed by
``(seed, epoch)``: every entry of a run sees exactly the same batches, and a
resumed run continues with the batches it would have seen.

This module imports neither Keras nor keras_autoprune at import time, so that
the TFMOT peer process (legacy ``tf_keras``) can use it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

DEFAULT_SOURCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
"""``../shared/data/cifar10-jpeg.tar.gz`` relative to the repository root."""

_PAD = 4


@dataclasses.dataclass
class BenchData:
    """Normalised benchmark data.

    Attributes:
        x_train: uint8 training images ``(N, 32, 32, 3)`` (normalised on the fly).
        y_train: int64 labels.
        x_test: float32 normalised test images; y_test: labels.
        mean, std: per-channel statistics of ``x_train / 255``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> float32 ``(x / 255 - mean) / std``."""
        return ((images.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)

    def calibration(self, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``count`` normalised training images, drawn without replacement (all classes)."""
        index = np.random.default_rng(seed).permutation(len(self.x_train))[:count]
        return self.normalise(self.x_train[index]), self.y_train[index]

    def test_sample(self, count: int, seed: int = 0) -> np.ndarray:
        """``count`` normalised test images in a fixed random order (export checks)."""
        return self.x_test[np.random.default_rng(seed).permutation(len(self.x_test))[:count]]

    def save(self, path: str | os.PathLike) -> None:
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "BenchData":
        with np.load(path) as arrays:
            return cls(**{field.name: arrays[field.name] for field in dataclasses.fields(cls)})


def load(
    source: str | os.PathLike = DEFAULT_SOURCE,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
) -> BenchData:
    """Loads CIFAR-10 (the first ``*_per_class`` images of each class) and normalises it."""
    from keras_autoprune.datasets import load_images

    x_train, y_train, _ = load_images(source, "train", max_per_class=train_per_class)
    x_test, y_test, _ = load_images(source, "test", max_per_class=test_per_class)
    mean = x_train.mean(axis=(0, 1, 2)).astype(np.float32)
    std = x_train.std(axis=(0, 1, 2)).astype(np.float32)
    x_train = np.round(x_train * 255.0).astype(np.uint8)  # load_images returns uint8 / 255
    return BenchData(x_train, y_train, ((x_test - mean) / std).astype(np.float32), y_test, mean, std)


def load_converged(source: str | os.PathLike = DEFAULT_SOURCE) -> BenchData:
    """All of CIFAR-10 for a converged base model (`benchmarks.converged`), which reads raw pixels.

    The images are `converged.load_cifar10`'s (Pillow-decoded, as the model
    was trained); ``mean = 0`` and ``std = 1/255`` make `BenchData.normalise`
    return raw pixel values in [0, 255] (to float32 rounding), so the
    augmentation, calibration and export data of the other profiles apply
    unchanged.
    """
    from benchmarks.converged import load_cifar10

    arrays = load_cifar10(source)
    mean, std = np.zeros(3, np.float32), np.full(3, 1.0 / 255.0, np.float32)
    data = BenchData(arrays.x_train, arrays.y_train, arrays.x_test, arrays.y_test, mean, std)
    return dataclasses.replace(data, x_test=data.normalise(arrays.x_test))


def train_dataset(data: BenchData, batch_size: int, seed: int, first_epoch: int, last_epoch: int):
    """Augmented batches of epochs ``first_epoch .. last_epoch - 1``, one after the other.

    Each epoch has ``len(x_train) // batch_size`` full batches (pass that as
    ``steps_per_epoch`` to ``fit``).
    """
    import tensorflow as tf

    count = len(data.x_train)
    images = tf.constant(data.x_train)
    labels = tf.constant(data.y_train)
    mean, std = tf.constant(data.mean), tf.constant(data.std)

    def augment(epoch, index):
        key = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + epoch, index])
        image = (tf.cast(tf.gather(images, index), tf.float32) / 255.0 - mean) / std
        image = tf.image.stateless_random_flip_left_right(image, key)
        image = tf.pad(image, [[_PAD, _PAD], [_PAD, _PAD], [0, 0]])
        image = tf.image.stateless_random_crop(image, tf.shape(images)[1:], key + 1)
        return image, tf.gather(labels, index)

    def epoch_batches(epoch):
        order = tf.argsort(tf.random.stateless_uniform([count], tf.stack([tf.cast(seed, tf.int64), epoch])))
        order = tf.cast(order, tf.int64)
        return (
            tf.data.Dataset.from_tensor_slices(order)
            .map(lambda index: augment(epoch, index), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size, drop_remainder=True)
        )

    epochs = tf.data.Dataset.range(first_epoch, last_epoch)
    return epochs.flat_map(epoch_batches).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(data: BenchData, batch_size: int) -> int:
    return len(data.x_train) // batch_size
