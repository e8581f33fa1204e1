"""RED's exactness on the keras.applications zoo (`tests.zoo`), by planting what it merges.

On random weights RED's merging (stage 2) and separation (stage 3) find
almost nothing, so an exactness check on them alone would be vacuous. This
module plants what they look for, where the dependency graph allows it:

- `plant_duplicates`: in a few prunable channel groups, channels become
  exact copies of another channel of the group in *every* member (the
  creating layers' kernel columns and biases, the per-channel weights of
  depthwise convolutions, unfolded normalisations, ...), which is what
  `keras_autoprune.red.signatures` calls equal signatures;
- `plant_repeats`: in one k×k convolution outside those groups, every input
  channel sends one of two kernels to each output, so that stage 3 lowers
  its FLOPs.

`red_sweep_one` runs the stages on one architecture (BatchNormalization
folding, hashing at the default ``bandwidth_scale``, merging, separation)
and returns the figures of `benchmarks.red_sweep` and `tests/test_red_zoo.py`.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from keras_autoprune.graph.dependency import ChannelGroup, DependencyGraph
from keras_autoprune.graph.handlers import ChannelwiseHandler, DepthwiseHandler, LinearHandler, SeparableHandler
from keras_autoprune.red import fold_batchnorm, hash_weights, merge_neurons, separate_depthwise
from keras_autoprune.red.records import GraphIndex
from keras_autoprune.red.signatures import group_signatures
from keras_autoprune.surgery.weights import assign_weights, layer_weights
from tests.helpers import randomize, relative_error
from tests.zoo import build

#: ``bandwidth_scale`` of the hashing stage: `kap.red.compress`'s default.
BANDWIDTH_SCALE = 0.05


def _copy(array: np.ndarray, axis: int, source: np.ndarray, target: np.ndarray) -> None:
    """``array[..., target, ...] = array[..., source, ...]`` on ``axis``, in place."""
    moved = np.moveaxis(array, axis, 0)  # a view: writes go through
    moved[target] = moved[source]


def _weights(operation) -> dict[str, np.ndarray]:
    """``layer_weights`` of a layer, ``{}`` for a weightless one or a `keras.ops` node."""
    return layer_weights(operation) if getattr(operation, "weights", None) else {}


def _per_channel_weights(record, side: str, weights: dict) -> list[tuple[str, int]] | None:
    """``[(weight key, channel axis)]`` a member holds per channel (`signatures._member`'s rules), None if unknown."""
    layer, handler = record.operation, record.handler
    bias = [("bias", 0)] if "bias" in weights else []
    if isinstance(handler, LinearHandler):
        if side == "input":
            return []
        return [("kernel", -1 if handler.is_depthwise(layer) else handler.out_axis)] + bias
    if isinstance(handler, DepthwiseHandler):
        return [("kernel", -1)] + bias if side == "output" else []  # on the (…, C·M) reshaped kernel
    if isinstance(handler, SeparableHandler):
        return [("pointwise_kernel", -1)] + bias if side == "output" else [("depthwise_kernel", -2)]
    if isinstance(handler, ChannelwiseHandler):
        if side == "output":
            return []
        width = len(record.call.in_layouts[0])
        return [(key, -1) for key, w in weights.items() if w.ndim and w.shape[-1] == width]
    return [] if not weights else None


def _cluster(group: ChannelGroup, copies: int) -> list[int] | None:
    """``copies + 1`` channels present in the same members at the same number of positions."""
    buckets: dict[tuple, list[int]] = {}
    counts = [np.bincount(m.channels, minlength=group.size) for m in group.members]
    for channel in range(group.size):
        buckets.setdefault(tuple(int(c[channel]) for c in counts), []).append(channel)
    best = max(buckets.values(), key=len)
    if len(best) < copies + 1:
        return None
    picks = np.linspace(0, len(best) - 1, copies + 1).round().astype(int)
    return sorted({best[i] for i in picks}) if len(set(picks)) == copies + 1 else None


def plant_duplicates(model: keras.Model, graph: DependencyGraph, groups: int = 3, copies: int = 2) -> dict[str, list[int]]:
    """Makes ``copies`` channels of ``groups`` prunable groups equal to another of their group, in place.

    Groups are taken evenly spaced among the mergeable ones (size above
    ``copies``, not blocked for RED, every member's weights understood).

    Returns:
        ``{group_id: [kept, copy, ...]}``, the cluster `merge_neurons` must find.
    """
    index = GraphIndex(graph)
    candidates = []
    for group in graph.prunable_groups:
        cluster = _cluster(group, copies) if group.size > copies else None
        if cluster is None or group_signatures(index, group).blocked:
            continue
        records = [index.record(m.layer) for m in group.members]
        if all(_per_channel_weights(r, m.side, _weights(r.operation)) is not None
               for r, m in zip(records, group.members)):
            candidates.append((group, cluster))
    if not candidates:
        return {}
    chosen = [candidates[i] for i in sorted(set(np.linspace(0, len(candidates) - 1, groups).round().astype(int)))]
    edited: dict[int, tuple] = {}
    for group, cluster in chosen:
        for member in group.members:
            record = index.record(member.layer)
            layer = record.operation
            weights = edited.setdefault(id(layer), (layer, _weights(layer)))[1]
            for key, axis in _per_channel_weights(record, member.side, weights):
                value = weights[key]
                if isinstance(record.handler, DepthwiseHandler) and key == "kernel":
                    value = value.reshape(value.shape[:-2] + (-1,))  # a view of the same buffer
                for target in cluster[1:]:
                    source_positions = member.positions[member.channels == cluster[0]]
                    _copy(value, axis, source_positions, member.positions[member.channels == target])
    for layer, weights in edited.values():
        if weights:
            assign_weights(layer, weights)
    return {group.id: cluster for group, cluster in chosen}


def plant_repeats(model: keras.Model, graph: DependencyGraph, seed: int = 0) -> str | None:
    """Gives the first k×k Conv2D reading no prunable channels two distinct kernels per input channel, in place.

    Output ``o`` of input channel ``c`` gets kernel ``K[..., c, 0]`` or
    ``K[..., c, 1]``, chosen at random; stage 3 then separates it with
    multiplier 2. Nothing before it can be merged into its kernel rows, and
    `plant_duplicates` afterwards copies whole columns, which keeps the
    repeats. Returns the layer's name, or None.
    """
    rng = np.random.default_rng(seed)
    for record in graph.records:
        layer = record.operation
        if (type(layer) is not keras.layers.Conv2D or not record.first_call or _reads_prunable(graph, record.name)
                or np.prod(layer.kernel_size) < 2 or layer.groups != 1 or layer.padding not in ("valid", "same")
                or layer.filters < 4):
            continue
        weights = layer_weights(layer)
        kernel = weights["kernel"]
        pick = rng.integers(0, 2, kernel.shape[-2:])
        weights["kernel"] = np.where(pick == 0, kernel[..., :1], kernel[..., 1:2]).astype(kernel.dtype)
        assign_weights(layer, weights)
        return record.name
    return None


def _reads_prunable(graph: DependencyGraph, name: str) -> bool:
    """Whether layer ``name`` reads channels of a prunable group (merging may fold its kernel rows)."""
    return any(m.layer == name and m.side == "input" for g in graph.prunable_groups for m in g.members)


def planted_merged(planted: dict[str, list[int]], clusters: dict[str, list[list[int]]]) -> int:
    """Planted copies that ended in the same merge cluster as their source."""
    count = 0
    for group_id, cluster in planted.items():
        together = next((set(c) for c in clusters.get(group_id, []) if cluster[0] in c), set())
        count += sum(channel in together for channel in cluster[1:])
    return count


def _error(a: keras.Model, b: keras.Model, x: np.ndarray) -> float:
    return relative_error(np.asarray(a(x)), np.asarray(b(x)))


def red_sweep_one(name: str, size: int, seed: int = 0) -> dict:
    """RED's stages on one architecture, random weights and planted duplicates (module docstring).

    Returns figures: ``groups``/``prunable_groups``; ``folded`` (BatchNormalizations
    folded) and ``fold_error`` (folded vs original); ``random_merged``
    (neurons merged on the hashed random weights) and ``random_error``
    (merged vs hashed); ``planted`` (copies planted) and
    ``planted_merged`` (of those, merged into their source) with
    ``merge_error`` (merged vs planted hashed model); ``repeats_layer``
    (the convolution given repeated kernels), ``separated`` (convolutions
    separated) and ``separation_error`` (separated vs merged); ``seconds``.
    """
    start = time.perf_counter()
    model = build(name, size)
    randomize(model, seed=seed, scale=0.05)
    x = np.random.default_rng(seed + 1).normal(0, 1, (2, size, size, 3)).astype("float32")
    graph = DependencyGraph(model)
    folded, folds = fold_batchnorm(model, graph)
    out = dict(name=name, size=size, groups=len(graph.groups), prunable_groups=len(graph.prunable_groups),
               folded=len(folds), fold_error=_error(folded, model, x))
    del model, graph
    hashed, _ = hash_weights(folded, BANDWIDTH_SCALE)
    del folded
    hashed_graph = DependencyGraph(hashed)
    random = merge_neurons(hashed, graph=hashed_graph)
    out.update(random_merged=random.merged, random_error=_error(random.model, hashed, x))
    del random
    repeats = plant_repeats(hashed, hashed_graph, seed)  # first: copied columns keep its repeats
    planted = plant_duplicates(hashed, hashed_graph)
    merged = merge_neurons(hashed, graph=hashed_graph)
    out.update(
        planted=sum(len(c) - 1 for c in planted.values()),
        planted_merged=planted_merged(planted, merged.clusters),
        merged=merged.merged,
        merge_error=_error(merged.model, hashed, x),
        output_scale=float(np.max(np.abs(np.asarray(hashed(x))))),
    )
    del hashed
    separated, separations = separate_depthwise(merged.model)
    out.update(repeats_layer=repeats, separated=[s.layer for s in separations],
               separation_error=_error(separated, merged.model, x), seconds=time.perf_counter() - start)
    return out
