"""Resumable work: a wall-clock deadline per invocation and finished units on disk.

A long profile (``gpu``) runs in stages: each invocation of
``python -m benchmarks.run`` stops cleanly before its deadline, after saving
what the next one needs (a training checkpoint, or the JSON result of each
finished unit), and the same command run again continues where it stopped.

A *unit* is one (seed, budget, entry) run or the pretraining; its result is
``<root>/<unit>.json``, its files live in ``<root>/<unit>/``. A store with a
``keep`` folder (in the repository) also writes each result there, with the
unit's final model as ``<keep>/<unit>.keras``, so that finished units survive
the loss of the cache: a later session reads them back from ``keep``.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time


class StageIncomplete(Exception):
    """The invocation's deadline came before the profile finished; run it again to resume."""


class Deadline:
    """The end of this invocation's time, or none.

    Args:
        minutes: wall-clock minutes from now, or None for no limit.
    """

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.monotonic() + 60.0 * minutes

    def remaining(self) -> float | None:
        """Seconds left (None without a deadline)."""
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def allows(self, seconds: float) -> bool:
        """Whether work of ``seconds`` would still finish before the deadline."""
        return self.end is None or time.monotonic() + seconds <= self.end

    def check(self, seconds: float, what: str) -> None:
        """Raises `StageIncomplete` unless ``what`` (about ``seconds``) fits."""
        if not self.allows(seconds):
            raise StageIncomplete(f"not enough time left for {what} (about {seconds:.0f} s)")


class UnitStore:
    """Finished units' JSON results under ``root``, and under ``keep`` when given (see the module docstring)."""

    def __init__(self, root: pathlib.Path, fresh: bool = False, keep: pathlib.Path | None = None):
        self.root = pathlib.Path(root)
        self.keep = None if keep is None else pathlib.Path(keep)
        if fresh and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)

    def files(self, unit: str) -> pathlib.Path:
        """The folder for the unit's files (created)."""
        folder = self.root / unit
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def result(self, unit: str) -> dict | None:
        """The unit's result from ``keep`` (the repository's copy, the reference), else from ``root`` (the cache);
        None if it has not finished."""
        for folder in (self.keep, self.root):
            path = None if folder is None else folder / f"{unit}.json"
            if path is not None and path.exists():
                return json.loads(path.read_text())
        return None

    def save(self, unit: str, result: dict) -> dict:
        for folder in (self.root, self.keep):
            if folder is not None:
                path = folder / f"{unit}.json"
                path.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
                path.with_suffix(".tmp").replace(path)
        return result

    def keep_model(self, unit: str, model) -> None:
        """Saves the unit's final model to `kept_model` (weights and architecture, no optimizer state); no-op without ``keep``."""
        import keras

        if self.keep is None:
            return
        # The same layers in an uncompiled functional model: no optimizer slots in the file.
        keras.Model(model.inputs, model.outputs, name=model.name).save(self.kept_model(unit))

    def kept_model(self, unit: str) -> pathlib.Path | None:
        """Where the unit's final model is kept (``<keep>/<unit>.keras``), or None without ``keep``."""
        return None if self.keep is None else self.keep / f"{unit}.keras"


def code_revision() -> str | None:
    """The repository's commit (``git rev-parse --short HEAD``), ``+changes`` when the library or the benchmark
    code differs from it; None outside a git checkout. Recorded in every finished unit and row, so that a table
    mixing code versions can be told apart (resumed results are reused as they are)."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--", "keras_autoprune", "benchmarks/*.py"],
                                 cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changes else "")
