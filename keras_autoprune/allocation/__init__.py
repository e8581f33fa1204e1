"""Allocation: from channel scores to a plan that meets a budget."""

from keras_autoprune.allocation.ranking import global_ranking_plan, removal_order
from keras_autoprune.allocation.schedule import round_epochs, round_targets

__all__ = ["global_ranking_plan", "removal_order", "round_epochs", "round_targets"]
