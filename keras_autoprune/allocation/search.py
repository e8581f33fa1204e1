"""Bisection for the shortest prefix of a removal order that meets a budget."""

from __future__ import annotations

from collections.abc import Callable


def shortest_fitting_prefix(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest ``count`` in ``[low, high]`` with ``fits(count)``.

    ``fits`` must be monotone (removing more never costs more) and
    ``fits(high)`` true; ``fits`` is called about ``log2(high - low)`` times.
    """
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return low
