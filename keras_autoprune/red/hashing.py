"""RED stage 1: adaptive hashing of the scalar weights of each layer.

For every weight tensor ``w`` of a convolution, depthwise, separable,
transposed-convolution or Dense layer (`LINEAR_CLASSES`: ``kernel``,
``depthwise_kernel``, ``pointwise_kernel`` and ``bias`` each on their own),
the values are grouped by the basins of the modes of their Gaussian kernel
density estimate (`keras_autoprune.red.kde`), and every value is replaced by
its basin's representative:

    h = bandwidth_scale · 0.9 · min(σ, IQR / 1.34) · n^(−1/5)   (Silverman)
    w_i  ←  v_k   for the basin k that holds w_i, with
    v_k = mean{w_j : w_j in basin k}   (``snap_to="mean"``, default) or
    v_k = m_k, the basin's mode        (``snap_to="mode"``, the paper).

Decision: **the basin's mean by default.** The basins, not the values,
decide which neurons become identical (equal basins, equal values), so both
choices merge and separate the same neurons; among values constant per
basin, the mean minimises ``sum_i (w_i − v_k(i))²``. A mode sits at the
density's peak, which for a wide, skewed basin (coarse hashing) lies far
from most of its weights. Measured on the converged CIFAR-10 models, the
mean loses less accuracy at every bandwidth where hashing changes the
model noticeably (docs/methods/red.md).

Decision: **per layer (per weight tensor), not per output neuron.** All
neurons of a layer share one set of modes, so two neurons whose weights fall
in the same basins become *identical* and stage 2 can merge them, and one
input channel's k×k kernels repeat across output channels, which stage 3
exploits. Per-neuron modes would give every neuron its own values and
almost never make two neurons equal. Kernels and biases get separate
densities because their scales differ (a bias after BatchNormalization
folding carries ``β − s μ``).

Weights of other layers (a BatchNormalization that could not be folded,
PReLU, LayerScale, ...) are left unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import keras
import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph, graph_of
from keras_autoprune.red.kde import density_modes, silverman_bandwidth
from keras_autoprune.red.options import check_choice, check_knob
from keras_autoprune.red.records import clone_with, is_linear_layer
from keras_autoprune.surgery.clone import layer_from_config
from keras_autoprune.surgery.weights import layer_weights

HASHED_WEIGHTS = ("kernel", "depthwise_kernel", "pointwise_kernel", "bias")


@dataclasses.dataclass(frozen=True)
class HashedTensor:
    """What hashing did to one weight tensor.

    Attributes:
        layer: qualified layer name.
        weight: weight key (``"kernel"``, ``"bias"``, ...).
        size: number of scalars.
        distinct_before: distinct values before hashing.
        distinct_after: distinct values after hashing (basins in use).
        bandwidth: the KDE bandwidth ``h``.
        relative_error: ``||ŵ − w|| / ||w||`` (0 for an all-zero ``w``), how
            far hashing moved the tensor: a data-free sign of how much it
            may cost (converged CIFAR-10 ResNet-20, every layer hashed:
            median kernel 1.0% at ``bandwidth_scale=0.05``, 89.3% accurate;
            88% at 1.0, at chance; docs/methods/red.md).
    """

    layer: str
    weight: str
    size: int
    distinct_before: int
    distinct_after: int
    bandwidth: float
    relative_error: float = 0.0


def hash_values(values: np.ndarray, bandwidth_scale: float, snap_to: str = "mean") -> tuple[np.ndarray, float]:
    """``values`` snapped per basin of their KDE (to its mean or mode, ``snap_to``), and the bandwidth used.

    Example:

    >>> v = np.array([0.0, 0.01, 0.02, 1.0, 1.01, 1.02])
    >>> hashed, h = hash_values(v, bandwidth_scale=0.1)
    >>> np.unique(hashed).size
    2
    """
    bandwidth = bandwidth_scale * silverman_bandwidth(values)
    return density_modes(values, bandwidth).snap(values, to=snap_to), bandwidth


def hash_weights(
    model: keras.Model, bandwidth_scale: float = 0.05, graph: DependencyGraph | None = None,
    layers: Collection[str] | None = None, snap_to: str = "mean",
) -> tuple[keras.Model, list[HashedTensor]]:
    """Returns a copy of ``model`` whose linear layers' weights are hashed.

    Args:
        model: a built Sequential or Functional model (left unchanged);
            usually already BatchNormalization-folded.
        bandwidth_scale: multiplies Silverman's bandwidth (>= 0); smaller
            keeps more distinct values (closer to the original model; 0
            leaves every value as it is). The default is `compress`'s.
        graph: ``DependencyGraph(model)`` if already built.
        layers: qualified names of the layers to hash (a list, set or
            tuple of linear layers' names); default: every linear layer.
        snap_to: ``"mean"`` (default): every weight becomes the mean of the
            weights in its basin; ``"mode"``: the basin's mode (the paper).

    Returns:
        ``(hashed_model, tensors)``: the new model and one `HashedTensor`
        per hashed weight, in graph order.

    Raises:
        ValueError: a knob out of range, ``layers`` a single string or naming
            a layer that is not a linear layer of ``model``, or a bad
            ``snap_to``.
    """
    check_knob("bandwidth_scale", bandwidth_scale)
    check_choice("snap_to", snap_to)
    graph = graph_of(model, graph)
    if layers is not None:
        layers = _checked_names(graph, layers)
    plans: dict[int, tuple] = {}
    tensors = []
    for record in graph.records:
        layer = record.operation
        if not record.first_call or not is_linear_layer(layer):
            continue
        if layers is not None and record.name not in layers:
            continue
        weights = layer_weights(layer)
        for key in HASHED_WEIGHTS:
            if key not in weights:
                continue
            original = weights[key]
            exact = original.astype(np.float64)
            hashed, bandwidth = hash_values(exact, bandwidth_scale, snap_to)
            weights[key] = hashed.astype(original.dtype)
            norm = float(np.linalg.norm(exact))
            error = float(np.linalg.norm(weights[key].astype(np.float64) - exact)) / norm if norm > 0 else 0.0
            tensors.append(HashedTensor(record.name, key, int(original.size), int(np.unique(original).size),
                                        int(np.unique(weights[key]).size), float(bandwidth), error))
        plans[id(layer)] = (layer_from_config(layer, layer.get_config()), weights)
    return clone_with(model, graph, lambda layer: plans.get(id(layer))), tensors


def _checked_names(graph: DependencyGraph, layers) -> frozenset[str]:
    if isinstance(layers, str):
        raise ValueError(f"Expected `layers` to be a collection of qualified layer names, e.g. layers=[{layers!r}]. "
                         f"Received: layers={layers!r} (a single string)")
    linear = {r.name for r in graph.records if is_linear_layer(r.operation)}
    unknown = sorted(set(layers) - linear)
    if unknown:
        raise ValueError(f"Expected `layers` to name linear layers of the model (qualified, nested ones as outer/inner). "
                         f"Received unknown name(s) {unknown}; the linear layers are {sorted(linear)[:20]}"
                         f"{' ...' if len(linear) > 20 else ''}")
    return frozenset(layers)
