"""Image data for the demo, the examples and the benchmarks, offline first.

`load_images(source, split)` takes either

- a folder laid out as ``<root>/<split>/<class>/*.jpg|png`` (or directly
  ``<root>/<class>/*`` when there is no split level), as written by
  ``tfds.ImageFolder`` users and by the CIFAR-10 archive of this project;
- a ``.tar.gz`` / ``.tgz`` archive of such a folder, extracted once into the
  cache directory;
- a TensorFlow Datasets name (``"cifar10"``, ``"tfds:mnist"``), which needs
  `tensorflow-datasets` and network access the first time.

Decoded arrays are cached as ``.npz`` (decoding CIFAR-10's 60,000 JPEGs takes
about 20 s on two cores), so later runs load in a second. Class ids follow
the alphabetical order of the class folders; pass the training split's
``class_names`` when loading another split, so that a class missing from it
does not shift the ids of the others.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import tarfile

import numpy as np

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}


def cache_dir() -> pathlib.Path:
    """``$KERAS_AUTOPRUNE_CACHE`` or ``~/.cache/keras_autoprune``."""
    default = pathlib.Path.home() / ".cache" / "keras_autoprune"
    return pathlib.Path(os.environ.get("KERAS_AUTOPRUNE_CACHE", default))


def load_images(
    source: str | os.PathLike,
    split: str = "train",
    image_size: tuple[int, int] | None = None,
    max_per_class: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Loads labelled images as arrays.

    Args:
        source: folder, archive or TFDS name (see the module docstring).
        split: ``"train"`` or ``"test"`` (any sub-folder name of the root).
        image_size: ``(height, width)`` to resize to; default: keep the size
            (all images of the split must then share it).
        max_per_class: keep at most this many images per class (the first
            in file-name order), for quick runs; an integer >= 1 or None (all).
        class_names: the class of each id, usually the ``class_names`` that
            loading the training split returned; a split's class folders
            must be among them (a folder may be missing) and take their ids.
            Default: the split's own folders, in alphabetical order.

    Returns:
        ``(x, y, class_names)``: ``x`` float32 in ``[0, 1]`` of shape
        ``(N, H, W, 3)``, ``y`` int64 class ids.

    Raises:
        FileNotFoundError: ``source`` does not exist, or has no ``split`` sub-folder.
        ValueError: bad arguments, a split without images, class folders not
            in ``class_names``, or images of different sizes without ``image_size``.
    """
    if max_per_class is not None and (isinstance(max_per_class, bool) or not isinstance(max_per_class, int)
                                      or max_per_class < 1):
        raise ValueError(f"Expected max_per_class to be an integer >= 1 or None (every image). "
                         f"Received: max_per_class={max_per_class!r}")
    if class_names is not None and (isinstance(class_names, str) or len(set(class_names)) != len(class_names)):
        raise ValueError(f"Expected class_names to be a list of distinct class names (the ids' order). "
                         f"Received: class_names={class_names!r}")
    path = pathlib.Path(source)
    if path.exists():
        return _load_folder(_extracted(path), split, image_size, max_per_class, class_names)
    name = _tfds_name(source)
    if name is not None:
        return _load_tfds(name, split, image_size, max_per_class, class_names)
    raise FileNotFoundError(_missing(source))


def check_image_source(source: str | os.PathLike) -> None:
    """Raises ValueError unless `load_images` can start on ``source``, without reading any image.

    It must be an existing folder or archive, or a TFDS name (``"cifar10"``,
    ``"tfds:cifar10"``) with tensorflow-datasets installed.
    """
    if pathlib.Path(source).exists():
        return
    name = _tfds_name(source)
    if name is None:
        raise ValueError(_missing(source))
    if importlib.util.find_spec("tensorflow_datasets") is None:
        raise ValueError(f"Loading the TFDS data set '{name}' needs tensorflow-datasets. Received: --data {str(source)!r}. "
                         'Fix: pip install "keras-autoprune[bench]", or pass an image folder instead.')


def _tfds_name(source: str | os.PathLike) -> str | None:
    """The TFDS name ``source`` stands for (``tfds:NAME``, or a bare name without a folder or suffix), else None."""
    name = str(source).removeprefix("tfds:")
    if str(source).startswith("tfds:") or ("/" not in name and not pathlib.Path(name).suffix):
        return name
    return None


def _missing(source: str | os.PathLike) -> str:
    return ("Expected an image folder (<root>/<split>/<class>/*.jpg), a .tar.gz of one, or a TFDS name "
            f"such as 'cifar10'. Received: source={str(source)!r}, which does not exist.")


def _extracted(path: pathlib.Path) -> pathlib.Path:
    if path.is_dir():
        return path
    if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise ValueError(f"Expected a folder or a .tar.gz / .tgz / .tar archive. Received: {path}")
    stat = path.stat()  # a replaced archive (even of the same size) is extracted again
    target = cache_dir() / "extracted" / _digest(path.resolve(), stat.st_size, stat.st_mtime_ns)
    marker = target / ".complete"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as archive:
            archive.extractall(target, filter="data")
        marker.touch()
    children = [p for p in target.iterdir() if p.is_dir()]
    return children[0] if len(children) == 1 and not _has_images(children[0]) and _split_dirs(children[0]) else target


def _split_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in root.iterdir() if p.is_dir()]


def _has_images(folder: pathlib.Path) -> bool:
    return any(p.suffix.lower() in _IMAGE_SUFFIXES for p in folder.iterdir())


def _load_folder(root, split, image_size, max_per_class, class_names):
    if (root / split).is_dir():
        split_root = root / split
    elif split == "train":  # a folder without split level, <root>/<class>/*, holds one split: the training images
        split_root = root
    else:
        raise FileNotFoundError(
            f"Expected a '{split}' sub-folder in {root} (layout <root>/<split>/<class>/*.jpg). Received: a folder "
            f"without it (sub-folders: {sorted(p.name for p in root.iterdir() if p.is_dir())[:6]}); a folder of "
            "class sub-folders only is read as the 'train' split."
        )
    folders = sorted(p.name for p in split_root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(
            f"Expected class sub-folders in {split_root} (layout <root>/<split>/<class>/*.jpg). Received: none."
        )
    classes = folders if class_names is None else list(class_names)
    unknown = [name for name in folders if name not in classes]
    if unknown:
        raise ValueError(f"Expected the class folders of {split_root} to be among class_names={classes}. "
                         f"Received: {unknown} as well. Fix: give every split the same class folders.")
    selected = [sorted(p for p in (split_root / name).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:max_per_class]
                if name in folders else [] for name in classes]
    if not any(selected):
        raise ValueError(f"Expected image files ({', '.join(sorted(_IMAGE_SUFFIXES))}) in the class folders of "
                         f"{split_root}. Received: none.")
    # The cache key covers what is read: an image added, removed or replaced gives a new key.
    listing = [(str(f.relative_to(split_root)), (stat := f.stat()).st_size, stat.st_mtime_ns)
               for files in selected for f in files]
    resize = None if image_size is None else (*image_size, "rounded")  # before: truncated to uint8
    cached = cache_dir() / "arrays" / f"{_digest(split_root.resolve(), resize, max_per_class, classes, listing)}.npz"
    if cached.exists():
        try:
            with np.load(cached) as data:
                return data["x"].astype("float32") / 255.0, data["y"], classes
        except (OSError, ValueError, KeyError):  # a damaged file (e.g. an interrupted write of an older version)
            cached.unlink()
    import tensorflow as tf

    images, labels = [], []
    for label, files in enumerate(selected):
        for file in files:
            image = tf.io.decode_image(tf.io.read_file(str(file)), channels=3, expand_animations=False)
            images.append(_resized(image.numpy(), image_size))
            labels.append(label)
    x, y = _stacked(images, str(split_root)), np.asarray(labels, np.int64)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, x=x, y=y)
    os.replace(partial, cached)  # atomic: a killed run leaves no truncated cache behind
    return x.astype("float32") / 255.0, y, classes


def _load_tfds(name, split, image_size, max_per_class, class_names):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"Loading the TFDS data set '{name}' needs tensorflow-datasets: "
            'pip install "keras-autoprune[bench]", or pass an image folder instead.'
        ) from error
    try:
        dataset, info = tfds.load(name, split=split, as_supervised=True, with_info=True)
    except Exception as error:  # no network, unknown name, ...
        if "Unknown split" in str(error):  # TFDS's message for a split the data set does not have
            raise FileNotFoundError(f"Expected a '{split}' split in the TFDS data set '{name}'. Received: {error}") from error
        raise ValueError(
            f"Could not load the TFDS data set '{name}' (split '{split}'): {error}. Offline, pass an image "
            "folder or archive instead, e.g. --data ../shared/data/cifar10-jpeg.tar.gz"
        ) from error
    names = list(info.features["label"].names)
    if class_names is not None and list(class_names) != names:
        raise ValueError(f"Expected class_names to be the TFDS data set's classes {names}. "
                         f"Received: class_names={list(class_names)}.")
    counts: dict[int, int] = {}
    images, labels = [], []
    for image, label in dataset.as_numpy_iterator():
        label = int(label)
        if max_per_class is not None and counts.get(label, 0) >= max_per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        images.append(_resized(image, image_size))
        labels.append(label)
    return _stacked(images, f"TFDS '{name}' ({split})").astype("float32") / 255.0, np.asarray(labels, np.int64), names


def _resized(image: np.ndarray, image_size: tuple[int, int] | None) -> np.ndarray:
    """``image`` (uint8, H x W x C) resized bilinearly to ``image_size`` and rounded back to uint8; as is without it."""
    if image_size is None:
        return image
    import tensorflow as tf

    return np.clip(np.round(tf.image.resize(image, image_size).numpy()), 0, 255).astype(np.uint8)


def _stacked(images: list[np.ndarray], where: str) -> np.ndarray:
    """The images as one array; ValueError when their sizes differ (no image_size was given)."""
    shapes = sorted({image.shape for image in images})
    if len(shapes) > 1:
        raise ValueError(f"Expected the images of {where} to share one size, or an image size to resize them to. "
                         f"Received: sizes {shapes[:4]}{' ...' if len(shapes) > 4 else ''}. "
                         "Fix: pass image_size=(H, W) (the command line's --image-size H,W).")
    return np.stack(images)


def _digest(*parts) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]
