"""RED stage 2: merging identical (or near-identical) output neurons.

Within every prunable `ChannelGroup`, channels with equal signatures
(`keras_autoprune.red.signatures`) carry equal values ``x_i = x_j`` wherever
the group's channels appear. Every reader computes
``sum_c W[c] x_c = ... + (W[i] + W[j]) x_i + 0 · x_j``, so a merge is

1. a weight fold: in every reader kernel, ``W[i] += W[j]; W[j] = 0``
   (rows at the same spatial position after a Flatten), which leaves the
   model's function unchanged, then
2. a `kap.PrunePlan` removing ``j``, executed by `kap.apply_plan`: channel
   ``j`` is now read by nothing, so removing it is exact.

The kept channel of a cluster is its lowest index. **Exactness**: with
``merge_threshold=0`` only channels with bit-identical signatures merge and
the merged model equals the unmerged one to float rounding (the tests check
1e-5 relative).

Near-identical channels (``merge_threshold > 0``): channels are clustered
greedily in index order; a channel joins the first cluster leader ``i`` with

    d(i, j) = max over members m of ||s_i^m − s_j^m|| / n_m

at most ``merge_threshold`` (``s^m``: the channel's weights in member
layer m, see `signatures`; a member without weights for it contributes 0)
and the same members and position counts as ``i``. The scale ``n_m``
(``merge_distance``) is

- ``"channel"`` (default): ``max(||s_i^m||, ||s_j^m||)``, the distance
  relative to the larger of the two channels: a channel merges only into
  one that points the same way, whatever its size;
- ``"layer"``: the root mean square of ``||s_c^m||`` over the group's
  channels ``c``, the distance relative to a typical channel of the layer:
  channels much weaker than the layer's typical one (on MobileNetV2,
  expansion channels whose BatchNormalization scale collapsed) merge with
  each other even when they point different ways, since what they add to
  the readers is small either way.

The model is then only approximately equal. What the kept channel of a
near-identical cluster ``C`` computes (``merge_representative``):

- ``"readers"`` (default): every member weight of the kept channel becomes
  the combination ``s_r = sum_{c in C} a_c s_c`` that the readers see best.
  With ``R_c`` the readers' kernel rows reading channel ``c`` (all readers,
  flattened) and ``S = sum_c R_c`` what they read from the merged channel,

      a_c = <R_c, S> / <S, S>        (sum_c a_c = 1; a plain mean if S = 0)

  minimises ``sum_o || sum_c R_{c,o} s_c − S_o s_r ||²``: the error of the
  readers' inputs when each channel is linear in its weights (the
  activation is ignored). The parameters of per-channel transforms (an
  unfolded normalisation, PReLU, ...) take the convex weights
  ``max(a_c, 0) / sum_c max(a_c, 0)`` instead: a variance stays positive.
  Measured on the converged CIFAR-10 ResNet-20 and MobileNetV2 it loses far
  less accuracy than keeping the leader (docs/methods/red.md).
- ``"leader"``: the leader's weights, unchanged (RED's merge of identical
  neurons).

With ``merge_threshold=0`` the members of a cluster are identical and the
kept channel is the leader in both cases.

Given ``channel_statistics`` (`compress` passes those of the folded
BatchNormalizations), near-identical merges also raise each reader's bias by
the change in the mean of what it reads (`keras_autoprune.red.correction`).
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np

from keras_autoprune.graph.dependency import DependencyGraph, graph_of
from keras_autoprune.graph.handlers import LinearHandler, SeparableHandler
from keras_autoprune.red.correction import ChannelStatistics, reader_bias_shifts
from keras_autoprune.red.options import check_choice, check_knob
from keras_autoprune.red.records import GraphIndex, with_weights
from keras_autoprune.red.signatures import GroupSignatures, group_signatures
from keras_autoprune.surgery import PrunePlan, apply_plan


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What stage 2 did.

    Attributes:
        model: the merged model (a new model).
        plan: the `PrunePlan` applied to the weight-folded model (its group
            ids are those of ``DependencyGraph`` of the input model).
        clusters: ``{group_id: [[kept, merged, ...], ...]}``, clusters of
            more than one channel only.
        merged_per_layer: ``{layer: output neurons removed}`` for the layers
            that create the merged channels.
        blocked: ``{group_id: reason}`` for prunable groups that could not
            be examined.
        compared_layers: the layers whose weights entered the signatures of
            the merged groups (every member but the readers): the merges
            depend on these layers' weights only.
        bias_corrected: the merged groups whose readers' biases were
            corrected (`keras_autoprune.red.correction`).
        bias_uncorrected: ``{group_id: why not}`` for the other merged
            groups, when a correction was asked for.
    """

    model: keras.Model
    plan: PrunePlan
    clusters: dict[str, list[list[int]]]
    merged_per_layer: dict[str, int]
    blocked: dict[str, str]
    compared_layers: frozenset[str] = frozenset()
    bias_corrected: tuple[str, ...] = ()
    bias_uncorrected: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def merged(self) -> int:
        """Channels removed in total."""
        return sum(len(c) - 1 for clusters in self.clusters.values() for c in clusters)


def merge_neurons(model: keras.Model, merge_threshold: float = 0.0, graph: DependencyGraph | None = None,
                  merge_distance: str = "channel", merge_representative: str = "readers",
                  channel_statistics: dict[str, ChannelStatistics] | None = None) -> MergeResult:
    """Merges the identical output neurons of ``model`` (see the module docstring).

    Args:
        model: a built Sequential or Functional model (left unchanged),
            usually BatchNormalization-folded and hashed.
        merge_threshold: 0 merges exactly identical neurons only; a positive
            value also merges neurons within that relative distance.
        graph: ``DependencyGraph(model)`` if already built.
        merge_distance: ``"channel"`` or ``"layer"``, what the distance is
            relative to (see the module docstring).
        merge_representative: ``"readers"`` or ``"leader"``, the weights of
            a near-identical cluster's kept channel (see the module
            docstring).
        channel_statistics: ``{layer: ChannelStatistics}`` of the layers
            that create channels (their folded BatchNormalizations'; see
            `keras_autoprune.red.correction.folded_statistics`): with
            ``merge_threshold > 0``, the readers' biases of every merged group
            the statistics describe are corrected. None (default): no
            correction.

    Returns:
        A `MergeResult`; with nothing to merge its ``model`` is a copy.
    """
    check_knob("merge_threshold", merge_threshold)
    check_choice("merge_distance", merge_distance)
    check_choice("merge_representative", merge_representative)
    graph = graph_of(model, graph)
    index = GraphIndex(graph)
    cache: dict = {}
    clusters: dict[str, list[list[int]]] = {}
    blocked: dict[str, str] = {}
    signatures: dict[str, GroupSignatures] = {}
    for group in graph.prunable_groups:
        if group.size < 2:
            continue
        signature = group_signatures(index, group, cache)
        if signature.blocked:
            blocked[group.id] = signature.blocked
            continue
        found = [c for c in _clusters(signature, merge_threshold, merge_distance) if len(c) > 1]
        if found:
            clusters[group.id] = found
            signatures[group.id] = signature
    if not clusters:
        return MergeResult(with_weights(model, graph, {}), PrunePlan({}), {}, {}, blocked)

    combine = merge_threshold > 0 and merge_representative == "readers"
    statistics = channel_statistics if merge_threshold > 0 else None
    folded, corrected, uncorrected = _fold_readers(model, index, signatures, clusters, cache, combine, statistics)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same unknown layers were reported for `model`
        folded_graph = DependencyGraph(folded)
    kept = {}
    for group_id, found in clusters.items():
        gone = {j for cluster in found for j in cluster[1:]}
        kept[group_id] = [c for c in range(graph.group(group_id).size) if c not in gone]
    plan = PrunePlan(kept)
    merged = apply_plan(folded, plan, folded_graph)
    return MergeResult(merged, plan, clusters, _per_layer(index, graph, clusters), blocked,
                       _compared_layers(index, graph, clusters), corrected, uncorrected)


def _clusters(signature: GroupSignatures, threshold: float, distance: str = "channel") -> list[list[int]]:
    channels = range(signature.group.size)
    if threshold <= 0:
        by_key: dict[bytes, list[int]] = {}
        for c in channels:
            by_key.setdefault(signature.key(c), []).append(c)
        return list(by_key.values())
    vectors = [signature.vectors(c) for c in channels]
    members = sorted({m for v in vectors for m in v})
    stacks = {}
    for m in members:  # channels absent from a member (or narrower there) get NaN rows
        width = max(len(v[m]) for v in vectors if m in v)
        stacks[m] = np.stack([v[m] if m in v and len(v[m]) == width else np.full(width, np.nan) for v in vectors])
    norms = {m: np.linalg.norm(s, axis=1) for m, s in stacks.items()}
    if distance == "layer":  # every channel measured against the member's root-mean-square channel norm
        norms = {m: np.full_like(n, np.sqrt(np.nanmean(n ** 2)) if np.isfinite(n).any() else 0.0)
                 for m, n in norms.items()}
    layouts = [signature.layout(c) for c in channels]
    unassigned = np.ones(len(vectors), bool)
    out = []
    for leader in channels:
        if not unassigned[leader]:
            continue
        distance = np.zeros(len(vectors))
        for m in members:
            if m not in vectors[leader]:  # the leader has no weights there: they contribute 0
                continue
            diff = np.linalg.norm(stacks[m] - stacks[m][leader], axis=1)
            scale = np.maximum(np.maximum(norms[m], norms[m][leader]), 1e-30)
            distance = np.maximum(distance, np.where(diff == 0, 0.0, diff / scale))
        same_layout = np.array([layout == layouts[leader] for layout in layouts])
        joined = unassigned & same_layout & (distance <= threshold)  # NaN compares False
        joined[leader] = True
        out.append(np.flatnonzero(joined).tolist())
        unassigned &= ~joined
    return out


def _fold_readers(model, index: GraphIndex, signatures, clusters, cache, combine: bool = False,
                  statistics: dict[str, ChannelStatistics] | None = None):
    """``(model, corrected groups, {uncorrected group: why})``: every reader's rows of merged channels added into
    the kept ones.

    With ``combine``, each cluster's kept channel first gets the readers'
    least-squares combination of the cluster's weights; with ``statistics``
    the readers' biases are corrected (module docstring).
    """
    updates: dict[int, dict[str, np.ndarray]] = {}
    corrected: list[str] = []
    uncorrected: dict[str, str] = {}

    def weights_of(layer) -> dict[str, np.ndarray]:
        return updates.setdefault(id(layer), {k: v.copy() for k, v in cache[id(layer)].items()})

    for group_id, found in clusters.items():
        signature = signatures[group_id]
        coefficients = [_reader_coefficients(signature, cluster, cache) if combine else _leader_weights(len(cluster))
                        for cluster in found]
        if combine:
            for cluster, a in zip(found, coefficients):
                _combine(signature, cluster, a, weights_of)
        if statistics is not None:
            shifts = reader_bias_shifts(index, signature, found, coefficients, cache, statistics)
            if isinstance(shifts, str):
                uncorrected[group_id] = shifts
            else:
                for reader, shift in shifts:
                    weights = weights_of(reader.layer)
                    weights["bias"] = (weights["bias"] + shift).astype(weights["bias"].dtype)
                corrected.append(group_id)
        for reader in signature.readers:
            weights = weights_of(reader.layer)
            kernel = np.moveaxis(weights[reader.weight], reader.axis, 0)  # a view: writes go through
            for cluster in found:
                keep_rows = reader.rows[cluster[0]]
                for j in cluster[1:]:
                    kernel[keep_rows] += kernel[reader.rows[j]]
                    kernel[reader.rows[j]] = 0
    return with_weights(model, index.graph, updates), tuple(corrected), uncorrected


def _reader_coefficients(signature: GroupSignatures, cluster: list[int], cache) -> np.ndarray:
    """``a_c = <R_c, S> / <S, S>`` for the channels ``c`` of ``cluster`` (the module docstring)."""
    rows = []
    for reader in signature.readers:
        kernel = np.moveaxis(cache[id(reader.layer)][reader.weight], reader.axis, 0)
        rows.append(np.stack([kernel[reader.rows[c]].astype(np.float64).ravel() for c in cluster]))
    read = np.concatenate(rows, axis=1) if rows else np.zeros((len(cluster), 0))  # (channels, reader weights)
    total = read.sum(axis=0)
    norm = float(total @ total)
    if norm <= 1e-12 * float((read * read).sum()):  # the readers cancel (or read nothing): no preferred combination
        return _mean_weights(len(cluster))
    return read @ total / norm


def _combine(signature: GroupSignatures, cluster: list[int], coefficients: np.ndarray, weights_of) -> None:
    """Sets the kept channel's weights in every member to ``sum_c a_c s_c``."""
    for member in signature.members:
        if cluster[0] not in member.positions:  # a cluster's channels share a layout: all in a member or none
            continue
        weights = weights_of(member.layer)
        for slot in member.slots:
            used = _convex(coefficients) if slot.convex else coefficients
            values = sum(a * slot.read(weights, member.positions[c]).astype(np.float64)
                         for a, c in zip(used, cluster))
            slot.write(weights, member.positions[cluster[0]], values)


def _convex(coefficients: np.ndarray) -> np.ndarray:
    """``max(a, 0)`` normalised to sum 1 (the plain mean if every ``a`` is ≤ 0)."""
    positive = np.maximum(coefficients, 0.0)
    total = positive.sum()
    return positive / total if total > 0 else _mean_weights(len(coefficients))


def _leader_weights(count: int) -> np.ndarray:
    """``(1, 0, ..., 0)``: the leader's weights kept."""
    return np.eye(count)[0]


def _mean_weights(count: int) -> np.ndarray:
    """``1 / count`` each: the plain mean of a cluster."""
    return np.full(count, 1.0 / count)


def _per_layer(index: GraphIndex, graph: DependencyGraph, clusters) -> dict[str, int]:
    """Output neurons removed from each layer creating merged channels."""
    counts: dict[str, int] = {}
    for group_id, found in clusters.items():
        gone = np.array(sorted(j for cluster in found for j in cluster[1:]))
        for member in graph.group(group_id).members:
            record = index.record(member.layer)
            creates = isinstance(record.handler, SeparableHandler) or _mixes_channels(record)
            if member.side == "output" and creates:
                counts[member.layer] = counts.get(member.layer, 0) + int(np.isin(member.channels, gone).sum())
    return counts


def _mixes_channels(record) -> bool:
    """Whether the call is a Conv/Dense layer (not a depthwise grouped one): each output reads every input."""
    return isinstance(record.handler, LinearHandler) and not record.handler.is_depthwise(record.operation)


def _compared_layers(index: GraphIndex, graph: DependencyGraph, clusters) -> frozenset[str]:
    """Members of the merged groups whose weights are compared (all but the Linear layers reading the channels)."""
    names = set()
    for group_id in clusters:
        for member in graph.group(group_id).members:
            record = index.record(member.layer)
            reads = member.side == "input" and _mixes_channels(record)
            if not reads and getattr(record.operation, "weights", None):
                names.add(member.layer)
    return frozenset(names)
