"""PSAP (protective self-adaptive pruning): reconstruction of the method.

The paper body could not be read; this is the reconstruction specified in
ALGORITHMS.md section 3, with every choice documented in docs/methods/psap.md.
Works on channel groups (a group of several producing layers is one "layer").

1. Weight sparsity ratio of a layer: ``WSR_l = |{w ∈ W_l : |w| < ε_l}| / |W_l|``
   with ``ε_l = κ · mean|W_l|``; a group takes the mean WSR of the layers
   creating its channels (`group_sparsity`).
2. Layer ratios: ``P_l = s · WSR_l / mean_l(WSR)``, clipped to
   ``[0, max_layer_ratio]``, with the scale ``s`` found by bisection so that
   the model-wide step target (FLOPs or parameters kept) is met
   (`adaptive_plan`). If sparse layers alone cannot reach it, a common floor
   ratio ``P_l = max(s · WSR_l / mean, u)`` is raised until they do.
3. In each group the lowest-L1 filters go (`surgery.importance.channel_l1`),
   except protected ones.
4. Protection (`protected_channels`): with an EMA of each channel's gradient
   norm, a currently zeroed channel whose EMA exceeds the median of the active
   channels' is protected (kept, so it can regrow), and an active channel
   whose EMA is in the top ``protect_quantile`` of its group is spared.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_autoprune.allocation.cost import PlanCost
from keras_autoprune.allocation.search import smallest_fitting_value
from keras_autoprune.budget import Budget
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.surgery.importance import channel_l1
from keras_autoprune.surgery.plan import PrunePlan


def weight_sparsity_ratio(kernel: np.ndarray, kappa: float = 0.05) -> float:
    """``|{w : |w| < κ · mean|W|}| / |W|``.

    >>> weight_sparsity_ratio(np.array([0.0, 0.01, 1.0, 2.0]), kappa=0.1)  # ε = 0.07575
    0.5
    """
    magnitude = np.abs(np.asarray(kernel, np.float64))
    return float(np.mean(magnitude < kappa * magnitude.mean()))


def group_sparsity(graph: DependencyGraph, kappa: float = 0.05) -> dict[str, float]:
    """Mean WSR of the kernels creating each prunable group's channels."""
    ratios: dict[int, list[float]] = {}
    for record in graph.records:
        layer = record.operation
        kernel = getattr(layer, "pointwise_kernel", None)  # a Variable has no truth value: no `or`
        if kernel is None:
            kernel = getattr(layer, "kernel", None)
        layout = record.out_layouts[0] if record.out_layouts else np.zeros(0, np.int64)
        creates = len(layout) and graph.atoms.space_owner(graph.atoms.space_of(int(layout[0]))) == record.name
        if kernel is None or not record.first_call or not creates:
            continue
        wsr = weight_sparsity_ratio(kernel.numpy(), kappa)
        for g in np.unique(graph.atom_group[layout]).tolist():
            ratios.setdefault(g, []).append(wsr)
    return {group.id: float(np.mean(ratios.get(graph.group_index(group.id), [0.0]))) for group in graph.prunable_groups}


def protected_channels(
    grad_ema: dict[str, np.ndarray],
    zeroed: dict[str, np.ndarray],
    protect_quantile: float = 0.1,
    regrow: bool = True,
) -> dict[str, np.ndarray]:
    """Channels that may not be pruned at this step, per group.

    Args:
        grad_ema: EMA of each channel's gradient norm, per group.
        zeroed: boolean array per group, True for channels zeroed now.
        protect_quantile: active channels whose EMA is in this top fraction
            of their group are spared: those at or above the
            ``1 - protect_quantile`` quantile of the active EMAs, at most
            ``n - ceil((1 - q)(n - 1))`` of the ``n`` active ones (the count
            without ties; ties go by channel index), and only channels with
            a gradient (EMA > 0): a group without gradient statistics (its
            layers cannot be tapped) protects nothing.
        regrow: protect zeroed channels whose EMA exceeds the active
            channels' median so they can regrow (soft rounds). False in the
            final hard round: a channel zeroed there is removed for good, so
            keeping one that is still zero would only waste the budget.

    Returns:
        Boolean array per group (True = protected).
    """
    protected = {}
    for group_id, ema in grad_ema.items():
        off = zeroed.get(group_id, np.zeros(len(ema), bool))
        active = ema[~off]
        guard = np.zeros(len(ema), bool)
        if active.size:
            if regrow:
                guard |= off & (ema > np.median(active))  # wrongly pruned: let it regrow
            if protect_quantile > 0:
                cut = np.quantile(active, 1 - protect_quantile)
                top = np.flatnonzero(~off & (ema >= cut) & (ema > 0))
                most = active.size - int(np.ceil((1 - protect_quantile) * (active.size - 1) - 1e-9))
                guard[top[np.argsort(-ema[top], kind="stable")[:most]]] = True
        protected[group_id] = guard
    return protected


def adaptive_plan(
    model: keras.Model,
    graph: DependencyGraph,
    budget: Budget,
    target: float,
    sparsity: dict[str, float],
    protected: dict[str, np.ndarray] | None = None,
    max_layer_ratio: float = 0.8,
    cost: PlanCost | None = None,
) -> PrunePlan:
    """The PSAP plan: WSR-proportional layer ratios scaled to meet ``target``.

    Returns the plan with the smallest scale ``s`` whose pruned model keeps at
    most ``target`` of the original cost (bisection, 30 steps), or the plan at
    ``max_layer_ratio`` everywhere if even that is not enough.
    """
    cost = cost or PlanCost(model, graph)
    limit = target * cost(PrunePlan({}), budget.metric)
    mean = np.mean(list(sparsity.values())) or 1.0
    relative = {gid: (wsr / mean if mean else 1.0) for gid, wsr in sparsity.items()}
    scores = channel_l1(graph)
    for group_id, guard in (protected or {}).items():  # above every unprotected channel, in their L1 order
        scores[group_id] = np.where(guard, scores[group_id] + scores[group_id].max() + 1.0, scores[group_id])

    def plan_at(scale: float, floor: float = 0.0) -> PrunePlan:
        ratios = {gid: float(np.clip(max(scale * r, floor), 0.0, max_layer_ratio)) for gid, r in relative.items()}
        return PrunePlan.from_ratios(graph, ratios, scores)

    def fits(plan: PrunePlan) -> bool:
        return cost(plan, budget.metric) <= limit

    def smallest(make, high: float) -> float:
        return smallest_fitting_value(lambda value: fits(make(value)), 0.0, high, steps=30)

    top = max_layer_ratio / min([r for r in relative.values() if r > 0] or [1.0])
    if fits(plan_at(top)):
        return plan_at(smallest(plan_at, top))
    # Groups with (near) zero sparsity cannot reach the target alone: raise a
    # common floor ratio for every group until it is met.
    if fits(plan_at(top, max_layer_ratio)):
        return plan_at(top, smallest(lambda floor: plan_at(top, floor), max_layer_ratio))
    warnings.warn(
        f"keras_autoprune: PSAP cannot reach {target:.1%} of the original {budget.metric} with "
        f"max_layer_ratio={max_layer_ratio}; using the most it can prune.",
        stacklevel=2,
    )
    return plan_at(top, max_layer_ratio)


def group_gradient_norms(graph: DependencyGraph, gradients) -> dict[str, np.ndarray]:
    """Per-channel gradient norm of each prunable group, summed over its producing layers."""
    norms = {group.id: np.zeros(group.size) for group in graph.prunable_groups}
    for record in graph.records:
        stats = gradients.get(record.name)
        if stats is None or not record.first_call:
            continue
        per_filter = stats.filter_grad_norm()
        layout = record.out_layouts[0]
        for g in np.unique(graph.atom_group[layout]).tolist():
            group_id = graph.groups[g].id
            if group_id in norms:
                at = graph.atom_group[layout] == g
                np.add.at(norms[group_id], graph.atom_channel[layout[at]], per_filter[at])
    return norms
