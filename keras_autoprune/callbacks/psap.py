"""`PSAPCallback`: protective self-adaptive pruning during `fit`, also from scratch."""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_autoprune.budget import Budget
from keras_autoprune.callbacks.base import PruningCallback
from keras_autoprune.callbacks.calibration import (
    CalibrationSource,
    check_counts,
    check_readable,
    fisher_facts,
    resolve_fisher,
)
from keras_autoprune.methods import psap
from keras_autoprune.stats import collect_gradient_stats
from keras_autoprune.surgery.importance import channel_l1
from keras_autoprune.surgery.plan import PrunePlan


class PSAPCallback(PruningCallback):
    """Prunes with PSAP: per-layer ratios from weight sparsity, soft pruning, gradient protection.

    Every epoch from ``start_epoch`` to ``end_epoch`` (one round per epoch by
    default) the model-wide target ramps (cubic) towards the budget; each
    group's share follows its weight sparsity ratio; the lowest-norm filters
    are zeroed *softly* (they keep training and may grow back), and a
    gradient-norm EMA protects important filters and lets wrongly pruned ones
    recover. The last round prunes for good: its masks are enforced in the
    train step, and the slim model is rebuilt at the end. Needs no
    pre-trained model (``start_epoch=0`` on a fresh one prunes from scratch).
    See `keras_autoprune.methods.psap` and docs/methods/psap.md.

    Args:
        budget: `kap.Budget` reached at the last round.
        data: a few batches for the gradient statistics (one calibration
            pass per round; ``num_batches`` bounds it), with labels: PSAP
            always uses the real labels (empirical Fisher), since the mean
            gradient of labels sampled from the model is zero in
            expectation.
        start_epoch, end_epoch, rounds: schedule; default one round per
            epoch over ``[start_epoch, end_epoch)``.
        kappa: ``ε_l = κ · mean|W_l|`` in the weight sparsity ratio. Default 0.05.
        max_layer_ratio: the largest fraction of a group's channels removed
            in all (every group keeps at least ``1 - max_layer_ratio``; the
            budget check before training counts with this floor). Default 0.8.
        protect_quantile: active filters in this top fraction of gradient
            EMA are spared. Default 0.1.
        ema: decay of the gradient-norm EMA. Default 0.5.
        num_batches: calibration batches per round. Default 2.
        batch_size: batch size for in-memory ``data``.
        **kwargs: ``check_tolerance``, ``verbose`` (see `PruningCallback`).
    """

    ramp = "cubic"

    decision_settings = ("kappa", "max_layer_ratio", "protect_quantile", "ema")

    def __init__(
        self,
        budget: Budget,
        data: Any,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        rounds: int | None = None,
        *,
        kappa: float = 0.05,
        max_layer_ratio: float = 0.8,
        protect_quantile: float = 0.1,
        ema: float = 0.5,
        num_batches: int = 2,
        batch_size: int = 64,
        **kwargs: Any,
    ):
        if end_epoch is not None and rounds is None:
            rounds = max(1, end_epoch - start_epoch)
        rounds = 1 if rounds is None else rounds
        super().__init__(budget, start_epoch=start_epoch, end_epoch=end_epoch, rounds=rounds, **kwargs)
        if data is None:
            raise ValueError("`data` (a few labelled batches) is required for the gradient statistics. Received: data=None")
        for name, value, low, high in (
            ("kappa", kappa, 0.0, 1.0), ("max_layer_ratio", max_layer_ratio, 0.0, 1.0),
            ("protect_quantile", protect_quantile, 0.0, 1.0), ("ema", ema, 0.0, 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high or (
                name in ("kappa", "max_layer_ratio") and value == 0
            ):
                raise ValueError(f"`{name}` must lie in {'(' if name in ('kappa', 'max_layer_ratio') else '['}{low}, {high}). Received: {name}={value!r}")
        check_readable(data, self.rounds, "PSAPCallback")
        self.data = data
        self.kappa = kappa
        self.max_layer_ratio = max_layer_ratio
        self.protect_quantile = protect_quantile
        self.ema = ema
        check_counts(num_batches, batch_size)
        self.num_batches = num_batches
        self.batch_size = batch_size

    def check_model(self, model) -> None:
        # The real labels: the mean gradient of labels sampled from the model is zero in expectation.
        self._likelihood, self._fisher = resolve_fisher(model, "empirical", "PSAPCallback", self.verbose)
        self._source = CalibrationSource(self.data, model, batch_size=self.batch_size, owner="PSAPCallback",
                                         require_labels=self._fisher == "empirical", likelihood=self._likelihood,
                                         num_batches=self.num_batches)
        self.grad_ema: dict[str, np.ndarray] = {}
        self.statistics_seconds = 0.0

    def run_facts(self) -> dict:
        return fisher_facts(self._likelihood, self._fisher)

    def smallest_plan(self) -> PrunePlan:
        """Every prunable group at its floor: ``max_layer_ratio`` of its channels removed (`psap.psap_plan` caps there)."""
        return PrunePlan.uniform(self.graph, self.max_layer_ratio, importance="last")

    def method_state(self):
        emas = {f"grad_ema:{group_id}": value for group_id, value in self.grad_ema.items()}
        return {"statistics_seconds": self.statistics_seconds}, emas

    def restore_method_state(self, values, arrays) -> None:
        self.statistics_seconds = values["statistics_seconds"]
        self.grad_ema = {name.split(":", 1)[1]: value for name, value in arrays.items() if name.startswith("grad_ema:")}

    def restore_constraints(self) -> None:
        # Soft rounds enforce nothing (their zeroed filters train on and may have regrown in the restored
        # weights); after the hard round the masks are enforced.
        if self.plan is not None and len(self.history) == self.rounds:
            self._masks.apply(self.plan, enforce=True)

    def prune_round(self, target: float) -> None:
        gradients = collect_gradient_stats(
            self.model, self._source.data, fisher=self._fisher, num_batches=self.num_batches,
            batch_size=self.batch_size, graph=self.graph, verbose=self.verbose,
        )
        self.statistics_seconds += gradients.seconds
        norms = psap.group_gradient_norms(self.graph, gradients)
        for group_id, value in norms.items():
            previous = self.grad_ema.get(group_id)
            self.grad_ema[group_id] = value if previous is None else self.ema * previous + (1 - self.ema) * value
        zeroed = {g.id: np.zeros(g.size, bool) for g in self.graph.prunable_groups}
        for group_id, kept in (self.plan.kept if self.plan is not None else {}).items():
            zeroed[group_id][:] = True
            zeroed[group_id][kept] = False
        final = len(self.history) + 1 == self.rounds
        if final:  # the hard round: a channel still all zero has not regrown and is not worth keeping
            filters = channel_l1(self.graph)
            zeroed = {g: off & (filters[g] == 0) for g, off in zeroed.items()}
        protected = psap.protected_channels(self.grad_ema, zeroed, self.protect_quantile, regrow=not final)
        sparsity = psap.group_sparsity(self.graph, self.kappa)
        plan = psap.adaptive_plan(
            self.model, self.graph, self.budget, target, sparsity, protected, self.max_layer_ratio, self.plan_cost()
        )
        plan.validate(self.graph)
        self._masks.apply(plan, enforce=final)
        self.plan = plan
        self.last_sparsity = sparsity
        self.last_protected = protected

    def compute_plan(self, target: float, removed: PrunePlan | None) -> PrunePlan:  # pragma: no cover
        raise NotImplementedError("PSAPCallback computes its plans in prune_round")
