"""Benchmark profiles: model, data subset, schedules and budgets per machine size.

A `Profile` fixes everything that decides the figures, so that every entry
of a run is trained, pruned and measured the same way:

- ``smoke``: a ResNet-8 of width 8 on 20 CIFAR-10 images per class, one
  epoch each of pretraining and fine-tuning. Checks the whole pipeline in
  about a minute (``tests/test_benchmarks.py``); its accuracies mean nothing.
- ``cpu``: ResNet-20 on 5,000 CIFAR-10 training images (500 per class) and
  the full 10,000 test images; sized so that the issue-5 entries
  (pretraining included) take at most 45 minutes on two shared CPU cores
  (see docs/benchmarks_quick.md, "How the cpu profile was sized"; the issue-7
  entries add more).
- ``v2``: Benchmark v2's protocol 2: the committed converged ResNet-20
  (`benchmarks.converged`, raw pixels in) fine-tuned 4 epochs on all
  50,000 training images at 50% and 25% FLOPs kept by the headline entries,
  two pruning rounds inside those epochs; resumable unit by unit (about
  6 hours on two CPU cores). No pretraining: ``base_model`` names the model.
  Its ``red`` entry compresses the converged model with `kap.red.compress`
  (data-free, budget mode) before the same fine-tuning.
- ``v2_mobilenetv2``: the same protocol on the committed converged
  MobileNetV2 0.5 (the depthwise network), for the entries whose ordering
  issue 12 asks about.
- ``gpu``: ResNet-56 on the full CIFAR-10 with He et al.'s schedule (SGD
  0.1, divided by 10 at epochs 82 and 123 of 164), fine-tuning 40 epochs;
  resumable in stages of at most ``stage_minutes`` (one H100).

The scratch entries (``psap_scratch``) train the pretraining's initial
weights for ``pretrain_epochs + finetune_epochs`` epochs with the
pretraining learning rate (see `benchmarks.entries.scratch_schedule`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

SCORER_ENTRIES = ("kron_obs", "kron_obd", "c_obs", "c_obd")
"""NAP's framework with a classic curvature scorer (`kap.NAPCallback(scorer=...)`), named after the scorer."""

STRUCTURED_ENTRIES = ("uniform_l1", "global_l1", "taylor", "random", "nap", "nap_cost_aware", "fisher_cost_aware", *SCORER_ENTRIES,
                      "eigendamage", "eigendamage_capped", "psap", "psap_scratch", "red", "red_merge", "red_bn",
                      "red_merge_bn", "red_merge_leader", "red_merge_leader_bn", "red_low_rank_bn")
"""Entries that remove channels or eigen-directions (their FLOPs must meet the budget)."""

ONE_SHOT_ENTRIES = ("red", "red_merge", "red_bn", "red_merge_bn", "red_merge_leader", "red_merge_leader_bn",
                    "red_low_rank_bn")
"""Entries that compress the model once, data-free, before the first fine-tuning epoch (no callback)."""

RED_VARIANTS = ONE_SHOT_ENTRIES[1:]
"""RED with another knob or setting than the ``red`` entry's: left out of the profiles that run every entry."""

SCRATCH_ENTRIES = ("psap_scratch",)
"""Entries that start from the pretraining's random initialisation, not from the pretrained model."""

ALL_ENTRIES = ("unpruned", *STRUCTURED_ENTRIES, "tfmot")
"""Every entry, in run order (TFMOT needs NAP's parameter count first)."""

_NOT_IN_RUN_KEY = ("entries", "resumable", "stage_minutes")
"""Profile fields that choose which units run and how, not what a unit computes."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """One benchmark configuration (see the module docstring).

    Attributes:
        name: profile name (also the results file name).
        depth, width: `zoo.resnet_cifar` arguments.
        train_per_class, test_per_class: images per class (None: all).
        calibration_batches, batch_size: calibration set of NAP and Taylor
            (``calibration_batches x batch_size`` training images, no
            augmentation); ``batch_size`` is also the training batch.
        pretrain_epochs, pretrain_lr: pretraining schedule.
        finetune_epochs, finetune_lr: fine-tuning schedule, the same for
            every entry; pruning happens in its first ``rounds`` epochs.
        pretrain_schedule: ``"cosine"`` (per-epoch cosine decay to 0) or
            ``"step"`` (divided by 10 at 50% and 75% of the epochs);
            fine-tuning always decays with the cosine.
        weight_decay: SGD weight decay (momentum 0.9, Nesterov).
        rounds: pruning rounds, one per epoch from the first fine-tuning epoch.
        budgets: fractions of the FLOPs kept.
        entries: entries run by default.
        latency_runs, latency_rounds, latency_warmup: `measure_latencies`.
        export_samples: samples for the export verification.
        resumable: keep finished units between invocations (stages).
        stage_minutes: default wall-clock limit of one invocation (None: none).
        base_model: a converged model of ``benchmarks/models`` (its manifest
            name) that replaces pretraining; its data are raw pixels.
    """

    name: str
    depth: int
    width: int
    train_per_class: int | None
    test_per_class: int | None
    calibration_batches: int
    batch_size: int
    pretrain_epochs: int
    pretrain_lr: float
    finetune_epochs: int
    finetune_lr: float
    pretrain_schedule: str = "cosine"
    weight_decay: float = 5e-4
    rounds: int = 1
    budgets: tuple[float, ...] = (0.5, 0.25)
    entries: tuple[str, ...] = ALL_ENTRIES
    latency_runs: int = 400
    latency_rounds: int = 20
    latency_warmup: int = 20
    export_samples: int = 100
    resumable: bool = False
    stage_minutes: float | None = None
    base_model: str | None = None

    def pretrain_key(self) -> str:
        """Digest of everything that determines the pretrained weights."""
        fields = ("depth", "width", "train_per_class", "batch_size", "pretrain_epochs", "pretrain_lr",
                  "pretrain_schedule", "weight_decay", "base_model")
        return _digest({f: getattr(self, f) for f in fields})

    def run_key(self) -> str:
        """Digest of the profile fields that determine a unit's figures.

        Finished units are only reused under the same key. The entry list and
        the staging fields are left out: adding an entry must not discard the
        finished units of the others.
        """
        return _digest({k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IN_RUN_KEY})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def learning_rate(epoch: int, base: float, epochs: int, schedule: str) -> float:
    """The learning rate of ``epoch`` (0-based) of a phase of ``epochs`` epochs.

    ``cosine``: ``base * (1 + cos(pi * epoch / epochs)) / 2``; ``step``:
    ``base``, ``base / 10`` from ``epochs / 2``, ``base / 100`` from
    ``3 * epochs / 4``.
    """
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return base * (0.1 ** ((epoch >= epochs // 2) + (epoch >= 3 * epochs // 4)))
    raise ValueError(f"Expected schedule 'cosine' or 'step'. Received: schedule={schedule!r}")


def _digest(data: dict) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", depth=8, width=8, train_per_class=20, test_per_class=10,
        calibration_batches=2, batch_size=32, pretrain_epochs=1, pretrain_lr=0.05,
        # Without TFMOT (its own process) and without the variants that only
        # change an argument of an entry's callback (cost_aware, scorer,
        # max_layer_ratio, RED's budget knob: tested with the callbacks and `kap.red`), to keep the test short.
        finetune_epochs=1, finetune_lr=0.01,
        entries=tuple(e for e in ALL_ENTRIES[:-1] if e not in ("nap_cost_aware", "fisher_cost_aware", *SCORER_ENTRIES,
                                                                "eigendamage_capped", *RED_VARIANTS)),
        latency_runs=20, latency_rounds=2, latency_warmup=2, export_samples=20,
    ),
    "cpu": Profile(
        name="cpu", depth=20, width=16, train_per_class=500, test_per_class=None,
        calibration_batches=4, batch_size=128, pretrain_epochs=15, pretrain_lr=0.1,
        finetune_epochs=6, finetune_lr=0.02, rounds=2,
    ),
    "v2": Profile(
        name="v2", depth=20, width=16, train_per_class=None, test_per_class=None,
        calibration_batches=8, batch_size=128, pretrain_epochs=0, pretrain_lr=0.1,
        finetune_epochs=4, finetune_lr=0.01, rounds=2, resumable=True, base_model="resnet20",
        entries=("unpruned", "uniform_l1", "taylor", "nap", "fisher_cost_aware", "eigendamage", "psap", "red", "red_merge_bn",
                 "tfmot"),
    ),
    "v2_mobilenetv2": Profile(
        name="v2_mobilenetv2", depth=20, width=16, train_per_class=None, test_per_class=None,
        calibration_batches=8, batch_size=128, pretrain_epochs=0, pretrain_lr=0.1,
        finetune_epochs=4, finetune_lr=0.01, rounds=2, resumable=True, base_model="mobilenetv2",
        entries=("unpruned", "uniform_l1", "taylor", "random", "nap", "fisher_cost_aware", "eigendamage", "psap", "red",
                 "red_merge", "red_merge_bn", "tfmot"),
    ),
    "gpu": Profile(
        name="gpu", depth=56, width=16, train_per_class=None, test_per_class=None,
        calibration_batches=8, batch_size=128, pretrain_epochs=164, pretrain_lr=0.1,
        finetune_epochs=40, finetune_lr=0.01, pretrain_schedule="step", weight_decay=1e-4, rounds=3,
        latency_runs=400, resumable=True, stage_minutes=8.5,
        # psap_scratch's pruning epochs (a third of 204) run in one `fit` with
        # the callback, which cannot stop at a stage boundary; not in the default.
        entries=tuple(e for e in ALL_ENTRIES if e not in (*SCRATCH_ENTRIES, *RED_VARIANTS)),
    ),
}
"""The predefined profiles, by name."""
