"""When to prune during training, and how far each round goes."""

from __future__ import annotations

import numpy as np


def round_epochs(start_epoch: int, end_epoch: int, rounds: int) -> list[int]:
    """Epochs (0-based) at whose beginning a pruning round runs.

    Rounds are spread evenly over ``[start_epoch, end_epoch)``:
    ``epoch_k = start + floor(k * (end - start) / rounds)``.

    >>> round_epochs(0, 6, 3)
    [0, 2, 4]
    >>> round_epochs(2, 3, 1)
    [2]
    """
    span = end_epoch - start_epoch
    return [start_epoch + (k * span) // rounds for k in range(rounds)]


def round_targets(fraction: float, rounds: int) -> list[float]:
    """Budget fraction kept after each round: a linear ramp to ``fraction``.

    ``target_k = 1 - (1 - fraction) * k / rounds`` for ``k = 1 .. rounds``.

    >>> round_targets(0.5, 2)
    [0.75, 0.5]
    """
    return [float(1 - (1 - fraction) * k / rounds) for k in np.arange(1, rounds + 1)]
