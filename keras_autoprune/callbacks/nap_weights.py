"""`WeightGranularityMixin`: NAP's ``granularity="weight"`` mode, single weights masked instead of channels.

Each round keeps the fraction of the maskable kernels (`nap.maskable_taps`:
Dense, convolution and attention projections, not depthwise) that leaves
the model ``target`` of its parameters, ranked by `nap.weight_masks`; the
result is the model with those weights set to zero (same architecture).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_autoprune.budget import round_up_fraction
from keras_autoprune.errors import BudgetUnreachableError
from keras_autoprune.methods import nap
from keras_autoprune.surgery.clone import clone_layers, copy_layer
from keras_autoprune.surgery.plan import PrunePlan


class WeightGranularityMixin:
    """The weight-mode part of `NAPCallback`.

    Reads ``model``, ``graph``, ``budget``, ``damping``, ``_original`` and
    ``_masks`` (a `MaskSet`); sets ``weight_masks`` (``{tap name: 0/1
    array}``) and ``plan`` (empty: no channel is removed).
    """

    def _weight_fraction(self, target: float, total: int) -> float:
        """Share of the maskable weights a weight-mode round keeps so that the model keeps ``target`` of its
        ``total`` parameters: ``1 - (1 - target) · total / maskable``, where ``maskable`` counts the kernels
        of `nap.maskable_taps` (Dense, convolution and attention projections; not depthwise).

        Raises:
            BudgetUnreachableError: masking every maskable weight still keeps more than ``target``.
        """
        maskable = self._maskable()
        fraction = 1.0 - (1.0 - target) * total / max(maskable, 1)
        if fraction <= 0:
            floor = self._weight_floor(total)
            raise BudgetUnreachableError(
                f"Expected a parameter budget that masking single weights can reach on model '{self.model.name}'. "
                f"Received: {self.budget}, but only {maskable} of its {total} parameters are kernels of Dense or "
                f"convolution layers NAP can mask (biases, normalization and depthwise weights stay), so the model "
                f"keeps at least {floor:.1%}. Fix: kap.Budget(params={round_up_fraction(floor)}) or more."
            )
        return fraction

    def _maskable(self) -> int:
        """Weights of the kernels weight mode masks (`nap.maskable_taps`)."""
        return sum(int(np.prod(t.layer.kernel.shape)) for t in nap.maskable_taps(self.graph).values())

    def _weight_floor(self, total: int) -> float:
        """The smallest fraction of ``total`` parameters weight mode can keep: ``1 - maskable / total``."""
        return 1.0 - self._maskable() / total

    def _weight_round(self, factors, target: float) -> None:
        fraction = self._weight_fraction(target, self._original["params"])
        masks = nap.weight_masks(self.graph, factors, fraction, self.damping)
        if self.weight_masks is not None:  # removed weights stay removed
            masks = {name: m * self.weight_masks.get(name, 1.0) for name, m in masks.items()}
        self.weight_masks = masks
        self._apply_weight_masks(masks)
        self.plan = PrunePlan({})

    def _apply_weight_masks(self, masks: dict[str, np.ndarray]) -> None:
        self._masks.apply(PrunePlan({}))
        taps = nap.maskable_taps(self.graph)
        for name, mask in masks.items():
            self._masks.set_variable_mask(taps[name].layer.kernel, mask)

    def _weight_kept(self) -> dict[str, float]:
        """FLOPs (unchanged: zeros are still multiplied) and parameters kept (the non-zero ones)."""
        zeros = sum(int(np.sum(m == 0)) for m in (self.weight_masks or {}).values())
        return {"flops": 1.0, "params": 1.0 - zeros / self._original["params"]}

    def _weight_pruned_model(self) -> keras.Model:
        """A copy of the model with the masked weights set to zero (and no mask constraints)."""
        clone = clone_layers(self.model, copy_layer)  # copies hold the trained values, without the masks' constraints
        twins = {id(old): new for old, new in zip(self.model.weights, clone.weights, strict=True)}
        taps = nap.maskable_taps(self.graph)
        for name, mask in (self.weight_masks or {}).items():  # the removed weights are zeros in the result
            kernel = twins[id(taps[name].layer.kernel)]
            kernel.assign(np.asarray(kernel) * mask)
        return clone
