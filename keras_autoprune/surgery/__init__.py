"""Layer surgery: plans, and executing them on a model."""

from keras_autoprune.surgery.factorization import FactorizationPlan, LayerFactorization
from keras_autoprune.surgery.plan import PrunePlan
from keras_autoprune.surgery.rebuild import apply_plan, mask_plan
from keras_autoprune.surgery.replace import LayerReplacement, replace_layers

__all__ = ["FactorizationPlan", "LayerFactorization", "LayerReplacement", "PrunePlan", "apply_plan", "mask_plan", "replace_layers"]
