"""The JPEG-quality probe of Benchmark v2 (`benchmarks.jpeg_quality`): the re-encoding it trains on."""

import numpy as np
import pytest

from benchmarks.converged import Cifar10
from benchmarks.jpeg_quality import reencode, reencoded


def _images(count=6, size=32):
    """Smooth colour gradients with a sharp square: detail that JPEG loses more of at lower quality."""
    rows, cols = np.mgrid[0:size, 0:size]
    images = np.zeros((count, size, size, 3), np.uint8)
    for i in range(count):
        images[i, ..., 0] = (rows * 7 + i * 13) % 256
        images[i, ..., 1] = (cols * 5 + i * 29) % 256
        images[i, 8 + i:16 + i, 8:16, 2] = 255
    return images


def test_reencoding_keeps_shape_and_loses_more_at_lower_quality():
    images = _images()
    high, low = reencode(images, 95), reencode(images, 30)
    assert high.shape == images.shape and high.dtype == np.uint8
    error = lambda x: np.abs(x.astype(int) - images).mean()  # noqa: E731
    assert 0 < error(high) < error(low)
    np.testing.assert_array_equal(reencode(images, 30), low)  # deterministic


def test_reencoded_changes_both_splits_and_keeps_labels():
    images, labels = _images(), np.arange(6)
    data = Cifar10(images, labels, images[:3], labels[:3])
    assert reencoded(data, 0) is data
    changed = reencoded(data, 40)
    assert changed.x_train.shape == images.shape and changed.x_test.shape == (3, 32, 32, 3)
    assert np.any(changed.x_train != images) and np.any(changed.x_test != images[:3])
    np.testing.assert_array_equal(changed.y_train, labels)


@pytest.mark.parametrize("quality", [0, 96, -5])
def test_reencode_refuses_a_quality_outside_pillows_range(quality):
    with pytest.raises(ValueError, match=r"Expected a JPEG quality in \[1, 95\]"):
        reencode(_images(1), quality)
