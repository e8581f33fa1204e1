"""load_images: folders, archives, caching, errors."""

import tarfile

import numpy as np
import pytest
import tensorflow as tf

from keras_autoprune.datasets import load_images


@pytest.fixture()
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    for split in ("train", "test"):
        for label, name in enumerate(["cat", "ant", "bee"]):  # ids follow alphabetical order
            directory = root / split / name
            directory.mkdir(parents=True)
            for k in range(3):
                pixels = np.full((4, 5, 3), 10 * label + k, np.uint8)
                (directory / f"{k}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    return root


def test_folder_and_archive_give_the_same_arrays(folder, tmp_path):
    x, y, classes = load_images(folder, "test")
    assert classes == ["ant", "bee", "cat"]
    assert x.shape == (9, 4, 5, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # "ant" was written with label 1 -> pixel values 10..12.
    np.testing.assert_allclose(x[:3, 0, 0, 0] * 255, [10, 11, 12])
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "train", arcname="train")
        tar.add(folder / "test", arcname="test")
    x2, y2, _ = load_images(archive, "test", max_per_class=2)
    np.testing.assert_array_equal(y2, [0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(x2[[0, 2, 4]], x[[0, 3, 6]])
    resized, _, _ = load_images(archive, "train", image_size=(8, 8))
    assert resized.shape == (9, 8, 8, 3)


def test_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_images(tmp_path / "missing" / "dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="class sub-folders"):
        load_images(tmp_path / "empty")


def test_a_folder_without_split_level_is_the_training_split_only(folder):
    flat = folder / "train"  # <root>/<class>/*.png
    x, y, classes = load_images(flat)
    assert len(x) == 9 and classes == ["ant", "bee", "cat"]
    with pytest.raises(FileNotFoundError, match="Expected a 'test' sub-folder"):
        load_images(flat, "test")  # not the training images again, under another name
    with pytest.raises(FileNotFoundError, match="Expected a 'tset' sub-folder"):
        load_images(folder, "tset")


def test_the_array_cache_follows_the_images_and_survives_a_damaged_file(folder, tmp_path):
    first, _, _ = load_images(folder, "test")
    image = folder / "test" / "ant" / "0.png"
    image.write_bytes(tf.io.encode_png(np.full((4, 5, 3), 200, np.uint8)).numpy())  # replaced in place
    again, _, _ = load_images(folder, "test")
    assert again[0, 0, 0, 0] * 255 == pytest.approx(200) and first[0, 0, 0, 0] * 255 == pytest.approx(10)
    cached = sorted((tmp_path / "cache" / "arrays").glob("*.npz"))
    assert cached and not list((tmp_path / "cache" / "arrays").glob("*.partial*"))
    for path in cached:
        path.write_bytes(b"truncated")
    np.testing.assert_array_equal(load_images(folder, "test")[0], again)  # decoded again, not a crash


def test_a_split_missing_a_class_keeps_the_training_ids(folder):
    import shutil

    shutil.rmtree(folder / "test" / "bee")
    _, y_train, classes = load_images(folder, "train")
    x, y, test_classes = load_images(folder, "test", class_names=classes)
    assert test_classes == classes == ["ant", "bee", "cat"]
    np.testing.assert_array_equal(y, [0, 0, 0, 2, 2, 2])  # "cat" stays 2 (its own folders alone would make it 1)
    np.testing.assert_allclose(x[3:, 0, 0, 0] * 255, [0, 1, 2])  # the "cat" images (written with label 0)
    (folder / "test" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"among class_names.*\['dog'\]"):
        load_images(folder, "test", class_names=classes)


def test_bad_arguments_and_empty_splits_are_refused_clearly(folder, tmp_path):
    for value in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_per_class"):
            load_images(folder, "train", max_per_class=value)
    with pytest.raises(ValueError, match="distinct"):
        load_images(folder, "train", class_names=["ant", "ant"])
    empty = tmp_path / "hollow" / "train" / "cat"
    empty.mkdir(parents=True)
    with pytest.raises(ValueError, match="Expected image files"):
        load_images(tmp_path / "hollow", "train", image_size=(4, 4))
    odd = folder / "train" / "ant" / "9.png"
    odd.write_bytes(tf.io.encode_png(np.zeros((6, 6, 3), np.uint8)).numpy())
    with pytest.raises(ValueError, match=r"share one size.*image_size=\(H, W\)"):
        load_images(folder, "train")


def test_resizing_rounds_the_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    pixels = np.random.default_rng(0).integers(0, 256, (9, 11, 3)).astype(np.uint8)
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0.png").write_bytes(tf.io.encode_png(pixels).numpy())
    x, _, _ = load_images(tmp_path / "images", image_size=(5, 7))
    exact = tf.image.resize(pixels, (5, 7)).numpy()
    np.testing.assert_array_equal(x[0] * 255, np.round(exact))  # truncation (the cast alone) is off by up to 1
    assert np.any(np.floor(exact) != np.round(exact))


def test_a_replaced_archive_of_the_same_size_is_extracted_again(folder, tmp_path):
    import os

    archive = tmp_path / "images.tar"  # plain .tar: sizes are whole blocks, so two archives often match
    for value in (10, 200):
        for split in ("train", "test"):
            for file in (folder / split).glob("*/*.png"):
                file.write_bytes(tf.io.encode_png(np.full((4, 5, 3), value, np.uint8)).numpy())
        with tarfile.open(archive, "w") as tar:
            tar.add(folder / "train", arcname="train")
        os.utime(archive, ns=(value * 10**9, value * 10**9))  # distinct times even within a clock tick
        x, _, _ = load_images(archive, "train")
        assert x.max() * 255 == pytest.approx(value)
