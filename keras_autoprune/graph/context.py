"""The walk context handed to handlers while the dependency graph is built."""

from __future__ import annotations

import numpy as np

from keras_autoprune.graph.atoms import AtomTable


class WalkContext:
    """What a handler may do to the graph during one call of one layer.

    Args:
        atoms: the graph's atom table.
        owner: qualified name of the layer being walked.
        space_cache: per-layer cache so that every call of a shared layer
            returns the same output channels.
    """

    def __init__(self, atoms: AtomTable, owner: str, space_cache: dict[int, np.ndarray]):
        self._atoms = atoms
        self._owner = owner
        self._cache = space_cache
        #: Internal channel spaces of this call (`internal_space`), in order.
        self.internal: list[np.ndarray] = []

    def new_space(self, size: int, output_index: int = 0) -> np.ndarray:
        """Fresh channels for output ``output_index`` (same ones on every call)."""
        if output_index not in self._cache:
            self._cache[output_index] = self._atoms.new_space(size, self._owner)
        return self._cache[output_index]

    def internal_space(self, size: int, index: int = 0) -> np.ndarray:
        """Fresh channels that live inside the layer, on no tensor (attention heads).

        Like `new_space`, but the channels are not on any of the layer's
        outputs: they become members of their group with side
        ``"internal"`` and reach the handler's `prune`/`mask` as
        ``LayerKeep.internal[index]``. Every call of a shared layer gets the
        same channels.
        """
        key = ("internal", index)
        if key not in self._cache:
            self._cache[key] = self._atoms.new_space(size, self._owner)
        while len(self.internal) <= index:
            self.internal.append(np.zeros(0, np.int64))
        self.internal[index] = self._cache[key]
        return self._cache[key]

    def tie(self, layout_a: np.ndarray, layout_b: np.ndarray) -> None:
        """Positions i of both layouts are the same channel."""
        self._atoms.tie(layout_a, layout_b)

    def fix(self, layout: np.ndarray, reason: str) -> np.ndarray:
        """Marks the channels of ``layout`` unprunable; returns ``layout``."""
        self._atoms.fix(layout, reason)
        return layout

    def chunk(self, layout: np.ndarray) -> None:
        """The channels of ``layout`` can only be removed all together."""
        self._atoms.chunk(layout)
