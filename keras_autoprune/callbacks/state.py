"""A pruning callback's state on disk, so that pruning survives an interrupted `fit`.

With ``state_dir``, a callback writes its state at the end of every epoch
``e`` to ``<state_dir>/pruning-state-<e>.json`` (and the method's arrays to
``pruning-state-<e>.npz``): the plan so far, the round history and timings,
the original model's costs, and what the method keeps between rounds
(NAP's reference accuracy and weight masks, PSAP's gradient EMAs,
EigenDamage's bases inside its plan). Files are written to a temporary name
and renamed, so a crash never leaves a half-written state.

A resumed `fit` (``keras.callbacks.BackupAndRestore``, or the model restored
from a checkpoint and ``fit(initial_epoch=e)``) starts at some epoch
``e``; the callback reads the state written at the end of epoch ``e - 1``,
the epoch the weights come from, and checks that it belongs to this model
(the names and shapes of its variables) and to the same callback settings.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

FORMAT = 1


def fingerprint(model) -> list[list]:
    """``[[variable path, shape], ...]`` of ``model``: what a state must match."""
    return [[variable.path, list(variable.shape)] for variable in model.weights]


class StateStore:
    """The per-epoch state files in one folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)

    def path(self, epoch: int) -> pathlib.Path:
        return self.folder / f"pruning-state-{epoch}.json"

    def save(self, epoch: int, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Writes the state of the end of ``epoch`` atomically (arrays first, then the JSON that refers to them)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(epoch)
        names = sorted(arrays)  # any strings (group ids, layer names): stored by position
        if names:
            temporary = target.with_suffix(".tmp.npz")
            np.savez(temporary, *[np.asarray(arrays[name]) for name in names])
            os.replace(temporary, target.with_suffix(".npz"))
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(dict(state, format=FORMAT, arrays=names), indent=1))
        os.replace(temporary, target)

    def load(self, epoch: int) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """The state written at the end of ``epoch`` and its arrays, or None when there is none."""
        path = self.path(epoch)
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        arrays = {}
        if state.get("arrays"):
            with np.load(path.with_suffix(".npz")) as stored:
                arrays = {name: stored[f"arr_{index}"] for index, name in enumerate(state["arrays"])}
        return state, arrays

    def epochs(self) -> list[int]:
        """Epochs with a saved state, ascending."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem.rsplit("-", 1)[1]) for p in self.folder.glob("pruning-state-*.json"))
