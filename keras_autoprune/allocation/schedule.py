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


def round_targets(fraction: float, rounds: int, ramp: str = "linear") -> list[float]:
    """Budget fraction kept after each round, ramping to ``fraction``.

    - ``"linear"``: ``target_k = 1 - (1 - fraction) * k / n``;
    - ``"cubic"`` (gradual pruning, Zhu & Gupta 2017): large steps first,
      small ones at the end, ``target_k = 1 - (1 - fraction) * (1 - (1 - k/n)³)``;

    for ``k = 1 .. n`` rounds.

    >>> round_targets(0.5, 2)
    [0.75, 0.5]
    >>> round_targets(0.5, 2, "cubic")
    [0.5625, 0.5]
    """
    if ramp not in ("linear", "cubic"):
        raise ValueError(f"`ramp` must be 'linear' or 'cubic'. Received: ramp={ramp!r}")
    progress = np.arange(1, rounds + 1) / rounds
    if ramp == "cubic":
        progress = 1 - (1 - progress) ** 3
    return [float(1 - (1 - fraction) * p) for p in progress]
