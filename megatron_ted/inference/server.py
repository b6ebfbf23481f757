"""Megatron-LM's text generation REST API (PUT /api) over our batched engine, without the sockets.

    request = parse_request(body_bytes)                   # RequestError (-> HTTP 400) names the field
    work = make_work(request, tokenizer, max_positions, seed)  # rank 0; broadcast to every rank
    ids, logprobs = run_work(model, work)                 # every rank, the same work
    reply = build_response(request, work, tokenizer, ids, logprobs)   # rank 0: the JSON object

The fields, their types, defaults and ranges are Megatron-LM's (megatron/inference/
text_generation_server.py), with these differences (docs/CHECKPOINTS.md): temperature 0 is greedy;
top_k and top_p may be combined; every bad field is a 400 (Megatron answers some with 200); a field
we do not know, and beam search / top_p_decay / top_p_bound / prevent_newline_after_colon, are
refused by name instead of ignored. The tool (tools/run_text_generation_server.py) owns the HTTP
server and the broadcast.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

from megatron_ted.inference.engine import check_prompts, generate_batch
from megatron_ted.inference.generate import banned_ids, completion_text
from megatron_ted.inference.sampling import SamplingConfig
from megatron_ted.parallel import mappings

MAX_PROMPTS = 128                  # Megatron's limit per request
# Megatron's fields we accept, and their defaults.
DEFAULTS = dict(tokens_to_generate=64, logprobs=False, temperature=1.0, top_k=0, top_p=0.0, add_BOS=False,
                stop_on_eol=False, stop_on_double_eol=False, random_seed=-1, no_log=False,
                stop_token=50256, length_penalty=1.0)
RETIRED = {"max_len": "tokens_to_generate", "sentences": "prompts"}   # Megatron's old names
# Megatron's fields we cannot honour, refused when set to anything but their no-op value.
UNSUPPORTED = {"beam_width": None, "top_p_decay": 0.0, "top_p_bound": 0.0, "prevent_newline_after_colon": False}


class RequestError(ValueError):
    """A bad request: one line naming the field, answered with HTTP 400."""


@dataclass(frozen=True)
class GenerateRequest:
    prompts: list[str]
    tokens_to_generate: int = 64
    logprobs: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0             # 0: no nucleus cut (Megatron's convention)
    add_BOS: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    random_seed: int = -1          # -1: the server draws one
    no_log: bool = False
    stop_token: int = 50256        # beam search only in Megatron: accepted, no effect
    length_penalty: float = 1.0    # beam search only in Megatron: accepted, no effect


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise RequestError(f"{name} must be {what}, got {json.dumps(value)}")


def parse_request(body: bytes | str | dict) -> GenerateRequest:
    """The request of a PUT /api body; RequestError naming the first bad field."""
    if not isinstance(body, dict):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not JSON ({e}); send a JSON object with \"prompts\"") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with \"prompts\"")
    for old, new in RETIRED.items():
        if old in body:
            raise RequestError(f"{old} is no longer used; replace it with {new}")
    for name, noop in UNSUPPORTED.items():
        if name in body and body[name] != noop:
            raise RequestError(f"{name} is not supported by this server; leave it out")
    unknown = sorted(set(body) - set(DEFAULTS) - set(UNSUPPORTED) - {"prompts"})
    if unknown:
        raise RequestError(f"{unknown[0]} is not a field of this API; the fields are prompts, "
                           f"{', '.join(DEFAULTS)}")
    if "prompts" not in body:
        raise RequestError("prompts is required: a list of strings")
    prompts = body["prompts"]
    _check("prompts", prompts, isinstance(prompts, list) and all(isinstance(p, str) for p in prompts),
           "a list of strings")
    _check("prompts", f"{len(prompts)} prompts", 0 < len(prompts) <= MAX_PROMPTS, f"1 to {MAX_PROMPTS} prompts")
    v = {**DEFAULTS, **{k: body[k] for k in DEFAULTS if k in body}}
    _check("tokens_to_generate", v["tokens_to_generate"], _is_int(v["tokens_to_generate"]) and
           v["tokens_to_generate"] >= 0, "an integer >= 0")
    for name in ("logprobs", "add_BOS", "stop_on_eol", "stop_on_double_eol", "no_log"):
        _check(name, v[name], isinstance(v[name], bool), "true or false")
    if v["tokens_to_generate"] == 0 and not v["logprobs"]:
        raise RequestError("tokens_to_generate 0 asks for the prompts' logprobs only: set logprobs true")
    _check("temperature", v["temperature"], _is_number(v["temperature"]) and 0 <= v["temperature"] <= 100,
           "a number in [0, 100] (0: greedy)")
    _check("top_k", v["top_k"], _is_int(v["top_k"]) and 0 <= v["top_k"] <= 1000,
           "an integer in [0, 1000] (0: no top-k cut, 1: greedy)")
    _check("top_p", v["top_p"], _is_number(v["top_p"]) and 0 <= v["top_p"] <= 1, "a number in [0, 1] (0: no cut)")
    _check("random_seed", v["random_seed"], _is_int(v["random_seed"]) and v["random_seed"] >= -1,
           "an integer >= 0 (or -1: the server chooses)")
    _check("stop_token", v["stop_token"], _is_int(v["stop_token"]), "an integer")
    _check("length_penalty", v["length_penalty"], _is_number(v["length_penalty"]), "a number")
    if any(not p for p in prompts) and not v["add_BOS"]:
        n = next(i for i, p in enumerate(prompts) if not p)
        raise RequestError(f"prompts[{n}] is empty: empty prompts need add_BOS true")
    return GenerateRequest(prompts=prompts, **v)


@dataclass(frozen=True)
class Work:
    """What every rank needs for one request (rank 0 broadcasts it)."""
    prompt_ids: list[list[int]]
    cfg: SamplingConfig
    logprobs: bool


def make_work(request: GenerateRequest, tokenizer, max_positions: int, rng: random.Random) -> Work:
    """The prompts' ids (with BOS = end-of-document when add_BOS, as Megatron) and the sampling of a
    request; RequestError naming prompts[i] when one does not fit the model or the vocabulary.
    rng draws the seed when the request gives none (random_seed -1)."""
    ids, names = [], []
    for n, text in enumerate(request.prompts):
        name = f"prompts[{n}]"
        try:
            p = tokenizer.tokenize(text) if text else []
        except ValueError:   # NullTokenizer: the text is ids
            raise RequestError(f"{name}: this checkpoint has no text tokenizer (NullTokenizer); give the prompt "
                               f"as token ids separated by spaces, e.g. \"12 7 40\"") from None
        p = [tokenizer.eod] + p if request.add_BOS else p
        if len(p) + request.tokens_to_generate > max_positions:
            raise RequestError(f"{name}: {len(p)} prompt tokens plus tokens_to_generate "
                               f"{request.tokens_to_generate} exceed the model's {max_positions} positions")
        ids.append(p)
        names.append(name)
    seed = request.random_seed if request.random_seed >= 0 else rng.randrange(2 ** 31)
    cfg = SamplingConfig(vocab_size=tokenizer.vocab_size, max_new_tokens=request.tokens_to_generate,
                         temperature=float(request.temperature), top_k=request.top_k,
                         top_p=float(request.top_p) or 1.0, seed=seed, eod=tokenizer.eod,
                         banned_ids=banned_ids(tokenizer))
    try:
        ids = check_prompts(ids, cfg, max_positions, names)
    except ValueError as e:
        raise RequestError(str(e)) from None
    return Work(ids, cfg, request.logprobs)


@torch.no_grad()
def run_work(model, work: Work) -> tuple[list[list[int]], list[list[float]] | None]:
    """(new ids per prompt, log-probabilities of every token after the first per prompt, or None):
    every rank calls it with the same work (collectives inside)."""
    out = generate_batch(model, work.prompt_ids, work.cfg, keep_logits=work.logprobs)
    if not work.logprobs:
        return out.ids, None
    vocab = work.cfg.vocab_size
    new_logprobs = [[] for _ in out.ids]
    for n, logits_BV in enumerate(out.logits):          # one step at a time: [B, V] at most in memory
        picked_B = _log_softmax(logits_BV[:, :vocab]).gather(
            -1, torch.tensor([ids[n] if n < len(ids) else 0 for ids in out.ids])[:, None])[:, 0].tolist()
        for b, ids in enumerate(out.ids):
            if n < len(ids):
                new_logprobs[b].append(picked_B[b])
    logprobs = [_prompt_logprobs(model, prompt, vocab) + row for prompt, row in zip(work.prompt_ids, new_logprobs)]
    return out.ids, logprobs


def _prompt_logprobs(model, prompt: list[int], vocab_size: int) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i >= 1, from one forward of the prompt (the engine keeps the
    last position's logits only)."""
    if len(prompt) < 2:
        return []
    device = next(model.parameters()).device
    ids_1S = torch.tensor([prompt], device=device)
    logits_SV = mappings.gather(model(ids_1S, torch.arange(len(prompt), device=device)[None]).logits,
                                model.tp, dim=-1)[0, :-1, :vocab_size]
    return _log_softmax(logits_SV).gather(-1, ids_1S[0, 1:, None])[:, 0].tolist()


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """In at least fp32 (bf16 / fp16 logits are upcast; fp64 stays)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def stop_length(tokenizer, prompt: list[int], ids: list[int], marker: str) -> int:
    """How many of the new ids to keep so that the completion ends with the token completing the
    first `marker` ("\\n": stop_on_eol, "\\n\\n": stop_on_double_eol); all when there is none."""
    if marker not in completion_text(tokenizer, prompt, ids, False):
        return len(ids)
    low, high = 1, len(ids)        # the shortest prefix whose text holds the marker
    while low < high:
        mid = (low + high) // 2
        if marker in completion_text(tokenizer, prompt, ids[:mid], False):
            high = mid
        else:
            low = mid + 1
    return low


def build_response(request: GenerateRequest, work: Work, tokenizer, new_ids: list[list[int]],
                   logprobs: list[list[float]] | None) -> dict:
    """Megatron's answer: text (prompt + completion, without a final end-of-document), segments (the
    text of each token), tokens (prompt + new ids) and logprobs (None unless asked)."""
    out = {"text": [], "segments": [], "tokens": [], "logprobs": [] if logprobs is not None else None}
    for n, (text, prompt, ids) in enumerate(zip(request.prompts, work.prompt_ids, new_ids)):
        for wanted, marker in ((request.stop_on_double_eol, "\n\n"), (request.stop_on_eol, "\n")):
            if wanted:
                ids = ids[:stop_length(tokenizer, prompt, ids, marker)]
        tokens = prompt + ids
        out["text"].append(text + completion_text(tokenizer, prompt, ids, stop_at_eod=True))
        out["tokens"].append(tokens)
        out["segments"].append([tokenizer.detokenize([t]) for t in tokens])
        if logprobs is not None:
            out["logprobs"].append(logprobs[n][:len(tokens) - 1])
    return out
