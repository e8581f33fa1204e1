"""`export_saved_model`: a verified SavedModel in TF Serving's layout.

TF Serving loads ``<model_base_path>/<version>/`` and serves the highest
numeric version; this module writes ``<export_dir>/<version>/`` with one
signature, ``serving_default``, whose names do not depend on layer names
(see `keras_autoprune.export.signature`):

- inputs ``input_0``, ``input_1``, ... (float32, in ``model.inputs`` order,
  unknown batch axis);
- outputs ``output_0``, ``output_1``, ... (in ``model.outputs`` order).

The version is first written to a hidden directory beside it (TF Serving
ignores non-numeric names), reloaded with `tf.saved_model.load`, its
signature called on sample inputs and compared with Keras, and only then
renamed to ``<version>``: a serving process never sees a half-written or
unverified version.

Example:

>>> import tensorflow as tf
>>> result = export_saved_model(model, "serving/my_model")     # doctest: +SKIP
>>> result.path                                                # doctest: +SKIP
PosixPath('serving/my_model/1')
>>> serve = tf.saved_model.load(str(result.path)).signatures["serving_default"]  # doctest: +SKIP
>>> serve(input_0=tf.zeros((1, 64, 64, 3)))["output_0"].shape  # doctest: +SKIP
TensorShape([1, 10])
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Any

import keras
import tensorflow as tf

from keras_autoprune.export.data import sample_inputs
from keras_autoprune.export.result import ExportResult
from keras_autoprune.export.signature import SIGNATURE_KEY, check_exportable, write_serving_saved_model
from keras_autoprune.export.verify import check_figures, check_thresholds, compare, reference_outputs, serving_outputs


def export_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    version: int | None = None,
    representative_data: Any = None,
    tolerance: float | None = 1e-4,
    min_top1_agreement: float | None = None,
    num_samples: int = 32,
    seed: int = 0,
) -> ExportResult:
    """Writes ``<export_dir>/<version>/``, reloads it and checks its signature.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        export_dir: the model's base directory (TF Serving's
            ``model_base_path``); created (with its parents) if missing.
            A path ending in a number (``"serving/1"``) with ``version=None``
            is taken as the version directory itself: base ``serving``,
            version 1.
        version: a non-negative integer. Defaults to None: one more than
            the highest numeric version already in ``export_dir`` (1 when
            there is none).
        representative_data: sample inputs for the check (see
            `export_tflite`). Defaults to None: uniform random inputs in
            ``[-1, 1)``.
        tolerance: largest relative error ``max|served - keras| /
            max|keras|`` allowed. Defaults to 1e-4. None: not checked.
        min_top1_agreement: lowest top-1 agreement allowed. Defaults to
            None (reported, not checked).
        num_samples: samples compared. Defaults to 32.
        seed: seed of the random inputs. Defaults to 0.

    Returns:
        An `ExportResult` whose ``path`` is the version directory.

    Raises:
        UnsupportedModelError: ``model`` is not a built Keras model.
        ValueError, TypeError: bad arguments, or the version exists.
        VerificationError: the reloaded signature disagrees with Keras
            (nothing is left under ``export_dir`` then).
    """
    model = check_exportable(model)
    base, version = check_saved_model_target(export_dir, version)
    check_thresholds(tolerance, min_top1_agreement, num_samples)
    inputs = sample_inputs(model, representative_data, num_samples, seed)
    expected = reference_outputs(model, inputs)  # the model must run on the samples before anything is written
    base.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{version}-partial-", dir=base))
    try:
        write_serving_saved_model(model, staging)
        signature = tf.saved_model.load(str(staging)).signatures[SIGNATURE_KEY]
        figures = compare(expected, serving_outputs(signature, model, inputs))
        check_figures(figures, f"SavedModel version {version} in {base}", tolerance, min_top1_agreement)
        final = base / str(version)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    return ExportResult(final, "saved_model", None, size, figures.max_abs_error,
                        figures.relative_error, figures.top1_agreement, figures.num_samples)


def check_saved_model_target(export_dir: Any, version: Any = None) -> tuple[pathlib.Path, int]:
    """``(base directory, version)`` that `export_saved_model` would write, or a ValueError/TypeError.

    A path ending in a number with ``version=None`` is the version directory
    itself (``"serving/1"``: base ``serving``, version 1).
    """
    base = _check_export_dir(export_dir)
    if version is None and base.name.isdigit():
        base, version = base.parent, int(base.name)
    return base, _check_version(base, version)


def _check_export_dir(export_dir: Any) -> pathlib.Path:
    if not isinstance(export_dir, (str, os.PathLike)):
        raise TypeError(f"Expected `export_dir` to be a directory path. Received: export_dir={export_dir!r}")
    base = pathlib.Path(export_dir)
    if base.exists() and not base.is_dir():
        raise ValueError(
            f"Expected `export_dir` to be a directory (TF Serving's model base path). "
            f"Received: export_dir='{base}', an existing file. Fix: choose another path."
        )
    return base


def _check_version(base: pathlib.Path, version: Any) -> int:
    existing = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    if version is None:
        return max(existing, default=0) + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(
            "Expected `version` to be a non-negative integer (TF Serving's version "
            f"directories are numbers) or None. Received: version={version!r}"
        )
    if (base / str(version)).exists():
        raise ValueError(
            f"Expected a new version. Received: version={version}, but '{base / str(version)}' "
            f"exists. Fix: pass `version=None` to use {max(existing, default=0) + 1}, or remove it."
        )
    return version
