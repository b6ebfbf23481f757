"""Sparse upcycling lives in training/upcycle.py (training runs it; interop sits above training)."""
from megatron_ted.training.upcycle import check_upcycling, upcycle, upcycle_and_save  # noqa: F401
