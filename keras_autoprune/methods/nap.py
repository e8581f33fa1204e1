"""NAP (Network Automatic Pruning, Zeng & Urtasun): K-FAC OBS saliency, global ranking.

Structured mode (channels):

1. K-FAC factors ``A, G`` of every Dense / Conv1D / Conv2D / DepthwiseConv2D
   layer from a calibration pass (`stats.collect_kfac`).
2. Saliency of channel i of a layer: the OBS loss increase of removing it,
   ``ΔL_i = w_iᵀ A w_i / (2 [G⁻¹]_ii)`` (output side) and, for layers that
   read the channel, ``½ tr([(A⁻¹)_{RR}]⁻¹ W_R G W_Rᵀ)`` over its taps R
   (input side, on by default: ``input_side=True``). A coupled group sums
   its members (`stats.GroupSaliency`).
3. All groups' channels are ranked together (optionally per unit of cost,
   ``cost_aware=True``: ``ΔL_i / cost_i``; a chunk removed as one, a
   GroupNormalization group, ranks by ``Σ ΔL / Σ cost`` over its channels);
   the lowest go until the budget
   holds (`allocation.global_ranking_plan`). Per-layer ratios follow from the
   ranking alone.
4. Optional OBS update of the remaining output channels of each layer that
   lost some: ``W ← W − W_R [(G⁻¹)_RR]⁻¹ (G⁻¹)_{R,:}``
   (`scoring.obs.out_channel_update`).

Baseline scorers (``scorer=``, `SCORERS`): step 2 can instead use one of
the classic curvature baselines of `scoring.baselines` (C-OBD, C-OBS,
Kron-OBD, Kron-OBS), dispatched through `_BASELINES`. They score the output
side only, as in their papers (the producers' output columns, summed over a
group's members); the input-side term is used by ``"nap"`` only.

Fine-grained mode (weights): ``ΔL_pi = W_pi² / (2 [A⁻¹]_pp [G⁻¹]_ii)`` per
weight, ranked over all layers, under a parameter budget (see
`weight_masks`).
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

from keras_autoprune.allocation.cost import PlanCost, channel_costs
from keras_autoprune.allocation.ranking import global_ranking_plan
from keras_autoprune.budget import Budget
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.scoring import baselines
from keras_autoprune.scoring.obs import out_channel_update, weight_saliency
from keras_autoprune.stats import GroupSaliency, damped_inverses, split_weight_matrix, weight_matrix
from keras_autoprune.stats.groups import expanded_members, internal_members
from keras_autoprune.stats.channel_fisher import group_channel_fisher
from keras_autoprune.stats.engine import StatisticsResult
from keras_autoprune.stats.taps import Tap, resolve_taps
from keras_autoprune.surgery.plan import PrunePlan


# The baseline scorers: per-layer output-column scores from (W̃, factors, A'⁻¹, G'⁻¹),
# the damped inverses of `stats.damped_inverses` (formulas in `scoring.baselines`).
_BASELINES = {
    "kron-obs": lambda w, f, a_inv, g_inv: baselines.kron_obs(w, f.A, g_inv),
    "kron-obd": lambda w, f, a_inv, g_inv: baselines.kron_obd(w, f.A, f.G),
    "c-obs": lambda w, f, a_inv, g_inv: baselines.c_obs(w, a_inv, g_inv),
    "c-obd": lambda w, f, a_inv, g_inv: baselines.c_obd(w, f.A, f.G),
}
SCORERS = ("nap", *_BASELINES, "fisher")
"""``"fisher"``: the exact channel-level Fisher of a removal as the readers see it
(`stats.channel_fisher`, statistics of its own instead of K-FAC factors)."""


def check_scorer(scorer: str, input_side: bool | None = None) -> bool:
    """Validates ``scorer`` and returns the effective ``input_side``.

    ``input_side=None`` means True for ``"nap"`` and False for the baselines,
    which are output-side only (``input_side=True`` with one is an error).
    """
    if scorer not in SCORERS:
        raise ValueError(f"`scorer` must be one of {SCORERS}. Received: scorer={scorer!r}")
    if scorer == "nap":
        return True if input_side is None else bool(input_side)
    if scorer == "fisher" and input_side:
        raise ValueError(
            "scorer='fisher' scores a channel where its readers see it; it has no output or input side to choose. "
            f"Leave `input_side` unset. Received: input_side={input_side!r}"
        )
    if input_side:
        raise ValueError(
            f"The baseline scorer {scorer!r} scores the output side only (as in its paper); the input-side "
            "saliency belongs to scorer='nap'. Leave `input_side` unset or False. "
            f"Received: scorer={scorer!r}, input_side={input_side!r}"
        )
    return False


def channel_saliencies(
    model: keras.Model,
    graph: DependencyGraph,
    factors: StatisticsResult,
    damping: float = 1e-3,
    input_side: bool | None = None,
    cost_aware: bool = False,
    metric: str = "flops",
    scorer: str = "nap",
) -> dict[str, np.ndarray]:
    """Per-channel scores (higher = keep) for every prunable group.

    Args:
        scorer: ``"nap"`` (OBS saliency, output side plus, with
            ``input_side``, the consumers' input side), a baseline of
            `SCORERS` (output side only), or ``"fisher"`` (the channel
            Fisher of `stats.channel_fisher`; ``factors`` then come from
            `stats.collect_channel_fisher`).
        input_side: None: True for ``"nap"``; see `check_scorer`.
    """
    input_side = check_scorer(scorer, input_side)
    if scorer == "fisher":  # ``factors`` are `stats.collect_channel_fisher`'s
        scores = group_channel_fisher(graph, factors)
    else:
        saliency = GroupSaliency(graph, factors, damping)
        score = ((lambda g: saliency.group(g, input_side=input_side)) if scorer == "nap"
                 else (lambda g: saliency.output_scores(g, _BASELINES[scorer])))
        measured = scorable_groups(graph, scorer, input_side, set(factors))
        unmeasured = sorted(g.id for g in graph.prunable_groups if g.id not in measured)
        if unmeasured:
            warnings.warn(f"keras_autoprune: the K-FAC statistics reach no layer that scores group(s) {unmeasured} "
                          f"with scorer={scorer!r} (their layers cannot be tapped); they are not pruned.", stacklevel=2)
        scores = {g.id: score(g) for g in graph.prunable_groups if g.id in measured}
    if cost_aware:  # the ranking sums a chunk's channels: each divided by its chunk's cost, the sum is Σ ΔL / Σ cost
        costs = channel_costs(model, graph, metric)
        scores = {gid: s / np.maximum(_chunk_costs(graph.group(gid).chunks, costs[gid]), 1e-12)
                  for gid, s in scores.items()}
    return scores


def _chunk_costs(chunks: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Each channel's chunk's summed cost (a channel's own cost when chunks are single channels)."""
    return np.bincount(chunks, weights=costs)[chunks]


def nap_plan(
    model: keras.Model,
    graph: DependencyGraph,
    factors: StatisticsResult,
    budget: Budget,
    target: float | None = None,
    removed: PrunePlan | None = None,
    max_layer_ratio: float = 1.0,
    plan_cost: PlanCost | None = None,
    **saliency_options: Any,
) -> PrunePlan:
    """The NAP plan for ``target`` (default: the budget) from K-FAC factors (``max_layer_ratio``: the layer floor of `global_ranking_plan`)."""
    scores = channel_saliencies(model, graph, factors, metric=budget.metric, **saliency_options)
    return global_ranking_plan(model, graph, scores, budget, target, removed, max_layer_ratio, plan_cost)


def obs_update(graph: DependencyGraph, factors: StatisticsResult, plan: PrunePlan, damping: float = 1e-3) -> list[str]:
    """Applies the OBS compensation to every producer layer that loses outputs.

    Only non-depthwise layers with factors are updated, each on its own (in a
    residual group every producer compensates for its own columns). The
    removed columns end at exactly 0.

    Returns:
        Names of the layers updated.
    """
    removed = plan.removed_atoms(graph)
    updated = []
    for record in graph.records:
        factor = factors.get(record.name)
        if not record.first_call or factor is None or factor.depthwise:
            continue
        gone = np.flatnonzero(removed[record.out_layouts[0]])
        if gone.size == 0:
            continue
        layer = record.operation
        bias = layer.bias if getattr(layer, "use_bias", False) else None
        w = weight_matrix(layer.kernel.numpy(), None if bias is None else bias.numpy(), False)
        _, g_inv = damped_inverses(factor.A, factor.G, damping)
        updated_w = out_channel_update(w, g_inv, gone)
        kernel, new_bias = split_weight_matrix(updated_w, tuple(layer.kernel.shape), bias is not None, False)
        layer.kernel.assign(kernel.astype(layer.kernel.dtype))
        if bias is not None:
            bias.assign(new_bias.astype(bias.dtype))
        updated.append(record.name)
    return updated


def scorable_groups(graph: DependencyGraph, scorer: str, input_side: bool = True,
                    tapped: set[str] | None = None) -> frozenset[str]:
    """Prunable groups that ``scorer`` can score: some member it reads is a layer the statistics tap.

    The channel Fisher (``"fisher"``) reads the groups' readers (input side);
    ``"nap"`` reads producers and, with ``input_side``, readers; the
    baselines read producers. A group none of whose read members is tapped
    would score 0 and be removed first, so the callbacks leave it whole.

    Args:
        tapped: qualified names of the tapped layers (the keys of collected
            statistics); default: those `resolve_taps` would tap.
    """
    tapped = set(resolve_taps(graph)) if tapped is None else tapped
    sides = {"input"} if scorer == "fisher" else {"output", "input"} if scorer == "nap" and input_side else {"output"}
    internal, _ = internal_members(graph)
    return frozenset(group.id for group in graph.prunable_groups
                     if any(m.layer in tapped and m.side in sides and m.tensor_index == 0
                            for m in expanded_members(group, internal)))


def maskable_taps(graph: DependencyGraph) -> dict[str, Tap]:
    """The layers whose kernels fine-grained NAP masks, by qualified name: every tapped Dense, convolution and
    MultiHeadAttention projection (`stats.taps.resolve_taps`); depthwise kernels are not masked."""
    return {name: tap for name, tap in resolve_taps(graph).items() if not tap.depthwise}


def weight_masks(
    graph: DependencyGraph,
    factors: StatisticsResult,
    fraction: float,
    damping: float = 1e-3,
) -> dict[str, np.ndarray]:
    """Fine-grained NAP: kernel masks keeping ``fraction`` of the scored weights.

    Every weight of every maskable layer (`maskable_taps`) with factors gets
    ``ΔL = W² / (2 [A⁻¹]_pp [G⁻¹]_ii)``; the globally lowest go, so that the
    kept count is ``ceil(fraction * total)``. Biases are never masked.

    Returns:
        ``{layer name: 0/1 array shaped like its kernel}``.
    """
    scored = {}
    for name, tap in maskable_taps(graph).items():
        factor = factors.get(name)
        if factor is None:
            continue
        kernel = tap.layer.kernel
        w = factor.weight_matrix(kernel.numpy(), tap.layer.bias.numpy() if tap.has_bias else None)
        a_inv, g_inv = damped_inverses(factor.A, factor.G, damping)
        saliency = weight_saliency(w, np.diag(a_inv), np.diag(g_inv))
        kernel_rows = int(np.prod(kernel.shape)) // w.shape[1]
        scored[name] = (tuple(kernel.shape), saliency[:kernel_rows])
    everything = np.concatenate([s.reshape(-1) for _, s in scored.values()])
    keep = int(np.ceil(fraction * everything.size))
    threshold = np.sort(everything)[::-1][keep - 1] if keep else np.inf
    return {name: (s >= threshold).astype("float32").reshape(shape) for name, (shape, s) in scored.items()}
