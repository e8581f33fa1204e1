"""`EigenDamageCallback`: EigenDamage pruning in the Kronecker-factored eigenbasis during `fit`."""

from __future__ import annotations

from typing import Any

import keras

from keras_autoprune.budget import Budget, round_up_fraction
from keras_autoprune.callbacks.base import PruningCallback
from keras_autoprune.callbacks.calibration import (
    CalibrationSource,
    check_counts,
    check_readable,
    fisher_facts,
    resolve_fisher,
)
from keras_autoprune.errors import BudgetUnreachableError
from keras_autoprune.callbacks.projections import ProjectionSet
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.methods import eigendamage
from keras_autoprune.stats import collect_direction_fisher, collect_kfac
from keras_autoprune.stats.kfac import APPROXIMATIONS
from keras_autoprune.surgery.factorization import FactorizationPlan

#: Unit roundoff of low-precision compute dtypes: the three layers round
#: differently from the one they replace, so the final check allows more.
_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
SCORERS = ("kfac", "fisher")
"""How directions are scored: K-FAC's eigenbasis importance, or the exact Fisher of each removal."""


class EigenDamageCallback(PruningCallback):
    """Prunes eigen-directions of each layer's K-FAC eigenbasis; layers keep their widths.

    At each round, channel-only K-FAC factors are collected on ``data``,
    every eligible layer (Dense, Conv1D, Conv2D; not the classifier) is
    rotated into the eigenbasis of its factors, and the globally least
    important in- and out-directions are removed until the round's target
    is met (see `keras_autoprune.methods.eigendamage`). During the rest of
    ``fit`` each pruned kernel is kept in its subspace by a projection
    applied inside the compiled train step
    (`keras_autoprune.callbacks.projections`). Later rounds re-collect the
    factors on the projected model and compose the bases.

    At the end, ``pruned_model`` is the model with every pruned layer
    replaced by three standard layers -- 1×1 rotation, core with the
    original kernel size, 1×1 rotation carrying the bias and activation --
    grouped in a `keras.Sequential` block named like the layer. Input and
    output widths are unchanged, so BatchNormalization and residual
    connections are untouched. ``plan`` is a `kap.FactorizationPlan` (JSON
    with the bases); ``report`` compares the two models.

    Args:
        data: calibration data: ``(x, y)`` arrays, a batched `tf.data.Dataset`,
            a `keras.utils.PyDataset` or an iterable of batches. A generator
            (any one-shot iterator) can be read once, and the default
            ``scorer="fisher"`` reads the data twice per round: a generator
            needs ``scorer="kfac", rounds=1`` and a new generator for each
            ``fit``.
        budget: `kap.Budget` to reach, counting the rotation layers.
        rounds: pruning rounds; the kept fraction ramps linearly.
        max_layer_ratio: a pruning never removes more than this fraction of
            a layer's original input (or output) directions, and always
            keeps one. Default 0.95 (the reference default).
        fisher: ``"true"`` (labels sampled from the model, default) or
            ``"empirical"``; a loss that defines no distribution uses the
            empirical Fisher, as for `NAPCallback`.
        num_batches: calibration batches per round (None: all of ``data``).
        batch_size: batch size when ``data`` is in-memory arrays.
        kfac_approximation: ``"expand"`` (default) or ``"reduce"``: how the
            locations of a convolution enter the factors (`collect_kfac`'s
            ``approximation``; measured in docs/methods/eigendamage.md).
        cost_aware: rank directions by importance per FLOP (or parameter,
            as the budget counts) that each saves, not by importance alone
            (`keras_autoprune.methods.eigendamage`, step 3). Default True
            (since issue 12; False ranks by importance, as the paper).
        scorer: ``"fisher"`` (default since issue 12): the exact Fisher of
            removing each direction, in a second calibration pass per round
            (`keras_autoprune.stats.direction_fisher`), the bases still from
            the K-FAC factors; or ``"kfac"``, the paper's importance in the
            K-FAC eigenbasis (one pass). ``scorer="kfac", cost_aware=False``
            is the method before issue 12; docs/methods/eigendamage.md shows
            both on the benchmark's converged models.
        **kwargs: ``start_epoch``, ``end_epoch``, ``check_tolerance``,
            ``verbose`` (see `PruningCallback`).

    Example:

    >>> cb = kap.EigenDamageCallback((x_cal, y_cal), budget=kap.Budget(flops=0.5), rounds=2)  # doctest: +SKIP
    >>> model.fit(x, y, epochs=6, callbacks=[cb])                                              # doctest: +SKIP
    >>> cb.pruned_model.save("slim.keras"); open("plan.json", "w").write(cb.plan.to_json())    # doctest: +SKIP
    """

    plan_class = FactorizationPlan

    decision_settings = ("max_layer_ratio", "fisher", "kfac_approximation", "cost_aware", "scorer")

    def __init__(
        self,
        data: Any,
        budget: Budget,
        rounds: int = 1,
        *,
        max_layer_ratio: float = 0.95,
        fisher: str = "true",
        num_batches: int | None = None,
        batch_size: int = 32,
        kfac_approximation: str = "expand",
        cost_aware: bool = True,
        scorer: str = "fisher",
        **kwargs: Any,
    ):
        super().__init__(budget, rounds=rounds, **kwargs)
        if data is None:
            raise ValueError("`data` (calibration batches) is required for the K-FAC statistics. Received: data=None")
        if isinstance(max_layer_ratio, bool) or not isinstance(max_layer_ratio, (int, float)) or not 0 < max_layer_ratio < 1:
            raise ValueError(
                "`max_layer_ratio` is the largest fraction of a layer's directions one plan removes, in (0, 1), "
                f"e.g. 0.95 or 0.5. Received: max_layer_ratio={max_layer_ratio!r}"
            )
        if fisher not in ("true", "empirical"):
            raise ValueError(f"`fisher` must be 'true' or 'empirical'. Received: fisher={fisher!r}")
        if kfac_approximation not in APPROXIMATIONS:
            raise ValueError(
                f"`kfac_approximation` must be one of {APPROXIMATIONS}. Received: kfac_approximation={kfac_approximation!r}"
            )
        if scorer not in SCORERS:
            raise ValueError(f"`scorer` must be one of {SCORERS}. Received: scorer={scorer!r}")
        if not isinstance(cost_aware, bool):
            raise ValueError(f"`cost_aware` must be True or False. Received: cost_aware={cost_aware!r}")
        check_readable(data, rounds, "EigenDamageCallback", passes_per_round=2 if scorer == "fisher" else 1,
                       once="scorer='kfac'")
        self.data = data
        self.max_layer_ratio = float(max_layer_ratio)
        self.fisher = fisher
        check_counts(num_batches, batch_size)
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.kfac_approximation = kfac_approximation
        self.cost_aware = cost_aware
        self.scorer = scorer

    # -- lifecycle additions -------------------------------------------
    def check_graph(self, graph: DependencyGraph) -> None:
        self._layers = eigendamage.eligible_layers(graph)
        if not self._layers:
            raise ValueError(
                f"Model '{graph.model.name}' has no layer EigenDamage can factorise: it needs Dense, Conv1D or "
                "Conv2D layers (ungrouped, not quantized) besides the classifier, i.e. whose outputs do not reach "
                "a model output. Use kap.NAPCallback for other models."
            )

    def check_model(self, model: keras.Model) -> None:
        # Fail before the first epoch on a loss, data or budget that cannot work.
        self._likelihood, self._fisher = resolve_fisher(model, self.fisher, "EigenDamageCallback", self.verbose)
        self._source = CalibrationSource(self.data, model, batch_size=self.batch_size,
                                         require_labels=self._fisher == "empirical", owner="EigenDamageCallback",
                                         likelihood=self._likelihood, num_batches=self.num_batches)
        self.statistics_seconds = 0.0
        self._cost = eigendamage.FactorizedCost(model, self._layers)
        self._check_reachable(model)

    def _check_reachable(self, model: keras.Model) -> None:
        metric = self.budget.metric
        smallest = self._cost.smallest(self.max_layer_ratio)
        floor = self._cost.cost(smallest, metric)
        if floor > self.budget.fraction * self._cost.total[metric]:
            fraction = floor / self._cost.total[metric]
            raise BudgetUnreachableError(
                f"Expected a budget EigenDamage can reach on model '{model.name}'. Received: kap.Budget({metric}="
                f"{self.budget.fraction}), but with every factorisable layer at its smallest core "
                f"(max_layer_ratio={self.max_layer_ratio}) the model keeps {fraction:.1%} of its {metric} (only "
                f"{len(self._cost.layers)} layer(s) can be factorised, the classifier and layers of other kinds stay "
                f"whole, and the rotation layers add their own cost). Fix: kap.Budget({metric}={round_up_fraction(fraction)}) or "
                "more, or a larger max_layer_ratio."
            )

    def sample_inputs(self):
        return self._source.sample_inputs

    def run_facts(self) -> dict:
        return fisher_facts(self._likelihood, self._fisher)

    def rebuilt_tolerance(self) -> float:
        roundoff = max((_ROUNDOFF.get(l.dtype_policy.compute_dtype, 0.0) for l in self._cost.layers.values()), default=0.0)
        return max(self.check_tolerance, 32 * roundoff)

    def method_state(self):
        return {"statistics_seconds": self.statistics_seconds}, {}

    def restore_method_state(self, values, arrays) -> None:
        self.statistics_seconds = values["statistics_seconds"]

    def restore_constraints(self) -> None:
        if self.plan is not None:
            self._projections.apply(self.plan)

    def check_budget(self, model: keras.Model) -> None:
        """EigenDamage's floor is that of its factorised layers (`_check_reachable`, in ``check_model``)."""

    def install_constraints(self, model: keras.Model) -> None:
        self._projections = ProjectionSet(self._layers)
        self._projections.install(getattr(model, "distribute_strategy", None))

    def remove_constraints(self) -> None:
        self._projections.remove()

    def prune_round(self, target: float) -> None:
        factors = collect_kfac(
            self.model, self._source.data, layers=list(self._layers), fisher=self._fisher, num_batches=self.num_batches,
            batch_size=self.batch_size, full_input_factor=False, approximation=self.kfac_approximation,
            graph=self.graph, verbose=self.verbose,
        )
        self.statistics_seconds += factors.seconds
        plan = eigendamage.eigendamage_plan(
            self.model, factors, self._cost, self.budget, target, self.plan, max_layer_ratio=self.max_layer_ratio,
            cost_aware=self.cost_aware, direction_scorer=self._direction_fisher if self.scorer == "fisher" else None,
        )
        self._projections.apply(plan)
        self.plan = plan

    def _direction_fisher(self, bases: dict) -> dict:
        """The exact Fisher of removing each direction of ``bases`` (`stats.collect_direction_fisher`)."""
        result = collect_direction_fisher(
            self.model, self._source.data, {name: (f.q_in, f.q_out) for name, f in bases.items()}, fisher=self._fisher,
            num_batches=self.num_batches, batch_size=self.batch_size, graph=self.graph, verbose=self.verbose,
        )
        self.statistics_seconds += result.seconds
        return dict(result)

    def measure_kept(self) -> dict[str, float]:
        return self._cost.kept(self.plan)

    def build_pruned_model(self) -> keras.Model:
        return self.plan.apply(self.model)

