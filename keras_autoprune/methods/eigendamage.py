"""EigenDamage: pruning eigen-directions of the Kronecker-factored eigenbasis.

One round, for every eligible layer (Dense, Conv1D, Conv2D; not the
classifier), given its channel-only K-FAC factors ``A_c`` (``Cin × Cin``)
and ``G`` (``Cout × Cout``) measured on the current (projected) model and its
current bases ``Q_in``, ``Q_out`` (identity before the first round):

1. The core's factors are ``A_core = Q_inᵀ A_c Q_in`` and
   ``G_core = Q_outᵀ G Q_out`` (the core sees ``Q_inᵀ a`` and back-propagates
   ``Q_outᵀ δ``), decomposed as ``U_A diag(s_A) U_Aᵀ``, ``U_G diag(s_G) U_Gᵀ``
   (eigenvalues ≤ 1e-10 set to 0, no damping); the bases are composed,
   ``Q_in ← Q_in U_A`` and ``Q_out ← Q_out U_G``.
2. The rotated kernel ``W*_k = Q_inᵀ K_k Q_out`` gives the importance
   ``I_ij = Σ_k (W*_ijk)² s_G,i s_A,j`` (`scoring.eigenbasis`), and each
   in-direction ``j`` scores ``Σ_i I_ij``, each out-direction ``i`` ``Σ_j I_ij``.
   With a ``direction_scorer`` (the callback's ``scorer="fisher"``), the
   scores are instead the exact Fisher of removing each direction of the
   composed bases, measured in a second calibration pass
   (`stats.direction_fisher`).
3. All layers' in- and out-direction scores go in one list, lowest first
   (with ``cost_aware``: each score divided by the cost one direction of
   its side adds at the layer's current core widths, from the bilinear cost
   ``f(n_in, n_out) = a + b·n_in + c·n_out + d·n_in·n_out`` of
   `FactorizedCost`: ``b + d·n_out`` for an in-direction, ``c + d·n_in``
   for an out-direction; the loss increase per FLOP or parameter saved).
   A layer side never loses more than ``max_layer_ratio`` of its original
   directions and keeps at least one. The shortest prefix of the list that
   brings the model to the round's target is removed (bisection on the exact
   cost, `FactorizedCost`, which counts the rotation layers).
4. Size guard: a layer whose three layers would cost at least as much as
   the original (FLOPs or parameters) stays whole.

The result is a `FactorizationPlan`; `FactorizationPlan.apply` builds the
rotation -> core -> rotation model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import keras
import numpy as np

from keras_autoprune.accounting import call_flops, call_shapes, count_flops, count_params
from keras_autoprune.allocation.ranking import layer_floor
from keras_autoprune.allocation.search import shortest_fitting_prefix
from keras_autoprune.budget import Budget
from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.scoring.eigenbasis import direction_scores, kfe_importance
from keras_autoprune.stats.curvature import symmetric_eigh
from keras_autoprune.stats.kfac import KFACFactors
from keras_autoprune.surgery.factorization import FactorizationPlan, LayerFactorization, factorization_problem, factorized_layers
from keras_autoprune.surgery.replace import named_layers

SIDES = ("in", "out")


def eligible_layers(graph: DependencyGraph) -> dict[str, keras.layers.Layer]:
    """``{qualified name: layer}`` of the layers EigenDamage may factorise.

    Dense, Conv1D and Conv2D layers (ungrouped, not quantized) whose output
    channels do not reach a model output: the classifier (and any layer
    producing an output directly) stays whole. So do the sublayers of traced
    custom layers (`keras_autoprune.graph.trace`): `replace_layers` replaces
    layers of functional graphs, nested models included, and a custom
    layer's sublayers are not such layers.
    """
    outputs = [graph.atom_group[layout] for layout in graph.output_layouts if len(layout)]
    output_groups = set(np.concatenate(outputs).tolist()) if outputs else set()
    replaceable = named_layers(graph.model)
    layers = {}
    for record in graph.records:
        layer = record.operation
        if not record.first_call or not isinstance(layer, keras.layers.Layer) or factorization_problem(layer):
            continue
        if replaceable.get(record.name) is not layer:
            continue
        if any(len(layout) and output_groups & set(graph.atom_group[layout].tolist()) for layout in record.out_layouts):
            continue
        layers[record.name] = layer
    return layers


class FactorizedCost:
    """Exact FLOPs and parameters of the model with some layers factorised.

    The model's cost is ``count(model) − Σ_l count(l) + Σ_l cost_l(n_in, n_out)``
    over the eligible layers ``l``, where ``cost_l`` is that of the three
    layers (`factorized_layers`) at core widths ``n_in``, ``n_out`` -- or of
    the original layer when the three would not be smaller in FLOPs *and*
    parameters (the size guard). A layer's FLOPs (from
    `keras_autoprune.accounting.call_flops`, summed over its calls) and
    parameters are bilinear in ``(n_in, n_out)``, so four evaluations per
    layer give exact coefficients.

    Args:
        model: the model (unfactorised architecture).
        layers: ``{qualified name: layer}``, e.g. `eligible_layers`.
    """

    def __init__(self, model: keras.Model, layers: dict[str, keras.layers.Layer]):
        self.layers = layers
        self.total = {"flops": count_flops(model), "params": count_params(model)}
        shapes = call_shapes(model)
        self.original: dict[str, dict[str, int]] = {}
        self._coefficients: dict[str, dict[str, np.ndarray]] = {}
        for name, layer in layers.items():
            calls = shapes[name]
            self.original[name] = {
                "flops": sum(call_flops(layer, ins, outs) for ins, outs in calls),
                "params": layer.count_params(),
            }
            points = {(a, b): self._composite(layer, calls, a, b) for a in (1, 2) for b in (1, 2)}
            self._coefficients[name] = {
                metric: _bilinear({point: costs[metric] for point, costs in points.items()}) for metric in ("flops", "params")
            }

    @staticmethod
    def _composite(layer, calls, n_in: int, n_out: int) -> dict[str, int]:
        rot_in, core, rot_out = factorized_layers(layer, n_in, n_out)
        axis = 1 if getattr(layer, "data_format", None) == "channels_first" else -1
        flops = 0
        for ins, outs in calls:
            x, y = tuple(ins[0]), tuple(outs[0])
            x_mid, y_mid = _with_channels(x, axis, n_in), _with_channels(y, axis, n_out)
            flops += call_flops(rot_in, [x], [x_mid]) + call_flops(core, [x_mid], [y_mid]) + call_flops(rot_out, [y_mid], [y])
        kernel = tuple(layer.kernel.shape)
        taps = math.prod(kernel[:-2])
        params = kernel[-2] * n_in + taps * n_in * n_out + n_out * kernel[-1] + (kernel[-1] if layer.use_bias else 0)
        return {"flops": flops, "params": params}

    def layer_cost(self, name: str, n_in: int, n_out: int) -> tuple[dict[str, int], bool]:
        """``({"flops": ..., "params": ...}, factorised)`` of one layer at core widths ``n_in``, ``n_out``."""
        composite = {m: int(_evaluate(c, n_in, n_out)) for m, c in self._coefficients[name].items()}
        original = self.original[name]
        if all(composite[m] < original[m] for m in composite):
            return composite, True
        return dict(original), False

    def marginal(self, name: str, n_in: int, n_out: int, metric: str) -> tuple[int, int]:
        """``(b + d·n_out, c + d·n_in)``: what one in- and one out-direction of the factorised layer cost at ``(n_in, n_out)``."""
        _, b, c, d = (int(v) for v in self._coefficients[name][metric])
        return b + d * n_out, c + d * n_in

    def cost(self, ranks: dict[str, tuple[int, int]], metric: str) -> int:
        """The model's ``metric`` with the layers in ``ranks`` (``{name: (n_in, n_out)}``) factorised."""
        total = self.total[metric]
        for name, (n_in, n_out) in ranks.items():
            total += self.layer_cost(name, n_in, n_out)[0][metric] - self.original[name][metric]
        return total

    def smallest(self, max_layer_ratio: float) -> dict[str, tuple[int, int]]:
        """``{name: (n_in, n_out)}``: every layer at the smallest core `eigendamage_plan` may leave it."""
        return {
            name: tuple(width - removable(width, max_layer_ratio) for width in layer.kernel.shape[-2:])
            for name, layer in self.layers.items()
        }

    def kept(self, plan: FactorizationPlan) -> dict[str, float]:
        """FLOPs and parameters of ``plan.apply(model)`` as fractions of the original."""
        ranks = {name: f.rank for name, f in plan.layers.items()}
        return {m: self.cost(ranks, m) / self.total[m] for m in ("flops", "params")}


def removable(width: int, max_layer_ratio: float) -> int:
    """How many of a layer side's ``width`` original directions may be removed: all but `layer_floor`'s
    ``max(1, ceil((1 - r) · width))``, the floor the channel rankings use."""
    return width - layer_floor(width, max_layer_ratio)


def _with_channels(shape: tuple, axis: int, width: int) -> tuple:
    shape = list(shape)
    shape[axis] = width
    return tuple(shape)


def _bilinear(f: dict[tuple[int, int], int]) -> np.ndarray:
    """Coefficients ``(a, b, c, d)`` of ``f(n_in, n_out) = a + b·n_in + c·n_out + d·n_in·n_out`` from ``f`` at (1|2, 1|2)."""
    f11, f21, f12, f22 = f[1, 1], f[2, 1], f[1, 2], f[2, 2]
    d = f22 - f21 - f12 + f11
    b, c = f21 - f11 - d, f12 - f11 - d
    return np.array([f11 - b - c - d, b, c, d], np.int64)


def _evaluate(coefficients: np.ndarray, n_in: int, n_out: int) -> int:
    a, b, c, d = (int(v) for v in coefficients)
    return a + b * n_in + c * n_out + d * n_in * n_out


def rotate(factors: KFACFactors, kernel: np.ndarray, current: LayerFactorization | None) -> tuple[LayerFactorization, np.ndarray]:
    """Composes the current bases with the core's eigenbases and scores the core.

    Args:
        factors: the layer's K-FAC factors on the current model (``A_channel``, ``G``).
        kernel: the layer's (projected) kernel, ``(*k, Cin, Cout)``.
        current: the bases kept so far (None: the identity).

    Returns:
        ``(bases, importance)``: the composed bases ``Q_in U_A``, ``Q_out U_G``
        (same widths as ``current``) and ``I`` of shape ``(n_in, n_out)``.
    """
    if factors.A_channel is None or factors.depthwise:
        raise ValueError(f"Layer '{factors.layer_name}': EigenDamage needs the channel-only factor A_channel.")
    cin, cout = kernel.shape[-2:]
    q_in = np.eye(cin) if current is None else current.q_in
    q_out = np.eye(cout) if current is None else current.q_out
    s_in, u_in = symmetric_eigh(q_in.T @ factors.A_channel @ q_in)
    s_out, u_out = symmetric_eigh(q_out.T @ factors.G @ q_out)
    bases = LayerFactorization(q_in @ u_in, q_out @ u_out)
    return bases, kfe_importance(bases.core_kernel(kernel), s_in, s_out)


def eigendamage_plan(
    model: keras.Model,
    factors: dict[str, KFACFactors],
    cost: FactorizedCost,
    budget: Budget,
    target: float | None = None,
    current: FactorizationPlan | None = None,
    max_layer_ratio: float = 0.95,
    cost_aware: bool = False,
    direction_scorer: Callable[[dict[str, LayerFactorization]], dict[str, tuple[np.ndarray, np.ndarray]]] | None = None,
) -> FactorizationPlan:
    """One EigenDamage round: the plan that meets ``target`` (see the module docstring).

    Args:
        model: the model whose kernels the factors were measured on (during
            fit: the projected model).
        factors: K-FAC factors with ``A_channel`` of every layer in ``cost.layers``.
        cost: `FactorizedCost` of the original model.
        budget: the metric and the final fraction.
        target: fraction of the original cost to keep after this round
            (default ``budget.fraction``).
        current: the plan of earlier rounds (its removed directions stay removed).
        max_layer_ratio: most of a layer side's original directions a plan removes.
        cost_aware: rank directions by score per unit of ``budget.metric`` they cost.
        direction_scorer: given the composed bases ``{name: LayerFactorization}``,
            ``{name: (in-direction scores, out-direction scores)}`` that replace
            K-FAC's (for instance `stats.collect_direction_fisher`).

    Returns:
        The new `FactorizationPlan`. If the target cannot be reached, the
        plan removing every removable direction, with a warning.
    """
    target = budget.fraction if target is None else target
    current_layers = current.layers if current is not None else {}
    rotated, sides, scores, widths, caps = {}, {}, [], {}, {}
    live = named_layers(model)
    for name in cost.layers:
        kernel = np.asarray(live[name].kernel.numpy(), np.float64)
        rotated[name], importance = rotate(factors[name], kernel, current_layers.get(name))
        sides[name] = direction_scores(importance)
    if direction_scorer is not None:
        sides = direction_scorer(rotated)
    for name in cost.layers:
        kernel = live[name].kernel
        per_direction = cost.marginal(name, *(len(s) for s in sides[name]), budget.metric) if cost_aware else (1, 1)
        for side, score, unit in zip(SIDES, sides[name], per_direction):
            score = score / max(unit, 1)
            original = kernel.shape[-2] if side == "in" else kernel.shape[-1]
            widths[name, side] = len(score)
            caps[name, side] = max(0, removable(original, max_layer_ratio) - (original - len(score)))
            scores += [(float(s), len(scores), name, side, int(i)) for i, s in enumerate(score)]
    scores.sort()
    order, taken = [], dict.fromkeys(caps, 0)
    for _, _, name, side, index in scores:
        if taken[name, side] < caps[name, side]:
            taken[name, side] += 1
            order.append((name, side, index))
    limit = target * cost.total[budget.metric]

    def ranks(count: int) -> dict[str, tuple[int, int]]:
        removed = dict.fromkeys(widths, 0)
        for name, side, _ in order[:count]:
            removed[name, side] += 1
        return {name: (widths[name, "in"] - removed[name, "in"], widths[name, "out"] - removed[name, "out"]) for name in cost.layers}

    def fits(count: int) -> bool:
        return cost.cost(ranks(count), budget.metric) <= limit

    if fits(len(order)):
        count = shortest_fitting_prefix(fits, 0, len(order))
    else:
        warnings.warn(
            f"keras_autoprune: EigenDamage cannot reach {target:.1%} of the original {budget.metric}: removing "
            f"every removable direction (max_layer_ratio={max_layer_ratio}) is not enough. Using that maximal plan.",
            stacklevel=2,
        )
        count = len(order)
    gone: dict[tuple[str, str], list[int]] = {key: [] for key in widths}
    for name, side, index in order[:count]:
        gone[name, side].append(index)
    plan = {}
    for name, bases in rotated.items():
        if not gone[name, "in"] and not gone[name, "out"] and name not in current_layers:
            continue
        keep_in = np.setdiff1d(np.arange(widths[name, "in"]), gone[name, "in"])
        keep_out = np.setdiff1d(np.arange(widths[name, "out"]), gone[name, "out"])
        if cost.layer_cost(name, len(keep_in), len(keep_out))[1]:
            plan[name] = LayerFactorization(bases.q_in[:, keep_in], bases.q_out[:, keep_out])
    return FactorizationPlan(plan)
