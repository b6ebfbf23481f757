"""Batched generation with a KV cache at any TP x EP layout: one prefill, then one decode step per token.

    model, groups = load_parallel("runs/x/checkpoints", tp=2, ep=2)   # under torchrun, 4 processes
    result = generate_batch(model, [[5, 6, 7], [9]], SamplingConfig(vocab_size=200, max_new_tokens=32))
    result.ids        # the new ids of each prompt (up to and with end-of-document)

Prompts of different lengths are left-padded to the longest; each sequence's positions count only
its own tokens and its padded slots are masked (inference/kv_cache.py), so a prompt gives the same
tokens alone or in a batch. Every rank runs the whole batch: the non-expert blocks are
tensor-parallel, the experts expert-parallel (dropless; a decode step routes B tokens, maybe fewer
than TP: moe/dispatcher.py pads DTD's split), and the vocabulary-parallel logits of the last
position are all-gathered over TP. Rank 0 chooses the tokens and broadcasts them, so all ranks
feed the same ids even where kernels are not bitwise deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_ted.inference.kv_cache import KVCache
from megatron_ted.inference.sampling import SamplingConfig, sample
from megatron_ted.parallel import mappings


@dataclass
class Generation:
    ids: list[list[int]]                                    # new ids per prompt
    logits: list[torch.Tensor] = field(default_factory=list)  # per step [B, V_padded] (keep_logits)


def check_prompts(prompts: list[list[int]], cfg: SamplingConfig, max_positions: int,
                  names: list[str] | None = None) -> list[list[int]]:
    """The prompts as lists of ints (an empty one starts from end-of-document); a ValueError naming
    the prompt (names[n], e.g. "--prompt" or "in.jsonl:3"; else "prompt n") and the problem."""
    out = []
    for n, prompt in enumerate(prompts):
        name = names[n] if names else f"prompt {n + 1}"
        bad = [i for i in prompt if not 0 <= int(i) < cfg.vocab_size]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the tokenizer's vocabulary "
                             f"(ids 0 to {cfg.vocab_size - 1})")
        if not prompt:
            if cfg.eod is None:
                raise ValueError(f"{name}: the prompt is empty and the tokenizer has no end-of-document id to start from")
            prompt = [cfg.eod]
        if len(prompt) + cfg.max_new_tokens > max_positions:
            raise ValueError(f"{name}: {len(prompt)} prompt tokens plus --max-new-tokens {cfg.max_new_tokens} "
                             f"exceed the model's {max_positions} positions (--max-position-embeddings); "
                             f"ask for fewer new tokens or shorten the prompt")
        out.append([int(i) for i in prompt])
    return out


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], cfg: SamplingConfig, keep_logits: bool = False,
                   names: list[str] | None = None) -> Generation:
    """model: a GPTModel in eval mode (any TP x EP; all ranks call with the same prompts and cfg);
    names: how an error names each prompt (check_prompts)."""
    prompts = check_prompts(prompts, cfg, model.config.max_position_embeddings, names)
    if not prompts or cfg.max_new_tokens == 0:
        return Generation([[] for _ in prompts])
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens_BS = torch.zeros(B, L, dtype=torch.long, device=device)      # id 0 on padding: masked out
    valid_BS = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens_BS[b, L - len(p):] = torch.tensor(p, device=device)
        valid_BS[b, L - len(p):] = True
    positions_BS = (valid_BS.long().cumsum(1) - 1).clamp(min=0)
    next_position_B = valid_BS.sum(1)
    cache = KVCache(B, L + cfg.max_new_tokens, device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    new_BN = torch.zeros(B, 0, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    out = Generation([])
    for _ in range(cfg.max_new_tokens):
        cache.begin(valid_BS)
        logits_BV = model(tokens_BS, positions_BS, kv_cache=cache).logits[:, -1]   # [B, V/TP]
        cache.end()
        logits_BV = mappings.gather(logits_BV, model.tp, dim=-1)                   # [B, V]
        if keep_logits:
            out.logits.append(logits_BV.cpu())
        ids_B = sample(logits_BV, cfg, generator)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(ids_B, src=0)
        new_BN = torch.cat([new_BN, ids_B[:, None]], dim=1)
        if cfg.stop_at_eod and cfg.eod is not None:
            done_B |= ids_B == cfg.eod
            if bool(done_B.all()):
                break
        tokens_BS, positions_BS = ids_B[:, None], next_position_B[:, None]
        valid_BS = torch.ones(B, 1, dtype=torch.bool, device=device)
        next_position_B = next_position_B + 1
    for row in new_BN.tolist():
        if cfg.stop_at_eod and cfg.eod in row:
            row = row[:row.index(cfg.eod) + 1]
        out.ids.append(row)
    return out
