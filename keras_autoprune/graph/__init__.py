"""Dependency graph: which channels of which layers must be pruned together."""

from keras_autoprune.graph.dependency import ChannelGroup, ChannelMember, DependencyGraph

__all__ = ["ChannelGroup", "ChannelMember", "DependencyGraph"]
