"""The dense MLP lives in tensor_parallel/mlp.py (the MoE blocks use it too; moe does not import model)."""
from megatron_ted.tensor_parallel.mlp import MLP, activation  # noqa: F401
