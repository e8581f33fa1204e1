"""Image samples for calibration and verification, from a folder or TFDS.

`load_images` reads images for ``representative_data`` (used by the
``keras-autoprune export --data`` command):

- a folder with one subfolder per class holding JPEG / PNG files
  (``root/<class>/*.jpg``; with ``split``, ``root/<split>/<class>/*.jpg``,
  the layout of ``tfds.ImageFolder``), or a ``.tar.gz`` of one;
- or a TensorFlow Datasets name such as ``"cifar10"`` (needs
  ``tensorflow-datasets``; split ``"train"`` by default).

Reading and decoding is `keras_autoprune.datasets.load_images` (with its
cache); here classes are taken in turn, files in name order, so that a few
samples cover every class.

Each image is decoded as RGB (a single-channel model gets the mean of R, G
and B, `to_channels`), resized
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

import os

import numpy as np

from keras_autoprune import datasets

SCALES = {
    "unit": (1.0, 0.0),
    "symmetric": (2.0, -1.0),
    "none": (255.0, 0.0),
}
"""``scale`` name -> ``(multiplier, offset)`` applied to pixels in ``[0, 1]``."""


def load_images(
    source: str | os.PathLike,
    image_shape: tuple[int, int, int],
    num_samples: int = 100,
    scale: str = "unit",
    split: str | None = None,
) -> np.ndarray:
    """Returns up to ``num_samples`` images as a float32 array ``(n, H, W, C)``.

    Args:
        source: an image folder or archive, or a TFDS name (see the module
            docstring).
        image_shape: ``(H, W, C)`` of the model input, ``C`` 1 or 3.
        num_samples: how many images at most. Defaults to 100.
        scale: ``"unit"``, ``"symmetric"`` or ``"none"``. Defaults to "unit".
        split: subfolder of ``source`` (folder) or TFDS split. Defaults to
            None: ``"train"``, i.e. ``source/train`` if the folder has one,
            else the folder itself (``source/<class>/*``), or TFDS's
            ``"train"``.

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
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"Expected `num_samples` to be a positive integer. Received: num_samples={num_samples!r}")
    height, width, channels = image_shape
    try:
        x, y, _ = datasets.load_images(source, split or "train", image_size=(height, width), max_per_class=num_samples)
    except (FileNotFoundError, ImportError) as error:
        raise ValueError(str(error)) from None
    multiplier, offset = SCALES[scale]
    return (to_channels(x[classes_in_turn(y, num_samples)], channels) * multiplier + offset).astype(np.float32)


def classes_in_turn(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to ``count`` examples taking the classes in turn: each class's first, then each one's second, ...

    A folder of images comes grouped by class; its first ``count`` images
    would calibrate and verify an export on one class only.
    """
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), np.int64)  # position of each example within its class
    for label in np.unique(labels):
        rank[labels == label] = np.arange(np.sum(labels == label))
    return np.lexsort((labels, rank))[:count]


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """RGB images (``N, H, W, 3``) as the model's ``channels``: unchanged for 3, the mean of R, G and B for 1."""
    return images.mean(axis=-1, keepdims=True) if channels == 1 else images
