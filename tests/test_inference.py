"""KV-cached batched generation (inference/engine.py) against the uncached full-context forward, one
prompt alone, a TP 2 x EP 2 world, the generate_text.py entry point and transformers' generate.
Tiny models in float64: equal up to reordering (1e-10), greedy ids exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_ted.config.from_flags import configs_from_args
from megatron_ted.data.tokenizer import build_tokenizer
from megatron_ted.inference.engine import generate_batch
from megatron_ted.inference.model import load_parallel
from megatron_ted.inference.sampling import SamplingConfig
from megatron_ted.model.attention import AttentionConfig
from megatron_ted.model.builder import MoEConfig, build_gpt
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.model.mla import MLAConfig
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.arguments import padded_vocab_size, parse_args
from megatron_ted.training.checkpoint import save_checkpoint
from multiproc import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 96
PROMPTS = [[5, 17, 3, 40, 2, 9, 33], [8], [70, 1, 1, 64]]   # different lengths, one shorter than TP x EP


def _model(kind: str):
    common = dict(vocab_size=V, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=48,
                  max_position_embeddings=64, position_embedding_type="rope", normalization="RMSNorm",
                  swiglu=True, init_method_std=0.5)
    moe = None
    if kind == "mha":
        config = GPTConfig(**{**common, "position_embedding_type": "learned", "normalization": "LayerNorm",
                              "swiglu": False})
    elif kind == "gqa":
        config = GPTConfig(**common, attention=AttentionConfig(num_query_groups=2))
    elif kind == "swa":   # a window of 3 earlier positions on layer 0; layer 1 full (prompts + 10 tokens > 4)
        config = GPTConfig(**common, attention=AttentionConfig(num_query_groups=2, window_size=(3, 0),
                                                               window_attn_skip_freq=(1, 0)))
    elif kind == "mla":
        config = GPTConfig(**common, mla=MLAConfig(kv_lora_rank=12, qk_head_dim=8, qk_pos_emb_head_dim=4,
                                                   v_head_dim=6, q_lora_rank=10))
    else:   # moe: every layer, GQA
        config = GPTConfig(**common, attention=AttentionConfig(num_query_groups=2))
        moe = MoEConfig(RouterConfig(num_experts=4, topk=2), ffn_hidden_size=24, layer_freq=1)
    return build_gpt(config, moe, ParallelGroups.single(), seed=3).double().eval()


def _uncached_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None]).logits[0, -1]


@pytest.mark.parametrize("kind", ["mha", "gqa", "mla", "moe", "swa"])
def test_cached_decode_equals_the_full_context_forward_at_every_step(kind):
    model = _model(kind)
    cfg = SamplingConfig(vocab_size=V, max_new_tokens=10, temperature=0)
    out = generate_batch(model, PROMPTS[:1], cfg, keep_logits=True)
    seq = PROMPTS[0] + out.ids[0]
    assert len(out.logits) == 10 and len(set(out.ids[0])) > 1, out.ids   # not a degenerate repeat
    for step, logits in enumerate(out.logits):
        expected = _uncached_logits(model, seq[:len(PROMPTS[0]) + step])
        torch.testing.assert_close(logits[0], expected, rtol=0, atol=1e-10)
        assert int(expected.argmax()) == seq[len(PROMPTS[0]) + step]


@pytest.mark.parametrize("kind", ["gqa", "moe", "swa"])
def test_batched_prompts_of_different_lengths_equal_each_prompt_alone(kind):
    model = _model(kind)
    cfg = SamplingConfig(vocab_size=V, max_new_tokens=8, temperature=0)
    batched = generate_batch(model, PROMPTS, cfg, keep_logits=True)
    for b, prompt in enumerate(PROMPTS):
        alone = generate_batch(model, [prompt], cfg, keep_logits=True)
        assert batched.ids[b] == alone.ids[0]
        for step in range(8):
            torch.testing.assert_close(batched.logits[step][b], alone.logits[step][0], rtol=0, atol=1e-10)
    # seeded sampling (top-k and top-p) draws the same ids twice, others with another seed
    hot = dict(vocab_size=V, max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.9)
    a = generate_batch(model, PROMPTS, SamplingConfig(**hot, seed=1)).ids
    assert a == generate_batch(model, PROMPTS, SamplingConfig(**hot, seed=1)).ids
    assert a != generate_batch(model, PROMPTS, SamplingConfig(**hot, seed=2)).ids


def _static_equals_growing(model, prompts, cfg):
    grown = generate_batch(model, prompts, cfg, keep_logits=True)
    static = generate_batch(model, prompts, cfg, keep_logits=True, static_cache=True)
    assert static.ids == grown.ids and len(static.logits) == len(grown.logits)
    for a, b in zip(static.logits, grown.logits):   # attention over S_max slots sums in another order
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    return grown


@pytest.mark.parametrize("kind", ["mha", "gqa", "mla", "moe", "swa"])
def test_static_cache_decode_equals_the_growing_cache(kind):
    """Batched prompts of different lengths; for MoE also batch 1, whose decode gathers the chosen
    experts' weights (T * K < E) while batch 3 runs every expert (inference/decode_moe.py); and a
    stop at end-of-document, which the static path checks every STOP_CHECK tokens only."""
    model = _model(kind)
    cfg = SamplingConfig(vocab_size=V, max_new_tokens=10, temperature=0)
    grown = _static_equals_growing(model, PROMPTS, cfg)
    assert len(set(grown.ids[0])) > 1
    if kind == "moe":
        _static_equals_growing(model, PROMPTS[:1], cfg)
        eod = grown.ids[1][2]   # ends sequence 2 at its third token, the others maybe later or never
        stopped = _static_equals_growing(model, PROMPTS, SamplingConfig(vocab_size=V, max_new_tokens=10,
                                                                        temperature=0, eod=eod))
        assert len(stopped.ids[1]) == 3


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__")


def _decode_steps_without_host_reads(model, dispatch: bool, monkeypatch):
    """Two decode steps on a StaticKVCache with every Tensor-to-Python read raising."""
    from megatron_ted.inference.decode_step import DecodeStep
    from megatron_ted.inference.kv_cache import StaticKVCache

    tokens = torch.tensor([[0, 0, 5, 17], [8, 1, 1, 64]])
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    cache = StaticKVCache(2, 8)
    cache.prefill(valid)
    with torch.no_grad():
        model(tokens, (valid.long().cumsum(1) - 1).clamp(min=0), kv_cache=cache)
        step = DecodeStep(model, cache, valid.sum(1))
        step.dispatch = dispatch
        with monkeypatch.context() as m:
            for name in SYNCS:
                m.setattr(torch.Tensor, name, lambda *a, _n=name: (_ for _ in ()).throw(RuntimeError(f"host sync: {_n}")))
            for ids in ([3, 4], [9, 2]):
                step(torch.tensor(ids))


def test_static_decode_step_reads_nothing_on_the_host(monkeypatch):
    model = _model("moe")
    _decode_steps_without_host_reads(model, True, monkeypatch)
    with pytest.raises(RuntimeError, match="host sync"):   # the token dispatcher reads its split sizes
        _decode_steps_without_host_reads(model, False, monkeypatch)


def test_static_windowed_decode_reads_nothing_on_the_host(monkeypatch):
    """The sliding window's band over the static cache's slots is device arithmetic too."""
    model = _model("swa")
    assert model.layers[0].attention.window == 3   # the windowed layer's mask is built in the step
    _decode_steps_without_host_reads(model, True, monkeypatch)


def test_cuda_graph_decode_refused_without_a_gpu(checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="--cuda-graph-decode needs a CUDA GPU"):
        generate_batch(_model("gqa"), PROMPTS, SamplingConfig(vocab_size=V, max_new_tokens=2), cuda_graph_decode=True)
    r = _run_tool("--load", checkpoint, "--prompt", "3 4", "--cuda-graph-decode", "--max-new-tokens", "2")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "--cuda-graph-decode" in err[0], r.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gqa", "mla", "moe"])
def test_cuda_graph_decode_replays_what_eager_decode_computes(kind):
    model = _model(kind).float().cuda()
    for prompts in (PROMPTS, PROMPTS[:1]):
        cfg = SamplingConfig(vocab_size=V, max_new_tokens=12, temperature=0)
        eager = generate_batch(model, prompts, cfg, keep_logits=True, static_cache=True)
        graphed = generate_batch(model, prompts, cfg, keep_logits=True, cuda_graph_decode=True)
        assert graphed.ids == eager.ids and len(graphed.logits) == 12
        for a, b in zip(graphed.logits, eager.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


MODEL_ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
              "--max-position-embeddings", "32", "--num-experts", "4", "--moe-router-topk", "2",
              "--moe-layer-freq", "1", "--micro-batch-size", "2", "--hidden-dropout", "0", "--attention-dropout", "0",
              "--mock-data", "--vocab-size", str(V), "--init-method-std", "0.5", "--position-embedding-type", "rope",
              "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A single-process model of MODEL_ARGV saved as a checkpoint (NullTokenizer: V ids + EOD)."""
    path = str(tmp_path_factory.mktemp("inf") / "ck")
    args = parse_args(MODEL_ARGV, world_size=1)
    args.padded_vocab_size = padded_vocab_size(V + 1, args.make_vocab_size_divisible_by, 1)
    m = configs_from_args(args).model
    config, moe = m.gpt, m.moe
    model = build_gpt(config, moe, ParallelGroups.single(), args.seed)
    save_checkpoint(path, 1, model, None, ParallelGroups.single(), vars(args))
    return path


def _generate_at_layout(rank, world, path, cases):
    torch.set_default_dtype(torch.float64)
    model, groups = load_parallel(path, tp=2, ep=2, dtype=torch.float64)
    assert model.layers[0].mlp.dispatcher.dtd and groups.tp.size == 2 and groups.ep.size == 2
    return [(lambda g: (g.ids, g.logits))(generate_batch(model, prompts, cfg, keep_logits=True,
                                                         static_cache=static))
            for prompts, cfg, static in cases]


def test_tp2_ep2_generates_what_one_process_does(checkpoint):
    """Batch 1 decodes 1 token over 4 ranks (fewer than TP: DTD's split is padded), batch 3 an odd
    count; greedy and seeded top-p ids and every step's logits equal one process's (growing cache),
    also on the static cache, whose decode step all-reduces the experts' rows over TP and EP."""
    greedy = SamplingConfig(vocab_size=V, max_new_tokens=6, temperature=0)
    nucleus = SamplingConfig(vocab_size=V, max_new_tokens=6, temperature=1.0, top_p=0.8, seed=4)
    cases = [([PROMPTS[0]], greedy, False), (PROMPTS, greedy, False), (PROMPTS, nucleus, False),
             ([PROMPTS[0]], greedy, True), (PROMPTS, nucleus, True)]
    single, _ = load_parallel(checkpoint, dtype=torch.float64)
    expected = [generate_batch(single, prompts, cfg, keep_logits=True) for prompts, cfg, _ in cases]
    results = run_distributed(_generate_at_layout, 4, checkpoint, cases)
    for rank_result in results:
        for (ids, logits), ref in zip(rank_result, expected):
            assert ids == ref.ids
            for a, b in zip(logits, ref.logits):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert len(set(expected[1].ids[0])) > 1


def _run_tool(*argv, timeout=180):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate_text.py"), *argv],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_generate_text_batch_file_round_trip_and_bad_inputs(checkpoint, tmp_path):
    lines = [{"prompt_ids": PROMPTS[0], "id": "a"}, {"prompt": "8"}, {"prompt_ids": PROMPTS[2]}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = _run_tool("--load", checkpoint, "--prompts-file", str(inp), "--output-file", str(out),
                  "--temperature", "0", "--max-new-tokens", "5", "--ignore-eod")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    single, _ = load_parallel(checkpoint)
    expected = generate_batch(single, PROMPTS, SamplingConfig(vocab_size=V + 1, max_new_tokens=5, temperature=0,
                                                              stop_at_eod=False)).ids
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=V)
    assert [row["completion_ids"] for row in rows] == expected
    assert [{k: v for k, v in row.items() if not k.startswith("completion")} for row in rows] == lines
    assert rows[1]["prompt"] + rows[1]["completion"] == tokenizer.detokenize([8] + expected[1])   # text joins

    before = out.read_text()
    bad = tmp_path / "bad.jsonl"
    for content, argv, needle in (
            (None, ["--output-file", str(out)], "--output-file"),                 # exists, no --overwrite
            ('{"prompt_ids": [1]}\n{"prompt": 3}\n', ["--output-file", str(tmp_path / "o2")], ":2"),
            ('{"prompt_ids": [1]}\nnot json\n', ["--output-file", str(tmp_path / "o2")], ":2"),
            ('{"text": "x"}\n', ["--output-file", str(tmp_path / "o2")], ":1"),
            ('{"prompt_ids": [1, 500]}\n', ["--output-file", str(tmp_path / "o2")], ":1"),
            (None, ["--output-file", str(tmp_path / "o2"), "--top-p", "0"], "--top-p")):
        src = inp
        if content is not None:
            bad.write_text(content)
            src = bad
        r = _run_tool("--load", checkpoint, "--prompts-file", str(src), *argv, "--max-new-tokens", "2")
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert err[0].startswith("error: ") and needle in err[0], err[0]
        if content is not None and needle.startswith(":"):
            assert str(src) in err[0]
    assert out.read_text() == before and not (tmp_path / "o2").exists()
    r = _run_tool("--load", checkpoint, "--prompts-file", str(inp), "--output-file", str(out), "--overwrite",
                  "--temperature", "0", "--max-new-tokens", "2")
    assert r.returncode == 0 and out.read_text() != before, r.stderr


def test_greedy_ids_equal_transformers_generate_on_an_exported_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from megatron_ted.interop import hf_io

    cfg = transformers.AutoConfig.for_model(
        "mixtral", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=48, vocab_size=V, rope_theta=10000.0, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(8)     # sharper logits: greedy choices far from ties
    source.save_pretrained(tmp_path / "src")
    hf_io.import_hf(str(tmp_path / "src"), str(tmp_path / "ck"))
    hf_io.export_hf(str(tmp_path / "ck"), str(tmp_path / "exported"), dtype="fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float64,
                                                      experts_implementation="eager").eval()
    ours, _ = load_parallel(str(tmp_path / "ck"), dtype=torch.float64)
    new = 12
    got = generate_batch(ours, PROMPTS, SamplingConfig(vocab_size=V, max_new_tokens=new, temperature=0)).ids
    for prompt, ids in zip(PROMPTS, got):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ids == ref
    assert len(set(got[0])) > 1


def _decode_experts_with_disagreeing_routing(rank, world, fc1, fc2, x_TH, routings):
    """Each EP rank hands the decode dispatcher its own top-k (they differ on purpose, as a near tie
    broken differently by two TP groups' rounding would); returns this rank's rows."""
    from types import SimpleNamespace
    from megatron_ted.inference.decode_moe import DecodeDispatcher
    from megatron_ted.moe.experts import GroupedExperts
    from megatron_ted.parallel.layout import ParallelLayout
    groups = ParallelGroups.create(ParallelLayout(world_size=world, expert_parallel=world), rank)
    L = fc1.shape[0] // world
    experts = GroupedExperts(L, fc1.shape[1], fc1.shape[2], groups.tp).double()
    with torch.no_grad():
        experts.fc1.copy_(fc1[rank * L:(rank + 1) * L])
        experts.fc2.copy_(fc2[rank * L:(rank + 1) * L])
    dispatcher = DecodeDispatcher(SimpleNamespace(tp=groups.tp, ep=groups.ep, num_local_experts=L))
    idx_TK, weight_TK = routings[rank]
    y_TH, _ = dispatcher(x_TH, None, None, experts, topk_TK=(idx_TK, weight_TK))
    return y_TH, groups.stats.count("broadcast", "ep")


def test_decode_experts_follow_one_routing_when_ep_ranks_disagree():
    """Token t's row is sum_k w[t, k] * expert_{idx[t, k]}(x_t) of EP rank 0's routing on every EP
    rank, computed here from the full weights; without the broadcast rank 1's experts would add
    its own choices (tokens 0 and 2 would get three or one expert instead of two)."""
    from megatron_ted.tensor_parallel.mlp import activation
    g = torch.Generator().manual_seed(0)
    E, H, F, T = 4, 6, 8, 3
    fc1, fc2 = torch.randn(E, H, F, generator=g, dtype=torch.float64), torch.randn(E, F, H, generator=g,
                                                                                 dtype=torch.float64)
    x_TH = torch.randn(T, H, generator=g, dtype=torch.float64)
    rank0 = (torch.tensor([[0, 2], [1, 3], [3, 0]]), torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.55, 0.45]],
                                                                  dtype=torch.float64))
    rank1 = (torch.tensor([[1, 2], [1, 3], [2, 0]]), torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.5, 0.5]],
                                                                  dtype=torch.float64))
    expected = torch.stack([sum(w * (activation(x_TH[t] @ fc1[e], False) @ fc2[e])
                                for e, w in zip(rank0[0][t].tolist(), rank0[1][t]))
                            for t in range(T)])
    results = run_distributed(_decode_experts_with_disagreeing_routing, 2, fc1, fc2, x_TH, [rank0, rank1])
    for y_TH, broadcasts in results:
        torch.testing.assert_close(y_TH, expected, rtol=0, atol=1e-12)
        assert broadcasts == 2    # the top-k ids and weights, once each
