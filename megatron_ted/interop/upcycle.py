"""Sparse upcycling lives in training/upcycle.py (training runs it; interop sits above training)."""
from megatron_ted.training.upcycle import upcycle, upcycle_and_save  # noqa: F401
from megatron_ted.training.upcycle_flags import check_upcycling  # noqa: F401
