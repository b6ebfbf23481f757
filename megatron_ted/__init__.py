"""megatron_ted: GPT Mixture-of-Experts pretraining with tensor x expert x data parallelism."""

__version__ = "0.1.0"
