"""Channel groups: the `ChannelMember` / `ChannelGroup` records and how they are built.

After the walk (`keras_autoprune.graph.dependency`), the atom table
(`keras_autoprune.graph.atoms`) holds every channel atom, its space (the
layer output that created it) and the unions made by the handlers.
`build_groups` turns that into groups:

- spaces whose atoms are tied (union-find over spaces) form one group,
  groups numbered in the order of their first space;
- each tied set of atoms (one root) is one channel of its group, channels
  numbered in the order their roots are first seen;
- a group is blocked (``prunable=False``) by the first reason fixed on any
  of its atoms (a model input or output, a layer without a handler, ...);
- chunks: channels tied by `AtomTable.chunk` (GroupNormalization groups)
  share a chunk id, renumbered ``0..n-1``;
- members: one `ChannelMember` per (first call of a layer, side, tensor)
  holding channels of the group;
- ids: the owner of the group's first space, ``owner#2``, ``owner#3`` for
  later groups of the same owner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from keras_autoprune.graph.atoms import AtomTable

if TYPE_CHECKING:
    from keras_autoprune.graph.dependency import CallRecord


@dataclasses.dataclass(frozen=True)
class ChannelMember:
    """Where a group's channels appear in one layer.

    Attributes:
        layer: qualified layer name (``outer_model/inner_layer`` for nested
            models).
        side: ``"input"`` or ``"output"`` of that layer, or ``"internal"``
            for channels that live inside it on no tensor (the heads of a
            MultiHeadAttention, `WalkContext.internal_space`).
        tensor_index: which input tensor (0 for outputs / single inputs);
            for ``"internal"``, which internal space of the layer.
        positions: positions on the tensor's channel (last) axis.
        channels: the group channel held at each position (the index map;
            a Flatten output repeats every channel ``H*W`` times).
    """

    layer: str
    side: str
    tensor_index: int
    positions: np.ndarray
    channels: np.ndarray


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together.

    Attributes:
        id: stable name, from the first layer that creates these channels.
        size: number of channels.
        members: every (layer, side, index map) the channels appear in.
        prunable: False when a channel reaches a model input or output, or
            crosses a layer that cannot be pruned.
        reason: why the group is not prunable (None if it is).
        chunks: one id per channel; channels sharing an id can only be
            removed together (GroupNormalization groups).
    """

    id: str
    size: int
    members: tuple[ChannelMember, ...]
    prunable: bool
    reason: str | None
    chunks: np.ndarray

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"blocked: {self.reason}"
        return f"ChannelGroup(id={self.id!r}, size={self.size}, members={len(self.members)}, {state})"


def build_groups(atoms: AtomTable, records: Sequence[CallRecord]) -> tuple[list[ChannelGroup], np.ndarray, np.ndarray]:
    """The groups of a walked graph: ``(groups, atom_group, atom_channel)``.

    ``atom_group[a]`` is the index in ``groups`` of atom ``a``'s group and
    ``atom_channel[a]`` its channel in that group.
    """
    roots = atoms.roots()
    spaces = atoms.spaces()
    space_parent = list(range(int(spaces.max()) + 1 if len(spaces) else 0))

    def find(s):
        while space_parent[s] != s:
            space_parent[s] = space_parent[space_parent[s]]
            s = space_parent[s]
        return s

    for a, b in zip(spaces.tolist(), spaces[roots].tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            space_parent[max(ra, rb)] = min(ra, rb)
    component = np.array([find(s) for s in range(len(space_parent))], np.int64)
    atom_component = component[spaces] if len(spaces) else spaces

    order = sorted(set(atom_component.tolist()))
    group_of_component = {c: g for g, c in enumerate(order)}
    atom_group = np.array([group_of_component[c] for c in atom_component.tolist()], np.int64)
    atom_channel = np.zeros(len(roots), np.int64)
    channel_of_root: dict[int, int] = {}
    sizes = [0] * len(order)
    for atom, root in enumerate(roots.tolist()):
        if root not in channel_of_root:
            g = atom_group[atom]
            channel_of_root[root] = sizes[g]
            sizes[g] += 1
        atom_channel[atom] = channel_of_root[root]

    reasons: dict[int, str] = {}
    for root, reason in atoms.fixed_roots().items():
        reasons.setdefault(int(atom_group[root]), reason)
    chunks = [np.arange(n) for n in sizes]
    for a, b in atoms.chunk_pairs():
        g = atom_group[a]
        _merge_chunks(chunks[g], atom_channel[a], atom_channel[b])

    members = _members(records, atom_group, atom_channel, len(order))
    names: dict[str, int] = {}
    groups = []
    for g, c in enumerate(order):
        base = atoms.space_owner(c)
        names[base] = names.get(base, 0) + 1
        group_id = base if names[base] == 1 else f"{base}#{names[base]}"
        groups.append(
            ChannelGroup(
                id=group_id,
                size=sizes[g],
                members=tuple(members[g]),
                prunable=g not in reasons,
                reason=reasons.get(g),
                chunks=_canonical_chunks(chunks[g]),
            )
        )
    return groups, atom_group, atom_channel


def _members(records: Sequence[CallRecord], atom_group: np.ndarray, atom_channel: np.ndarray,
             n_groups: int) -> list[list[ChannelMember]]:
    """``members[g]``: where the channels of group ``g`` appear, in the first call of each layer."""
    members: list[list[ChannelMember]] = [[] for _ in range(n_groups)]
    for record in records:
        if not record.first_call:
            continue
        sides = [("input", i, l) for i, l in enumerate(record.call.in_layouts)]
        sides += [("output", i, l) for i, l in enumerate(record.out_layouts)]
        sides += [("internal", i, l) for i, l in enumerate(record.internal_layouts)]
        for side, index, layout in sides:
            if not len(layout):
                continue
            groups = atom_group[layout]
            for g in np.unique(groups).tolist():
                positions = np.flatnonzero(groups == g)
                members[g].append(
                    ChannelMember(record.name, side, index, positions, atom_channel[layout[positions]])
                )
    return members


def _merge_chunks(chunk_ids: np.ndarray, a: int, b: int) -> None:
    old, new = max(chunk_ids[a], chunk_ids[b]), min(chunk_ids[a], chunk_ids[b])
    chunk_ids[chunk_ids == old] = new


def _canonical_chunks(chunk_ids: np.ndarray) -> np.ndarray:
    _, canonical = np.unique(chunk_ids, return_inverse=True)
    return canonical.astype(np.int64)
