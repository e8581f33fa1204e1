"""`search`: MetaPruning end to end (train a PruningNet, search, build the winner).

>>> result = kap.metapruning.search(model, train_ds, kap.Budget(flops=0.5),
...                                 validation_data=held_out)        # doctest: +SKIP
>>> result.model, result.report, result.history.best_scores       # doctest: +SKIP

The stages are usable on their own: `PruningNet` + `train_pruningnet` (or a
plain ``fit`` with a `GeneSampler`), `CandidateScorer`, `EvolutionarySearch`,
`PruningNet.materialize`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_autoprune.allocation.cost import PlanCost
from keras_autoprune.batchnorm import recalibrate_batchnorm
from keras_autoprune.budget import Budget
from keras_autoprune.callbacks.state import fingerprint as fingerprint_variables
from keras_autoprune.evaluation import accuracy, output_activation
from keras_autoprune.errors import BudgetUnreachableError
from keras_autoprune.metapruning.evolution import EvolutionarySearch, SearchHistory, SearchSettings
from keras_autoprune.metapruning.genes import DEFAULT_SCALES, Gene, GeneSpace
from keras_autoprune.metapruning.latency import LatencyTable
from keras_autoprune.metapruning.pruningnet import GeneSampler, PruningNet
from keras_autoprune.report import PruningReport
from keras_autoprune.stats.calibration import CalibrationData
from keras_autoprune.surgery.plan import PrunePlan


def train_pruningnet(net: PruningNet, data: Any, epochs: int = 1, learning_rate: float | None = None,
                     label_smoothing: float = 0.1, from_logits: bool | None = None, seed: int = 0,
                     batch_size: int = 128, decay: bool = True, callbacks: Sequence[keras.callbacks.Callback] = (),
                     verbose: int | str = "auto"):
    """Trains ``net`` with ``fit``, one random gene per batch (the paper's recipe).

    SGD (Nesterov momentum 0.9) with the learning rate decayed linearly to 0
    over the run (constant when the number of batches is unknown), label
    smoothing on the cross-entropy. For another recipe, compile ``net``
    yourself and call ``net.fit(..., callbacks=[GeneSampler()])``.

    ``(x, y)`` arrays are shuffled each epoch by a permutation drawn from
    ``seed``, so the same seed trains the same network; a dataset is read in
    the order it yields.

    Args:
        net: the `PruningNet`.
        data: labelled training batches for ``fit`` (a batched
            `tf.data.Dataset` of ``(x, y)``, integer or one-hot labels).
        epochs: passes over ``data``.
        learning_rate: initial rate; default 0.01 for a warm-started
            PruningNet, 0.1 from scratch.
        label_smoothing: label smoothing (the paper: 0.1).
        from_logits: whether the model outputs logits; default: ``True``
            unless its last layer applies a softmax.
        seed: seed of the genes drawn (and of the order of ``(x, y)``
            arrays). Training in stages, give each call its own seed: the
            same seed draws the same genes in the same order again.
        batch_size: batch size for ``(x, y)`` arrays.
        decay: decay the rate linearly to 0 over this call (``False``: keep
            it constant, e.g. when training in one-epoch stages with your own
            per-stage rate).
        callbacks: more callbacks for ``fit`` (e.g. `keras.callbacks.BackupAndRestore`).
        verbose: ``fit``'s verbosity.

    Returns:
        The `keras.callbacks.History` of ``fit``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an int >= 1. Received: epochs={epochs!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"`label_smoothing` must be in [0, 1). Received: label_smoothing={label_smoothing!r}")
    rate = learning_rate if learning_rate is not None else (0.01 if net.warm_start else 0.1)
    arrays = _is_labelled_arrays(data)
    steps = -(-len(data[0]) // batch_size) if arrays else _batches(data)
    if steps and decay:
        rate = keras.optimizers.schedules.PolynomialDecay(rate, decay_steps=steps * epochs, end_learning_rate=0.0)
    logits = output_activation(net.base) != "softmax" if from_logits is None else bool(from_logits)
    classes = int(net.base.outputs[0].shape[-1])
    net.compile(optimizer=keras.optimizers.SGD(rate, momentum=0.9, nesterov=True),
                loss=SmoothedCrossentropy(classes, label_smoothing, logits))
    if arrays:  # its own seeded order; `fit` would shuffle its batches unseeded
        return net.fit(_ShuffledArrays(*data, batch_size=batch_size, seed=seed), epochs=epochs, shuffle=False,
                       callbacks=[GeneSampler(seed), *callbacks], verbose=verbose)
    return net.fit(data, epochs=epochs, callbacks=[GeneSampler(seed), *callbacks], verbose=verbose)


class _ShuffledArrays(keras.utils.PyDataset):
    """``(x, y)`` arrays in batches, in a new permutation drawn from ``seed`` at every epoch.

    The same seed gives the same batches in every run, in one ``fit`` (so that
    callbacks such as ``BackupAndRestore`` or ``EarlyStopping`` see one
    training, not one per epoch). When training in stages (one call per
    epoch), give each stage its own ``seed``, or every stage repeats the same
    order.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(x))

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index: int):
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self._order = self._rng.permutation(len(self.x))


class SmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy with label smoothing for integer or one-hot labels.

    ``y = (1 - s) onehot + s / K``; loss ``-sum_k y_k log p_k``.
    """

    def __init__(self, classes: int, label_smoothing: float = 0.1, from_logits: bool = True,
                 name: str = "smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.classes, self.label_smoothing, self.from_logits = classes, label_smoothing, from_logits

    def call(self, y_true, y_pred):
        if len(y_true.shape) < len(y_pred.shape) or y_true.shape[-1] != self.classes:
            y_true = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), self.classes)
        return keras.losses.categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "classes": self.classes, "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits}


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
        for name, value in (("recalibration_batches", recalibration_batches), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={value!r}")
        if validation_data is None or recalibration_data is None:
            raise ValueError("CandidateScorer needs labelled `validation_data` and `recalibration_data` batches. "
                             f"Received: validation_data={type(validation_data).__name__}, "
                             f"recalibration_data={type(recalibration_data).__name__}")
        # the first batch of each is checked now (labels, input shapes, classes), not after a long training
        CalibrationData(validation_data, net.base, batch_size=batch_size,
                        labels_reason="candidates are scored by their top-1 accuracy on `validation_data`")
        CalibrationData(recalibration_data, net.base, batch_size=batch_size, num_batches=recalibration_batches,
                        require_labels=False)
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


def cost_function(net: PruningNet, budget: Budget, latency_table: LatencyTable | None = None):
    """``gene -> fraction of the original cost`` for ``budget``'s metric (FLOPs, parameters, latency)."""
    _check_latency_table(budget, latency_table)
    space = net.space
    if budget.metric == "latency":
        table = latency_table.bind(net.base, net.graph)
        return lambda gene: table.estimate(space.plan(gene)) / table.full_ms
    plan_cost = PlanCost(net.base, net.graph)
    full = plan_cost(PrunePlan({}), budget.metric)
    return lambda gene: plan_cost(space.plan(gene), budget.metric) / full


def _check_latency_table(budget: Budget, latency_table: Any) -> None:
    if budget.metric == "latency" and not isinstance(latency_table, LatencyTable):
        raise ValueError(
            "A latency budget prices candidates with a latency table measured on the target. Received: "
            f"latency_table={latency_table!r}. Fix: `table = kap.metapruning.LatencyTable.build(model)` "
            "(on the target, or load a saved one) and pass `latency_table=table`."
        )


def uniform_gene(space: GeneSpace, cost, budget: float) -> Gene:
    """The widest uniform gene (every group at the same scale) whose cost fraction is at most ``budget``."""
    for choice in reversed(range(len(space.scales))):
        gene = space.uniform(choice)
        if cost(gene) <= budget:
            return gene
    raise BudgetUnreachableError(
        f"Expected a budget that a uniform width can reach. Received: budget={budget!r}, but every group at the "
        f"smallest scale ({space.scales[0]}) keeps {cost(space.uniform(0)):.1%}, and no gene costs less. Fix: a larger "
        "budget, or smaller `scales`.")


@dataclasses.dataclass
class SearchResult:
    """What `search` found.

    Attributes:
        model: the winner, a plain Keras model with the PruningNet's
            generated weights and re-estimated BatchNormalization statistics
            (train it further with the usual recipe, or use `scratch_model`).
        gene: the winner's gene; widths: ``{group_id: channels kept}``.
        plan: the winner's `kap.PrunePlan` on the original model.
        score: its held-out accuracy in the search; cost: its cost fraction.
        report: a `kap.PruningReport` of the original against the winner.
        history: the `SearchHistory` (best score per iteration, every score).
        pruningnet: the trained `PruningNet` (search again with another budget).
        train_seconds, search_seconds: time in PruningNet training and in the search.
    """

    model: keras.Model
    gene: Gene
    widths: dict[str, int]
    plan: PrunePlan
    score: float
    cost: float
    report: PruningReport
    history: SearchHistory
    pruningnet: PruningNet
    train_seconds: float
    search_seconds: float

    def scratch_model(self) -> keras.Model:
        """The winner's architecture with freshly initialised weights (to train from scratch)."""
        return keras.models.clone_model(self.model)


def search(model: keras.Model, data: Any, budget: Budget, *, validation_data: Any = None,
           recalibration_data: Any = None, epochs: int | None = None, pruningnet: PruningNet | None = None,
           scales: Sequence[float] = DEFAULT_SCALES, window: float = 0.05, settings: SearchSettings | None = None,
           latency_table: LatencyTable | None = None, recalibration_batches: int = 20, batch_size: int = 128,
           seed: int = 0, cache_path: str | os.PathLike | None = None, verbose: int = 1) -> SearchResult:
    """MetaPruning: trains a `PruningNet` on ``data``, searches genes under ``budget``, builds the winner.

    Args:
        model: the model to prune (never changed).
        data: labelled training batches (a batched `tf.data.Dataset`, or
            ``(x, y)`` arrays) for the PruningNet's training.
        budget: `kap.Budget` of FLOPs, parameters or latency (a latency
            budget needs ``latency_table``).
        validation_data: labelled held-out batches that score candidates;
            default: for ``(x, y)`` arrays, 10% of them (at most 5,000, drawn
            with ``seed``), held out of the training; a dataset needs it
            explicitly.
        recalibration_data: batches re-estimating BatchNormalization before
            each score; default ``data``.
        epochs: PruningNet training epochs; default 1, or 0 when a trained
            ``pruningnet`` is given (pass more to train it further: that
            changes its weights, so an earlier score cache no longer applies).
        pruningnet: a `PruningNet` of ``model`` already built (and trained).
        scales: width choices per gene (the paper's 31 by default).
        window: candidates cost between ``budget - window`` and ``budget``
            (fractions of the original); 0 accepts the budget exactly only.
        settings: `SearchSettings` (population, iterations, ...).
        latency_table: a `LatencyTable` of ``model`` for latency budgets.
        recalibration_batches, batch_size: see `CandidateScorer`.
        seed: seed of training genes, search draws and generators.
        cache_path: JSON file of scored genes (resumes an interrupted search;
            keyed by a fingerprint of the trained PruningNet, so scores of
            another network are refused). An existing file with ``epochs > 0``
            is refused before the training, which would change the net.
        verbose: 1 shows progress, 0 is silent.

    Returns:
        A `SearchResult`.
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"`budget` must be a kap.Budget, e.g. kap.Budget(flops=0.5). Received: budget={budget!r}")
    if not 0 <= window < budget.fraction:
        raise ValueError(f"`window` must be in [0, budget) = [0, {budget.fraction}). Received: window={window!r}")
    if epochs is None:
        epochs = 0 if pruningnet is not None else 1
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0 or (epochs == 0 and pruningnet is None):
        raise ValueError(
            f"`epochs` must be an int >= 1 (>= 0 when a trained `pruningnet` is given). Received: epochs={epochs!r}"
        )
    if settings is not None and not isinstance(settings, SearchSettings):
        raise TypeError(f"`settings` must be a kap.metapruning.SearchSettings or None. Received: settings={settings!r}")
    _check_latency_table(budget, latency_table)
    if epochs and cache_path is not None and pathlib.Path(cache_path).exists():
        raise ValueError(
            f"Expected a `cache_path` of this search's PruningNet. Received: cache_path={str(cache_path)!r}, a file "
            f"that exists, with epochs={epochs}: the PruningNet trains first, which changes the weights the scores "
            "belong to, so the file would be refused after the training. Fix: to resume a search, pass the trained "
            "net (pruningnet=result.pruningnet, epochs=0); otherwise use another `cache_path` or delete the file."
        )
    data, validation_data = _held_out(data, validation_data, seed)
    recalibration_data = data if recalibration_data is None else recalibration_data
    if pruningnet is not None:
        _check_pruningnet(pruningnet, model, scales)
    net = pruningnet if pruningnet is not None else PruningNet(model, scales=scales, seed=seed)
    # Everything that can be checked is checked before the (long) training.
    cost = functools.cache(cost_function(net, budget, latency_table))  # shared by the check and the search
    uniform_gene(net.space, cost, budget.fraction)  # the cheapest gene is the uniform smallest one
    scorer = CandidateScorer(net, validation_data, recalibration_data, recalibration_batches, batch_size)
    low = budget.fraction - window
    EvolutionarySearch(net.space, scorer, cost, high=budget.fraction, low=low, settings=settings, seed=seed,
                       verbose=0).first_population()  # costs only: a window no gene reaches fails here
    start = time.perf_counter()
    if epochs:
        train_pruningnet(net, data, epochs=epochs, seed=seed, batch_size=batch_size, verbose="auto" if verbose else 0)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    evolution = EvolutionarySearch(net.space, scorer, cost, high=budget.fraction, low=low,
                                   settings=settings, seed=seed, cache_path=cache_path,
                                   cache_key=fingerprint(net, recalibration_batches, batch_size, seed,
                                                         _data_digest(validation_data), _data_digest(recalibration_data)),
                                   verbose=verbose)
    gene, score = evolution.run()
    winner = scorer.model(gene)
    search_seconds = time.perf_counter() - start
    plan = net.space.plan(gene)
    report = PruningReport.from_models(model, winner, plan, extra={
        "method": "metapruning", "budget": str(budget), "search_score": score,
        "pruningnet_epochs": epochs, "train_seconds": train_seconds, "search_seconds": search_seconds,
        "candidates_scored": len(evolution.history.scores)})
    return SearchResult(winner, gene, net.space.group_widths(gene), plan, score, evolution.history.costs[gene], report,
                        evolution.history, net, train_seconds, search_seconds)


def _check_pruningnet(net: Any, model: keras.Model, scales: Sequence[float]) -> None:
    """A given PruningNet must be one of ``model`` (same layers and weight shapes), and ``scales`` its own."""
    if not isinstance(net, PruningNet):
        raise TypeError(f"`pruningnet` must be a kap.metapruning.PruningNet or None. Received: {type(net).__name__}")
    if fingerprint_variables(model) != fingerprint_variables(net.base):
        raise ValueError(f"Expected a `pruningnet` built from `model` ({model.name!r}). Received: one built from "
                         f"{net.base.name!r}, whose layers or weight shapes differ. Fix: build it with "
                         "kap.metapruning.PruningNet(model) or leave `pruningnet=None`.")
    if tuple(scales) != tuple(DEFAULT_SCALES) and tuple(scales) != tuple(net.space.scales):
        raise ValueError(f"`scales` are the given `pruningnet`'s ({net.space.scales}). Received: scales={tuple(scales)}. "
                         "Fix: leave `scales` out, or build the PruningNet with these scales.")


def _held_out(data: Any, validation_data: Any, seed: int) -> tuple[Any, Any]:
    if validation_data is not None:
        return data, validation_data
    if _is_labelled_arrays(data):
        x, y = data
        count = min(5000, max(1, len(x) // 10))
        order = np.random.default_rng(seed).permutation(len(x))  # data may be sorted by class
        kept, held = order[:-count], order[-count:]
        return (x[kept], y[kept]), (x[held], y[held])
    raise ValueError(
        "MetaPruning scores candidates on held-out labelled data. Received: validation_data=None with "
        f"data of type {type(data).__name__}. Fix: pass `validation_data=` (e.g. un-augmented training "
        "examples kept out of `data`), or give `data` as `(x, y)` arrays to hold out a random 10% of them."
    )


def fingerprint(net: PruningNet, *settings) -> str:
    """What candidate scores depend on: the PruningNet's trained weights, its channel order and the scoring settings.

    A cache key for `EvolutionarySearch`: a PruningNet trained again (even
    with the same epochs and seed) gets another key, so its scores are never
    mixed with those of an earlier net; searching or building winners does
    not change it (`PruningNet.trained_weights`). `search` adds its seed and
    a digest of its scoring and re-estimation data to ``settings``.
    """
    digest = hashlib.sha1(repr(settings).encode())
    for order in net.space.channel_order:
        if not np.array_equal(order, np.arange(order.size)):  # index order: the keys of earlier caches stay valid
            digest.update(order.tobytes())
    for weight in net.trained_weights():  # not the gene's masks, nor what `materialize` writes
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:16]


def _data_digest(data: Any) -> str:
    """A short digest of what scoring reads from ``data``: all of ``(x, y)`` arrays, the first batch of a dataset."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        data = next(iter(data.take(1)))
    parts = data if isinstance(data, (tuple, list)) else (data,)
    digest = hashlib.sha1()
    for part in parts:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(part))
        digest.update(repr((array.shape, array.dtype.str)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _is_labelled_arrays(data: Any) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and all(isinstance(a, np.ndarray) for a in data)


def _batches(data: Any) -> int | None:
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        count = int(data.cardinality())
        return count if count > 0 else None
    return None
