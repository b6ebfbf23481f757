"""--dry-run: parameter counts from shapes equal built models', the memory model equals what the
trainer allocates, the 128-rank report of the 40B recipe, and bad input as one line."""
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_ted.model.builder import MoEConfig, build_gpt
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.model.attention import AttentionConfig
from megatron_ted.model.mla import MLAConfig
from megatron_ted.planning.param_count import count_parameters, parameter_shapes
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.comm import CommStats, Group
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.sharding import full_shape, spec_of
from megatron_ted.planning.memory import memory_per_gpu
from megatron_ted.training.grad_sync import GradientSync
from reference_adamw import MixedPrecisionAdamW
from megatron_ted.launch.pretrain import main

CONFIGS = {
    "moe-every-2nd": (dict(), dict(layer_freq=2)),
    "moe-every-layer-swiglu-untied": (dict(swiglu=True, untie_embeddings_and_output_weights=True), dict(layer_freq=1)),
    "moe-every-3rd-rope-rmsnorm-nobias": (dict(position_embedding_type="rope", normalization="RMSNorm",
                                               add_bias_linear=False, num_layers=4), dict(layer_freq=3, ffn=24)),
    "dense": (dict(swiglu=True), None),
    # grouped-query attention: one K/V group (replicated at TP 2, 4), head dim 8 != 16 / 4, qkv bias, RMS qk norm
    "moe-gqa1-qwen": (dict(attention=AttentionConfig(num_query_groups=1, kv_channels=8, add_qkv_bias=True,
                                                     qk_layernorm=True), normalization="RMSNorm",
                           add_bias_linear=False, position_embedding_type="rope"), dict(layer_freq=2)),
    "dense-gqa2-layernorm-qknorm-nope": (dict(attention=AttentionConfig(num_query_groups=2, qk_layernorm=True),
                                              add_position_embedding=False), None),
    "dense-mha-kv-channels": (dict(attention=AttentionConfig(kv_channels=8)), None),
    "mla-q-latent-moe": (dict(position_embedding_type="rope", normalization="RMSNorm", hidden_size=32,
                              mla=MLAConfig(kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=2, v_head_dim=6,
                                            q_lora_rank=12)), dict(layer_freq=2)),
    "mla-plain-q-dense-nobias": (dict(position_embedding_type="rope", add_bias_linear=False,
                                      mla=MLAConfig(kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=2,
                                                    v_head_dim=6)), None),
}


def build_config(config_kw, moe_kw):
    kw = dict(vocab_size=128, hidden_size=16, num_layers=3, num_attention_heads=4, ffn_hidden_size=32,
              max_position_embeddings=12)
    kw.update(config_kw)
    moe = None
    if moe_kw is not None:
        moe = MoEConfig(RouterConfig(num_experts=4, topk=2), ffn_hidden_size=moe_kw.get("ffn", 40),
                        layer_freq=moe_kw["layer_freq"])
    return GPTConfig(**kw), moe


def fake_groups(tp: int, ep: int, tp_rank: int, ep_rank: int):
    """Groups of the right sizes and this rank's indices, no processes: building and initializing a
    model needs only sizes and ranks."""
    stats = CommStats()
    return SimpleNamespace(tp=Group("tp", tuple(range(tp)), tp_rank, None, stats),
                           ep=Group("ep", tuple(range(ep)), ep_rank, None, stats),
                           dp=Group.single("dp", stats))  # the MoE router takes DP (global aux loss only)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 4), (2, 2), (4, 2)])
def test_parameter_counts_equal_the_built_model(name, tp, ep):
    config_kw, moe_kw = CONFIGS[name]
    if moe_kw is None and ep > 1:
        pytest.skip("a dense model has no expert parallelism")
    config, moe = build_config(config_kw, moe_kw)
    shapes = {s.name: s for s in parameter_shapes(config, moe)}
    counts = count_parameters(config, moe, tp, ep)
    for tp_rank, ep_rank in {(0, 0), (tp - 1, ep - 1)}:
        groups = fake_groups(tp, ep, tp_rank, ep_rank)
        model = build_gpt(*build_config(config_kw, moe_kw), groups, seed=1)
        params = dict(model.named_parameters())
        assert params.keys() == shapes.keys()
        for pname, p in params.items():
            spec, s = spec_of(p), shapes[pname]
            assert (spec.tp_dim, spec.expert) == (s.tp_dim, s.expert), pname
            assert full_shape(p.shape, spec, groups.tp, groups.ep) == s.shape, pname
            assert tuple(p.shape) == s.local_shape(tp, ep), pname
        assert sum(p.numel() for p in params.values()) == counts.per_rank
        assert sum(p.numel() for p in params.values() if spec_of(p).expert) == counts.expert_per_rank
    logical = sum(math.prod(full_shape(p.shape, spec_of(p), groups.tp, groups.ep)) for p in params.values())
    assert logical == counts.total
    if moe is None:
        assert counts.expert == counts.expert_per_rank == 0


@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "bf16"), (torch.float16, "fp16"),
                                             (torch.float32, "fp32")])
def test_memory_model_equals_what_the_trainer_allocates(dtype, precision):
    """Weights, GradientSync's fp32 main grads and the optimizer's master + Adam states, counted in
    bytes after a real optimizer step, are what the dry run predicts."""
    config, moe = build_config(*CONFIGS["moe-every-layer-swiglu-untied"])
    groups = ParallelGroups.single()
    model = build_gpt(config, moe, groups, seed=1).to(dtype)
    sync = GradientSync(model, groups.dp, groups.expert_dp)
    opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=1e-3, weight_decay=0.1)
    for p in model.parameters():
        p.main_grad.normal_()
    applied, _ = opt.step(1e-3)
    assert applied
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(b.flat.numel() * b.flat.element_size() for b in sync.buckets)
    optim = 0
    for p, m in zip(opt.params, opt.master):
        if m is not p:
            optim += m.numel() * m.element_size()
        optim += sum(opt.optimizer.state[m][k].numel() * opt.optimizer.state[m][k].element_size()
                     for k in ("exp_avg", "exp_avg_sq"))
    mem = memory_per_gpu(count_parameters(config, moe), ParallelLayout(1), precision)
    assert (mem.weights, mem.gradients, mem.optimizer_replicated) == (weights, grads, optim)
    assert mem.optimizer_distributed == mem.optimizer_replicated  # DP = expert-DP = 1


def test_distributed_optimizer_splits_dense_over_dp_and_experts_over_expert_dp():
    config, moe = build_config(*CONFIGS["moe-every-2nd"])
    layout = ParallelLayout(16, tensor_parallel=2, expert_parallel=4)     # DP 8, expert-DP 2
    c = count_parameters(config, moe, 2, 4)
    mem = memory_per_gpu(c, layout, "fp16")
    assert mem.optimizer_replicated == 12 * c.per_rank
    assert mem.optimizer_distributed == 12 * (math.ceil(c.dense_per_rank / 8) + math.ceil(c.expert_per_rank / 2))


RECIPE_40B = ["--num-layers", "20", "--hidden-size", "5120", "--num-attention-heads", "40", "--seq-length", "2048",
              "--num-experts", "16", "--moe-layer-freq", "2", "--moe-router-topk", "1",
              "--moe-expert-capacity-factor", "1.0", "--moe-min-capacity", "4", "--moe-aux-loss-coeff", "0.01",
              "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "16",
              "--micro-batch-size", "4", "--global-batch-size", "2048", "--fp16",
              "--recompute-granularity", "full", "--recompute-method", "uniform", "--use-distributed-optimizer",
              "--lr", "1.2e-4", "--min-lr", "1.2e-5", "--vocab-size", "50256"]


def expected_40b_total(layers, h, vocab=50304, positions=2048, experts=16, moe_layers=None):
    """Closed form: embeddings, attention (+ biases), two LayerNorms per layer, dense MLPs in odd
    layers, router + experts (no biases) in even layers, the final LayerNorm."""
    f = 4 * h
    moe_layers = layers // 2 if moe_layers is None else moe_layers
    per_layer = 4 * h * h + 4 * h + 4 * h
    dense_mlp = 2 * h * f + f + h
    moe_mlp = experts * h + experts * 2 * h * f
    return (vocab + positions) * h + layers * per_layer + (layers - moe_layers) * dense_mlp \
        + moe_layers * moe_mlp + 2 * h


def parse_report(text: str) -> dict:
    total = re.search(r"^  total +([\d,]+)", text, re.M).group(1)
    per_gpu = re.search(r"^  total +[\d,]+ \([\d.]+B\) +([\d,]+)", text, re.M).group(1)
    return {"total": int(total.replace(",", "")), "per_gpu": int(per_gpu.replace(",", ""))}


def test_dry_run_of_the_40b_recipe_on_128_ranks(capsys):
    rc = main(RECIPE_40B + ["--dry-run", "--world-size", "128", "--gpus-per-node", "8"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    assert not dist.is_initialized()
    assert "world 128: TP 2, DP 64, EP 16, expert-DP 4, order tp-ep-dp" in out
    assert re.search(r"^ +127 +1 +63 +15 +3 +15$", out, re.M)                  # last rank: its coords, node 15
    assert "TP: 64 groups of 2, e.g. [0,1] [2,3] ...; each inside one node" in out
    assert "DP: 2 groups of 64, e.g. [0,2,...,126] [1,3,...,127]; each spans 16 nodes" in out
    assert "EP: 8 groups of 16, e.g. [0,2,...,30] [1,3,...,31] ...; each spans 4 nodes" in out
    assert "expert-DP: 32 groups of 4, e.g. [0,32,64,96] [1,33,65,97] ...; each spans 4 nodes" in out
    assert "global batch 2048" in out and "8 micro-batches" in out
    counts = parse_report(out)
    assert counts["total"] == expected_40b_total(20, 5120)
    assert 38e9 < counts["total"] < 41e9
    c = count_parameters(*_model_of_recipe(20, 5120, 40), tp=2, ep=16)
    assert counts["per_gpu"] == c.per_rank
    assert re.search(r"weights \(fp16\) +6\.12 +6\.12", out)
    assert "applies: distributed (--use-distributed-optimizer" in out


def _model_of_recipe(layers, hidden, heads):
    config = GPTConfig(vocab_size=50304, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                       ffn_hidden_size=4 * hidden, max_position_embeddings=2048)
    return config, MoEConfig(RouterConfig(num_experts=16, topk=1), 4 * hidden, 2)


def test_dry_run_of_the_gpt3_shape(capsys):
    argv = RECIPE_40B + ["--dry-run", "--world-size", "128"]
    argv[1], argv[3], argv[5] = "32", "4096", "32"
    assert main(argv) == 0
    counts = parse_report(capsys.readouterr().out)
    assert counts["total"] == expected_40b_total(32, 4096)
    assert 38e9 < counts["total"] < 41e9


@pytest.mark.parametrize("extra,flag", [
    (["--world-size", "100"], "--expert-model-parallel-size 16 does not divide the data-parallel size 50"),
    (["--world-size", "127"], "--tensor-model-parallel-size 2 does not divide the world size 127"),
    (["--world-size", "128", "--global-batch-size", "100"], "--global-batch-size"),
    (["--world-size", "128", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["--world-size", "128", "--data-path", "no/such/prefix"], "--data-path no/such/prefix"),
    (["--world-size", "128", "--mock-data", "--data-path", "x"], "--mock-data and --data-path"),
])
def test_bad_dry_run_is_one_line(capsys, extra, flag):
    assert main(RECIPE_40B + ["--dry-run"] + extra) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err
    assert not dist.is_initialized()


@pytest.mark.parametrize("variant", [
    dict(mlp_type="residual", experts_per_layer=(2, 4), enable_expert_bias=True, topk=1),
    dict(router_type="hash", topk=1, vocab_size=128),
    dict(mlp_type="residual", topk=1, shared_expert_size=24, shared_expert_gate=True),
])
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 2)])
def test_parameter_shapes_of_moe_variants_equal_the_built_model(variant, tp, ep):
    """Residual and pyramid MoE, expert bias, hash routing, gated shared experts: every name and
    shard shape."""
    from parity import tiny_config, tiny_moe
    from megatron_ted.model.builder import build_gpt
    from megatron_ted.planning.param_count import parameter_shapes
    config, moe = tiny_config(), tiny_moe(**variant)
    shapes = {s.name: s for s in parameter_shapes(config, moe)}
    for tp_rank in range(tp):
        for ep_rank in range(ep):
            model = build_gpt(tiny_config(), tiny_moe(**variant), fake_groups(tp, ep, tp_rank, ep_rank), seed=1)
            built = {n: tuple(p.shape) for n, p in model.named_parameters()}
            assert built.keys() == shapes.keys()
            for n, shape in built.items():
                assert shapes[n].local_shape(tp, ep) == shape, n


def test_dry_run_prints_per_stage_memory_with_pipeline(capsys):
    """PP 2 on the 40B recipe: one line per stage; the stages' parameters add up to the unsplit
    model's per GPU plus the last stage's tied embedding copy (V/TP x H); 1F1B keeps 2 micro-batches
    in flight on the first stage, 1 on the last."""
    assert main(RECIPE_40B + ["--dry-run", "--world-size", "128", "--pipeline-model-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    stages = re.findall(r"^  stage (\d): layers (\d+)-(\d+), ([\d,]+).* (\d+) micro-batches in flight", out, re.M)
    assert [(s, a, b, k) for s, a, b, _, k in stages] == [("0", "0", "9", "2"), ("1", "10", "19", "1")]
    whole = count_parameters(*_model_of_recipe(20, 5120, 40), tp=2, ep=16).per_rank
    assert sum(int(n.replace(",", "")) for *_, n, _ in stages) == whole + 50304 // 2 * 5120


SMALL = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128 "
         "--micro-batch-size 2 --global-batch-size 16 --lr 1e-4 --vocab-size 1000 --dry-run --world-size 8").split()


@pytest.mark.parametrize("extra,line", [
    # selective recompute has no method and no chunk of layers
    ("--num-experts 8 --expert-model-parallel-size 4 --recompute-granularity selective",
     "activation recomputation: selective;"),
    # Pyramid-MoE (4 experts in layer 0, 8 in layer 2) over EP 2: 2 and 4 experts per GPU
    ("--num-experts 4 8 --moe-layer-freq 2 --expert-model-parallel-size 2",
     "(2/4 of 4/8 experts per GPU by MoE layer, each sliced over TP 1)"),
])
def test_dry_run_of_selective_recompute_and_pyramid_moe(capsys, extra, line):
    assert main(SMALL + extra.split()) == 0
    assert line in capsys.readouterr().out
