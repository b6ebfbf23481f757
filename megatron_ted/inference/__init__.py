"""Text generation and the model of a checkpoint (written at any layout) in one process."""
from megatron_ted.inference.generate import generate_ids, generate_text, load_for_inference
from megatron_ted.inference.model import load_model

__all__ = ["generate_ids", "generate_text", "load_for_inference", "load_model"]
