"""Tensor-parallel building blocks: column/row-parallel linear, vocab-parallel embedding and loss."""
from megatron_ted.tensor_parallel.linear import ColumnParallelLinear, RowParallelLinear
from megatron_ted.tensor_parallel.vocab import (VocabParallelEmbedding, vocab_parallel_cross_entropy,
                                               vocab_parallel_kl_div)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "vocab_parallel_cross_entropy", "vocab_parallel_kl_div"]
