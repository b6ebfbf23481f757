"""Attention variants: grouped-query attention (layout invariance, K/V groups replicated over TP),
--add-qkv-bias and --qk-layernorm against Hugging Face's Qwen2 / Qwen3-MoE attention in float64,
and bad attention flags as one line.

One gloo launch (world 8) trains the tiny MoE model (EP 2, top-2 dropless) with G in {1, 2, 4}
K/V groups at TP 1, 2 and 4 (TP 4 > G 1, 2: each group held by 4 resp. 2 ranks, its gradient
summed over them), plus Qwen-style attention (GQA + qkv bias + qk-layernorm + RoPE + RMSNorm,
head dim 8 != hidden / heads) at TP 4 with and without --sequence-parallel, a sliding window
of 2 (every other layer, GQA) at TP 2, and OLMoE's qk-norm over the whole q / k projection
(--qk-layernorm-hidden-dim) at TP 4 with 2 K/V groups (q's sum of squares over 4 ranks, k's over 2
groups each held twice). Every loss of the
curve, every parameter's full gradient and the optimizer's gradient norm must match one process.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ted.model.attention import AttentionConfig, SelfAttention
from megatron_ted.parallel.groups import ParallelGroups
from parity import assert_matches, job, reference_job, run_forked, run_jobs, single_thread

STEPS = 2
MOE = dict(topk=2)
QWEN = dict(position_embedding_type="rope", normalization="RMSNorm", add_bias_linear=False,
            attention=AttentionConfig(num_query_groups=2, kv_channels=8, add_qkv_bias=True, qk_layernorm=True))
OLMOE = dict(position_embedding_type="rope", normalization="RMSNorm", add_bias_linear=False,
             attention=AttentionConfig(num_query_groups=2, qk_layernorm=True, qk_layernorm_hidden_dim=True))
# a window of 2 earlier positions, shorter than the parity runs' 8; layer 2 (1-based) keeps full attention
SWA = dict(attention=AttentionConfig(num_query_groups=2, window_size=(2, 0), window_attn_skip_freq=2))


def gqa(groups):
    return dict(attention=AttentionConfig(num_query_groups=groups))


# world 8: TP 1 runs DP 8 (micro-batch 1), TP 2 DP 4 (expert-DP 2), TP 4 DP 2 (expert-DP 1)
JOBS = ([job(tp, 2, config_kw=gqa(g), moe_kw=MOE, steps=STEPS, micro=2 if tp > 1 else 1)
         for tp in (1, 2, 4) for g in (1, 2, 4)]
        + [job(4, 2, config_kw=QWEN, moe_kw=MOE, steps=STEPS),
           job(4, 2, config_kw=QWEN, moe_kw=MOE, steps=STEPS, sequence_parallel=True),
           job(2, 2, config_kw=SWA, moe_kw=MOE, steps=STEPS),
           job(4, 2, config_kw=OLMOE, moe_kw=MOE, steps=STEPS)])


def _key(j):
    return tuple(sorted(j["config_kw"].items())), j["micro"]


@pytest.fixture(scope="module")
def runs():
    return run_forked(run_jobs, 8, JOBS)


@pytest.fixture(scope="module")
def refs():
    return single_thread(lambda: {_key(j): reference_job(dict(j, sequence_parallel=False)) for j in JOBS})


def test_gqa_layouts_match_one_process(runs, refs):
    for rank, per_rank in enumerate(runs):
        for j, res in zip(JOBS, per_rank):
            what = f"TP {j['tp']} EP 2 {j['config_kw']} SP {j['sequence_parallel']} rank {rank}"
            assert res["sizes"]["tp"] == j["tp"] and res["sizes"]["ep"] == 2, what
            ref = refs[_key(j)]
            assert_matches(res, ref, what)
            for a, b in zip(res["grad_norms"], ref["grad_norms"]):   # a shared slice counted once
                assert abs(a - b) <= 1e-12 * b, f"{what}: grad norm {a} != {b}"


def test_gqa_parameters_have_the_logical_shapes(refs):
    """K/V hold G heads of D, Q all heads (the weights Hugging Face's q/k/v_proj copy into)."""
    for g in (1, 2, 4):
        grads = refs[_key(job(config_kw=gqa(g), micro=2))]["grads"]
        if g == 4:   # one group per head: the fused multi-head layout of every checkpoint so far
            assert grads["layers.0.attention.qkv.weight"].shape == (3, 16, 16)
            assert "layers.0.attention.kv.weight" not in grads
        else:
            assert grads["layers.0.attention.q.weight"].shape == (1, 16, 16)
            assert grads["layers.0.attention.kv.weight"].shape == (2, g * 4, 16)
    grads = refs[_key(job(config_kw=QWEN, micro=2))]["grads"]
    assert grads["layers.0.attention.q.bias"].shape == (1, 32)
    assert grads["layers.0.attention.kv.bias"].shape == (2, 16)
    assert grads["layers.0.attention.q_layernorm.weight"].shape == (8,)
    assert grads["layers.0.attention.proj.weight"].shape == (16, 32)
    assert "layers.0.attention.proj.bias" not in grads
    assert all(g.abs().max() > 0 for g in grads.values())


def test_the_sliding_window_changes_the_model(refs):
    """The windowed model is another model than full attention (else its parity would not show the window)."""
    full = refs[_key(job(config_kw=gqa(2), micro=2))]["losses"][0]
    assert abs(refs[_key(job(config_kw=SWA, micro=2))]["losses"][0] - full) > 1e-6


def test_fewer_groups_change_the_model(refs):
    """G = 1, 2 and 4 are different models (else the parity above would not tell them apart)."""
    losses = {g: refs[_key(job(config_kw=gqa(g), micro=2))]["losses"][0] for g in (1, 2, 4)}
    assert len({round(v, 12) for v in losses.values()}) == 3, losses


# ---- against Hugging Face's implementations (float64, one process) -----------------------------

def _hf_attention(module, rotary, x):
    """A transformers attention module's output with its own RoPE tables, on its sdpa path with no
    mask (causal); its eager path would take the softmax in float32."""
    s = x.shape[1]
    cos, sin = rotary(x, torch.arange(s).expand(x.shape[0], s))
    return module(x, (cos, sin), None)[0]


def _ours(att: AttentionConfig, norm: str, hidden: int, heads: int, hf, x, base: float, eps: float):
    from megatron_ted.model.positions import RopeConfig, RotaryEmbedding
    ours = SelfAttention(hidden, heads, ParallelGroups.single().tp, bias=False, config=att, norm=norm,
                         eps=eps).double()
    with torch.no_grad():   # Hugging Face's q/k/v_proj copy over as they are
        ours.q.weight[0].copy_(hf.q_proj.weight)
        ours.kv.weight[0].copy_(hf.k_proj.weight)
        ours.kv.weight[1].copy_(hf.v_proj.weight)
        ours.proj.weight.copy_(hf.o_proj.weight)
        if att.add_qkv_bias:
            ours.q.bias[0].copy_(hf.q_proj.bias)
            ours.kv.bias[0].copy_(hf.k_proj.bias)
            ours.kv.bias[1].copy_(hf.v_proj.bias)
        if att.qk_layernorm:
            ours.q_layernorm.weight.copy_(hf.q_norm.weight)
            ours.k_layernorm.weight.copy_(hf.k_norm.weight)
    s = x.shape[1]
    rotary = RotaryEmbedding(ours.head_dim, RopeConfig(base=base))(torch.arange(s).expand(x.shape[0], s))
    return ours(x, rotary)


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def test_qwen2_attention_matches_transformers():
    """GQA (4 heads, 2 K/V groups, head dim 8 at hidden 24) + qkv bias + RoPE (base 1e6) = Qwen2Attention."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
    config = Qwen2Config(hidden_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attn_implementation="sdpa")
    hf = Qwen2Attention(config, layer_idx=0).double().eval()
    _randomise(hf, 0)
    x = torch.randn(2, 7, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = _hf_attention(hf, Qwen2RotaryEmbedding(config), x)
    got = _ours(AttentionConfig(num_query_groups=2, kv_channels=8, add_qkv_bias=True), "RMSNorm", 24, 4, hf, x,
                1e6, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_qk_layernorm_matches_qwen3_moe_attention():
    """--qk-layernorm (RMSNorm over each head's dim, before RoPE) = Qwen3MoeAttention's q_norm/k_norm.
    Its RMSNorm computes in float32 whatever the input: float32 tolerances."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding
    config = Qwen3MoeConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                            rms_norm_eps=1e-6, attention_bias=False, attn_implementation="sdpa",
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = Qwen3MoeAttention(config, layer_idx=0).double().eval()
    _randomise(hf, 2)
    with torch.no_grad():   # norm weights near 1, as trained ones are
        hf.q_norm.weight.add_(1.0)
        hf.k_norm.weight.add_(1.0)
    x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = _hf_attention(hf, Qwen3MoeRotaryEmbedding(config), x)
    att = AttentionConfig(num_query_groups=1, kv_channels=8, qk_layernorm=True)
    got = _ours(att, "RMSNorm", 16, 4, hf, x, 10000.0, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    without = _ours(AttentionConfig(num_query_groups=1, kv_channels=8), "RMSNorm", 16, 4, hf, x, 10000.0, 1e-6)
    assert (without - want).abs().max() > 1e-2   # the norm matters at these weights


# ---- sliding window ----------------------------------------------------------------------------

def _masked_softmax_attention(att: SelfAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """The attention written out: scores q.k / sqrt(D), -inf outside keys i - window .. i, softmax, @ v."""
    q, k, v = att._project(x)                                     # [B, heads, S, D], [B, groups, S, D]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / att.head_dim ** 0.5
    s = x.shape[1]
    for i in range(s):
        for j in range(s):
            if not i - window <= j <= i:
                scores[..., i, j] = float("-inf")
    out = torch.softmax(scores, -1) @ v                           # [B, heads, S, D]
    return att.proj(out.transpose(1, 2).reshape(x.shape[0], s, -1))


@pytest.mark.parametrize("window", [0, 3, 9])
def test_sliding_window_equals_a_masked_softmax_reference(window):
    """GQA, float64, 10 positions; window 9 = every earlier position (the mask-free causal path)."""
    att = SelfAttention(24, 4, ParallelGroups.single().tp, bias=False, config=AttentionConfig(num_query_groups=2),
                        window=window).double()
    _randomise(att, 5)
    x = torch.randn(2, 10, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(att(x), _masked_softmax_attention(att, x, window), rtol=0, atol=1e-12)


def test_window_attn_skip_freq_picks_megatrons_full_layers():
    """Megatron-LM: an int N leaves its 1-based layers N, 2N, ... full; a list says 1 for windowed."""
    every_third = AttentionConfig(window_size=(4, 0), window_attn_skip_freq=3)
    assert [every_third.window_of(i) for i in range(6)] == [4, 4, None, 4, 4, None]
    listed = AttentionConfig(window_size=(4, 0), window_attn_skip_freq=(0, 1, 1))
    assert [listed.window_of(i) for i in range(3)] == [None, 4, 4]


# ---- flags -------------------------------------------------------------------------------------

BASE = ["--mock-data", "--vocab-size", "100", "--micro-batch-size", "1", "--train-iters", "1", "--num-layers", "2", "--hidden-size", "48"]


def _parse(*argv, world=4):
    from megatron_ted.training.arguments import parse_args
    return parse_args(BASE + list(argv), world_size=world)


@pytest.mark.parametrize("argv, flag", [
    (["--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "3"], "--num-query-groups 3"),
    (["--num-attention-heads", "12", "--group-query-attention", "--num-query-groups", "3",
      "--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2"),
    (["--num-attention-heads", "4", "--kv-channels", "0"], "--kv-channels"),
    (["--num-attention-heads", "5"], "--kv-channels"),   # 48 / 5: no head dim without --kv-channels
    (["--num-attention-heads", "4", "--window-size", "4,4"], "--window-size 4,4: the right window must be 0"),
    (["--num-attention-heads", "4", "--window-size", "4"], "--window-size '4' takes two integers"),
    (["--num-attention-heads", "4", "--window-size", "4,0", "--window-attn-skip-freq", "[1,0,1]"],
     "--window-attn-skip-freq '[1,0,1]' has 3 entries"),
    (["--num-attention-heads", "4", "--window-attn-skip-freq", "2"], "--window-attn-skip-freq needs --window-size"),
    (["--num-attention-heads", "4", "--window-size", "4,0", "--multi-latent-attention", "--kv-lora-rank", "8",
      "--position-embedding-type", "rope"], "--window-size with --multi-latent-attention"),
    (["--num-attention-heads", "4", "--qk-layernorm-hidden-dim"], "--qk-layernorm-hidden-dim needs --qk-layernorm"),
    (["--num-attention-heads", "4", "--qk-layernorm", "--qk-layernorm-hidden-dim"],
     "--qk-layernorm-hidden-dim needs --normalization RMSNorm"),
])
def test_bad_attention_flags_are_one_line(argv, flag):
    with pytest.raises(ValueError) as err:
        _parse(*argv)
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_attention_flags_reach_the_model():
    from megatron_ted.config.from_flags import model_config_from_flags
    args = _parse("--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
                  "--kv-channels", "16", "--add-qkv-bias", "--qk-layernorm", "--norm-epsilon", "1e-6",
                  "--position-embedding-type", "rope", "--no-position-embedding", "--disable-bias-linear")
    config = model_config_from_flags(args, 128).gpt
    assert config.attention == AttentionConfig(num_query_groups=2, kv_channels=16, add_qkv_bias=True,
                                               qk_layernorm=True)
    assert config.layernorm_epsilon == 1e-6 and not config.add_position_embedding
    full = model_config_from_flags(_parse("--num-attention-heads", "4", "--qk-layernorm", "--qk-layernorm-hidden-dim",
                                          "--normalization", "RMSNorm"), 128).gpt.attention
    assert full.qk_layernorm and full.qk_layernorm_hidden_dim
    windowed = model_config_from_flags(_parse("--num-attention-heads", "4", "--window-size", "(7,0)",
                                              "--window-attn-skip-freq", "([1]*1+[0])"), 128).gpt.attention
    assert (windowed.window_size, windowed.window_attn_skip_freq) == ((7, 0), (1, 0))
    unbounded = model_config_from_flags(_parse("--num-attention-heads", "4", "--window-size=-1,0"), 128).gpt
    assert unbounded.attention.window_size is None   # Megatron-LM's -1: no window
    # Megatron-LM ignores --num-query-groups without --group-query-attention: multi-head attention
    config = model_config_from_flags(_parse("--num-attention-heads", "4", "--num-query-groups", "2"), 128).gpt
    assert config.attention.num_query_groups is None


def test_no_position_embedding_drops_the_learned_table():
    from megatron_ted.model.builder import build_gpt
    from parity import tiny_config
    g = ParallelGroups.single()
    names = {n for n, _ in build_gpt(tiny_config(add_position_embedding=False), None, g, 1).named_parameters()}
    assert "position_embedding.weight" not in names
    assert "position_embedding.weight" in {n for n, _ in build_gpt(tiny_config(), None, g, 1).named_parameters()}


def test_flops_count_the_smaller_kv_projections():
    """Llama-2-70B-like attention (H 8192, 64 heads of 128, 8 K/V groups), seq 4096, per token
    forward: q and output projections 2 * 2 * H * H, k and v 2 * 2 * H * (8 * 128), scores and
    values 2 * 2 * S * H."""
    from megatron_ted.config.from_flags import configs_from_args
    from megatron_ted.planning.flops import flops_per_token_of_model
    h, s = 8192, 4096
    args = _parse("--num-attention-heads", "64", "--group-query-attention", "--num-query-groups", "8",
                  "--seq-length", str(s), "--hidden-size", str(h), "--num-layers", "1", world=1)
    args.padded_vocab_size = 128
    attention = 2 * 2 * h * h + 2 * 2 * h * 1024 + 2 * 2 * s * h
    mlp, logits = 2 * 2 * h * args.ffn_hidden_size, 2 * h * 128
    assert flops_per_token_of_model(configs_from_args(args).model, s) == 3 * (attention + mlp + logits)
