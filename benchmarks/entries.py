"""The benchmarked methods, and one fine-tuning run of an entry.

Every structured entry is a `kap.PruningCallback`, so masks, schedule and
surgery are the library's own and identical for all; only the channel
scores differ:

- ``uniform_l1``: `PrunePlan.uniform` (the same fraction of every group,
  smallest filter L1 norms) with the smallest ratio whose model meets the
  round's FLOPs target (bisection), `UniformL1Callback`;
- ``global_l1``: `kap.MagnitudeCallback` (filter L1 norms ranked model-wide);
- ``taylor``: first-order Taylor, ``sum over a filter's weights of
  |dL/dw * w|`` with the mean gradient of the training loss (empirical
  Fisher) on the calibration set, `TaylorCallback`;
- ``random``: uniformly random channel scores (seeded), `RandomCallback`;
- ``nap``: `kap.NAPCallback(scorer="nap", cost_aware=False)` (K-FAC OBS
  saliencies, NAP's default before issue 12) on the same calibration set;
- ``nap_cost_aware``: the same with ``cost_aware=True`` (saliency per FLOP saved);
- ``fisher_cost_aware``: `kap.NAPCallback` with its defaults since issue 12
  (``scorer="fisher", cost_aware=True``: the exact channel Fisher per FLOP saved);
- ``psap``: `kap.PSAPCallback` (weight-sparsity layer ratios, soft rounds,
  gradient protection; the last round hard) on the same calibration set;
- ``psap_scratch``: `kap.PSAPCallback` from the pretraining's *initial*
  weights, trained as long as pretraining and fine-tuning together, pruning
  while it trains (`scratch_schedule`).

``unpruned`` is fine-tuned exactly like the others, without a callback; the
TFMOT peer lives in `benchmarks.tfmot_peer`.

A one-shot entry (`ONE_SHOT_ENTRIES`) compresses the model once, without
data, before the first epoch, then fine-tunes it like every other entry
(same epochs, learning rates and batches), without a callback:

- ``red``: `kap.red.compress` with ``budget=kap.Budget(flops=budget)`` (its
  budget mode: the smallest ``bandwidth_scale`` from the default 0.05 up to
  100 times it whose compressed model fits; no merge threshold, no depthwise
  separation). The compressed model has its BatchNormalizations folded, so
  it is fine-tuned without them.
- ``red_merge``: the same with ``budget_knob="merge_threshold"`` and
  ``merge_distance="layer"`` (the smallest near-identical threshold whose
  model fits, hashing at the default 0.05): the setting that kept
  MobileNetV2 away from chance at 50% data-free (docs/methods/red.md).
- ``red_bn``, ``red_merge_bn``: ``red`` and ``red_merge`` with
  ``restore_batchnorm=True``: the folded BatchNormalizations are put back
  (exactly, in inference mode) so that the fine-tuning trains with them, as
  every other entry does; the budget counts them.
- ``red_merge_leader``, ``red_merge_leader_bn``: ``red_merge`` and
  ``red_merge_bn`` with ``merge_representative="leader"`` (a merged cluster
  keeps its first channel's weights): what those two entries computed
  before session 23 made the readers' combination RED's default; their
  units of sessions 21-22 are kept under these names.
- ``red_low_rank_bn`` (session 27): RED's approximate separation reaching
  the budget (``budget_knob="separation_tolerance"``, no hashing, the 1×1
  parts refitted on images synthesized from the model's BatchNormalization
  statistics, FLOPs cost) with ``restore_batchnorm=True``.

The RED units measured before session 24 hashed to the density's modes
(``snap_to="mode"``) and left the readers' biases of near-identical merges
alone; later units record ``snap_to`` (the default ``"mean"``) and
``bias_corrected_groups`` (``correct_merge_bias=True`` by default) among
their figures.

A budget an entry cannot reach (`kap.BudgetUnreachableError`: RED's budget
mode, or a callback's check before its first epoch) is a result
(`EntryCannotRun`, recorded as the unit's ``error``), not a crash.

A run (`run_entry`): the pretrained model, SGD with a fresh optimizer and
the profile's fine-tuning learning rate; the first ``rounds`` epochs with
the callback (pruning at the start of each), then the slim
``cb.pruned_model`` (a physically smaller model, recompiled with a fresh
optimizer, as the unpruned model is) for the remaining epochs. A scratch
entry follows the same two phases with its own `Schedule`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import keras
import numpy as np

import keras_autoprune as kap
from benchmarks.data import BenchData
from benchmarks.pretrain import PRETRAIN_SEED, load_pretrained
from benchmarks.profiles import ONE_SHOT_ENTRIES, SCORER_ENTRIES, SCRATCH_ENTRIES, Profile, learning_rate
from benchmarks.stages import Deadline, StageIncomplete
from benchmarks.training import compile_model, fit_epochs
from keras_autoprune.callbacks.ranked import RankedPruningCallback
from keras_autoprune.evaluation import accuracy
from keras_autoprune.stats import collect_gradient_stats
from keras_autoprune.zoo import resnet_cifar


class EntryCannotRun(Exception):
    """The entry cannot produce a model at this budget (the run records the message as its result)."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The epochs of one entry's run.

    Attributes:
        epochs: epochs trained in all.
        prune_start, prune_end: pruning rounds run at the start of epochs
            in ``[prune_start, prune_end)``, one per epoch; the callback's
            ``fit`` covers epochs ``0 .. prune_end - 1``, the slim model
            trains the rest.
        base_lr, lr_schedule: `profiles.learning_rate` over ``epochs``.
    """

    epochs: int
    prune_start: int
    prune_end: int
    base_lr: float
    lr_schedule: str

    def learning_rate(self, epoch: int) -> float:
        return learning_rate(epoch, self.base_lr, self.epochs, self.lr_schedule)


def finetune_schedule(profile: Profile) -> Schedule:
    """Every entry but the scratch ones: ``finetune_epochs``, cosine from ``finetune_lr``, rounds in the first ``rounds``."""
    return Schedule(profile.finetune_epochs, 0, profile.rounds, profile.finetune_lr, "cosine")


def scratch_schedule(profile: Profile) -> Schedule:
    """A scratch entry: the pretraining and fine-tuning epochs together, with the pretraining learning rate.

    ``n = pretrain_epochs + finetune_epochs`` epochs, the pretraining's
    schedule (``pretrain_lr``, ``pretrain_schedule``) stretched over the
    ``n`` epochs: one decay from the pretraining rate, where the others
    restart at the lower ``finetune_lr`` after pretraining. Rounds at the
    start of epochs ``1 .. n // 3``: one epoch of plain training first (so
    the filter norms and gradients are no longer those of the random
    initialisation), the hard last round by a third of the run, and two
    thirds of the epochs to train the final network (``cpu``: 21 epochs,
    rounds at epochs 1-7, the slim model from epoch 8).
    """
    epochs = profile.pretrain_epochs + profile.finetune_epochs
    start = min(1, epochs - 1)
    end = min(epochs, start + max(1, epochs // 3))
    return Schedule(epochs, start, end, profile.pretrain_lr, profile.pretrain_schedule)


def entry_schedule(entry: str, profile: Profile) -> Schedule:
    return scratch_schedule(profile) if entry in SCRATCH_ENTRIES else finetune_schedule(profile)


def starting_model(entry: str, profile: Profile, pretrained: pathlib.Path, seed: int) -> keras.Model:
    """The pretrained model, or for a scratch entry the weights pretraining started from.

    A scratch entry builds ``resnet_cifar(depth, width)`` under
    `benchmarks.pretrain.PRETRAIN_SEED`, so its starting weights are the
    same for every seed (as the pretrained weights are for the other
    entries). The global random seed is ``seed`` on return.
    """
    if entry in SCRATCH_ENTRIES:
        keras.utils.set_random_seed(PRETRAIN_SEED)
        model = resnet_cifar(profile.depth, width=profile.width)
        keras.utils.set_random_seed(seed)
        return model
    keras.utils.set_random_seed(seed)
    return load_pretrained(pretrained)


class UniformL1Callback(kap.PruningCallback):
    """Uniform L1 pruning: one ratio for every group, bisected to meet the FLOPs target.

    The plan is ``PrunePlan.uniform(graph, ratio)`` with the smallest ratio
    (to ``1e-4``) whose rebuilt model keeps at most ``target`` of the
    budgeted cost. Channels removed by an earlier round have zero weights
    under the masks, so the L1 order removes them first again.

    Attributes:
        ratio: the ratio of the last round.
    """

    ratio: float | None = None

    def compute_plan(self, target: float, removed: kap.PrunePlan | None) -> kap.PrunePlan:
        limit = target * self.budget.cost(self.model)

        def plan(ratio: float) -> kap.PrunePlan:
            return kap.PrunePlan.uniform(self.graph, ratio)

        def fits(ratio: float) -> bool:
            return self.budget.cost(kap.apply_plan(self.model, plan(ratio), self.graph)) <= limit

        low, high = 0.0, 0.999
        if not fits(high):
            raise ValueError(f"Uniform pruning cannot reach {target:.1%} of the {self.budget.metric}.")
        while high - low > 1e-4:
            middle = (low + high) / 2
            low, high = (low, middle) if fits(middle) else (middle, high)
        self.ratio = high
        result = plan(high)
        for group_id, kept_before in (removed.kept if removed is not None else {}).items():
            kept_now = result.kept.get(group_id)
            if kept_now is None or not np.isin(kept_now, kept_before).all():
                raise RuntimeError(f"Uniform round kept channels of group '{group_id}' removed earlier.")
        return result


class TaylorCallback(RankedPruningCallback):
    """First-order Taylor pruning: ``score_c = sum_{w in filters creating c} |g_w * w|``.

    ``g`` is the mean gradient of the training loss (real labels: the
    empirical Fisher) over the calibration data, from
    `keras_autoprune.stats.collect_gradient_stats`; a coupled group sums the
    filters of all layers creating the channel (biases included).

    Args:
        data: calibration ``(x, y)``.
        budget: a `kap.Budget`.
        num_batches, batch_size: calibration batches per round.
        **kwargs: `RankedPruningCallback` arguments (``max_layer_ratio``, the schedule).
    """

    def __init__(self, data: Any, budget: kap.Budget, num_batches: int, batch_size: int, **kwargs: Any):
        super().__init__(budget, **kwargs)
        self.data, self.num_batches, self.batch_size = data, num_batches, batch_size
        self.statistics_seconds = 0.0

    def check_model(self, model: keras.Model) -> None:
        self.statistics_seconds = 0.0

    def scores(self) -> dict[str, np.ndarray]:
        stats = collect_gradient_stats(
            self.model, self.data, fisher="empirical", num_batches=self.num_batches,
            batch_size=self.batch_size, graph=self.graph, verbose=0,
        )
        self.statistics_seconds += stats.seconds
        return taylor_scores(self.graph, stats)


def taylor_scores(graph: kap.DependencyGraph, stats: dict) -> dict[str, np.ndarray]:
    """``{group_id: per-channel |gradient x weight| summed over the creating filters}``."""
    layers = {record.name: record.operation for record in graph.records}
    scores = {}
    for group in graph.prunable_groups:
        total = np.zeros(group.size)
        for member in group.members:
            layer_stats = stats.get(member.layer)
            if member.side != "output" or member.tensor_index != 0 or layer_stats is None:
                continue
            layer = layers[member.layer]
            kernel = np.abs(layer_stats.kernel_grad * np.asarray(layer.kernel))
            width = kernel.shape[-2] * kernel.shape[-1] if layer_stats.kind == "depthwise_conv2d" else kernel.shape[-1]
            per_output = kernel.reshape(-1, width).sum(axis=0)
            if layer_stats.bias_grad is not None:
                per_output = per_output + np.abs(layer_stats.bias_grad * np.asarray(layer.bias))
            np.add.at(total, member.channels, per_output[member.positions])
        scores[group.id] = total
    if not any(score.any() for score in scores.values()):
        raise RuntimeError("No prunable group received a Taylor score: no gradient statistics matched its layers.")
    return scores


class RandomCallback(RankedPruningCallback):
    """Random channels: uniform random scores, the same in every round (seeded)."""

    def __init__(self, budget: kap.Budget, seed: int, **kwargs: Any):
        super().__init__(budget, **kwargs)
        self.seed = seed

    def scores(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {group.id: rng.random(group.size) for group in self.graph.prunable_groups}


def compress_one_shot(entry: str, model: keras.Model, budget: float) -> tuple[keras.Model, dict]:
    """A one-shot entry's compressed model and figures (see the module docstring).

    Raises:
        kap.BudgetUnreachableError: the budget is out of the method's reach.
    """
    if entry not in ONE_SHOT_ENTRIES:
        raise ValueError(f"Unknown one-shot entry {entry!r}. Expected one of {ONE_SHOT_ENTRIES}.")
    options = {"budget_knob": "merge_threshold", "merge_distance": "layer"} if entry.startswith("red_merge") else {}
    if entry.startswith("red_low_rank"):
        options = {"budget_knob": "separation_tolerance", "bandwidth_scale": 0.0, "verbose": 0}
    if "_leader" in entry:
        options["merge_representative"] = "leader"
    options["restore_batchnorm"] = entry.endswith("_bn")
    start = time.perf_counter()
    result = kap.red.compress(model, budget=kap.Budget(flops=budget), **options)
    figures = {"pruning_seconds": time.perf_counter() - start, "bandwidth_scale": result.bandwidth_scale,
               "merge_threshold": result.merge_threshold, "snap_to": result.snap_to,
               "bias_corrected_groups": len(result.bias_corrected),
               "neurons_merged": result.neurons_merged, "batchnorm_folded": len(result.folded_norms),
               "separation_tolerance": result.separation_tolerance,
               "convolutions_approximated": len(result.approximations)}
    return result.model, figures


def make_callback(
    entry: str, profile: Profile, budget: float | None, calibration: tuple, seed: int
) -> kap.PruningCallback | None:
    """The entry's callback (None for ``unpruned`` and the one-shot entries)."""
    if entry == "unpruned" or entry in ONE_SHOT_ENTRIES:
        return None
    target = kap.Budget(flops=budget)
    window = entry_schedule(entry, profile)
    schedule = {"rounds": profile.rounds, "verbose": 0}
    calibration_options = {"num_batches": profile.calibration_batches, "batch_size": profile.batch_size}
    if entry == "uniform_l1":
        return UniformL1Callback(target, **schedule)
    if entry == "global_l1":
        return kap.MagnitudeCallback(target, **schedule)
    if entry == "taylor":
        return TaylorCallback(calibration, target, **calibration_options, **schedule)
    if entry == "random":
        return RandomCallback(target, seed, **schedule)
    if entry in ("nap", "nap_cost_aware"):
        return kap.NAPCallback(calibration, budget=target, scorer="nap", cost_aware=entry == "nap_cost_aware",
                               **calibration_options, **schedule)
    if entry == "fisher_cost_aware":
        return kap.NAPCallback(calibration, budget=target, scorer="fisher", cost_aware=True, **calibration_options, **schedule)
    if entry in SCORER_ENTRIES:
        return kap.NAPCallback(calibration, budget=target, scorer=entry.replace("_", "-"), **calibration_options, **schedule)
    if entry in ("eigendamage", "eigendamage_capped"):
        # The capped variant keeps at least a quarter of every layer side (the default cap keeps 5%).
        cap = {"max_layer_ratio": 0.75} if entry == "eigendamage_capped" else {}
        return kap.EigenDamageCallback(calibration, budget=target, **cap, **calibration_options, **schedule)
    if entry in ("psap", "psap_scratch"):
        return kap.PSAPCallback(target, calibration, start_epoch=window.prune_start, end_epoch=window.prune_end,
                                rounds=window.prune_end - window.prune_start, **calibration_options, verbose=0)
    raise ValueError(f"Unknown entry {entry!r}.")


def run_entry(
    entry: str,
    profile: Profile,
    data: BenchData,
    pretrained: pathlib.Path,
    budget: float | None,
    seed: int,
    folder: pathlib.Path,
    deadline: Deadline | None = None,
) -> tuple[keras.Model, dict]:
    """Fine-tunes (and prunes) one entry; returns the final model and its figures.

    With a deadline, the fine-tuning after the pruning epochs stops early if
    needed: the model and its progress are saved in ``folder`` and
    `StageIncomplete` is raised; the next call continues from there.
    """
    state_path, checkpoint = folder / "state.json", folder / "checkpoint.keras"
    schedule = entry_schedule(entry, profile)
    lr = schedule.learning_rate
    train = {"data": data, "batch_size": profile.batch_size, "seed": seed, "learning_rate": lr, "keras_module": keras}
    if state_path.exists():
        state = json.loads(state_path.read_text())
        model = keras.saving.load_model(checkpoint)
    else:
        model = starting_model(entry, profile, pretrained, seed)
        reference = {"flops": kap.count_flops(model), "params": kap.count_params(model)}
        one_shot = {}
        try:  # RED's budget mode, or a callback's `on_train_begin`, checks the budget before any work
            if entry in ONE_SHOT_ENTRIES:
                model, one_shot = compress_one_shot(entry, model, budget)
            callback = make_callback(entry, profile, budget, data.calibration(profile.calibration_batches * profile.batch_size), seed)
            compile_model(model, keras, lr(0), profile.weight_decay)
            phase = fit_epochs(model, first=0, last=schedule.prune_end, callbacks=[callback] if callback else [], **train)
        except kap.BudgetUnreachableError as error:
            raise EntryCannotRun(f"{type(error).__name__}: {error}") from error
        if callback is not None:
            model = callback.pruned_model
            (folder / "plan.json").write_text(callback.plan.to_json())
        state = {
            "end_epoch": phase.end_epoch,
            "fit_seconds": phase.seconds,
            "pruning_seconds": getattr(callback, "pruning_seconds", one_shot.get("pruning_seconds", 0.0)),
            "statistics_seconds": getattr(callback, "statistics_seconds", 0.0),
            "flops_kept": kap.count_flops(model) / reference["flops"],
            "params_kept": kap.count_params(model) / reference["params"],
            "flops": kap.count_flops(model),
            "params": kap.count_params(model),
            "uniform_ratio": getattr(callback, "ratio", None),
            "epochs": schedule.epochs,
            "round_epochs": [0] if one_shot else [round_["epoch"] for round_ in getattr(callback, "history", [])],
            **{k: v for k, v in one_shot.items() if k != "pruning_seconds"},
        }
        compile_model(model, keras, lr(phase.end_epoch), profile.weight_decay)
    phase = fit_epochs(model, first=state["end_epoch"], last=schedule.epochs, deadline=deadline, **train)
    state.update(end_epoch=phase.end_epoch, fit_seconds=state["fit_seconds"] + phase.seconds)
    if phase.end_epoch < schedule.epochs:
        model.save(checkpoint)
        state_path.write_text(json.dumps(state))
        raise StageIncomplete(f"{entry}: fine-tuning stopped after epoch {phase.end_epoch}")
    state.pop("end_epoch")
    checkpoint.unlink(missing_ok=True)
    figures = dict(entry=entry, budget=budget, seed=seed, accuracy=accuracy(model, (data.x_test, data.y_test)), **state)
    return model, figures
