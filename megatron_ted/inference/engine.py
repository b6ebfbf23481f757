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

`static_cache` decodes on a StaticKVCache (inference/kv_cache.py): every step has the same shapes
and no host synchronisation (inference/decode_step.py; the MoE layers' experts run through
inference/decode_moe.py), and `cuda_graph_decode` replays that step from a CUDA graph. The host
then checks for end-of-document every STOP_CHECK tokens instead of every token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_ted.inference.decode_step import DecodeStep, cuda_graph_blocker
from megatron_ted.inference.kv_cache import KVCache, StaticKVCache
from megatron_ted.inference.sampling import SamplingConfig, sample
from megatron_ted.parallel import mappings


STOP_CHECK = 8   # static decode: tokens between the host's checks that every sequence has ended


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
                   names: list[str] | None = None, static_cache: bool = False,
                   cuda_graph_decode: bool = False) -> Generation:
    """model: a GPTModel in eval mode (any TP x EP; all ranks call with the same prompts and cfg);
    names: how an error names each prompt (check_prompts).
    static_cache: decode on a StaticKVCache (the same shapes every step, no host sync in the step:
    inference/decode_step.py); cuda_graph_decode: that step captured in a CUDA graph (implies it)."""
    device = next(model.parameters()).device
    if cuda_graph_decode:
        blocker = cuda_graph_blocker(model, device)
        if blocker is not None:
            raise ValueError(blocker)
        static_cache = True
    prompts = check_prompts(prompts, cfg, model.config.max_position_embeddings, names)
    if not prompts or cfg.max_new_tokens == 0:
        return Generation([[] for _ in prompts])
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens_BS = torch.zeros(B, L, dtype=torch.long, device=device)      # id 0 on padding: masked out
    valid_BS = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens_BS[b, L - len(p):] = torch.tensor(p, device=device)
        valid_BS[b, L - len(p):] = True
    positions_BS = (valid_BS.long().cumsum(1) - 1).clamp(min=0)
    next_position_B = valid_BS.sum(1)
    cache = (StaticKVCache if static_cache else KVCache)(B, L + cfg.max_new_tokens, device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    new_BN = torch.zeros(B, 0, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    out = Generation([])
    decode = None
    for step in range(cfg.max_new_tokens):
        if decode is not None:
            logits_BV = decode(tokens_BS[:, 0])                                    # [B, V]
        elif static_cache:                                                         # the prefill
            cache.prefill(valid_BS)
            logits_BV = mappings.gather(model(tokens_BS, positions_BS, kv_cache=cache).logits[:, -1], model.tp, dim=-1)
            decode = DecodeStep(model, cache, next_position_B, cuda_graph_decode)
        else:
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
            # the static path asks the host every STOP_CHECK tokens only (the ids after a
            # sequence's end-of-document are cut below, so the result is the same)
            if (not static_cache or (step + 1) % STOP_CHECK == 0) and bool(done_B.all()):
                break
        tokens_BS, positions_BS = ids_B[:, None], next_position_B[:, None]
        valid_BS = torch.ones(B, 1, dtype=torch.bool, device=device)
        next_position_B = next_position_B + 1
    for row in new_BN.tolist():
        if cfg.stop_at_eod and cfg.eod in row:
            row = row[:row.index(cfg.eod) + 1]
        out.ids.append(row)
    del out.logits[max(len(row) for row in out.ids):]   # steps past every end-of-document
    return out
