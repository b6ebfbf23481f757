"""Load a checkpoint into a one-process model and sample text from it.

    model, tokenizer, args = load_for_inference("runs/quickstart/checkpoints")
    text = generate_text(model, tokenizer, "def parse(", max_new_tokens=64, top_k=40, seed=1)

The model is rebuilt from the ModelConfig saved in the checkpoint (`ParallelGroups.single()`, TP=EP=1:
the full vocabulary comes out of one forward), so a checkpoint written at any (TP, EP, DP) works.
Dropout is off and MoE routing is dropless (no capacity limit), whatever training used.
No KV cache: each new token runs the model over the last `--max-position-embeddings` tokens,
which is what a small model needs.

Sampling: greedy when temperature is 0 or top_k is 1; else softmax(logits / temperature) over
the top_k ids (all ids when top_k is 0). Ids the tokenizer does not have (the padding that rounds
the vocabulary up to --make-vocab-size-divisible-by) and the tokenizer's pad id are never sampled.
Generation stops at end-of-document unless stop_at_eod is False.
"""
from __future__ import annotations

import os

import torch

from megatron_ted.data.tokenizer import build_tokenizer, resolve_tokenizer_type
from megatron_ted.inference.model import CausalLM, build_from_checkpoint, checkpoint_args
from megatron_ted.training.saved_model import checkpoint_model_config


def _tokenizer_for(saved_flags: dict, directory: str, tokenizer_model: str | None):
    """The tokenizer the training run read its data with, from its saved flags (data, not the model:
    --tokenizer-type, --tokenizer-model, --vocab-size, --vocab-file, --merge-file)."""
    kind = saved_flags["tokenizer_type"]
    if kind == "NullTokenizer":
        return build_tokenizer(kind, vocab_size=saved_flags.get("vocab_size"))
    if kind == "GPT2BPETokenizer":
        return build_tokenizer(kind, vocab_file=saved_flags.get("vocab_file"), merge_file=saved_flags.get("merge_file"))
    candidates = [tokenizer_model] if tokenizer_model else [os.path.join(directory, "tokenizer.model"),
                                                           saved_flags.get("tokenizer_model")]
    for path in candidates:
        if path and os.path.exists(path):   # a file, or HuggingFaceTokenizer's directory
            return build_tokenizer(kind, tokenizer_model=path)
    raise ValueError(f"--tokenizer-model: checkpoint {directory} holds no tokenizer.model and the training "
                     f"run's {saved_flags.get('tokenizer_model')!r} is not there; pass --tokenizer-model PATH")


def load_for_inference(load: str, tokenizer_model: str | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer, the training run's saved flags) from `--load` (save or iteration
    directory). The model is built from its saved ModelConfig (model.model_config); the flags are for
    what is not the model's (its data: --seq-length, the tokenizer)."""
    directory, saved_flags = checkpoint_args(load)
    tokenizer = load_tokenizer(load, tokenizer_model)
    return build_from_checkpoint(directory, device, dtype), tokenizer, saved_flags


def load_tokenizer(load: str, tokenizer_model: str | None = None, tokenizer_flags: dict | None = None):
    """The tokenizer of checkpoint `load`: the copy saved with it, or `tokenizer_model`; tokenizer_flags
    (a launch script's --tokenizer-type, --vocab-file, --merge-file, --vocab-size) replace the saved ones."""
    directory, saved_flags = checkpoint_args(load)
    if tokenizer_flags:
        flags = {**saved_flags, **tokenizer_flags}
        if "tokenizer_type" in tokenizer_flags or "vocab_file" in tokenizer_flags:   # as training reads them
            flags["tokenizer_type"] = resolve_tokenizer_type(tokenizer_flags.get("tokenizer_type"),
                                                             tokenizer_flags.get("vocab_file"))
        saved_flags = flags
    tokenizer = _tokenizer_for(saved_flags, directory, tokenizer_model)
    padded = checkpoint_model_config(directory).gpt.vocab_size
    if tokenizer.vocab_size > padded:
        raise ValueError(f"--tokenizer-model: its {tokenizer.vocab_size} ids exceed the checkpoint's vocabulary "
                         f"{padded}; use the tokenizer the model was trained with")
    return tokenizer


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, vocab_size: int, temperature: float = 1.0,
                 top_k: int = 0, seed: int | None = None, eod: int | None = None, stop_at_eod: bool = True,
                 banned_ids: tuple[int, ...] = ()) -> list[int]:
    """The new ids (at most max_new_tokens) after prompt_ids; ids >= vocab_size are never produced."""
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens {max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"--temperature {temperature} must be >= 0 (0: greedy)")
    if top_k < 0:
        raise ValueError(f"--top-k {top_k} must be >= 0 (0: no top-k cut)")
    bad = [i for i in prompt_ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ValueError(f"--prompt: token id {bad[0]} is outside the tokenizer's vocabulary "
                         f"(ids 0 to {vocab_size - 1})")
    if not prompt_ids:
        if eod is None:
            raise ValueError("--prompt is empty and the tokenizer has no end-of-document id to start from")
        prompt_ids = [eod]
    device = next(model.parameters()).device
    window = model.config.max_position_embeddings
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else int(seed))
    tokens = list(int(i) for i in prompt_ids)
    new: list[int] = []
    greedy = temperature == 0 or top_k == 1
    for _ in range(max_new_tokens):
        ctx = torch.tensor(tokens[-window:], dtype=torch.long, device=device).unsqueeze(0)
        pos = torch.arange(ctx.shape[1], device=device).unsqueeze(0)
        if isinstance(model, CausalLM):                              # load_model's: [V] unpadded
            logits = model(ctx)[0, -1].float().cpu()
        else:
            logits = model(ctx, pos).logits[0, -1].float().cpu()      # [V] (padded vocabulary)
        logits[vocab_size:] = float("-inf")                          # padding ids are not tokens
        for i in banned_ids:
            if 0 <= i < logits.shape[0]:
                logits[i] = float("-inf")
        if greedy:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.shape[0]:
                kth = torch.topk(logits, top_k).values[-1]
                logits[logits < kth] = float("-inf")
            nxt = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))
        new.append(nxt)
        tokens.append(nxt)
        if stop_at_eod and eod is not None and nxt == eod:
            break
    return new


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0,
                  top_k: int = 0, seed: int | None = None, stop_at_eod: bool = True) -> str:
    """The generated continuation of `prompt` (without the prompt, without a final end-of-document)."""
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    ids = generate_ids(model, prompt_ids, max_new_tokens, tokenizer.vocab_size, temperature, top_k, seed,
                       eod=tokenizer.eod, stop_at_eod=stop_at_eod, banned_ids=banned_ids(tokenizer))
    return completion_text(tokenizer, prompt_ids, ids, stop_at_eod)


def banned_ids(tokenizer) -> tuple[int, ...]:
    """Ids never to sample: the tokenizer's pad id, if it has one."""
    pad = getattr(tokenizer, "pad", -1)
    return (pad,) if pad is not None and pad >= 0 else ()


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    try:
        return tokenizer.tokenize(prompt) if prompt else []
    except ValueError:  # NullTokenizer: the text is ids
        raise ValueError(f"--prompt {prompt[:40]!r}: this checkpoint has no text tokenizer (NullTokenizer); "
                         "give the prompt as token ids separated by spaces, e.g. --prompt \"12 7 40\"") from None


def completion_text(tokenizer, prompt_ids: list[int], ids: list[int], stop_at_eod: bool = True) -> str:
    """The text of the new `ids` after `prompt_ids` (a final end-of-document left out)."""
    if ids and stop_at_eod and ids[-1] == tokenizer.eod:
        ids = ids[:-1]
    # Decode with the prompt so that word boundaries at the seam come out right, then cut it off.
    head, full = tokenizer.detokenize(prompt_ids), tokenizer.detokenize(prompt_ids + ids)
    if prompt_ids and full.startswith(head):
        return full[len(head):]
    return tokenizer.detokenize(ids)
