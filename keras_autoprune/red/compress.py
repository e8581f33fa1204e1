"""`compress`: RED, data-free structured compression, as one call.

The stages, each a small module of this package:

0. `fold_batchnorm`: BatchNormalization folded into the layer before it.
1. `hash_weights`: every weight tensor of the linear layers snapped to one
   value per basin of its kernel density estimate (``bandwidth_scale``; the
   basin's mean by default, its mode with ``snap_to="mode"``). By default
   only the layers whose hashing lets stage 2 merge or stage 3 separate
   keep it: the others get their weights back (``hash_all_layers=False``).
2. `merge_neurons`: identical output neurons merged exactly (a
   `kap.PrunePlan` plus a fold of the readers' weights); near-identical ones
   with ``merge_threshold > 0``.
3. `separate_depthwise` (``separate_depthwise=True``): convolutions whose
   hashed kernels repeat become a depthwise + 1×1 block where that lowers
   FLOPs. With ``separation_tolerance > 0``, `separate_low_rank` then
   separates the remaining convolutions approximately (per-input-channel
   SVD within that relative kernel error) and `reconstruct_pointwise`
   refits their 1×1 parts on images synthesized from the model's
   BatchNormalization statistics (``reconstruction="synthetic"``). With
   ``refit_layers="all"``, `reconstruct_layers` instead refits every layer
   whose output differs from the BatchNormalization-folded original's, on
   the same images (what hashing and merging lose, recovered data-free).
4. `restore_batchnorm` (``restore_batchnorm=True``): the folded
   BatchNormalizations put back, for a user who fine-tunes the result.

Stages 0, 2 (``merge_threshold=0``), 3 (exact) and 4 are exact; stage 1 and
the approximate separation are where the model changes (and the refit of
``refit_layers="all"``, which moves every changed layer's weights). No data is read
(unless the caller passes inputs for the refit) and nothing is fine-tuned.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import keras
import numpy as np

from keras_autoprune.accounting import count_flops, count_params
from keras_autoprune.allocation.search import smallest_fitting_value
from keras_autoprune.budget import Budget
from keras_autoprune.errors import BudgetUnreachableError
from keras_autoprune.graph.dependency import DependencyGraph, check_model
from keras_autoprune.red.batchnorm import FoldedNorm, fold_batchnorm
from keras_autoprune.red.block_latency import BlockTimer, BlockTiming
from keras_autoprune.red.correction import folded_statistics
from keras_autoprune.red.hashing import HashedTensor, hash_weights
from keras_autoprune.red.low_rank import separate_low_rank
from keras_autoprune.red.merging import MergeResult, merge_neurons
from keras_autoprune.red.options import check_choice, check_knob, check_reconstruction
from keras_autoprune.red.reconstruction import reconstruct_layers, reconstruct_pointwise
from keras_autoprune.red.separation import Separation, separate_depthwise
from keras_autoprune.red.synthesis import synthesize_images
from keras_autoprune.red.unfolding import check_restorable, kept_outputs, restore_batchnorm
from keras_autoprune.report import PruningReport
from keras_autoprune.surgery import PrunePlan
from keras_autoprune.surgery.clone import clone_layers, copy_layer

_SEARCH_STEPS = 10
_MERGE_RESOLUTION = 1e-3  # budget search on merge_threshold: bisected until the bracket is this narrow
_SEARCH_RANGE = 100.0  # budget search: bandwidth_scale in [scale, 100 · scale]
_TOLERANCE_FLOOR = 1e-3  # budget search on separation_tolerance: from max(tolerance, this) up to 1


@dataclasses.dataclass(frozen=True)
class StageFigures:
    """Size of the model after one stage (``kap.count_flops``, ``kap.count_params``)."""

    stage: str
    flops: int
    params: int


@dataclasses.dataclass(frozen=True)
class RedResult:
    """What `compress` returns.

    Attributes:
        model: the compressed plain-Keras model (standard layers only);
            with ``restore_batchnorm=True``, the folded BatchNormalizations
            are back in it.
        hashed_model: the model after stages 0-1; ``model`` computes the same
            function as this one (to float rounding, in inference mode) when
            ``merge_threshold=0``, ``separation_tolerance=0`` and
            ``refit_layers="approximated"``.
        report: a `kap.PruningReport` of ``model`` against the input model
            (its plan is the stage-2 merge plan), or None if one could not be
            built.
        stages: `StageFigures` for ``"original"``, ``"batchnorm_folded"``,
            ``"hashed"``, ``"merged"``, with ``separate_depthwise``
            ``"separated"``, with ``separation_tolerance > 0``
            ``"approximated"``, and with ``restore_batchnorm``
            ``"batchnorm_restored"``.
        folded_norms: the BatchNormalizations folded, with their producers.
        hashed: one `HashedTensor` per hashed weight tensor (of the layers
            that kept their hashing).
        hashing_reverted: the layers whose hashing enabled no merge and no
            separation and was undone (empty with ``hash_all_layers=True``).
        merge_plan: the stage-2 `kap.PrunePlan`.
        merged_per_layer: ``{layer: output neurons removed by merging}``
            (every layer feeding a residual group loses the group's merged
            channels; `neurons_merged` counts each channel once).
        merge_clusters: ``{group_id: [[kept, merged, ...], ...]}``.
        merge_blocked: ``{group_id: why it could not merge}``.
        separations: the convolutions separated exactly in stage 3.
        approximations: the convolutions separated approximately
            (``separation_tolerance > 0``), each with its ``kernel_error``.
        separation_tolerance: the value used (chosen by the search with a
            budget and ``budget_knob="separation_tolerance"``).
        reconstruction: what the layers were refitted on: ``"synthetic"``,
            ``"inputs"`` (the caller's) or ``"none"``.
        refit_layers: which layers the refit was for: ``"approximated"``
            (the approximate blocks' 1×1 parts) or ``"all"``.
        reconstructed: the layers refitted (a block: its 1×1 part), in
            graph order.
        separation_cost: what decided that a block replaces its
            convolution: ``"flops"``, ``"latency"`` or ``"latency_int8"``.
        block_timings: with a latency cost, ``{layer:
            BlockTiming}`` of every block timed against its convolution in
            the result's run (those not ``faster`` stayed convolutions).
        bandwidth_scale: the value used (chosen by the search with a budget
            and ``budget_knob="bandwidth_scale"``).
        merge_threshold: the value used (chosen by the search with a budget
            and ``budget_knob="merge_threshold"``).
        merge_representative: what a near-identical cluster kept
            (``"readers"`` or ``"leader"``).
        snap_to: what a hashed weight became (``"mean"`` or ``"mode"``).
        correct_merge_bias: whether near-identical merges corrected their
            readers' biases.
        bias_corrected: the merged groups whose readers' biases were
            corrected (empty without near-identical merging).
    """

    model: keras.Model
    hashed_model: keras.Model
    report: PruningReport | None
    stages: tuple[StageFigures, ...]
    folded_norms: tuple[FoldedNorm, ...]
    hashed: tuple[HashedTensor, ...]
    merge_plan: PrunePlan
    merged_per_layer: dict[str, int]
    merge_clusters: dict[str, list[list[int]]]
    merge_blocked: dict[str, str]
    separations: tuple[Separation, ...]
    bandwidth_scale: float
    hashing_reverted: tuple[str, ...] = ()
    merge_threshold: float = 0.0
    merge_representative: str = "readers"
    snap_to: str = "mean"
    correct_merge_bias: bool = True
    bias_corrected: tuple[str, ...] = ()
    approximations: tuple[Separation, ...] = ()
    separation_tolerance: float = 0.0
    reconstruction: str = "none"
    refit_layers: str = "approximated"
    reconstructed: tuple[str, ...] = ()
    separation_cost: str = "flops"
    block_timings: dict[str, BlockTiming] = dataclasses.field(default_factory=dict)

    @property
    def distinct_values(self) -> dict[str, dict[str, int]]:
        """``{layer: {weight: distinct values after hashing}}``."""
        out: dict[str, dict[str, int]] = {}
        for tensor in self.hashed:
            out.setdefault(tensor.layer, {})[tensor.weight] = tensor.distinct_after
        return out

    @property
    def neurons_merged(self) -> int:
        """Channels removed by merging (a residual group's channel counts once)."""
        return sum(len(c) - 1 for clusters in self.merge_clusters.values() for c in clusters)

    def stage(self, name: str) -> StageFigures:
        """The figures of stage ``name``."""
        for figures in self.stages:
            if figures.stage == name:
                return figures
        raise KeyError(f"No stage {name!r}. Stages: {[s.stage for s in self.stages]}")

    def summary(self) -> str:
        """One line per stage: FLOPs and parameters, kept fractions."""
        first = self.stages[0]
        kept = f", merge_representative={self.merge_representative!r}" if self.merge_threshold > 0 else ""
        snapped = f", snap_to={self.snap_to!r}" if self.bandwidth_scale > 0 else ""
        lines = [f"RED (bandwidth_scale={self.bandwidth_scale:g}{snapped}, merge_threshold={self.merge_threshold:g}{kept}): "
                 f"{len(self.folded_norms)} BatchNormalization folded, "
                 f"{self.neurons_merged} neurons merged, {len(self.separations)} convolutions separated"
                 + (f", {len(self.approximations)} approximately (separation_tolerance="
                    f"{self.separation_tolerance:g})" if self.separation_tolerance > 0 else "")]
        for s in self.stages:
            lines.append(f"  {s.stage:18s} FLOPs {s.flops:>14,} ({s.flops / max(first.flops, 1):6.1%})  "
                         f"params {s.params:>12,} ({s.params / max(first.params, 1):6.1%})")
        if self.merge_threshold > 0 and self.correct_merge_bias and self.merge_clusters:
            lines.append(f"  reader biases corrected for {len(self.bias_corrected)} of the {len(self.merge_clusters)} "
                         "merged groups (data-free, from the folded BatchNormalizations)")
        if self.approximations:
            largest = max(self.approximations, key=lambda separation: separation.kernel_error)
            lines.append(f"  approximate separation changed a kernel by at most {largest.kernel_error:.1%} of its squared "
                         f"norm ({largest.layer}, rank {largest.multiplier}); {len(self.reconstructed)} 1×1 parts "
                         f"refitted ({self.reconstruction})")
        if self.block_timings:
            slower = [t.layer for t in self.block_timings.values() if not t.faster]
            lines.append(f"  LiteRT timed {len(self.block_timings)} blocks against their convolutions; "
                         f"{len(slower)} slower, kept as convolutions" + (f": {', '.join(slower)}" if slower else ""))
        worst = self.largest_hashing_error
        if worst is not None:
            lines.append(f"  hashing moved a weight tensor by at most {worst.relative_error:.1%} of its norm "
                         f"({worst.layer} {worst.weight})")
        return "\n".join(lines)

    @property
    def largest_hashing_error(self) -> HashedTensor | None:
        """The hashed tensor with the largest ``relative_error`` (None if nothing kept its hashing)."""
        return max(self.hashed, key=lambda tensor: tensor.relative_error, default=None)


def compress(
    model: keras.Model,
    bandwidth_scale: float = 0.05,
    merge_threshold: float = 0.0,
    separate_depthwise: bool = False,
    budget: Budget | None = None,
    hash_all_layers: bool = False,
    merge_distance: str = "channel",
    input_shape: Any = None,
    budget_knob: str = "bandwidth_scale",
    restore_batchnorm: bool = False,
    merge_representative: str = "readers",
    snap_to: str = "mean",
    correct_merge_bias: bool = True,
    separation_tolerance: float = 0.0,
    reconstruction: str | np.ndarray | None = "synthetic",
    refit_layers: str = "approximated",
    separation_cost: str = "flops",
    verbose: int = 1,
) -> RedResult:
    """Compresses ``model`` with RED, without data and without fine-tuning.

    Args:
        model: a built Sequential or Functional Keras 3 model; never changed.
        bandwidth_scale: multiplies Silverman's bandwidth of each weight
            tensor's density (stage 1). Larger: fewer distinct values, more
            merging and separation, lower accuracy. 0 skips hashing. The
            default 0.05 kept the converged CIFAR-10 ResNet-20 and
            MobileNetV2 within 0.3 point of their accuracy (measured in
            docs/methods/red.md); Silverman's bandwidth itself (1.0)
            destroys both.
        snap_to: what a hashed weight becomes (stage 1): ``"mean"``
            (default; the mean of the weights in its basin, the least-squares
            value for the basins) or ``"mode"`` (the density's mode, the
            paper's hashing). The basins, hence the exact merges, the
            separations and the sizes, are the same with either (near-
            identical merges compare the hashed values and may differ by a
            few channels); the mean changes the weights less (measured in
            docs/methods/red.md).
        merge_threshold: relative distance below which output neurons merge
            (stage 2). 0 (default): only identical neurons, exactly.
        merge_distance: what that distance is relative to: ``"channel"``
            (default; the larger of the two channels' weight norms) or
            ``"layer"`` (the layer's root-mean-square channel norm, so weak
            channels merge more easily); see `keras_autoprune.red.merging`.
        merge_representative: the weights of the channel a near-identical
            cluster keeps: ``"readers"`` (default; the combination of the
            cluster's weights that its readers see best, a least-squares
            fit) or ``"leader"`` (its first channel's, unchanged). Exact
            merges (``merge_threshold=0``) are the same with either.
        correct_merge_bias: with ``merge_threshold > 0``, raise the biases
            of a merged cluster's readers by the change in the mean of what
            they read, estimated without data from the folded
            BatchNormalizations (`keras_autoprune.red.correction`; groups
            tied by a residual Add are left uncorrected). Default True.
        separate_depthwise: run stage 3 (uneven depthwise separation).
        separation_tolerance: > 0 separates the remaining convolutions
            approximately (`keras_autoprune.red.low_rank`): each takes the
            lowest per-input-channel rank whose relative squared kernel
            error stays within this tolerance, where that lowers FLOPs.
            0 (default): off. On the converged CIFAR-10 ResNet-20, 0.1 kept
            71% of the FLOPs and lost 0.6 point (docs/methods/red.md).
        reconstruction: what the refit of ``refit_layers`` runs on
            (`keras_autoprune.red.reconstruction`): ``"synthetic"``
            (default; images synthesized from the model's
            BatchNormalization statistics, `keras_autoprune.red.synthesis`,
            no data), a NumPy array of model inputs, or None (no refit:
            the SVD's and the hashing's weights).
        refit_layers: which layers are refitted by least squares to
            reproduce the BatchNormalization-folded original's outputs:
            ``"approximated"`` (default; the 1×1 parts of the approximate
            separations, so nothing is refitted when
            ``separation_tolerance`` is 0) or ``"all"`` (every convolution,
            depthwise convolution, dense layer and separated block whose
            output differs from the original's, in graph order, each kept
            channel fitted to its own original channel; the hashed values
            are then replaced by fitted ones, the merges and separations
            stay). Measured in docs/methods/red.md.
        separation_cost: what decides that a separated block (stages 3
            and 3b) replaces its convolution: ``"flops"`` (default; fewer
            FLOPs) or ``"latency"`` (also measured faster on LiteRT, each
            convolution and its block built alone and timed on this
            machine, 1 thread; `keras_autoprune.red.block_latency`) or
            ``"latency_int8"`` (the same, timed as full-integer int8
            ``.tflite`` files, for a model deployed quantized).
        verbose: 0 silent, 1 a progress bar while images are synthesized.
        budget: a `kap.Budget`; if given, the knob named by ``budget_knob``
            is the lower end of a search for the smallest value whose
            compressed model fits the budget.
        budget_knob: what the budget search raises: ``"bandwidth_scale"``
            (default, the paper's knob; log-bisection from ``bandwidth_scale``
            up to 100 times it), ``"merge_threshold"`` (bisection from
            ``merge_threshold`` up to the distance at which every group's
            channels merge, with ``bandwidth_scale`` fixed) or
            ``"separation_tolerance"`` (log-bisection from
            ``max(separation_tolerance, 0.001)`` up to 1, where every
            candidate has rank 1): coarser hashing, more
            near-identical merging, or coarser approximate separation. The
            search runs without the refit, which changes no size; the
            result found is refitted.
        hash_all_layers: keep the hashed weights of every layer, as the
            paper does. ``False`` (default): stages 1-3 run once with every
            layer hashed, then again with only the layers that created
            merged neurons or were separated hashed; the others keep their
            original weights, so hashing that removes nothing costs no
            accuracy.
        input_shape: input shape without the batch axis, for a model whose
            inputs have unknown dimensions (``(None, None, 3)``): the stage
            figures, the budget and the report count FLOPs at this shape
            (see `kap.count_flops`). RED itself reads no data.
        restore_batchnorm: put every folded BatchNormalization back after
            its producer, over the channels it kept, with weights that keep
            the compressed model's function in inference mode
            (`keras_autoprune.red.unfolding`). For fine-tuning the result
            with data: without it the compressed model has no normalisation
            to train with. A budget counts the restored normalisations.

    Returns:
        A `RedResult`.

    Raises:
        UnsupportedModelError: a subclassed or unbuilt model.
        ValueError: a bad argument, a budget that the search cannot reach,
            ``restore_batchnorm=True`` on a model with custom layers that
            RED traces, or ``reconstruction="synthetic"`` on a model without
            BatchNormalization to synthesize images from.

    Example:

    >>> result = kap.red.compress(model, bandwidth_scale=0.05)  # doctest: +SKIP
    >>> result.model, result.report, result.summary()          # doctest: +SKIP
    """
    check_model(model)
    check_options(bandwidth_scale, merge_threshold, separate_depthwise, budget, hash_all_layers, merge_distance,
                  budget_knob, restore_batchnorm, merge_representative, snap_to, correct_merge_bias,
                  separation_tolerance, separation_cost, refit_layers)
    if verbose not in (0, 1) or isinstance(verbose, bool):
        raise ValueError(f"Expected `verbose` to be 0 (silent) or 1 (a progress bar). Received: verbose={verbose!r}")
    approximating = separation_tolerance > 0 or (budget is not None and budget_knob == "separation_tolerance")
    refitting = approximating or refit_layers == "all"
    check_reconstruction(model, reconstruction, refitting)
    if separation_cost != "flops" and any(None in tuple(tensor.shape[1:]) for tensor in model.inputs):
        raise ValueError(
            f"separation_cost={separation_cost!r} times each convolution at its input shape, so the model's "
            f"inputs need a fixed size. Received: input shapes {[tuple(t.shape) for t in model.inputs]}. Fix: build the model "
            "with a fixed input size, or pass separation_cost='flops'."
        )
    if restore_batchnorm:
        check_restorable(DependencyGraph(model))  # before the images are synthesized, not after
    count_flops(model, input_shape)  # a model of unknown input size needs `input_shape`: refused before any work
    knobs = {"bandwidth_scale": float(bandwidth_scale), "merge_threshold": float(merge_threshold),
             "separation_tolerance": float(separation_tolerance)}
    options = {"separate": bool(separate_depthwise), "hash_all_layers": hash_all_layers,
               "merge_distance": merge_distance, "input_shape": input_shape, "restore": restore_batchnorm,
               "merge_representative": merge_representative, "snap_to": snap_to,
               "correct_merge_bias": correct_merge_bias,
               "timer": (BlockTimer(quantize="int8" if separation_cost == "latency_int8" else None)
                         if separation_cost != "flops" else None)}
    refit = (_RefitInputs(model, reconstruction, refit_layers, verbose) if refitting and reconstruction is not None
             else None)
    if budget is None:
        return _run(model, **knobs, **options, refit=refit)
    return _search(model, knobs, budget_knob, options, budget, refit)


class _RefitInputs:
    """The inputs the approximate blocks are refitted on, made on first use (synthesis takes minutes)."""

    def __init__(self, model: keras.Model, reconstruction, layers: str, verbose: int):
        self.kind = "synthetic" if isinstance(reconstruction, str) else "inputs"
        self.layers = layers
        self._model, self._reconstruction, self._verbose = model, reconstruction, verbose
        self._images: np.ndarray | None = None

    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = (synthesize_images(self._model, verbose=self._verbose) if self.kind == "synthetic"
                            else np.asarray(self._reconstruction, np.float32))
        return self._images


def check_options(bandwidth_scale, merge_threshold, separate_depthwise, budget, hash_all_layers=False,
                  merge_distance="channel", budget_knob="bandwidth_scale", restore_batchnorm=False,
                  merge_representative="readers", snap_to="mean", correct_merge_bias=True,
                  separation_tolerance=0.0, separation_cost="flops", refit_layers="approximated") -> None:
    """Checks `compress`'s arguments other than the model and the reconstruction (raises ValueError), before any work."""
    check_knob("bandwidth_scale", bandwidth_scale)
    check_knob("merge_threshold", merge_threshold)
    check_knob("separation_tolerance", separation_tolerance)
    if separation_tolerance > 1:
        raise ValueError(
            "Expected `separation_tolerance` in [0, 1] (a relative squared kernel error; at 1 every candidate has "
            f"rank 1). Received: separation_tolerance={separation_tolerance!r}"
        )
    for name, value in (("merge_distance", merge_distance), ("merge_representative", merge_representative),
                        ("snap_to", snap_to), ("budget_knob", budget_knob), ("separation_cost", separation_cost),
                        ("refit_layers", refit_layers)):
        check_choice(name, value)
    if budget is not None and budget_knob == "bandwidth_scale" and bandwidth_scale == 0:
        raise ValueError(
            "A budget search scales `bandwidth_scale` up from its value, so it must be > 0. "
            "Received: bandwidth_scale=0 with a budget. Fix: pass e.g. bandwidth_scale=0.05, "
            "or budget_knob='merge_threshold'."
        )
    for name, value in (("separate_depthwise", separate_depthwise), ("hash_all_layers", hash_all_layers),
                        ("restore_batchnorm", restore_batchnorm), ("correct_merge_bias", correct_merge_bias)):
        if not isinstance(value, bool):
            raise ValueError(f"Expected `{name}` to be True or False. Received: {name}={value!r}")
    if budget is not None and not isinstance(budget, Budget):
        raise ValueError(
            "Expected `budget` to be a `kap.Budget`, e.g. `kap.Budget(flops=0.75)`, or None. "
            f"Received: budget={budget!r} of type {type(budget).__name__}"
        )
    if budget is not None:
        budget.require_countable("kap.red.compress")


def _run(model, bandwidth_scale: float, merge_threshold: float, separate: bool, hash_all_layers: bool,
         merge_distance: str = "channel", input_shape: Any = None, restore: bool = False,
         merge_representative: str = "readers", snap_to: str = "mean", correct_merge_bias: bool = True,
         separation_tolerance: float = 0.0, refit: _RefitInputs | None = None,
         timer: BlockTimer | None = None) -> RedResult:
    graph = DependencyGraph(model)
    if restore:
        check_restorable(graph)  # before any stage

    def figures(name: str, current: keras.Model) -> StageFigures:
        return StageFigures(name, count_flops(current, input_shape), count_params(current))

    stages = [figures("original", model)]
    with warnings.catch_warnings():
        # the graph of `model` above reported unknown layers and failing handlers once; not again per stage
        warnings.filterwarnings("ignore", message="keras_autoprune: (no pruning handler|handler .* failed)")
        folded, folds = fold_batchnorm(model, graph)
        stages.append(figures("batchnorm_folded", folded))
        statistics = folded_statistics(graph, folds) if correct_merge_bias and merge_threshold > 0 else None
        if timer is not None:
            timer.timings.clear()  # this run's decisions only (the measurements stay cached)
        keep = timer.keep if timer is not None else None
        merging = {"merge_distance": merge_distance, "merge_representative": merge_representative,
                   "snap_to": snap_to, "channel_statistics": statistics, "keep": keep}
        run = _Stages.run(folded, bandwidth_scale, merge_threshold, separate, **merging)
        reverted: tuple[str, ...] = ()
        if not hash_all_layers:
            used = set(run.merge.compared_layers) | {separation.layer for separation in run.separations}
            hashed_layers = list(dict.fromkeys(tensor.layer for tensor in run.tensors))
            reverted = tuple(layer for layer in hashed_layers if layer not in used)
            if reverted:
                if timer is not None:
                    timer.timings.clear()  # the decisions of the run kept, below
                again = _Stages.run(folded, bandwidth_scale, merge_threshold, separate, layers=used, **merging)
                if merge_threshold > 0 or again.merge.clusters == run.merge.clusters:
                    run = again
                else:  # cannot happen if `compared_layers` is complete; never give up a merge silently
                    reverted = ()
    stages.append(dataclasses.replace(stages[-1], stage="hashed"))  # hashing changes values, not sizes
    stages.append(figures("merged", run.merge.model))
    if separate:
        stages.append(figures("separated", run.model))
    compressed, approximations, reconstructed = run.model, [], ()
    if separation_tolerance > 0:
        compressed, approximations = separate_low_rank(run.model, separation_tolerance, keep=keep)
        if refit is not None and refit.layers == "approximated" and approximations:
            reconstructed = reconstruct_pointwise(compressed, run.model, [a.layer for a in approximations],
                                                  refit.images())
        stages.append(figures("approximated", compressed))
    if refit is not None and refit.layers == "all":
        if compressed is run.hashed or compressed is folded:
            compressed = clone_layers(compressed, copy_layer)  # refitted in place, never the returned hashed_model
        kept = kept_outputs(run.hashed_graph, run.merge.plan, {layer.name for layer in compressed.layers})
        reconstructed = reconstruct_layers(compressed, folded, refit.images(), kept)
    if restore:
        kept = kept_outputs(run.hashed_graph, run.merge.plan, {fold.into for fold in folds})
        compressed = restore_batchnorm(model, graph, compressed, folds, kept)
        stages.append(figures("batchnorm_restored", compressed))
    extra = {
        "method": "red",
        "bandwidth_scale": bandwidth_scale,
        "merge_threshold": merge_threshold,
        "merge_distance": merge_distance,
        "merge_representative": merge_representative,
        "snap_to": snap_to,
        "merge_bias_corrected_groups": len(run.merge.bias_corrected),
        "batchnorm_folded": len(folds),
        "neurons_merged": run.merge.merged,
        "convolutions_separated": len(run.separations),
        "separation_tolerance": separation_tolerance,
        "convolutions_approximated": len(approximations),
        "layers_refitted": len(reconstructed),
        "refit_layers": refit.layers if refit is not None else "none",
        "hashing_reverted": len(reverted),
        "batchnorm_restored": len(folds) if restore else 0,
    }
    try:
        report = PruningReport.from_models(model, compressed, plan=run.merge.plan, extra=extra, input_shape=input_shape,
                                           removed_layers=True)
    except (ValueError, TypeError) as error:  # a layer the cost counters do not know: the model is still good
        warnings.warn(f"RED compressed '{model.name}', but its per-layer report could not be built "
                      f"({type(error).__name__}: {error}); `result.report` is None.", stacklevel=2)
        report = None
    return RedResult(
        model=compressed,
        hashed_model=run.hashed,
        report=report,
        stages=tuple(stages),
        folded_norms=tuple(folds),
        hashed=tuple(run.tensors),
        merge_plan=run.merge.plan,
        merged_per_layer=run.merge.merged_per_layer,
        merge_clusters=run.merge.clusters,
        merge_blocked=run.merge.blocked,
        separations=tuple(run.separations),
        bandwidth_scale=bandwidth_scale,
        hashing_reverted=reverted,
        merge_threshold=merge_threshold,
        merge_representative=merge_representative,
        snap_to=snap_to,
        correct_merge_bias=correct_merge_bias,
        bias_corrected=run.merge.bias_corrected,
        approximations=tuple(approximations),
        separation_tolerance=separation_tolerance,
        reconstruction=refit.kind if refit is not None and (separation_tolerance > 0 or refit.layers == "all")
        else "none",
        refit_layers=refit.layers if refit is not None else "approximated",
        reconstructed=reconstructed,
        separation_cost="flops" if timer is None else "latency_int8" if timer.quantize else "latency",
        block_timings=dict(timer.timings) if timer is not None else {},
    )


@dataclasses.dataclass(frozen=True)
class _Stages:
    """Stages 1-3 on a BatchNormalization-folded model."""

    hashed: keras.Model
    hashed_graph: DependencyGraph
    tensors: list[HashedTensor]
    merge: MergeResult
    model: keras.Model
    separations: list[Separation]

    @classmethod
    def run(cls, folded, bandwidth_scale: float, merge_threshold: float, separate: bool, layers=None,
            merge_distance: str = "channel", merge_representative: str = "readers", snap_to: str = "mean",
            channel_statistics=None, keep=None) -> _Stages:
        """Hashes ``layers`` (default: every linear layer; none when ``bandwidth_scale`` is 0), merges, separates."""
        hashed, tensors = (hash_weights(folded, bandwidth_scale, layers=layers, snap_to=snap_to)
                           if bandwidth_scale > 0 and (layers is None or layers) else (folded, []))
        graph = DependencyGraph(hashed)
        merge = merge_neurons(hashed, merge_threshold, graph=graph, merge_distance=merge_distance,
                              merge_representative=merge_representative, channel_statistics=channel_statistics)
        current, separations = separate_depthwise(merge.model, keep=keep) if separate else (merge.model, [])
        return cls(hashed, graph, tensors, merge, current, separations)


def _search(model, knobs: dict[str, float], knob: str, options: dict[str, Any], budget: Budget,
            refit: _RefitInputs | None = None) -> RedResult:
    """The smallest value of ``knob`` from ``knobs[knob]`` up (the others fixed) whose result meets ``budget``.

    The search runs without ``refit`` (it changes no size); the value found
    runs again with it.

    ``bandwidth_scale``: log-bisection in ``[b, 100·b]`` (10 steps).
    ``separation_tolerance``: log-bisection in ``[max(t, 0.001), 1]`` (10
    steps); at 1 every candidate convolution has rank 1.
    ``merge_threshold``: bisection in ``[t, t_max]``, where every group's
    channels merge at ``t_max`` (`_merge_ceiling`), until the bracket is
    narrower than ``_MERGE_RESOLUTION`` (at least 10 steps): with the layer
    distance ``t_max`` grows with the widest group (62 on a 960-channel
    layer), and 10 halvings of that range left steps of 0.06 in the
    threshold, which moved MobileNetV2's FLOPs by 5 points.
    """
    full = count_flops(model, options["input_shape"]) if budget.metric == "flops" else count_params(model)
    target = budget.fraction * full

    def run(value: float, with_refit: bool = False) -> RedResult:
        return _run(model, **{**knobs, knob: value}, **options, refit=refit if with_refit else None)

    def refitted(result: RedResult) -> RedResult:
        needed = refit is not None and (result.approximations or refit.layers == "all")
        return run(getattr(result, knob), with_refit=True) if needed else result

    def cost(result: RedResult) -> int:
        return getattr(result.stages[-1], budget.metric)

    low = knobs[knob]
    if knob == "separation_tolerance":
        low = max(low, _TOLERANCE_FLOOR)
    best = run(low)
    if cost(best) <= target:
        return refitted(best)
    geometric = knob != "merge_threshold"
    high = {"bandwidth_scale": low * _SEARCH_RANGE, "separation_tolerance": 1.0}.get(knob)
    if high is None:
        high = _merge_ceiling(model, options["merge_distance"])
    top = run(high)
    if cost(top) > target:
        reached = cost(top) / full
        other = {"bandwidth_scale": "a merge_threshold > 0 or budget_knob='merge_threshold'",
                 "merge_threshold": "separate_depthwise=True",
                 "separation_tolerance": "a larger bandwidth_scale"}[knob]
        raise BudgetUnreachableError(
            f"RED cannot reach the budget ({budget}) with {knob} up to {high:g}: it keeps "
            f"{reached:.1%} of the {budget.metric} there. Received: budget={budget!r}. Fix: ask for at least "
            f"{math.ceil(reached * 100) / 100:.2f}, or pass separate_depthwise=True or {other}."
        )
    results = {high: top}

    def fits(value: float) -> bool:
        results[value] = run(value)
        return cost(results[value]) <= target

    steps = _SEARCH_STEPS if geometric else max(_SEARCH_STEPS, math.ceil(math.log2((high - low) / _MERGE_RESOLUTION)))
    return refitted(results[smallest_fitting_value(fits, low, high, steps, geometric=geometric)])


def _merge_ceiling(model: keras.Model, merge_distance: str) -> float:
    """A ``merge_threshold`` at which every two channels of a group are near-identical.

    ``d(i, j) ≤ (‖s_i‖ + ‖s_j‖) / n``: at most 2 with ``"channel"``
    (``n = max(‖s_i‖, ‖s_j‖)``), at most ``2·√C`` with ``"layer"`` (``n`` the
    root mean square of a group's ``C`` channel norms, none of which exceeds
    ``√C·n``).
    """
    if merge_distance == "channel":
        return 2.0 * (1 + 1e-6)  # opposite channels sit at 2 up to float rounding
    sizes = [group.size for group in DependencyGraph(model).prunable_groups] or [1]
    return 2.0 * math.sqrt(max(sizes)) * (1 + 1e-6)
