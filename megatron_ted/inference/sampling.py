"""Choose the next token of each sequence from its logits: greedy, or temperature / top-k / top-p.

Greedy when temperature is 0 or top_k is 1. Else softmax(logits / temperature) over the top_k ids
(all when 0) and, of those, the smallest most-likely set whose probability reaches top_p (all when
1; Holtzman et al.'s nucleus sampling), drawn with `generator`. Ids past the tokenizer's vocabulary
(the padding of the embedding table) and `banned_ids` are never chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    vocab_size: int                      # the tokenizer's ids; higher logits are padding
    max_new_tokens: int
    temperature: float = 1.0             # 0: greedy
    top_k: int = 0                       # 0: no top-k cut
    top_p: float = 1.0                   # 1: no nucleus cut
    seed: int = 0
    eod: int | None = None
    stop_at_eod: bool = True
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature} must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0: no top-k cut)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1] (1: no nucleus cut)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V_padded] (float) -> the chosen ids [B] (int64)."""
    logits_BV = logits_BV.float().clone()
    logits_BV[:, cfg.vocab_size:] = float("-inf")
    banned = [i for i in cfg.banned_ids if 0 <= i < logits_BV.shape[1]]
    if banned:
        logits_BV[:, banned] = float("-inf")
    if cfg.greedy:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / cfg.temperature
    if 0 < cfg.top_k < logits_BV.shape[1]:
        kth_B1 = torch.topk(logits_BV, cfg.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if cfg.top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        drop_BV = cum_BV - sorted_BV.softmax(-1) >= cfg.top_p     # the mass before it already reaches p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(1)
