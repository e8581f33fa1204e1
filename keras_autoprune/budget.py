"""`Budget`: how much of the original model a pruning method may keep."""

from __future__ import annotations

import dataclasses
import math

import keras


@dataclasses.dataclass(frozen=True)
class Budget:
    """A limit on the FLOPs, parameters or latency kept, as a fraction of the original.

    Exactly one of ``flops``, ``params`` and ``latency`` is given, in ``(0, 1]``.

    Args:
        flops: keep at most this fraction of the original FLOPs
            (`kap.count_flops`).
        params: keep at most this fraction of the original parameters
            (`kap.count_params`).
        latency: keep at most this fraction of the original model's LiteRT
            latency, estimated from a per-layer table measured on the target
            (`kap.metapruning.LatencyTable`); only `kap.metapruning.search`
            accepts it.

    Example:

    >>> Budget(flops=0.5).metric, Budget(flops=0.5).fraction
    ('flops', 0.5)
    """

    flops: float | None = None
    params: float | None = None
    latency: float | None = None

    def __post_init__(self):
        given = {k: v for k, v in (("flops", self.flops), ("params", self.params), ("latency", self.latency))
                 if v is not None}
        if len(given) != 1:
            raise ValueError(
                "A Budget limits exactly one quantity: `Budget(flops=0.5)`, `Budget(params=0.25)` or "
                f"`Budget(latency=0.5)`. Received: flops={self.flops}, params={self.params}, latency={self.latency}"
            )
        (name, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(
                f"`{name}` is the fraction of the original model kept, in (0, 1] "
                f"(e.g. 0.5 keeps half). Received: {name}={value!r}"
            )

    @property
    def metric(self) -> str:
        """``"flops"``, ``"params"`` or ``"latency"``."""
        return "flops" if self.flops is not None else "params" if self.params is not None else "latency"

    @property
    def fraction(self) -> float:
        """The fraction kept."""
        return float(getattr(self, self.metric))

    def cost(self, model: keras.Model) -> int:
        """The budgeted quantity of ``model`` (FLOPs or parameters; a latency budget raises)."""
        from keras_autoprune.accounting import count_flops, count_params

        self.require_countable("Budget.cost")
        return count_flops(model) if self.metric == "flops" else count_params(model)

    def require_countable(self, method: str) -> None:
        """Raises for a latency budget: ``method`` counts FLOPs or parameters only."""
        if self.metric == "latency":
            raise ValueError(
                f"{method} budgets FLOPs or parameters, counted from the model; a latency budget needs a "
                "latency table measured on the target and is accepted by `kap.metapruning.search` only. "
                f"Received: budget=kap.Budget(latency={self.latency}). Fix: use `kap.Budget(flops=...)` "
                "here, or `kap.metapruning.search(model, data, kap.Budget(latency=...), latency_table=...)`."
            )

    def __str__(self) -> str:
        names = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}
        return f"{self.fraction:.0%} of {names[self.metric]}"


def round_up_fraction(fraction: float) -> float:
    """``fraction`` rounded up to two significant digits: a budget to suggest in an error message."""
    digits = 1 - int(math.floor(math.log10(fraction)))
    return float(math.ceil(fraction * 10**digits) / 10**digits)
