"""Parallel layout (pure rank arithmetic), this rank's process groups, and counted collectives."""
from megatron_ted.parallel.comm import CommStats, Group
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import LayoutError, ParallelLayout, RankCoords

__all__ = ["ParallelLayout", "LayoutError", "RankCoords", "ParallelGroups", "Group", "CommStats"]
