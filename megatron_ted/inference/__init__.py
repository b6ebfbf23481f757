"""Text generation from a checkpoint (written at any layout) in one process."""
from megatron_ted.inference.generate import generate_ids, generate_text, load_for_inference

__all__ = ["generate_ids", "generate_text", "load_for_inference"]
