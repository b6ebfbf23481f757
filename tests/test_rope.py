"""RoPE options against hand-computed rotations and Hugging Face's RoPE parameter functions."""
import math

import pytest
import torch

from megatron_ted.model.positions import RopeConfig, RotaryEmbedding, apply_rotary
from megatron_ted.training.arguments import parse_args

BASE_ARGS = ["--mock-data", "--vocab-size", "64", "--num-layers", "1", "--hidden-size", "32",
             "--num-attention-heads", "4", "--position-embedding-type", "rope"]


def rotate_by_hand(x, positions, rot_dim, base):
    """Pairs (i, i + rot_dim/2) of the first rot_dim dims turned by position * base^(-2i/rot_dim)."""
    out = x.clone()
    half = rot_dim // 2
    for s, p in enumerate(positions):
        for i in range(half):
            angle = p * base ** (-2 * i / rot_dim)
            a, b = x[..., s, i], x[..., s, i + half]
            out[..., s, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., s, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


@pytest.mark.parametrize("percent,base", [(1.0, 10000.0), (0.5, 500.0), (0.25, 10000.0)])
def test_rotary_percent_and_base_match_hand_rotation(percent, base):
    head_dim, positions = 16, [3, 11]
    rope = RotaryEmbedding(head_dim, RopeConfig(base=base, percent=percent))
    x = torch.randn(2, 3, len(positions), head_dim, dtype=torch.float64)
    cos, sin = rope(torch.tensor([positions, positions]))
    got = apply_rotary(x, cos.double(), sin.double())
    want = rotate_by_hand(x, positions, int(head_dim * percent), base)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)   # the tables are float32
    if percent < 1:   # the dims past the rotated ones pass through untouched
        assert torch.equal(got[..., int(head_dim * percent):], x[..., int(head_dim * percent):])


def test_default_tables_are_plain_rope():
    rope = RotaryEmbedding(8)
    torch.testing.assert_close(rope.inv_freq, 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), rtol=0, atol=0)
    assert rope.attention_factor == 1.0


def _hf_config(**rope_parameters):
    from transformers import DeepseekV3Config
    return DeepseekV3Config(hidden_size=32, num_attention_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=8,
                            v_head_dim=8, max_position_embeddings=640, rope_parameters=rope_parameters)


@pytest.mark.parametrize("factor,mscale,mscale_all_dim,beta_fast,original", [
    (40.0, 1.0, 1.0, 32.0, 4096),       # DeepSeek-V3
    (40.0, 0.707, 0.707, 32.0, 4096),   # DeepSeek-V2-Lite
    (4.0, 1.0, 0.0, 16.0, 64),          # a ramp inside the head dim, mscale_all_dim off
])
def test_yarn_matches_hugging_face(factor, mscale, mscale_all_dim, beta_fast, original):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale
    params = dict(rope_type="yarn", rope_theta=10000.0, factor=factor, mscale=mscale, mscale_all_dim=mscale_all_dim,
                  beta_fast=beta_fast, beta_slow=1.0, original_max_position_embeddings=original)
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(**params))
    cfg = RopeConfig(rope_type="yarn", scaling_factor=factor, mscale=mscale, mscale_all_dim=mscale_all_dim,
                     beta_fast=beta_fast, original_max_position_embeddings=original)
    ours = RotaryEmbedding(16, cfg)
    assert not torch.equal(ours.inv_freq, RotaryEmbedding(16).inv_freq)
    torch.testing.assert_close(ours.inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    assert ours.attention_factor == pytest.approx(hf_attention_factor, rel=1e-12)
    assert cfg.softmax_scale_factor() == pytest.approx(yarn_apply_mscale(params, 1.0), rel=1e-12)


def test_llama3_scaling_matches_hugging_face():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                     rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192))
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    ours = RotaryEmbedding(128, RopeConfig(base=500000.0, llama3_scaling_factor=8.0))
    torch.testing.assert_close(ours.inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    assert not torch.equal(ours.inv_freq, RotaryEmbedding(128, RopeConfig(base=500000.0)).inv_freq)


@pytest.mark.parametrize("extra,flag", [
    (["--rotary-percent", "0"], "--rotary-percent"),
    (["--rotary-percent", "1.5"], "--rotary-percent"),
    (["--rotary-scaling-factor", "4"], "--rope-type yarn"),
    (["--rope-type", "yarn", "--use-rope-scaling"], "--use-rope-scaling"),
])
def test_bad_rope_flags_are_one_line(extra, flag):
    with pytest.raises(ValueError, match=flag) as err:
        parse_args(BASE_ARGS + extra, world_size=1)
    assert "\n" not in str(err.value)
