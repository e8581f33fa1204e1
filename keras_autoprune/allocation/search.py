"""Bisections that meet a budget: the shortest prefix of a removal order, the smallest knob value."""

from __future__ import annotations

import math
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


def smallest_fitting_value(fits: Callable[[float], bool], low: float, high: float, steps: int,
                           geometric: bool = False) -> float:
    """The smallest ``value`` in ``(low, high]`` with ``fits(value)``, to the bracket left after ``steps`` halvings.

    ``fits`` must be monotone (a larger value never costs more) and
    ``fits(high)`` true; the returned value is always one where ``fits``
    held. The bracket is split at ``(low + high) / 2``, or at ``√(low·high)``
    with ``geometric=True`` (a knob spanning decades, ``low > 0``).
    """
    for _ in range(steps):
        middle = math.sqrt(low * high) if geometric else (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high
