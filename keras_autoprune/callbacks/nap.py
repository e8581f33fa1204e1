"""`NAPCallback`: NAP pruning (curvature saliency, global ranking) during `fit`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from keras_autoprune.accounting import count_params
from keras_autoprune.budget import Budget, round_up_fraction
from keras_autoprune.callbacks.nap_weights import WeightGranularityMixin
from keras_autoprune.callbacks.ranked import DEFAULT_MAX_LAYER_RATIO, RankedPruningCallback
from keras_autoprune.callbacks.calibration import (
    CalibrationSource,
    check_counts,
    check_readable,
    fisher_facts,
    resolve_fisher,
)
from keras_autoprune.evaluation import accuracy
from keras_autoprune.methods import nap
from keras_autoprune.stats import collect_channel_fisher, collect_kfac
from keras_autoprune.stats.calibration import CalibrationData
from keras_autoprune.surgery.plan import PrunePlan

_GRANULARITIES = ("channel", "weight")
TOLERANCE_MODE_BUDGET = 0.1
"""Fraction of the FLOPs tolerance mode aims at without a ``budget`` (raised to the model's floor if above)."""


class NAPCallback(WeightGranularityMixin, RankedPruningCallback):
    """Prunes with NAP: curvature-based saliency, per-layer ratios found automatically.

    At each round, curvature statistics are collected on ``data``, every
    channel gets a saliency (the loss increase its removal causes, see
    `keras_autoprune.methods.nap`), and the globally least salient channels
    go until the round's target is met. No per-layer ratio is needed.

    Default (since issue 12): the exact channel-level Fisher of each removal
    (``scorer="fisher"``), ranked per FLOP (or parameter) saved
    (``cost_aware=True``): on the converged benchmark models it keeps more
    accuracy at every one-shot target than K-FAC's OBS saliency
    (``scorer="nap", cost_aware=False``, the default before; docs/methods/nap.md).

    Args:
        data: calibration data: ``(x, y)`` arrays, a batched `tf.data.Dataset`,
            a `keras.utils.PyDataset` or an iterable of batches. A generator
            (any one-shot iterator) can be read once: it needs ``rounds=1``
            and a new generator for each ``fit``. Labels are only needed
            with ``fisher="empirical"``.
        budget: `kap.Budget` to reach. In tolerance mode it is the most the
            callback may prune (default there: ``Budget(flops=0.1)``, or the
            least the model can keep when that is more).
        rounds: pruning rounds, the kept fraction ramping linearly.
        granularity: ``"channel"`` (structured, default: channels are
            removed by surgery at the end) or ``"weight"`` (fine-grained
            per-weight masks on Dense/Conv kernels; needs a params budget;
            the returned model has the same shapes with zeroed weights and no
            masks).
        fisher: ``"true"`` (labels sampled from the model, default) or
            ``"empirical"``. The model's compiled loss defines ``p(y|x)``:
            cross-entropies (per position too), MSE, MAE, several outputs
            with their ``loss_weights``; any other loss uses the empirical
            Fisher (``data`` then needs labels). ``report.extra["fisher"]``
            says which was used (`keras_autoprune.stats.loss`).
        num_batches: calibration batches per round (None: all of ``data``).
        batch_size: batch size when ``data`` is in-memory arrays.
        damping: relative damping of the K-FAC inverses. Default 1e-3.
        scorer: how channels are scored (default None: ``"fisher"``;
            ``"nap"`` with ``granularity="weight"``, ``obs_update=True`` or
            ``input_side=True``, which need it): ``"nap"`` (K-FAC's OBS
            saliency, `keras_autoprune.methods.nap`) or a classic curvature baseline from the
            EigenDamage paper, ranked the same way: ``"kron-obs"``
            (``½ w_iᵀ A w_i / [G⁻¹]_ii``), ``"kron-obd"``
            (``½ G_ii w_iᵀ A w_i``), ``"c-obs"``
            (``½ Σ_j W_ji² / ([A⁻¹]_jj [G⁻¹]_ii)``) or ``"c-obd"``
            (``½ Σ_j W_ji² A_jj G_ii``), see `keras_autoprune.scoring.baselines`.
            Baselines are output-side only and need ``granularity="channel"``.
            ``"fisher"``: the exact channel-level Fisher of removing a channel
            as its readers see it, ``½ E_b[(Σ_p x_bpc ∂ℓ_b/∂x_bpc)²]``,
            from a statistics pass of its own instead of K-FAC
            (`keras_autoprune.stats.channel_fisher`; channel granularity, no
            ``obs_update``).
        input_side: add the saliency of the layers reading a channel
            (default None: True for ``scorer="nap"``; the baselines reject
            True).
        cost_aware: rank by saliency per FLOP (or parameter) saved (default
            None: True with ``scorer="fisher"``, False with the K-FAC scorers,
            as measured in docs/methods/nap.md).
        obs_update: compensate the remaining outputs of a pruned layer with
            the OBS update.
        max_layer_ratio: the largest fraction of any layer's channels the
            ranking removes, in (0, 1]. Default 0.9: every layer keeps at
            least a tenth of its channels, a guard against layer collapse
            (`keras_autoprune.callbacks.ranked`); 1.0: down to one channel
            (the behaviour before issue 12).
        validation_data: labelled data for tolerance mode.
        max_accuracy_drop: tolerance mode: after each round's epoch, if the
            validation accuracy fell more than this below the unpruned
            model's (measured just before the first round, so after the
            epochs before ``start_epoch``), the round is undone and pruning
            stops. The last round that met the tolerance is kept.
        **kwargs: ``start_epoch``, ``end_epoch``, ``check_tolerance``,
            ``verbose`` (see `PruningCallback`).

    Example:

    >>> cb = kap.NAPCallback((x_cal, y_cal), budget=kap.Budget(flops=0.5), rounds=2)  # doctest: +SKIP
    >>> model.fit(x, y, epochs=6, callbacks=[cb])                                      # doctest: +SKIP
    >>> cb.pruned_model.summary()                                                      # doctest: +SKIP
    """

    decision_settings = ("max_layer_ratio", "granularity", "fisher", "damping", "scorer", "input_side", "cost_aware",
                         "obs_update", "max_accuracy_drop")

    def __init__(
        self,
        data: Any,
        budget: Budget | None = None,
        rounds: int = 1,
        *,
        granularity: str = "channel",
        fisher: str = "true",
        num_batches: int | None = None,
        batch_size: int = 32,
        damping: float = 1e-3,
        scorer: str | None = None,
        input_side: bool | None = None,
        cost_aware: bool | None = None,
        obs_update: bool = False,
        max_layer_ratio: float = DEFAULT_MAX_LAYER_RATIO,
        validation_data: Any = None,
        max_accuracy_drop: float | None = None,
        **kwargs: Any,
    ):
        tolerance_mode = validation_data is not None or max_accuracy_drop is not None
        if tolerance_mode and (validation_data is None or max_accuracy_drop is None):
            raise ValueError(
                "Tolerance mode needs both `validation_data` and `max_accuracy_drop` (e.g. 0.01). "
                f"Received: validation_data={'given' if validation_data is not None else None}, "
                f"max_accuracy_drop={max_accuracy_drop}"
            )
        budget_given = budget is not None
        if budget is None:
            if not tolerance_mode:
                raise ValueError(
                    "Give a `budget` (e.g. `kap.Budget(flops=0.5)`), or use tolerance mode with "
                    "`validation_data=...` and `max_accuracy_drop=0.01`. Received: budget=None"
                )
            # single weights save parameters, channels FLOPs
            budget = Budget(**{"params" if granularity == "weight" else "flops": TOLERANCE_MODE_BUDGET})
        super().__init__(budget, rounds=rounds, max_layer_ratio=max_layer_ratio, **kwargs)
        self._budget_given = budget_given
        if data is None:
            raise ValueError("`data` (calibration batches) is required for the curvature statistics. Received: data=None")
        if granularity not in _GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {_GRANULARITIES}. Received: granularity={granularity!r}")
        if granularity == "weight" and budget.metric != "params":
            raise ValueError(
                "granularity='weight' zeroes single weights, which saves parameters, not dense FLOPs: "
                f"use a parameter budget, e.g. kap.Budget(params=0.2). Received: budget={budget}"
            )
        if scorer is None:  # the options that only K-FAC's OBS saliency has select it
            scorer = "nap" if granularity == "weight" or obs_update or input_side else "fisher"
        if cost_aware is None:
            cost_aware = scorer == "fisher"
        input_side = nap.check_scorer(scorer, input_side)
        if granularity == "weight" and scorer != "nap":
            raise ValueError(
                "The baseline scorers rank whole output channels: use granularity='channel', or "
                "scorer='nap' for per-weight saliencies (NAP's weight saliency is the per-weight term of C-OBS). "
                f"Received: granularity={granularity!r}, scorer={scorer!r}"
            )
        if scorer == "fisher" and obs_update:
            raise ValueError(
                "obs_update needs K-FAC factors, which scorer='fisher' does not collect. "
                "Received: scorer='fisher', obs_update=True. Fix: obs_update=False, or another scorer."
            )
        if fisher not in ("true", "empirical"):
            raise ValueError(f"`fisher` must be 'true' or 'empirical'. Received: fisher={fisher!r}")
        if (isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not math.isfinite(damping)
                or damping <= 0):
            raise ValueError(f"`damping` must be a finite number > 0, e.g. 1e-3. Received: damping={damping!r}")
        if max_accuracy_drop is not None and (isinstance(max_accuracy_drop, bool)
                                              or not isinstance(max_accuracy_drop, numbers.Real)
                                              or not 0 <= max_accuracy_drop < 1):
            raise ValueError(f"`max_accuracy_drop` is a fraction in [0, 1), e.g. 0.01. Received: {max_accuracy_drop!r}")
        if isinstance(validation_data, Iterator):
            raise ValueError(
                "NAPCallback: expected `validation_data` that can be read once for the unpruned model and once after "
                f"every round. Received: a one-shot iterator ({type(validation_data).__name__}). Fix: pass arrays "
                "(x, y), a tf.data.Dataset, a keras.utils.PyDataset or a list of batches."
            )
        check_readable(data, rounds, "NAPCallback")
        check_counts(num_batches, batch_size)
        self.data = data
        self.granularity = granularity
        self.masks_every_layer = granularity == "weight"  # single weights are masked in any Dense/Conv kernel
        self.fisher = fisher
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.damping = damping
        self.scorer = scorer
        self.input_side = input_side
        self.cost_aware = cost_aware
        self.obs_update = obs_update
        self.validation_data = validation_data
        self.max_accuracy_drop = max_accuracy_drop

    # -- lifecycle additions -------------------------------------------
    def check_model(self, model: keras.Model) -> None:
        # Fail before the first epoch on data that does not fit the model.
        self._likelihood, self._fisher = resolve_fisher(model, self.fisher, "NAPCallback", self.verbose)
        self._source = CalibrationSource(self.data, model, batch_size=self.batch_size,
                                         require_labels=self._fisher == "empirical", owner="NAPCallback",
                                         likelihood=self._likelihood, num_batches=self.num_batches)
        if self.validation_data is not None:  # its first batch, checked now rather than at the first round
            CalibrationData(self.validation_data, model, batch_size=self.batch_size,
                            labels_reason="tolerance mode measures the top-1 accuracy on `validation_data`")
        self.statistics_seconds = 0.0
        self.weight_masks: dict[str, np.ndarray] | None = None
        self.base_accuracy = None  # measured just before the first round (`prune_round`)
        self._snapshot = None

    def sample_inputs(self):
        return self._source.sample_inputs

    def run_facts(self) -> dict:
        return fisher_facts(self._likelihood, self._fisher)

    def check_graph(self, graph) -> None:
        if self.granularity == "channel":  # single weights need no prunable channel group
            super().check_graph(graph)

    def smallest_plan(self) -> PrunePlan:
        """The ranked floor, with the groups the scorer cannot score left whole (`nap.scorable_groups`)."""
        scorable = nap.scorable_groups(self.graph, self.scorer, self.input_side)
        return PrunePlan({gid: kept for gid, kept in super().smallest_plan().kept.items() if gid in scorable})

    def floor_note(self) -> str:
        scorable = nap.scorable_groups(self.graph, self.scorer, self.input_side)
        unscored = sorted(g.id for g in self.graph.prunable_groups if g.id not in scorable)
        if not unscored:
            return ""
        return (f"; so do the groups scorer={self.scorer!r} cannot score, as none of the layers it reads there can be "
                f"tapped: {unscored[:8]}{' ...' if len(unscored) > 8 else ''} (another scorer may reach them)")

    def check_budget(self, model: keras.Model) -> None:
        if self.granularity == "weight":
            total = count_params(model)
            if not self._budget_given:  # tolerance mode's own default: a step above the floor, not an error
                above_floor = round_up_fraction(min(1.0, self._weight_floor(total) + 0.01))
                self.budget = Budget(params=max(TOLERANCE_MODE_BUDGET, above_floor))
            self._weight_fraction(self.budget.fraction, total)  # raises when out of reach
            return
        if not self._budget_given:  # tolerance mode's own default: as far as the model goes, not an error
            floor = self.budget_floor()
            self.budget = Budget(flops=max(TOLERANCE_MODE_BUDGET, round_up_fraction(floor)))
        super().check_budget(model)

    def method_state(self):
        masks = {f"weight_mask:{name}": mask for name, mask in (self.weight_masks or {}).items()}
        return {"base_accuracy": self.base_accuracy, "statistics_seconds": self.statistics_seconds}, masks

    def restore_method_state(self, values, arrays) -> None:
        self.base_accuracy = values["base_accuracy"]  # of the unpruned model, not of the resumed one
        self.statistics_seconds = values["statistics_seconds"]
        masks = {name.split(":", 1)[1]: mask for name, mask in arrays.items() if name.startswith("weight_mask:")}
        self.weight_masks = masks or None

    def restore_constraints(self) -> None:
        if self.granularity == "weight" and self.weight_masks is not None:
            self._apply_weight_masks(self.weight_masks)
        elif self.granularity == "channel":
            super().restore_constraints()

    def _factors(self):
        collect = collect_channel_fisher if self.scorer == "fisher" else collect_kfac
        factors = collect(
            self.model,
            self._source.data,
            fisher=self._fisher,
            num_batches=self.num_batches,
            batch_size=self.batch_size,
            graph=self.graph,
            verbose=self.verbose,
        )
        self.statistics_seconds += factors.seconds
        return factors

    def prune_round(self, target: float) -> None:
        if self.validation_data is not None:
            if self.base_accuracy is None:  # the unpruned model as trained so far (restored on resume)
                self.base_accuracy = accuracy(self.model, self.validation_data, self.batch_size)
            self._snapshot = ([v.numpy() for v in self.model.weights], self.plan, self.weight_masks, self._kept)
        factors = self._factors()
        if self.granularity == "weight":
            self._weight_round(factors, target)
            return
        plan = nap.nap_plan(
            self.model, self.graph, factors, self.budget, target, self.plan, self.max_layer_ratio, self.plan_cost(),
            damping=self.damping, input_side=self.input_side, cost_aware=self.cost_aware, scorer=self.scorer,
        )
        if self.obs_update:
            nap.obs_update(self.graph, factors, plan, self.damping)
        plan.validate(self.graph)
        self._masks.apply(plan)
        self.plan = plan

    def on_epoch_end(self, epoch, logs=None):
        if self._snapshot is not None and epoch in self._epochs and not self.stopped:
            self._judge_round(epoch, logs)
        super().on_epoch_end(epoch, logs)

    def _judge_round(self, epoch: int, logs) -> None:
        value = accuracy(self.model, self.validation_data, self.batch_size)
        drop = self.base_accuracy - value
        self.history[-1].update(val_accuracy=value, accepted=drop <= self.max_accuracy_drop)
        if logs is not None:
            logs["pruned_val_accuracy"] = value
        snapshot, self._snapshot = self._snapshot, None  # each round is judged once, after its own epoch
        if drop <= self.max_accuracy_drop:
            return
        weights, plan, masks, kept = snapshot
        for variable, value_before in zip(self.model.weights, weights):
            variable.assign(value_before)
        self.plan, self.weight_masks, self._kept = plan, masks, kept
        if self.granularity == "weight" and masks is not None:
            self._apply_weight_masks(masks)
        elif self.granularity == "channel" and plan is not None:
            self._masks.apply(plan)
        else:  # the first round is undone: no mask may stay
            self._masks.apply(PrunePlan({}))
        self.stopped = True
        if self.verbose:
            print(
                f"\nNAPCallback: validation accuracy {value:.4f} is {drop:.4f} below the unpruned "
                f"{self.base_accuracy:.4f} (> max_accuracy_drop={self.max_accuracy_drop}): round undone, pruning stops."
            )

    def on_train_end(self, logs=None):
        if self.stopped and self.plan is None and self.weight_masks is None:
            self.plan = PrunePlan({})  # no round met the tolerance: the unpruned model
        super().on_train_end(logs)

    def measure_kept(self) -> dict[str, float]:
        return super().measure_kept() if self.granularity == "channel" else self._weight_kept()

    def build_pruned_model(self) -> keras.Model:
        return super().build_pruned_model() if self.granularity == "channel" else self._weight_pruned_model()
