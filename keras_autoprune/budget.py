"""`Budget`: how much of the original model a pruning method may keep."""

from __future__ import annotations

import dataclasses
import math

import keras


@dataclasses.dataclass(frozen=True)
class Budget:
    """A limit on the FLOPs or the parameters kept, as a fraction of the original.

    Exactly one of ``flops`` and ``params`` is given, in ``(0, 1]``.

    Args:
        flops: keep at most this fraction of the original FLOPs
            (`kap.count_flops`).
        params: keep at most this fraction of the original parameters
            (`kap.count_params`).

    Example:

    >>> Budget(flops=0.5).metric, Budget(flops=0.5).fraction
    ('flops', 0.5)
    """

    flops: float | None = None
    params: float | None = None

    def __post_init__(self):
        given = {k: v for k, v in (("flops", self.flops), ("params", self.params)) if v is not None}
        if len(given) != 1:
            raise ValueError(
                "A Budget limits exactly one quantity: `Budget(flops=0.5)` or `Budget(params=0.25)`. "
                f"Received: flops={self.flops}, params={self.params}"
            )
        (name, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(
                f"`{name}` is the fraction of the original model kept, in (0, 1] "
                f"(e.g. 0.5 keeps half). Received: {name}={value!r}"
            )

    @property
    def metric(self) -> str:
        """``"flops"`` or ``"params"``."""
        return "flops" if self.flops is not None else "params"

    @property
    def fraction(self) -> float:
        """The fraction kept."""
        return float(self.flops if self.flops is not None else self.params)

    def cost(self, model: keras.Model) -> int:
        """The budgeted quantity of ``model`` (FLOPs or parameters)."""
        from keras_autoprune.accounting import count_flops, count_params

        return count_flops(model) if self.metric == "flops" else count_params(model)

    def __str__(self) -> str:
        return f"{self.fraction:.0%} of {'FLOPs' if self.metric == 'flops' else 'parameters'}"


def round_up_fraction(fraction: float) -> float:
    """``fraction`` rounded up to two significant digits: a budget to suggest in an error message."""
    digits = 1 - int(math.floor(math.log10(fraction)))
    return float(math.ceil(fraction * 10**digits) / 10**digits)
