"""Pricing and scoring candidates: `cost_function`, `uniform_gene`, `CandidateScorer`.

A candidate's cost is its fraction of the original model's FLOPs or
parameters (`kap.PlanCost`) or of its latency estimated by a `LatencyTable`;
its score is the top-1 accuracy of its generated slim model, with
BatchNormalization statistics re-estimated, on held-out data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from keras_autoprune.allocation.cost import PlanCost
from keras_autoprune.batchnorm import recalibrate_batchnorm
from keras_autoprune.budget import Budget
from keras_autoprune.errors import BudgetUnreachableError
from keras_autoprune.evaluation import accuracy
from keras_autoprune.metapruning.genes import Gene, GeneSpace
from keras_autoprune.metapruning.latency import LatencyTable
from keras_autoprune.metapruning.pruningnet import PruningNet
from keras_autoprune.stats.calibration import CalibrationData
from keras_autoprune.surgery.plan import PrunePlan


class CandidateScorer:
    """Scores a gene: its generated slim model, BatchNormalization re-estimated, top-1 on held-out data.

    Args:
        net: the trained `PruningNet`.
        validation_data: labelled held-out batches (re-iterable: arrays or
            a `tf.data.Dataset`).
        recalibration_data: training batches for `kap.recalibrate_batchnorm`
            (re-iterable).
        recalibration_batches: batches used to re-estimate the statistics
            (the paper: about 100; 20 of 128 images are enough on CIFAR).
        batch_size: batch size for in-memory arrays.
    """

    def __init__(self, net: PruningNet, validation_data: Any, recalibration_data: Any,
                 recalibration_batches: int = 20, batch_size: int = 128):
        check_scoring(net.base, validation_data, recalibration_data, recalibration_batches, batch_size)
        self.net = net
        self.validation_data = validation_data
        self.recalibration_data = recalibration_data
        self.recalibration_batches = recalibration_batches
        self.batch_size = batch_size

    def model(self, gene: Gene) -> keras.Model:
        """The slim model of ``gene`` with generated weights and re-estimated statistics."""
        slim = self.net.materialize(gene)
        recalibrate_batchnorm(slim, self.recalibration_data, batch_size=self.batch_size,
                              num_batches=self.recalibration_batches)
        return slim

    def __call__(self, gene: Gene) -> float:
        """Top-1 accuracy of ``gene``'s model on the validation data."""
        return accuracy(self.model(gene), self.validation_data, batch_size=self.batch_size)


def check_scoring(model: keras.Model, validation_data: Any, recalibration_data: Any,
                  recalibration_batches: int = 20, batch_size: int = 128) -> None:
    """Raises ValueError unless `CandidateScorer` can score ``model``'s genes with these inputs.

    The counts must be ints >= 1; the first batch of each data set is read
    and checked against ``model`` (labels, input shapes, classes), so that
    `search` refuses them before the PruningNet is built and trained.
    """
    for name, value in (("recalibration_batches", recalibration_batches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={value!r}")
    if validation_data is None or recalibration_data is None:
        raise ValueError("CandidateScorer needs labelled `validation_data` and `recalibration_data` batches. "
                         f"Received: validation_data={type(validation_data).__name__}, "
                         f"recalibration_data={type(recalibration_data).__name__}")
    CalibrationData(validation_data, model, batch_size=batch_size,
                    labels_reason="candidates are scored by their top-1 accuracy on `validation_data`")
    CalibrationData(recalibration_data, model, batch_size=batch_size, num_batches=recalibration_batches,
                    require_labels=False)


def cost_function(net: PruningNet, budget: Budget, latency_table: LatencyTable | None = None) -> Callable[[Gene], float]:
    """``gene -> fraction of the original cost`` for ``budget``'s metric (FLOPs, parameters, latency)."""
    check_latency_table(budget, latency_table)
    space = net.space
    if budget.metric == "latency":
        table = latency_table.bind(net.base, net.graph)
        return lambda gene: table.estimate(space.plan(gene)) / table.full_ms
    plan_cost = PlanCost(net.base, net.graph)
    full = plan_cost(PrunePlan({}), budget.metric)
    return lambda gene: plan_cost(space.plan(gene), budget.metric) / full


def check_latency_table(budget: Budget, latency_table: Any) -> None:
    """Raises ValueError for a latency ``budget`` without a `LatencyTable`."""
    if budget.metric == "latency" and not isinstance(latency_table, LatencyTable):
        raise ValueError(
            "A latency budget prices candidates with a latency table measured on the target. Received: "
            f"latency_table={latency_table!r}. Fix: `table = kap.metapruning.LatencyTable.build(model)` "
            "(on the target, or load a saved one) and pass `latency_table=table`."
        )


def uniform_gene(space: GeneSpace, cost: Callable[[Gene], float], budget: float) -> Gene:
    """The widest uniform gene (every group at the same scale) whose cost fraction is at most ``budget``."""
    for choice in reversed(range(len(space.scales))):
        gene = space.uniform(choice)
        if cost(gene) <= budget:
            return gene
    raise BudgetUnreachableError(
        f"Expected a budget that a uniform width can reach. Received: budget={budget!r}, but every group at the "
        f"smallest scale ({space.scales[0]}) keeps {cost(space.uniform(0)):.1%}, and no gene costs less. Fix: a larger "
        "budget, or smaller `scales`.")
