"""Whole-model parallelisation: what parallel modes do to a plain, built model (parallelize()),
and the steps that must wait for the optimizer and the checkpoint load (parallelize_after_load())."""
from megatron_ted.parallelize.apply import parallelize, parallelize_after_load

__all__ = ["parallelize", "parallelize_after_load"]
