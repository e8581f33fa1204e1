"""The calibration pass shared by every statistic (K-FAC, gradients).

For each batch: replay the model in inference mode (`replay.replay`), take the
per-example negative log-likelihood ``−log p(y_b|x_b)`` of every output with
a loss (true Fisher: ``y_b`` sampled from the model; empirical: the real
labels; scaled per output as `stats.likelihoods` says), and one
``tf.GradientTape`` gives ``δ = ∂(Σ_b −log p(y_b|x_b))/∂s`` for every tapped
pre-activation ``s``. A loss that defines no distribution (`stats.loss`)
makes the pass use the empirical Fisher whatever ``fisher`` asked for; the
result's ``fisher`` says which one was used. In inference mode examples are independent, so these
are the per-example ``δ``s; no per-example parameter gradient is stored.
Each `Statistic` turns ``(patches, δ, sample weights)`` into sums over the
chunk's examples, which are added up in float64 on the host. The step is one
`tf.function` per pass (traced at most twice: full and remainder chunks).

- **Randomness.** Example ``k`` of the pass (counted over batches) uses the
  next ``n`` draws of ``np.random.default_rng(seed).random``, ``n`` the
  labels it needs (one per position of each output with a loss, outputs in
  order: ``n = 1`` for a classifier, whose example ``k`` uses the k-th draw),
  to sample its labels by inverse CDF (`likelihoods.OutputLikelihood.sample`):
  results do not depend on batching, chunking or the number of replicas (up
  to float rounding).
- **Memory.** A batch is processed in chunks of ``chunk_size`` examples,
  by default as many as keep the largest per-layer work array (im2col
  patches, per-example gradients) under 2**25 float64 elements (256 MiB).
- **Distribution.** Under a `tf.distribute` strategy with several replicas
  (``model.distribute_strategy``), every chunk is split evenly across
  replicas with `experimental_distribute_values_from_function`, each replica
  computes its sums and `strategy.reduce(SUM)` combines them: the result
  equals the single-device one up to float rounding.
- **Mixed precision.** With float16 layers the loss is multiplied by a scale
  (2**15, halved and the chunk redone while any sum is not finite) and
  ``δ`` divided by it, as `LossScaleOptimizer` does; statistics are float64.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import keras
import numpy as np
import tensorflow as tf

from keras_autoprune.graph.dependency import DependencyGraph, check_model
from keras_autoprune.stats.calibration import CalibrationBatch, CalibrationData, progress_bar
from keras_autoprune.stats.loss import Likelihood, resolve_likelihood
from keras_autoprune.stats.replay import replay
from keras_autoprune.stats.taps import Tap, resolve_taps

FISHER_TYPES = ("true", "empirical")
_MEMORY_ELEMENTS = 2**25
_INITIAL_LOSS_SCALE = 2.0**15


class Statistic(Protocol):
    """What a statistic does inside the calibration pass."""

    def elements_per_example(self, tap: Tap) -> int:
        """Float64 elements of its largest work array, per example."""

    def contributions(self, tap: Tap, patches: tf.Tensor, deltas: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        """Sums over a chunk (traced).

        ``patches (B,T,K,Cin)`` and ``deltas (B,T,Cout)`` come in float32
        (float64 for float64 layers), ``weights (B,)`` in float64; the sums
        are added up in float64 on the host.
        """

    def finalize(self, tap: Tap, sums: dict[str, np.ndarray], num_examples: float, fisher: str) -> Any:
        """The per-layer result from the sums over the whole pass (``num_examples = Σ_b w_b``)."""


class StatisticsResult(dict):
    """Per-layer results keyed by qualified layer name, with the pass's cost.

    Attributes:
        num_examples: examples seen (sum of sample weights when given).
        num_batches: batches seen.
        seconds: wall-clock time of the pass.
        fisher: the Fisher used, ``"true"`` or ``"empirical"``.
        likelihood: the `stats.loss.Likelihood` the labels came from
            (``likelihood.describe(fisher)`` says which Fisher and why).
    """

    def __init__(
        self, items: dict, *, num_examples: float, num_batches: int, seconds: float, fisher: str, likelihood=None
    ):
        super().__init__(items)
        self.num_examples = num_examples
        self.num_batches = num_batches
        self.seconds = seconds
        self.fisher = fisher
        self.likelihood = likelihood


def run_statistics(
    model: keras.Model,
    data: Any,
    statistics: Sequence[Statistic],
    *,
    layers: Sequence[Any] | None = None,
    fisher: str = "true",
    loss: Any = None,
    loss_weights: Any = None,
    seed: int = 0,
    num_batches: int | None = None,
    batch_size: int = 32,
    chunk_size: int | None = None,
    graph: DependencyGraph | None = None,
    verbose: int = 1,
) -> list[StatisticsResult]:
    """Runs one calibration pass and returns one result per statistic.

    Arguments are those of `collect_kfac`. Everything is checked (loss,
    layers, first batch) before the first forward pass.
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"Expected fisher to be one of {FISHER_TYPES}. Received: fisher={fisher!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"Expected an integer seed. Received: seed={seed!r}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"Expected a positive integer or None. Received: chunk_size={chunk_size!r}")
    likelihood = resolve_likelihood(model, loss, loss_weights)
    likelihood.check_model(model)
    fisher = likelihood.fisher(fisher)
    if graph is None:
        with warnings.catch_warnings():  # pruning-handler warnings do not concern statistics
            warnings.simplefilter("ignore")
            graph = DependencyGraph(model)
    taps = resolve_taps(graph, layers)
    if not taps:
        raise ValueError(
            "Expected at least one Dense, Conv1D, Conv2D or DepthwiseConv2D layer to collect statistics for. "
            f"Received: model '{model.name}' with none (layers={layers!r})."
        )
    empirical = fisher == "empirical"
    batches = CalibrationData(
        data, model, batch_size=batch_size, num_batches=num_batches, require_labels=empirical,
        likelihood=likelihood if empirical else None, labels_reason=likelihood.labels_reason(),
    )
    step = _make_step(model, taps, likelihood, fisher, statistics)
    chunk = chunk_size or _auto_chunk(taps, statistics)
    uniforms = np.random.default_rng(int(seed))
    shapes = _OutputShapes(model)
    scale = _INITIAL_LOSS_SCALE if any(t.layer.compute_dtype == "float16" for t in taps.values()) else 1.0
    totals: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in statistics]
    bar = progress_bar(batches.total, verbose)
    start, seen, count = time.perf_counter(), 0.0, 0
    for count, batch in enumerate(batches, start=1):
        labels = batch.y if empirical else _uniforms(uniforms, batch.size, likelihood.noise_widths(shapes(batch.x)))
        for lo in range(0, batch.size, chunk):
            part = batch.slice(lo, lo + chunk)
            sums, scale = _run_chunk(step, part, [a[lo : lo + chunk] for a in labels], scale, count)
            for total, layer_sums in zip(totals, sums):
                _accumulate(total, layer_sums)
        seen += float(batch.sample_weight.sum())
        bar.update(count)
    seconds = time.perf_counter() - start
    if seen <= 0:
        raise ValueError(f"Expected examples with positive sample weight. Received: total sample weight {seen}.")
    return [
        StatisticsResult(
            {name: stat.finalize(taps[name], total[name], seen, fisher) for name in taps},
            num_examples=seen,
            num_batches=count,
            seconds=seconds,
            fisher=fisher,
            likelihood=likelihood,
        )
        for stat, total in zip(statistics, totals)
    ]


def _uniforms(rng: np.random.Generator, size: int, widths: list[int]) -> list[np.ndarray]:
    """Per head, ``(size, width)`` uniforms; example ``k`` takes the next ``Σ widths`` draws."""
    draws = rng.random((size, sum(widths)))
    bounds = np.cumsum([0, *widths])
    return [draws[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


class _OutputShapes:
    """The model's output shapes (without batch) for a batch's inputs; computed once per input shape when unknown."""

    def __init__(self, model: keras.Model):
        self._functional = check_model(model)
        self._static = [tuple(t.shape[1:]) for t in self._functional.outputs]
        self._known = all(d is not None for shape in self._static for d in shape)
        self._cache: dict[tuple, list[tuple]] = {}

    def __call__(self, x: list[np.ndarray]) -> list[tuple]:
        if self._known:
            return self._static
        key = tuple(a.shape[1:] for a in x)
        if key not in self._cache:
            specs = [keras.KerasTensor((1, *a.shape[1:]), dtype=t.dtype) for a, t in zip(x, self._functional.inputs)]
            struct = keras.tree.pack_sequence_as(self._functional._inputs_struct, specs)
            outputs = keras.tree.flatten(self._functional.compute_output_spec(struct))
            self._cache[key] = [tuple(o.shape[1:]) for o in outputs]
        return self._cache[key]


def _make_step(model, taps: dict[str, Tap], likelihood: Likelihood, fisher: str, statistics):
    def replica_step(x, labels, weights, scale):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            outputs, records, logits = replay(model, list(x), taps, tape.watch)
            objective = likelihood.objective(keras.tree.flatten(outputs), logits, list(labels), fisher)
            total = objective * tf.cast(scale, objective.dtype)
        grads = tape.gradient(
            total, [r.pre_activation for r in records], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        weights = tf.cast(weights, tf.float64)
        sums: list[dict[str, dict[str, tf.Tensor]]] = [{} for _ in statistics]
        for record, grad in zip(records, grads):
            tap = record.tap
            dtype = tf.float64 if record.inputs.dtype == tf.float64 else tf.float32  # exact for 16/32-bit
            patches = tf.cast(tap.patches(record.inputs), dtype)
            deltas = tf.cast(tap.deltas(grad), dtype) / tf.cast(scale, dtype)  # a power of 2: exact
            for stat, out in zip(statistics, sums):
                slot = out.setdefault(tap.name, {})
                for key, value in stat.contributions(tap, patches, deltas, weights).items():
                    slot[key] = slot[key] + value if key in slot else value
        return sums

    strategy = getattr(model, "distribute_strategy", None)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if replicas == 1:
        function = tf.function(replica_step, reduce_retracing=True)
        return lambda x, labels, weights, scale: function(x, labels, weights, scale)

    @tf.function(reduce_retracing=True)
    def distributed(x, labels, weights, scale):
        per_replica = strategy.run(replica_step, args=(x, labels, weights, scale))
        return tf.nest.map_structure(lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), per_replica)

    def split_step(x, labels, weights, scale):
        parts = [np.array_split(a, replicas) for a in (*x, *labels, weights)]

        def value(context, index):
            return tf.constant(parts[index][context.replica_id_in_sync_group])

        values = [strategy.experimental_distribute_values_from_function(lambda c, i=i: value(c, i)) for i in range(len(parts))]
        with strategy.scope():
            return distributed(values[: len(x)], values[len(x) : -1], values[-1], scale)

    return split_step


def _run_chunk(step, part: CalibrationBatch, labels: np.ndarray, scale: float, batch_number: int):
    """Runs one chunk; with loss scaling, halves the scale until sums are finite."""
    while True:
        sums = step(part.x, labels, part.sample_weight, tf.constant(scale, tf.float32))
        sums = tf.nest.map_structure(lambda t: t.numpy(), sums)
        finite = all(np.all(np.isfinite(v)) for v in tf.nest.flatten(sums))
        if finite:
            return sums, scale
        if scale <= 1.0:
            raise FloatingPointError(
                f"Expected finite statistics. Received: NaN or Inf in batch {batch_number - 1}. "
                "Fix: check the inputs and that the model's outputs are finite on them."
            )
        scale = max(scale / 2.0, 1.0)


def _accumulate(total: dict[str, dict[str, np.ndarray]], layer_sums: dict[str, dict[str, np.ndarray]]) -> None:
    for name, sums in layer_sums.items():
        slot = total.setdefault(name, {})
        for key, value in sums.items():
            slot[key] = slot[key] + value if key in slot else np.array(value, np.float64)


def _auto_chunk(taps: dict[str, Tap], statistics) -> int:
    if any(t.locations is None for t in taps.values()):
        return 2**31 - 1  # unknown spatial size: whole batches (pass chunk_size to bound memory)
    largest = max(stat.elements_per_example(tap) for tap in taps.values() for stat in statistics)
    return max(1, _MEMORY_ELEMENTS // max(largest, 1))
