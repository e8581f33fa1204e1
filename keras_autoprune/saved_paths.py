"""Checks of the file names a command-line run reads and writes, before any work."""

from __future__ import annotations

import os
import pathlib


def check_model_paths(model_path: str | os.PathLike, out: str | os.PathLike,
                      *tflite: str | os.PathLike | None) -> None:
    """Raises ValueError unless ``model_path`` is a file and every output can be written without overwriting
    it or another output: ``out`` a ``.keras`` name, each ``tflite`` (None: not written) a ``.tflite`` name, all in
    existing folders and all different files."""
    if not pathlib.Path(model_path).is_file():
        raise ValueError(f"Expected a saved model file (.keras). Received: '{model_path}', which does not exist.")
    if pathlib.Path(out).suffix != ".keras":
        raise ValueError(f"Expected the output model to be a .keras file. Received: OUT='{out}'. Fix: e.g. pruned.keras")
    exports = [path for path in tflite if path is not None]
    for path in exports:
        if pathlib.Path(path).suffix != ".tflite":
            raise ValueError(f"Expected a .tflite file name. Received: '{path}'. Fix: e.g. pruned.tflite")
    for path in (out, *exports):
        if not pathlib.Path(path).resolve().parent.is_dir():
            raise ValueError(f"Expected an existing folder for the output. Received: '{path}'")
    if pathlib.Path(out).resolve() == pathlib.Path(model_path).resolve():
        raise ValueError(f"Expected an output file other than the input model. Received: OUT='{out}', the model read. "
                         "Fix: write the result to another file (the input model is kept as it is).")
    resolved = [pathlib.Path(path).resolve() for path in exports]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"Expected one file per export. Received: {[str(p) for p in exports]}. Fix: name each .tflite "
                         "file differently.")
