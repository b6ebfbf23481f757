"""Multi-latent attention against transformers' DeepseekV3Attention on the same weights (float64).

The Hugging Face model stores the rope dims of q and k interleaved (`rope_interleave=True`, as
DeepSeek's checkpoints); ours rotates halves, so the weight mapping below permutes those rows, as an
importer must (model/mla.py). Hugging Face computes its RMSNorms and cos/sin tables in float32
whatever the input dtype, hence errors of float32's order (relative to the largest entry).
"""
import pytest
import torch

from megatron_ted.model.mla import MLAConfig, MultiLatentAttention
from megatron_ted.model.positions import RopeConfig, RotaryEmbedding
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.arguments import parse_args

HIDDEN, HEADS, NOPE, ROPE, V, KV_RANK, SEQ = 32, 4, 8, 6, 10, 12, 7


def deinterleave(rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The last rope_dim rows of `rows` [..., d, in] reordered from pairs (0,1),(2,3).. to halves."""
    perm = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    out = rows.clone()
    out[..., -rope_dim:, :] = rows[..., -rope_dim:, :][..., perm, :]
    return out


def q_rows(w: torch.Tensor) -> torch.Tensor:
    """HF's q projection [heads * (nope + rope), in] -> ours [1, same], rope rows of each head de-interleaved."""
    per_head = deinterleave(w.view(HEADS, NOPE + ROPE, -1), ROPE)
    return per_head.reshape(1, HEADS * (NOPE + ROPE), -1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


def load_hf_weights(ours: MultiLatentAttention, hf) -> None:
    with torch.no_grad():
        if hf.q_lora_rank is None:
            ours.q_proj.weight.copy_(q_rows(hf.q_proj.weight))
        else:
            ours.q_a_proj.weight.copy_(hf.q_a_proj.weight)
            ours.q_a_layernorm.weight.copy_(hf.q_a_layernorm.weight)
            ours.q_b_proj.weight.copy_(q_rows(hf.q_b_proj.weight))
        ours.kv_a_proj_with_mqa.weight.copy_(deinterleave(hf.kv_a_proj_with_mqa.weight, ROPE))
        ours.kv_a_layernorm.weight.copy_(hf.kv_a_layernorm.weight)
        ours.kv_b_proj.weight.copy_(hf.kv_b_proj.weight.unsqueeze(0))
        ours.o_proj.weight.copy_(hf.o_proj.weight)


@pytest.mark.parametrize("q_lora_rank,yarn", [(None, False), (16, False), (16, True), (None, True)])
def test_mla_matches_deepseek_v3_attention(q_lora_rank, yarn):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    torch.manual_seed(0)
    rope_parameters = dict(rope_type="default", rope_theta=1000.0)
    rope = RopeConfig(base=1000.0)
    if yarn:   # DeepSeek-V2-Lite's YaRN settings, its ramp moved inside this tiny rope dim
        rope_parameters = dict(rope_type="yarn", rope_theta=1000.0, factor=40.0, mscale=0.707, mscale_all_dim=0.707,
                               beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=512)
        rope = RopeConfig(base=1000.0, rope_type="yarn", scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707,
                          original_max_position_embeddings=512)
    config = DeepseekV3Config(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                              q_lora_rank=q_lora_rank, kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE,
                              qk_rope_head_dim=ROPE, v_head_dim=V, max_position_embeddings=20480, rms_norm_eps=1e-6,
                              rope_parameters=rope_parameters, rope_interleave=True, attention_bias=False)
    config._attn_implementation = "eager"
    hf = DeepseekV3Attention(config, layer_idx=0).double()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    ours = MultiLatentAttention(HIDDEN, HEADS, MLAConfig(KV_RANK, NOPE, ROPE, V, q_lora_rank), ParallelGroups.single().tp,
                                bias=False, eps=1e-6, softmax_scale_factor=rope.softmax_scale_factor()).double()
    load_hf_weights(ours, hf)

    x = torch.randn(2, SEQ, HIDDEN, dtype=torch.float64)
    positions = torch.arange(100, 100 + SEQ).expand(2, SEQ)   # far positions: the rotation matters
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    mask = torch.full((SEQ, SEQ), float("-inf"), dtype=torch.float64).triu(1).expand(2, 1, SEQ, SEQ)
    want, _ = hf(x_hf, DeepseekV3RotaryEmbedding(config)(x_hf, positions), mask)
    cos, sin = RotaryEmbedding(ROPE, rope)(positions)
    got = ours(x_ours, (cos.double(), sin.double()))
    assert relative_error(got, want) < 1e-6
    got.square().sum().backward()
    want.square().sum().backward()
    assert relative_error(x_ours.grad, x_hf.grad) < 1e-6


BASE = ["--mock-data", "--vocab-size", "64", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
        "--position-embedding-type", "rope", "--multi-latent-attention", "--kv-lora-rank", "8"]


@pytest.mark.parametrize("argv,world,flag", [
    (["--mock-data", "--vocab-size", "64", "--multi-latent-attention", "--position-embedding-type", "rope"], 1,
     "--kv-lora-rank"),
    (BASE[:-5] + BASE[-3:], 1, "--position-embedding-type rope"),
    (BASE + ["--qk-pos-emb-head-dim", "5"], 1, "--qk-pos-emb-head-dim"),
    (BASE + ["--rotary-percent", "0.5"], 1, "--rotary-percent"),
    (BASE + ["--num-attention-heads", "6", "--hidden-size", "48", "--tensor-model-parallel-size", "4"], 4,
     "--num-attention-heads"),
    (BASE + ["--q-lora-rank", "0"], 1, "--q-lora-rank"),
])
def test_bad_mla_flags_are_one_line(argv, world, flag):
    with pytest.raises(ValueError, match=flag) as err:
        parse_args(argv, world_size=world)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_flops_formula_counts_the_module(q_lora_rank):
    """torch's FLOP counter over one forward (matmuls and SDPA's full S x S) = the analytic count."""
    from torch.utils.flop_counter import FlopCounterMode
    from megatron_ted.planning.flops import mla_flops_per_token
    mla = MLAConfig(KV_RANK, NOPE, ROPE, V, q_lora_rank)
    module = MultiLatentAttention(HIDDEN, HEADS, mla, ParallelGroups.single().tp, bias=False)
    x, positions = torch.randn(2, SEQ, HIDDEN), torch.arange(SEQ).expand(2, SEQ)
    rotary = RotaryEmbedding(ROPE)(positions)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x, rotary)
    assert counter.get_total_flops() == mla_flops_per_token(HIDDEN, SEQ, HEADS, mla) * 2 * SEQ


def test_training_flops_of_flags_count_mla():
    """The FLOPs of a run's flags (MFU logging, dry run) swap the classic attention for MLA's."""
    from megatron_ted.config.from_flags import configs_from_args
    from megatron_ted.planning.flops import attention_flops_per_token, flops_per_token_of_model, mla_flops_per_token
    plain = parse_args(BASE[:-3], world_size=1)
    args = parse_args(BASE + ["--q-lora-rank", "16"], world_size=1)
    plain.padded_vocab_size = args.padded_vocab_size = 128   # set by the trainer from the tokenizer
    mla = MLAConfig(8, 128, 64, 128, 16)   # Megatron's head-dim defaults
    per_layer = mla_flops_per_token(32, args.seq_length, 4, mla) - attention_flops_per_token(32, args.seq_length)
    f = [flops_per_token_of_model(configs_from_args(a).model, a.seq_length) for a in (args, plain)]
    assert f[0] - f[1] == pytest.approx(3 * per_layer)
