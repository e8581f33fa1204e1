"""Channel atoms: the smallest units that the dependency graph ties together.

Every channel a layer creates (a convolution's output channel, a model input's
feature, ...) is one *atom*, an integer id. A tensor's channel axis (its last
axis) is described by a *layout*: an integer array with one atom id per
position. Layers that pass channels through copy layouts, element-wise merges
tie the atoms at equal positions together (union-find), concatenations join
layouts, and flatten/reshape repeat them.

After the walk, atoms tied together form one prunable channel; channels whose
atoms are linked through the layouts of the same layers form one
`ChannelGroup`.
"""

from __future__ import annotations

import numpy as np


class AtomTable:
    """Allocates atoms and keeps the union-find forest over them.

    Atoms are allocated in contiguous *spaces*, one per layer output that
    creates channels. The root of a tied set is always its smallest atom, so
    channel order follows the order in which layers were walked.
    """

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._space: list[int] = []
        self._space_owner: list[str] = []
        self._fixed: list[tuple[int, str]] = []
        self._chunk_pairs: list[tuple[int, int]] = []

    # -- allocation -----------------------------------------------------
    def new_space(self, size: int, owner: str) -> np.ndarray:
        """Returns a layout of ``size`` fresh atoms created by ``owner``."""
        start = len(self._parent)
        space_id = len(self._space_owner)
        self._space_owner.append(owner)
        self._parent.extend(range(start, start + size))
        self._space.extend([space_id] * size)
        return np.arange(start, start + size, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._parent)

    def space_of(self, atom: int) -> int:
        return self._space[atom]

    def space_owner(self, space_id: int) -> str:
        return self._space_owner[space_id]

    # -- union-find -----------------------------------------------------
    def find(self, atom: int) -> int:
        parent = self._parent
        root = atom
        while parent[root] != root:
            root = parent[root]
        while parent[atom] != root:
            parent[atom], atom = root, parent[atom]
        return root

    def tie(self, layout_a: np.ndarray, layout_b: np.ndarray) -> None:
        """Ties ``layout_a[i]`` to ``layout_b[i]`` for every position i.

        Layouts of length 1 broadcast (numpy rules on the channel axis): a
        size-1 channel axis is not tied to anything.
        """
        if len(layout_a) == 1 or len(layout_b) == 1:
            return
        for a, b in zip(layout_a.tolist(), layout_b.tolist()):
            root_a, root_b = self.find(a), self.find(b)
            if root_a != root_b:
                self._parent[max(root_a, root_b)] = min(root_a, root_b)

    def fix(self, layout: np.ndarray, reason: str) -> None:
        """Marks the atoms of ``layout`` as not prunable, for ``reason``."""
        self._fixed.extend((atom, reason) for atom in layout.tolist())

    def chunk(self, layout: np.ndarray) -> None:
        """Requires the atoms of ``layout`` to be removed all together."""
        atoms = layout.tolist()
        self._chunk_pairs.extend(zip(atoms[:-1], atoms[1:]))

    # -- read-out -------------------------------------------------------
    def roots(self) -> np.ndarray:
        """Root atom of every atom, as one array."""
        return np.array([self.find(a) for a in range(len(self._parent))], np.int64)

    def spaces(self) -> np.ndarray:
        return np.asarray(self._space, np.int64)

    def fixed_roots(self) -> dict[int, str]:
        """Root atom -> the first reason given for fixing any atom tied to it."""
        reasons: dict[int, str] = {}
        for atom, reason in self._fixed:
            reasons.setdefault(self.find(atom), reason)
        return reasons

    def chunk_pairs(self) -> list[tuple[int, int]]:
        return list(self._chunk_pairs)
