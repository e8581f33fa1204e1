"""Dependency graph: which channels of which layers must be pruned together."""

from keras_autoprune.graph.dependency import DependencyGraph
from keras_autoprune.graph.groups import ChannelGroup, ChannelMember

__all__ = ["ChannelGroup", "ChannelMember", "DependencyGraph"]
