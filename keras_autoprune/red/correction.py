"""Data-free bias correction of near-identical merges.

A near-identical merge (`keras_autoprune.red.merging`, ``merge_threshold >
0``) replaces what the readers of a cluster ``C`` receive,
``sum_{c in C} R_c x_c``, by ``S x_r``: ``S = sum_c R_c`` are the readers'
folded rows and ``x_r`` the kept channel, whose weights became
``s_r = sum_c a_c s_c``. Besides their variation the two differ in their
mean, which shifts reader output ``o`` by

    Δ_o = sum_{c in C} ΣR_c[o] · (E[x_c] − E[x_r])

(``ΣR_c[o]``: the sum of the reader weights that read channel ``c`` for
output ``o``; zero padding at the borders aside). Each reader's bias is
raised by ``Δ``: the data-free bias correction of Nagel et al. (ICCV 2019,
there for quantization), applied to merging.

The means need no data. The channels' last creating layer had a
BatchNormalization folded into it (stage 0), trained to give its output
channel ``c`` mean ``β_c`` and standard deviation ``|γ_c|``, so before the
activations ``z_c ~ N(β_c, γ_c²)`` is assumed and

    E[x_c] = E[f(z_c)] = ∫ f(β_c + |γ_c| u) φ(u) du  ≈  sum_i f(β_c + |γ_c| u_i) φ(u_i) / sum_i φ(u_i)

on 2,001 equally spaced ``u_i`` over ±8 (the kinks of ReLU and ReLU6 cost
Gauss-Hermite quadrature percents; this rule is within about 1e-5), for the
elementwise activations ``f`` between that layer and the readers (ReLU,
ReLU6, swish, GELU, ... the model's own layers evaluated at the points). The
kept channel's pre-activation is ``sum_c a_c z_c``: mean ``sum_c a_c β_c``;
its channels being near-identical they are taken as perfectly correlated,
standard deviation ``|sum_c a_c |γ_c||``.

The correction runs only where that description holds (`_source`): one
member of the group, after which no other creates or transforms the
channels, had a BatchNormalization folded into it and holds each channel at
one position, and between it and the readers there are only elementwise
activations and layers that keep a value's mean (`MEAN_KEEPING`). A group
tied by a residual Add or a gate, one with an unfolded normalisation or a
max pooling after its last creating layer, or one read by a SeparableConv
(through its depthwise filters) or a grouped convolution, is merged without
correction; a reader without a bias is left as it is. Exact merges need
none (their channels are equal).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_autoprune.graph.dependency import ChannelGroup, DependencyGraph
from keras_autoprune.graph.handlers import ActivationHandler, LinearHandler
from keras_autoprune.red.records import GraphIndex
from keras_autoprune.red.signatures import GroupSignatures, Reader

MEAN_KEEPING = frozenset({
    "Flatten", "Reshape", "Identity", "InputLayer",
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout", "GaussianNoise",
    "AlphaDropout",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
    "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
})
"""Layers between a channel's source and its readers that keep every value's mean (inference mode)."""

_POINTS = np.linspace(-8.0, 8.0, 2001)
_DENSITY = np.exp(-_POINTS ** 2 / 2) / np.sum(np.exp(-_POINTS ** 2 / 2))


@dataclasses.dataclass(frozen=True)
class ChannelStatistics:
    """A layer's output channels before their activation: the folded BatchNormalization's ``β`` and ``|γ|``."""

    mean: np.ndarray
    std: np.ndarray


def folded_statistics(graph: DependencyGraph, folds) -> dict[str, ChannelStatistics]:
    """``{producer: ChannelStatistics}`` for every `FoldedNorm` of ``folds`` (``graph``: the unfolded model's)."""
    index = GraphIndex(graph)
    out = {}
    for fold in folds:
        norm = index.record(fold.norm).operation
        width = int(norm.moving_mean.shape[-1])
        beta = norm.beta.numpy() if norm.beta is not None else np.zeros(width)
        gamma = norm.gamma.numpy() if norm.gamma is not None else np.ones(width)
        out[fold.into] = ChannelStatistics(beta.astype(np.float64), np.abs(gamma.astype(np.float64)))
    return out


@dataclasses.dataclass(frozen=True)
class _Source:
    """The member whose statistics describe a group's channels, and the activations after it (in order)."""

    layer: str
    positions: dict[int, int]
    activations: tuple


def reader_bias_shifts(index: GraphIndex, signature: GroupSignatures, clusters: list[list[int]],
                       coefficients: list[np.ndarray], cache: dict,
                       statistics: dict[str, ChannelStatistics]) -> list[tuple[Reader, np.ndarray]] | str:
    """``[(reader, Δ)]`` for the readers with a bias of one group's merged ``clusters`` (module docstring), or why
    the group cannot be corrected.

    Args:
        index: lookups over the graph of the model being merged.
        signature: the group's signatures and readers.
        clusters: the group's merged clusters, kept channel first.
        coefficients: per cluster, the ``a_c`` of its kept channel.
        cache: ``{id(layer): weights}`` before the merge.
        statistics: `folded_statistics` of the model before folding.
    """
    source = _source(index, signature.group, signature.readers, statistics)
    if isinstance(source, str):
        return source
    for reader in signature.readers:
        if reader.weight != "kernel" or reader.layer.get_config().get("groups", 1) > 1:
            kind = "reads through depthwise filters" if reader.weight != "kernel" else "is a grouped convolution"
            return f"reader '{reader.layer.name}' {kind}"
    channels = [c for cluster in clusters for c in cluster]
    if any(c not in source.positions for c in channels):
        return f"a merged channel is not created by '{source.layer}'"
    stats = statistics[source.layer]
    at = [source.positions[c] for c in channels]
    channel_means = dict(zip(channels, _expected(source.activations, stats.mean[at], stats.std[at])))
    members = [[source.positions[c] for c in cluster] for cluster in clusters]
    kept = _expected(source.activations,  # every cluster's kept channel at once: N(Σ a β, (Σ a |γ|)²)
                     np.array([a @ stats.mean[m] for m, a in zip(members, coefficients)]),
                     np.array([abs(a @ stats.std[m]) for m, a in zip(members, coefficients)]))
    shifts = []
    for reader in signature.readers:
        weights = cache[id(reader.layer)]
        if weights.get("bias") is None:
            continue
        sums = _row_sums(index.record_of(reader.layer).handler, reader, weights)
        shift = sum(sums[c] * (channel_means[c] - kept_r) for cluster, kept_r in zip(clusters, kept) for c in cluster)
        shifts.append((reader, shift))
    return shifts


def _source(index: GraphIndex, group: ChannelGroup, readers: list[Reader],
            statistics: dict[str, ChannelStatistics]) -> _Source | str:
    reading = {id(reader.layer) for reader in readers}
    candidates = [m for m in group.members if m.side == "output" and m.layer in statistics]
    if not candidates:
        return "no member of the group had a BatchNormalization folded into it"
    source = max(candidates, key=lambda m: index.position(m.layer))
    activations = []
    for member in sorted(group.members, key=lambda m: index.position(m.layer)):
        record = index.record(member.layer)
        layer = record.operation
        if index.position(member.layer) <= index.position(source.layer) or id(layer) in reading:
            continue
        if isinstance(record.handler, ActivationHandler) and not _normalises(layer):
            if member.side == "output":  # the same layer's input side was seen first
                activations.append(layer)
            continue
        if type(layer).__name__ not in MEAN_KEEPING:
            return f"layer '{member.layer}' ({type(layer).__name__}) between '{source.layer}' and the readers"
    positions: dict[int, int] = {}
    for channel in np.unique(source.channels):
        at = source.positions[source.channels == channel]
        if at.size != 1:
            return f"'{source.layer}' holds a channel at {at.size} positions"
        positions[int(channel)] = int(at[0])
    return _Source(source.layer, positions, tuple(activations))


def _normalises(layer) -> bool:
    """Whether an activation layer is a softmax (over some axis): not elementwise, so not evaluated pointwise."""
    name = getattr(layer, "get_config", dict)().get("activation")
    name = name if isinstance(name, str) else getattr(name, "__name__", "")
    return type(layer).__name__ in ("Softmax", "LogSoftmax") or name in ("softmax", "log_softmax")


def _expected(activations, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``E[f(z)]`` for ``z ~ N(mean, std²)``, ``f`` the ``activations`` in order (module docstring)."""
    values = mean[:, None] + std[:, None] * _POINTS[None, :]
    for layer in activations:
        values = np.asarray(layer(values.astype("float32")), np.float64)
    return values @ _DENSITY


def _row_sums(handler, reader: Reader, weights: dict) -> dict[int, np.ndarray]:
    """``{channel: ΣR_c}``: per output of the reader, the sum of its weights reading each channel."""
    out_axis = handler.out_axis if isinstance(handler, LinearHandler) and reader.weight == "kernel" else -1
    kernel = weights[reader.weight].astype(np.float64)
    kernel = np.moveaxis(kernel, (reader.axis % kernel.ndim, out_axis % kernel.ndim), (0, -1))
    return {c: kernel[rows].reshape(-1, kernel.shape[-1]).sum(axis=0) for c, rows in reader.rows.items()}
