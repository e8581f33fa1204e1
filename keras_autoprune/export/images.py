"""Image samples for calibration and verification, from a folder or TFDS.

`load_images` reads images for ``representative_data`` (used by the
``keras-autoprune export --data`` command):

- a folder with one subfolder per class holding JPEG / PNG files
  (``root/<class>/*.jpg``; with ``split``, ``root/<split>/<class>/*.jpg``,
  the layout of ``tfds.ImageFolder``). Classes are taken in turn, files in
  name order, so that a few samples cover every class;
- or, when ``source`` is not a directory, a TensorFlow Datasets name such
  as ``"cifar10"`` (needs ``tensorflow-datasets``; split ``"train"`` by
  default), whose ``"image"`` feature is used.

Each image is decoded with the model's number of channels, resized
(bilinear) to the model's input height and width when it differs, and
scaled by ``scale``:

- ``"unit"`` (the default): ``x / 255``, in ``[0, 1]``;
- ``"symmetric"``: ``x / 127.5 - 1``, in ``[-1, 1]`` (MobileNet-style);
- ``"none"``: raw pixel values in ``[0, 255]`` (for models that rescale
  inside, such as EfficientNet or MobileNetV3 with preprocessing).

Example:

>>> x = load_images("data/images", (32, 32, 3), num_samples=100)   # doctest: +SKIP
>>> x.shape, float(x.min()) >= 0.0, float(x.max()) <= 1.0          # doctest: +SKIP
((100, 32, 32, 3), True, True)
"""

from __future__ import annotations

import itertools
import os
import pathlib
from typing import Any

import numpy as np
import tensorflow as tf

SCALES = {
    "unit": (1 / 255, 0.0),
    "symmetric": (1 / 127.5, -1.0),
    "none": (1.0, 0.0),
}
"""``scale`` name -> ``(multiplier, offset)``: ``x * multiplier + offset``."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_images(
    source: str | os.PathLike,
    image_shape: tuple[int, int, int],
    num_samples: int = 100,
    scale: str = "unit",
    split: str | None = None,
) -> np.ndarray:
    """Returns up to ``num_samples`` images as a float32 array ``(n, H, W, C)``.

    Args:
        source: an image folder, or a TFDS name (see the module docstring).
        image_shape: ``(H, W, C)`` of the model input, ``C`` 1 or 3.
        num_samples: how many images at most. Defaults to 100.
        scale: ``"unit"``, ``"symmetric"`` or ``"none"``. Defaults to "unit".
        split: subfolder of ``source`` (folder) or TFDS split. Defaults to
            None: the folder itself, or TFDS's ``"train"``.

    Raises:
        ValueError: bad ``scale`` or ``image_shape``, a folder without
            images, or a name TFDS cannot load.
    """
    if scale not in SCALES:
        raise ValueError(f"Expected `scale` to be one of {list(SCALES)}. Received: scale={scale!r}")
    if len(image_shape) != 3 or any(d is None for d in image_shape) or image_shape[-1] not in (1, 3):
        raise ValueError(
            "Expected an image input shape (height, width, channels) with 1 or 3 channels "
            f"and known sizes. Received: image_shape={tuple(image_shape)}. Fix: pass "
            "representative data as arrays for models with other inputs."
        )
    path = pathlib.Path(source)
    if path.is_dir():
        encoded = _folder_images(path / split if split else path, num_samples)
    else:
        encoded = _tfds_images(str(source), split or "train", num_samples)
    images = [_prepare(image, image_shape) for image in encoded]
    multiplier, offset = SCALES[scale]
    return (np.stack(images) * multiplier + offset).astype(np.float32)


def _folder_images(root: pathlib.Path, num_samples: int) -> list[tf.Tensor]:
    if not root.is_dir():
        raise ValueError(f"Expected an image folder. Received: '{root}', which is not a directory.")
    folders = sorted(p for p in root.iterdir() if p.is_dir()) or [root]
    per_class = [sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for folder in folders]
    files = [f for group in itertools.zip_longest(*per_class) for f in group if f is not None]
    if not files:
        raise ValueError(
            f"Expected class subfolders of JPEG / PNG files in '{root}' (root/<class>/*.jpg). "
            f"Received: no {', '.join(IMAGE_SUFFIXES)} files in {len(folders)} folder(s)."
        )
    return [tf.io.read_file(str(f)) for f in files[:num_samples]]


def _tfds_images(name: str, split: str, num_samples: int) -> list[tf.Tensor]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError(
            f"Expected an image folder or a TensorFlow Datasets name. Received: '{name}', "
            "which is not a directory, and `tensorflow_datasets` is not installed. Fix: "
            "pass a folder of class subfolders, or `pip install tensorflow-datasets`."
        ) from None
    try:
        dataset = tfds.load(name, split=split)
    except Exception as error:  # noqa: BLE001 - TFDS raises many types.
        raise ValueError(
            f"Expected an image folder or a TensorFlow Datasets name. Received: '{name}', "
            f"which is not a directory, and TFDS could not load split '{split}': "
            f"{type(error).__name__}: {error}"
        ) from None
    return [element["image"] for element in dataset.take(num_samples)]


def _prepare(image: Any, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Decodes (if encoded), fixes the channels, resizes; values stay 0-255."""
    height, width, channels = image_shape
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    elif image.shape[-1] != channels:
        image = tf.image.grayscale_to_rgb(image) if channels == 3 else tf.image.rgb_to_grayscale(image)
    image = tf.cast(image, tf.float32)
    if tuple(image.shape[:2]) != (height, width):
        image = tf.image.resize(image, (height, width))
    return image.numpy()
