"""Checks that a suitable TensorFlow is installed (it comes from an extra)."""

from __future__ import annotations

import importlib.util

_MIN_TF = (2, 16)


def check_tensorflow() -> None:
    """Raises ImportError with install instructions if TensorFlow is missing/old."""
    if importlib.util.find_spec("tensorflow") is None:
        raise ImportError(
            "keras-autoprune needs TensorFlow >= 2.16 as the Keras backend, and none is installed. "
            'Fix: `pip install "keras-autoprune[cpu]"` (tensorflow-cpu) or '
            '`pip install "keras-autoprune[gpu]"` (tensorflow with GPU support).'
        )
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorflow", "tensorflow-cpu", "tf-nightly", "tensorflow-macos"):
        try:
            found = version(dist)
        except PackageNotFoundError:
            continue
        numbers = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
        if numbers < _MIN_TF:
            raise ImportError(
                f"keras-autoprune needs TensorFlow >= 2.16 (Keras 3). Received: {dist}=={found}. "
                'Fix: `pip install -U "tensorflow-cpu>=2.16"` (or tensorflow).'
            )
        return
