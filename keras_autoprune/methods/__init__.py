"""Pruning methods: short compositions of statistics, scoring and allocation."""
