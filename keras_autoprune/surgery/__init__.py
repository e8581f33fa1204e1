"""Layer surgery: plans, and executing them on a model."""

from keras_autoprune.surgery.plan import PrunePlan
from keras_autoprune.surgery.rebuild import apply_plan, mask_plan

__all__ = ["PrunePlan", "apply_plan", "mask_plan"]
