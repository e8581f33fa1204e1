"""Checks of the file names a command-line run reads and writes, before any work."""

from __future__ import annotations

import os
import pathlib


def check_model_paths(model_path: str | os.PathLike, out: str | os.PathLike,
                      tflite: str | os.PathLike | None = None) -> None:
    """Raises ValueError unless ``model_path`` is a file and ``out`` (and ``tflite``) can be written without
    overwriting it: a ``.keras`` (``.tflite``) name in an existing folder, not the input file itself."""
    if not pathlib.Path(model_path).is_file():
        raise ValueError(f"Expected a saved model file (.keras). Received: '{model_path}', which does not exist.")
    if pathlib.Path(out).suffix != ".keras":
        raise ValueError(f"Expected the output model to be a .keras file. Received: OUT='{out}'. Fix: e.g. pruned.keras")
    if tflite is not None and pathlib.Path(tflite).suffix != ".tflite":
        raise ValueError(f"Expected a .tflite file name. Received: --tflite '{tflite}'. Fix: e.g. --tflite pruned.tflite")
    for path in (out, tflite):
        if path is not None and not pathlib.Path(path).resolve().parent.is_dir():
            raise ValueError(f"Expected an existing folder for the output. Received: '{path}'")
    if pathlib.Path(out).resolve() == pathlib.Path(model_path).resolve():
        raise ValueError(f"Expected an output file other than the input model. Received: OUT='{out}', the model read. "
                         "Fix: write the result to another file (the input model is kept as it is).")
