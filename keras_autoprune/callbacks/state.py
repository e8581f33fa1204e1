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

`StateStore` reads and writes the files; `ResumeMixin` holds the callback's
side (what a state holds, the checks, and the error when a resumed ``fit``
would lose earlier rounds).
"""

from __future__ import annotations

import json
import os
import pathlib
import uuid
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
        """Writes the state of the end of ``epoch`` atomically (arrays first, then the JSON that refers to them).

        Temporary files have a name of their own per call: workers of a multi-worker ``fit`` that share the folder
        each write the same state, and none renames another's file away.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(epoch)
        unique = uuid.uuid4().hex[:12]
        names = sorted(arrays)  # any strings (group ids, layer names): stored by position
        if names:
            temporary = target.with_suffix(f".{unique}.tmp.npz")
            np.savez(temporary, *[np.asarray(arrays[name]) for name in names])
            os.replace(temporary, target.with_suffix(".npz"))
        temporary = target.with_suffix(f".{unique}.tmp")
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


class ResumeMixin:
    """The ``state_dir`` part of `PruningCallback`: the state written every epoch, and a resumed ``fit``.

    Reads and sets the callback's ``plan``, ``history``, ``pruning_seconds``,
    ``stopped``, ``_kept`` and ``_original``; reads ``model``, ``verbose``,
    its settings (``budget``, ``start_epoch``, ``end_epoch``, ``rounds``,
    and the method's ``decision_settings``),
    ``plan_class``, ``_epochs`` (the scheduled rounds), ``state_dir`` and
    ``_store`` (a `StateStore`, or None without ``state_dir``). The method's
    own part goes through ``method_state`` / ``restore_method_state`` and
    ``restore_constraints``.
    """

    #: Names of the method's arguments that change its decisions: a state written with other values is refused.
    decision_settings: tuple[str, ...] = ()

    def _settings(self) -> dict:
        schedule = {"budget": repr(self.budget), "start_epoch": self.start_epoch, "end_epoch": self.end_epoch,
                    "rounds": self.rounds}
        return {**schedule, **{name: repr(getattr(self, name)) for name in self.decision_settings}}

    def _save_state(self, epoch: int) -> None:
        values, arrays = self.method_state()
        state = {
            "callback": type(self).__name__, "settings": self._settings(), "model": fingerprint(self.model),
            "epoch": epoch, "plan": self.plan.to_json() if self.plan is not None else None, "history": self.history,
            "pruning_seconds": self.pruning_seconds, "stopped": self.stopped, "kept": self._kept,
            "original": self._original, "method": values,
        }
        self._store.save(epoch, state, arrays)

    def _resume(self, epoch: int) -> None:
        """At a fit's first epoch: restores the state of the end of ``epoch - 1``, or fails if rounds would be lost."""
        earlier = sorted(e + 1 for e in self._epochs if e < epoch)
        saved = self._store.load(epoch - 1) if self._store is not None and epoch > 0 else None
        if saved is not None:
            self._restore(*saved)
            return
        if not earlier:
            return
        where = (
            f"state_dir={str(self.state_dir)!r} holds no state for the end of epoch {epoch} (states found for epochs "
            f"{[e + 1 for e in self._store.epochs()]})" if self._store is not None
            else "this callback has no state_dir, so the pruning of the earlier fit would be lost"
        )
        raise ValueError(
            f"{type(self).__name__}: this fit starts at epoch {epoch + 1}, after the pruning round(s) scheduled at "
            f"epoch(s) {earlier}, but {where}. Fix: create the callback with state_dir=... (the same folder in the "
            "interrupted and the resumed run, e.g. beside keras.callbacks.BackupAndRestore's backup_dir), or start "
            "the fit before the first round."
        )

    def _restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        problems = []
        if state["callback"] != type(self).__name__:
            problems.append(f"it was written by {state['callback']}")
        if state["settings"] != self._settings():
            problems.append(f"its settings {state['settings']} differ from this callback's {self._settings()}")
        if state["model"] != fingerprint(self.model):
            problems.append("its model has other variables (names or shapes)")
        if problems:
            raise ValueError(
                f"{type(self).__name__}: the pruning state {self._store.path(state['epoch'])} does not belong to this "
                f"run: {'; '.join(problems)}. Fix: resume with the same model and callback arguments, or give a new state_dir."
            )
        self.plan = self.plan_class.from_json(state["plan"]) if state["plan"] is not None else None
        self.history = state["history"]
        self.pruning_seconds = state["pruning_seconds"]
        self.stopped = state["stopped"]
        self._kept = state["kept"]
        self._original = state["original"]
        self.restore_method_state(state["method"], arrays)
        self.restore_constraints()
        if self.verbose:
            print(f"\n{type(self).__name__}: resumed from the state of epoch {state['epoch'] + 1} "
                  f"({len(self.history)} of {self.rounds} round(s) done).")
