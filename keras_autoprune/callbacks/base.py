"""`PruningCallback`: the lifecycle of pruning inside `model.fit`.

A subclass only decides *what* to prune (`compute_plan`); this base class
owns *when* and *how*:

1. ``__init__`` checks the arguments (before any training).
2. ``on_train_begin`` resets all state (instances are reusable), checks the
   model (`DependencyGraph`, ``check_graph``, ``check_model``), installs the
   in-step enforcement as variable constraints (``install_constraints``:
   masks, `keras_autoprune.callbacks.masks`, by default; projections for
   EigenDamage) and records the original cost.
3. At the beginning of each scheduled epoch (`round_epochs`) it asks the
   subclass for a plan meeting that round's target (`round_targets`) and
   applies it to the masks. Channels removed once stay removed.
4. ``on_epoch_end`` adds ``flops_kept``, ``params_kept`` and
   ``pruning_seconds`` (time spent in statistics and decisions so far) to
   ``logs``, so `History`, TensorBoard and progress bars show them.
5. ``on_train_end`` removes the constraints (``remove_constraints``), sets ``self.plan``, builds
   ``self.pruned_model = kap.apply_plan(model, plan)``, checks it against the
   masked model on a batch, and sets ``self.report``.

The user's model keeps its masked (zeroed) weights after training; the slim
model is ``cb.pruned_model``.

``cb.prune(model)`` runs the same lifecycle once without training (one-shot,
post-training pruning) on a copy of the model (`keras_autoprune.callbacks.oneshot`).

Interrupted training: with ``state_dir`` the state is written at the end of
every epoch and a resumed ``fit`` (``BackupAndRestore``, or a checkpoint and
``fit(initial_epoch=e)``) continues from it (`keras_autoprune.callbacks.state`).
A ``fit`` that starts after a scheduled round without that state fails at
its first epoch instead of losing the pruning silently.
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings

import keras
import numpy as np

from keras_autoprune.accounting import count_flops, count_params
from keras_autoprune.allocation.cost import PlanCost
from keras_autoprune.allocation.schedule import round_epochs, round_targets
from keras_autoprune.budget import Budget, round_up_fraction
from keras_autoprune.callbacks.masks import MaskSet
from keras_autoprune.callbacks.oneshot import OneShotMixin
from keras_autoprune.callbacks.state import ResumeMixin, StateStore
from keras_autoprune.errors import BudgetUnreachableError, SurgeryError
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.report import PruningReport
from keras_autoprune.surgery.plan import PrunePlan
from keras_autoprune.surgery.rebuild import apply_plan


class PruningCallback(OneShotMixin, ResumeMixin, keras.callbacks.Callback):
    """Base class of the pruning callbacks (lifecycle only).

    Args:
        budget: a `kap.Budget`, the fraction of FLOPs or parameters kept.
        start_epoch: first epoch (0-based) with a pruning round. Default 0.
        end_epoch: rounds are spread over ``[start_epoch, end_epoch)``;
            default ``start_epoch + rounds`` (one round per epoch). Epochs
            after the last round fine-tune the pruned network.
        rounds: number of pruning rounds; the kept fraction ramps linearly
            to the budget. Default 1.
        check_tolerance: relative tolerance of the final check that the
            rebuilt model equals the masked one. Default 1e-4.
        verbose: 0 silent; 1 a line per round and, for methods that read
            calibration data, a progress bar over its batches; 2 the same
            with one line per pass instead of a bar (for logs). Default 1.
        state_dir: folder for the pruning state, written at the end of every
            epoch, so that an interrupted ``fit`` resumes with its pruning
            (give the same folder and arguments to the resumed run). Default
            None: no state is written.
    """

    #: How the kept fraction ramps over the rounds (`allocation.round_targets`).
    ramp: str = "linear"
    #: The class of ``plan`` (how a state file stores it).
    plan_class = PrunePlan

    def __init__(
        self,
        budget: Budget,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        rounds: int = 1,
        check_tolerance: float = 1e-4,
        verbose: int = 1,
        state_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        if not isinstance(budget, Budget):
            raise TypeError(
                "`budget` must be a kap.Budget, e.g. `kap.Budget(flops=0.5)`. "
                f"Received: budget={budget!r} of type {type(budget).__name__}"
            )
        budget.require_countable(type(self).__name__)
        for name, value in (("start_epoch", start_epoch), ("rounds", rounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "rounds" else 0):
                raise ValueError(
                    f"`{name}` must be an integer >= {1 if name == 'rounds' else 0}. Received: {name}={value!r}"
                )
        if end_epoch is None:
            end_epoch = start_epoch + rounds
        if isinstance(end_epoch, bool) or not isinstance(end_epoch, int) or end_epoch - start_epoch < rounds:
            raise ValueError(
                f"`end_epoch` must leave room for {rounds} round(s) after start_epoch={start_epoch} "
                f"(end_epoch >= start_epoch + rounds). Received: end_epoch={end_epoch!r}"
            )
        if (isinstance(check_tolerance, bool) or not isinstance(check_tolerance, numbers.Real)
                or not math.isfinite(check_tolerance) or check_tolerance <= 0):
            raise ValueError(
                "`check_tolerance` must be a finite number > 0, the relative error allowed between the rebuilt and "
                f"the masked model. Received: check_tolerance={check_tolerance!r}. Fix: leave the default 1e-4."
            )
        if verbose not in (0, 1, 2) or not isinstance(verbose, numbers.Integral):
            raise ValueError(f"`verbose` must be 0 (silent), 1 or 2 (a line per round). Received: verbose={verbose!r}")
        self.budget = budget
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.rounds = rounds
        self.check_tolerance = check_tolerance
        self.verbose = verbose
        self.state_dir = state_dir
        self._store = StateStore(state_dir) if state_dir is not None else None
        self._reset()

    # -- to be provided by a method ------------------------------------
    def compute_plan(self, target: float, removed: PrunePlan | None) -> PrunePlan:
        """The plan keeping at most ``target`` of the original cost.

        Args:
            target: fraction of the budgeted cost to keep after this round.
            removed: the current plan; its removed channels must stay removed.
        """
        raise NotImplementedError

    def check_model(self, model: keras.Model) -> None:
        """Method-specific checks of the model, called in ``on_train_begin``."""

    def run_facts(self) -> dict:
        """Method facts for the report's ``extra`` (e.g. which Fisher the statistics used)."""
        return {}

    def check_budget(self, model: keras.Model) -> None:
        """Raises before training when the budget is below the smallest model the method can build.

        The floor is ``model`` rebuilt with `smallest_plan` (every prunable
        channel group down to one channel, one chunk for GroupNormalization
        groups, or the method's per-layer floor); layers whose channels
        cannot be pruned stay whole.
        """
        floor = self.budget_floor()
        if floor > self.budget.fraction:
            metric = self.budget.metric
            raise BudgetUnreachableError(
                f"Expected a budget {type(self).__name__} can reach on model '{model.name}'. Received: "
                f"kap.Budget({metric}={self.budget.fraction}), but with every prunable channel group at its smallest "
                f"(one channel, or the layer floor `max_layer_ratio` keeps) the model keeps {floor:.1%} of its {metric} (the layers whose channels cannot be pruned "
                f"stay whole: see kap.DependencyGraph(model).summary()){self.floor_note()}. Fix: kap.Budget({metric}="
                f"{round_up_fraction(floor)}) or more."
            )

    def floor_note(self) -> str:
        """More on what `smallest_plan` leaves whole, for the unreachable-budget message (default: nothing)."""
        return ""

    def budget_floor(self) -> float:
        """The fraction of the budget's metric that `smallest_plan` keeps on the fit's model: the least reachable.

        Raises:
            RuntimeError: before `fit` or `prune` has started (no model yet).
        """
        if self.graph is None:
            raise RuntimeError(
                f"Expected {type(self).__name__}.budget_floor() after `fit` or `prune` has started: it is measured "
                "on the model being pruned. Received: a callback with no model yet. Fix: call it once fit/prune has "
                "begun, or read the fraction in the kap.BudgetUnreachableError that fit raises for a budget below it."
            )
        cost, metric = self.plan_cost(), self.budget.metric
        return cost(self.smallest_plan(), metric) / cost(PrunePlan({}), metric)

    def plan_cost(self) -> PlanCost:
        """Exact FLOPs or parameters of a plan on the fit's model, without rebuilding it (`PlanCost`, one per fit)."""
        if self._plan_cost is None:
            self._plan_cost = PlanCost(self.model, self.graph)
        return self._plan_cost

    def smallest_plan(self) -> PrunePlan:
        """The plan of the smallest model the method builds: every prunable group down to one channel."""
        return PrunePlan.uniform(self.graph, 1.0 - 1e-9, importance="last")

    def sample_inputs(self):
        """A batch of inputs for the final rebuilt-vs-masked check (or None)."""
        return None

    def method_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What the method keeps between rounds, for a state file: JSON values and named arrays (default: none)."""
        return {}, {}

    def restore_method_state(self, values: dict, arrays: dict[str, np.ndarray]) -> None:
        """Undoes `method_state` when a ``fit`` resumes (``plan`` and ``history`` are restored already)."""

    def restore_constraints(self) -> None:
        """Puts the restored plan back into the in-step enforcement (default: enforced channel masks)."""
        if self.plan is not None:
            self._masks.apply(self.plan)

    def rebuilt_tolerance(self) -> float:
        """Relative tolerance of the final rebuilt-vs-masked check (default ``check_tolerance``)."""
        return self.check_tolerance

    def prune_round(self, target: float) -> None:
        """One pruning round: a new plan for ``target``, applied to the masks."""
        plan = self.compute_plan(target, self.plan)
        plan.validate(self.graph)
        self._masks.apply(plan)
        self.plan = plan

    def measure_kept(self) -> dict[str, float]:
        """FLOPs and parameters of the current plan, as fractions of the original."""
        cost = self.plan_cost()
        return {metric: cost(self.plan, metric) / self._original[metric] for metric in ("flops", "params")}

    def build_pruned_model(self) -> keras.Model:
        """The final slim model (called once, after the masks are removed)."""
        self._masks.apply(self.plan)  # also zeroes non-trainable entries (moving means)
        return apply_plan(self.model, self.plan, self.graph)

    # -- one-shot -------------------------------------------------------
    # -- lifecycle -----------------------------------------------------
    def _reset(self) -> None:
        self.plan: PrunePlan | None = None
        self.pruned_model: keras.Model | None = None
        self.report = None
        self.graph: DependencyGraph | None = None
        self.history: list[dict] = []
        self.pruning_seconds = 0.0
        #: True once a method decides to prune no further (tolerance mode).
        self.stopped = False
        self._masks: MaskSet | None = None
        self._installed = False
        self._original = {}
        self._plan_cost: PlanCost | None = None
        self._epochs: dict[int, float] = {}
        self._first_epoch: int | None = None

    def check_graph(self, graph: DependencyGraph) -> None:
        """Raises unless the method has something to prune (default: a prunable channel group)."""
        if not graph.prunable_groups:
            raise ValueError(
                f"Model '{graph.model.name}' has no prunable channel group (see `kap.DependencyGraph(model).summary()`): "
                "every channel reaches an input/output or crosses a layer without a handler."
            )

    #: Whether masks go on every layer with weights (single-weight pruning), not only on prunable channels.
    masks_every_layer = False

    def install_constraints(self, model: keras.Model) -> None:
        """Puts the in-step enforcement on the model's variables (default: channel masks)."""
        self._masks = MaskSet(self.graph, every_layer=self.masks_every_layer)
        self._masks.install(getattr(model, "distribute_strategy", None))

    def remove_constraints(self) -> None:
        """Undoes `install_constraints`."""
        self._masks.remove()

    def on_train_begin(self, logs=None):
        if self._installed:  # an earlier fit raised before on_train_end: its constraints are still on
            self.remove_constraints()
        self._reset()
        model = self.model
        self.graph = DependencyGraph(model)
        self.check_graph(self.graph)
        self.check_model(model)
        self.check_budget(model)
        self._original = {"flops": count_flops(model), "params": count_params(model)}
        self._epochs = dict(zip(round_epochs(self.start_epoch, self.end_epoch, self.rounds), round_targets(self.budget.fraction, self.rounds, self.ramp)))
        self._kept = {"flops": 1.0, "params": 1.0}
        self._check_fit_reaches_the_rounds()
        self.install_constraints(model)
        self._installed = True
        model.make_train_function(force=True)  # retrace: the constraints are now part of the step

    def _check_fit_reaches_the_rounds(self) -> None:
        """Raises before training when ``fit(epochs=...)`` ends before the last round (warns with a ``state_dir``,
        where a later ``fit`` resumes the pruning)."""
        epochs = (self.params or {}).get("epochs")
        last = max(self._epochs)
        if epochs is None or last < epochs:
            return
        rounds = ", ".join(str(e + 1) for e in sorted(self._epochs))
        problem = (f"{type(self).__name__} prunes at the start of epoch(s) {rounds} (1-based), but this fit runs "
                   f"{epochs} epoch(s): the round(s) from epoch {last + 1} on would not run and the model would not "
                   f"reach {self.budget}.")
        if self._store is not None:
            warnings.warn(f"{problem} The pruning state is saved in {self.state_dir!r}: a later fit with the same "
                          "callback arguments and state_dir resumes it.", stacklevel=2)
            return
        raise ValueError(f"Expected a fit that reaches the last pruning round. Received: fit(epochs={epochs}). "
                         f"{problem} Fix: fit(epochs={last + 1}) or more (plus the epochs that fine-tune after the last "
                         "round), or a callback with a smaller start_epoch, end_epoch or number of rounds.")

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch
            self._resume(epoch)
        if epoch not in self._epochs or self.stopped:
            return
        start = time.perf_counter()
        target = self._epochs[epoch]
        self.prune_round(target)
        self._kept = self.measure_kept()
        seconds = time.perf_counter() - start
        self.pruning_seconds += seconds
        self.history.append(dict(epoch=epoch, target=target, seconds=seconds, **{f"{k}_kept": v for k, v in self._kept.items()}))
        if self.verbose:
            print(
                f"\n{type(self).__name__}: epoch {epoch + 1}, round {len(self.history)}/{self.rounds}: "
                f"target {target:.1%} of {self.budget.metric}; FLOPs kept {self._kept['flops']:.1%}, "
                f"params kept {self._kept['params']:.1%} ({seconds:.1f} s)"
            )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["flops_kept"] = self._kept["flops"]
            logs["params_kept"] = self._kept["params"]
            logs["pruning_seconds"] = self.pruning_seconds
        if self._store is not None:
            self._save_state(epoch)

    def on_train_end(self, logs=None):
        if not self._installed:
            return
        self.remove_constraints()
        self._installed = False
        self.model.train_function = None  # the next fit traces a step without masks
        if len(self.history) < self.rounds and not self.stopped:
            warnings.warn(
                f"{type(self).__name__}: training ended after {len(self.history)} of {self.rounds} pruning round(s) "
                f"(the last one is at the start of epoch {max(self._epochs) + 1}), so the model does not reach "
                f"{self.budget}" + (": nothing was pruned and `pruned_model` is None." if self.plan is None else
                                    f"; `pruned_model` keeps {self._kept['flops']:.1%} of the FLOPs and "
                                    f"{self._kept['params']:.1%} of the parameters.")
                + (f" Its state is in {self.state_dir!r}: resume with the same arguments." if self._store else ""),
                stacklevel=2)
        if self.plan is None:
            return  # training stopped before the first round
        self.pruned_model = self.build_pruned_model()
        self._check_rebuilt()
        self.report = self._make_report()

    def _check_rebuilt(self) -> None:
        inputs = self.sample_inputs()
        if inputs is None:
            rng = np.random.default_rng(0)
            inputs = [rng.normal(size=(2,) + tuple(t.shape[1:])).astype("float32") for t in self.model.inputs]
            inputs = inputs[0] if len(inputs) == 1 else inputs
        expected = [np.asarray(o, np.float64) for o in keras.tree.flatten(self.model(inputs, training=False))]
        received = [np.asarray(o, np.float64) for o in keras.tree.flatten(self.pruned_model(inputs, training=False))]
        largest = max(max(float(np.max(np.abs(e))) for e in expected), 1e-12)
        error = max(float(np.max(np.abs(e - r))) for e, r in zip(expected, received)) / largest
        tolerance = self.rebuilt_tolerance()
        if error > tolerance:
            raise SurgeryError(
                f"The rebuilt model differs from the masked model by {error:.3g} (relative), above "
                f"the tolerance {tolerance:.3g} (check_tolerance={self.check_tolerance}). "
                "This is a bug in keras_autoprune; please report it."
            )

    def _make_report(self):
        return PruningReport.from_models(
            self.model,
            self.pruned_model,
            plan=self.plan,
            extra={"method": type(self).__name__, "budget": str(self.budget), "pruning_seconds": self.pruning_seconds,
                   **self.run_facts()},
        )
