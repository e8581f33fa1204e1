"""`search`: MetaPruning end to end (train a PruningNet, search, build the winner).

>>> result = kap.metapruning.search(model, train_ds, kap.Budget(flops=0.5),
...                                 validation_data=held_out)        # doctest: +SKIP
>>> result.model, result.report, result.history.best_scores       # doctest: +SKIP

The stages are usable on their own: `PruningNet` + `train_pruningnet` (or a
plain ``fit`` with a `GeneSampler`; `keras_autoprune.metapruning.training`),
`cost_function` and `CandidateScorer` (`keras_autoprune.metapruning.scoring`),
`EvolutionarySearch`, `PruningNet.materialize`.
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

from keras_autoprune.budget import Budget
from keras_autoprune.callbacks.state import fingerprint as fingerprint_variables
from keras_autoprune.metapruning.evolution import EvolutionarySearch, SearchHistory, SearchSettings
from keras_autoprune.metapruning.genes import DEFAULT_SCALES, Gene
from keras_autoprune.metapruning.latency import LatencyTable
from keras_autoprune.metapruning.pruningnet import PruningNet
from keras_autoprune.metapruning.scoring import (
    CandidateScorer,
    check_latency_table,
    check_scoring,
    cost_function,
    uniform_gene,
)
from keras_autoprune.metapruning.training import check_training, is_labelled_arrays, train_pruningnet
from keras_autoprune.report import PruningReport
from keras_autoprune.surgery.plan import PrunePlan


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
    check_latency_table(budget, latency_table)
    if epochs and cache_path is not None and pathlib.Path(cache_path).exists():
        raise ValueError(
            f"Expected a `cache_path` of this search's PruningNet. Received: cache_path={str(cache_path)!r}, a file "
            f"that exists, with epochs={epochs}: the PruningNet trains first, which changes the weights the scores "
            "belong to, so the file would be refused after the training. Fix: to resume a search, pass the trained "
            "net (pruningnet=result.pruningnet, epochs=0); otherwise use another `cache_path` or delete the file."
        )
    data, validation_data = _held_out(data, validation_data, seed)
    recalibration_data = data if recalibration_data is None else recalibration_data
    # Everything that can be checked is checked before the PruningNet is built (its generators are large).
    if epochs:
        check_training(data, batch_size)
    check_scoring(model, validation_data, recalibration_data, recalibration_batches, batch_size)
    if budget.metric == "latency":
        latency_table.bind(model)  # a table of another model is refused here
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
    if is_labelled_arrays(data):
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
