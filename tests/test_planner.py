"""The planner (megatron_ted/planning, tools/plan_ted.py): parameter counts equal built models',
activation memory equals counted CPU allocations of real forward/backward passes, communication
bytes equal CommStats of real gloo runs, only valid layouts are enumerated, the ranking respects
memory and node boundaries, and bad input is one line."""
import gc
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_ted.model.attention import AttentionConfig
from megatron_ted.model.builder import MoEConfig, build_gpt
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.model.mla import MLAConfig
from megatron_ted.planning.param_count import count_parameters
from megatron_ted.parallelize.recompute import RecomputeConfig, apply_recompute
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.planning.comm import micro_batch_comm, total_bytes
from megatron_ted.planning.memory import Workload, activation_memory, workload_of
from megatron_ted.launch.plan import search
from megatron_ted.planning.throughput import Cluster
from megatron_ted.training.arguments import build_parser
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.measured_memory import allocation_levels
from tests.multiproc import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "tools", "plan_ted.py")
SBATCH = os.path.join(ROOT, "scripts", "slurm", "pretrain_40b.sbatch")
B, S, V, H = 2, 32, 256, 32


def tiny(moe=True, swiglu=False, layers=4, freq=2, shared=None, gate=False, mla=None, attention=None):
    """mla: an MLAConfig (multi-latent attention, RoPE); attention: an AttentionConfig (GQA, head dim)."""
    config = GPTConfig(vocab_size=V, hidden_size=H, num_layers=layers, num_attention_heads=4, ffn_hidden_size=4 * H,
                       max_position_embeddings=S, swiglu=swiglu, mla=mla, attention=attention or AttentionConfig(),
                       position_embedding_type="rope" if mla else "learned")
    moe_config = MoEConfig(RouterConfig(num_experts=4, topk=2), ffn_hidden_size=3 * H, layer_freq=freq,
                           shared_expert_size=shared, shared_expert_gate=gate) if moe else None
    return config, moe_config


def measure(config, moe, groups, recompute=None, n=1, cac=False):
    """(saved bytes after forward, peak bytes of forward + backward), counted CPU allocations.

    Full recompute: checkpoint stashes the CPU RNG state of every chunk (a 5 KB CPU tensor; on a
    GPU run it lives in host memory, outside what the model predicts): taken out of the count."""
    torch.manual_seed(0)
    model = build_gpt(config, moe, groups, seed=1)
    if recompute:
        apply_recompute(model, RecomputeConfig(recompute, num_layers=n, moe_cac=cac))
    GradientSync(model, groups.dp, groups.expert_dp)       # main grads exist before: not counted
    model.train()
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (B, S), generator=gen)
    positions = torch.arange(S).expand(B, S)

    def forward():
        out = model(tokens, positions, tokens)
        return out.loss.sum() + out.aux_loss
    # no cyclic garbage collection inside the counted regions: a collection frees tensors of
    # earlier work at a random moment (the count was flaky by ~7% without this)
    gc.collect()
    gc.disable()
    try:
        loss, saved, forward_peak = allocation_levels(forward)
        _, _, backward_peak = allocation_levels(loss.backward)
    finally:
        gc.enable()
    if recompute == "full":
        stash = -(-config.num_layers // n) * torch.get_rng_state().numel()
        saved, forward_peak = saved - stash, forward_peak - stash
    return saved, max(forward_peak, saved + backward_peak), groups.stats


# (model kwargs, recompute, chunk, cac); every case within SAVED_TOL of the counted saved bytes and
# PEAK_TOL of the counted peak (measured errors are listed in docs/PLANNER.md)
SAVED_TOL, PEAK_TOL, PARALLEL_SAVED_TOL, PARALLEL_PEAK_TOL = 0.06, 0.12, 0.20, 0.30
CASES = {"dense": (dict(moe=False), None, 1), "moe": (dict(), None, 1), "moe-swiglu": (dict(swiglu=True), None, 1),
         "moe-full": (dict(), "full", 1), "moe-full-chunk2": (dict(), "full", 2),
         "moe-selective": (dict(), "selective", 1), "moe-shared-experts": (dict(shared=2 * H), None, 1),
         "moe-gated-shared-experts": (dict(shared=2 * H, gate=True), None, 1),
         "moe-mla-q-latent": (dict(mla=MLAConfig(kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4,
                                                 v_head_dim=12, q_lora_rank=24)), None, 1),
         # 2 K/V groups of 4 heads, head dim 16 (heads * D = 2 h): q and SDPA's output weigh 2 h each
         "moe-gqa-kv-channels": (dict(attention=AttentionConfig(num_query_groups=2, kv_channels=16)), None, 1),
         "dense-gqa": (dict(moe=False, attention=AttentionConfig(num_query_groups=1)), None, 1),
         "dense-mla": (dict(moe=False, mla=MLAConfig(kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4,
                                                     v_head_dim=12)), None, 1)}


@pytest.mark.parametrize("name", list(CASES))
def test_activation_memory_matches_counted_allocations(name):
    kw, recompute, n = CASES[name]
    config, moe = tiny(**kw)
    saved, peak, _ = measure(config, moe, ParallelGroups.single(), recompute, n)
    est = activation_memory(Workload(config, moe, S, B, "fp32", recompute, n), tp=1)
    assert abs(est.saved / saved - 1) < SAVED_TOL, (est.saved, saved)
    assert abs(est.peak / peak - 1) < PEAK_TOL, (est.peak, peak)


def _parallel_case(rank, world, tp, ep, recompute, cac, shared=None):
    config, moe = tiny(shared=shared)
    groups = ParallelGroups.create(ParallelLayout(world, tp, ep))
    saved, peak, stats = measure(config, moe, groups, recompute, 1, cac)
    kinds = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
    return saved, peak, {f"{k}/{g}": stats.nbytes(k, g) for k in kinds for g in ("tp", "ep")} \
        | {"calls/a2a": stats.count("all_to_all", "ep")}


@pytest.mark.parametrize("tp,ep,recompute,cac,shared", [(2, 1, None, False, None), (1, 2, "full", True, None),
                                                       (2, 1, None, False, 2 * H)])
def test_tp_and_ep_runs_match_memory_and_communication_models(tp, ep, recompute, cac, shared):
    """Two gloo ranks: activation memory per rank, and the bytes of every collective kind per group
    summed over the ranks, against the model: the all-to-all exactly (dropless routing: each rank
    sends exactly T*k rows, /TP under DTD); the DTD all-gather and reduce-scatter of the routed rows
    pad to the most rows any TP rank received, so they may exceed the balanced expectation (<= 5%).
    Peak tolerance here PARALLEL_PEAK_TOL: recomputed MoE chunks on EP ranks come out lower than
    predicted (measured +19% to +26% with CAC, by routing; docs/PLANNER.md), the model errs on the safe side.
    With shared experts at TP 2 their MLP adds a TP all-reduce forward and one backward per MoE layer."""
    results = run_distributed(_parallel_case, 2, tp, ep, recompute, cac, shared)
    config, moe = tiny(shared=shared)
    wl = Workload(config, moe, S, B, "fp32", recompute, 1, cac)
    est = activation_memory(wl, tp, ep)
    layout = ParallelLayout(2, tp, ep)
    volumes = micro_batch_comm(wl, layout)
    # Multi-process runs on gloo: the counted bytes vary from run to run by up to ~15% for the same
    # routing (EP: 178-209 KB saved; TP: 485-535 KB; 2026-11-22). Cause: gloo frees some
    # collective buffers after the call returns, outside what the profiler records (a loop of
    # all_gather/all_reduce whose tensors are all dropped still "leaves" 0-280 KB counted), so
    # these cases get PARALLEL_SAVED_TOL; the one-process cases keep SAVED_TOL
    for saved, peak, _ in results:
        assert abs(est.saved / saved - 1) < PARALLEL_SAVED_TOL, (est.saved, saved)
        assert abs(est.peak / peak - 1) < PARALLEL_PEAK_TOL, (est.peak, peak)
    for kind in ("all_to_all", "all_gather", "reduce_scatter", "all_reduce"):
        group = "ep" if kind == "all_to_all" else "tp"
        measured = sum(r[2][f"{kind}/{group}"] for r in results)
        predicted = 2 * total_bytes(volumes, kind, group)
        if kind in ("all_to_all", "all_reduce"):
            assert measured == predicted, (kind, measured, predicted)
        else:
            assert predicted <= measured <= 1.05 * predicted, (kind, measured, predicted)
    if ep > 1:   # layers 0 and 2 of 4 are MoE: 4 all-to-alls each per micro-batch with CAC, 6 without
        assert results[0][2]["calls/a2a"] == 2 * (4 if cac else 6)


def _cluster(**kw):
    return Cluster(**{**dict(gpus_per_node=8, num_nodes=2, gpu_memory_gib=80, intra_node_gbps=450,
                             inter_node_gbps=50, achievable_tflops=400), **kw})


def _base(*argv):
    return build_parser().parse_args(["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
                                      "--num-experts", "8", "--seq-length", "512", "--vocab-size", "1000",
                                      "--global-batch-size", "64", "--bf16", *argv])


def test_enumeration_yields_only_valid_layouts_and_counts_match_the_model():
    plans = search(_base(), _cluster(), vocab_size=1001, micro_batches=(1, 2))
    assert plans
    for p in plans[:40]:
        tp, ep = p.layout.tensor_parallel, p.layout.expert_parallel
        assert 8 % tp == 0 and 8 % ep == 0 and p.layout.data_parallel % ep == 0 and 16 % tp == 0
        assert 64 % (p.run.training.schedule.micro_batch_size * p.layout.data_parallel) == 0
    p = plans[0]
    wl = workload_of(p.run)
    assert p.counts == count_parameters(wl.config, wl.moe, p.layout.tensor_parallel, p.layout.expert_parallel)


def test_planner_parameter_counts_equal_a_built_model():
    """The counts the planner reports are the numel of the model the trainer builds (TP 1, EP 1)."""
    a = _base("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
              "--global-batch-size", "16")
    p = search(a, _cluster(num_nodes=1, gpus_per_node=1), vocab_size=1001, micro_batches=(1,))[0]
    wl = workload_of(p.run)
    model = build_gpt(wl.config, wl.moe, ParallelGroups.single(), seed=1)
    assert p.counts.total == sum(t.numel() for t in model.parameters())


def test_a_layout_that_does_not_fit_is_never_ranked_best():
    totals = sorted(p.memory.total for p in search(_base(), _cluster(), vocab_size=1001, micro_batches=(1, 8)))
    limit = totals[len(totals) // 2] / 0.9 / 2**30          # about half the layouts fit
    plans = search(_base(), _cluster(gpu_memory_gib=limit), vocab_size=1001, micro_batches=(1, 8))
    fitting = [p for p in plans if p.fits]
    assert fitting and not all(p.fits for p in plans)
    assert plans[0].fits and all(p.memory.total <= 0.9 * limit * 2**30 for p in fitting)
    assert all(p.fits for p in plans[:len(fitting)])


def test_slow_inter_node_links_rank_tp_inside_the_node_first():
    """With 4 GPUs per node and a slow network, TP 8 spans two nodes: it ranks below TP <= 4."""
    plans = search(_base(), _cluster(gpus_per_node=4, num_nodes=4, inter_node_gbps=1.0), vocab_size=1001,
                   micro_batches=(2,), eps=[1])
    ranks = {p.layout.tensor_parallel: i for i, p in reversed(list(enumerate(plans)))}
    assert ranks[8] > max(ranks[t] for t in (1, 2, 4))
    assert plans[0].layout.tensor_parallel <= 4


def test_tp_efficiency_slows_only_the_compute_of_tp_layouts():
    """The same per-GPU FLOPs take 1/eff^log2(TP) as long; TP 1 and the collectives are unchanged."""
    from megatron_ted.planning.throughput import step_time
    flops = 3e14
    for tp in (1, 2, 4, 8):
        layout = ParallelLayout(16, tp, 1)
        plain = step_time(flops, False, [], layout, _cluster(tp_efficiency=1.0))
        slowed = step_time(flops, False, [], layout, _cluster(tp_efficiency=0.8))
        assert plain.compute == pytest.approx(flops / 400e12)
        assert slowed.compute == pytest.approx(plain.compute / 0.8 ** {1: 0, 2: 1, 4: 2, 8: 3}[tp])
    with pytest.raises(ValueError, match="--tp-efficiency"):
        _cluster(tp_efficiency=1.5)


@pytest.mark.parametrize("argv,message", [
    (["--preset", "gpt3-1.3b-16e", "--gpu-memory-gib", "0"], "error: --gpu-memory-gib must be positive"),
    (["--preset", "gpt3-1.3b-16e", "--num-attention-heads", "15"], "error: --hidden-size 2048 is not divisible by"),
    (["--preset", "gpt3-1.3b-16e", "--num-nodes", "0"], "error: --num-nodes must be a positive integer"),
    (["--preset", "nope"], "error: --preset nope is unknown"),
    (["--preset", "gpt3-1.3b-16e", "--tp-efficiency", "0"], "error: --tp-efficiency must be in (0, 1]"),
    (["--preset", "gpt3-40b-16e", "--num-nodes", "1", "--gpu-memory-gib", "16"], "error: no layout fits in 16 GiB"),
])
def test_bad_planner_input_is_one_line(argv, message):
    r = subprocess.run([sys.executable, PLAN, *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), r.stderr


def test_planner_picks_pipeline_when_memory_requires_it():
    """A dense 8-layer model, hidden 1024, one head (so TP 1 only), fp16, 2 GPUs of 1.75 GiB (usable
    1.575): at PP 1 each GPU holds all ~101M parameters, 2 + 4 bytes each plus at least 6 of Adam
    state (12 split over DP 2): 1.13 GiB, x 1.05 + 0.5 GiB allowance = 1.69 GiB, so nothing fits; at
    PP 2 (DP 1) each holds half the layers, ~52M x 18 bytes = 0.87 GiB, x 1.05 + 0.5 = 1.41 GiB plus
    small activations: the planner picks PP 2."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from plan_ted import commands, plan
    argv = ("--num-layers 8 --hidden-size 1024 --num-attention-heads 1 --seq-length 128 "
            "--max-position-embeddings 128 --global-batch-size 8 --fp16 --vocab-size 1024 "
            "--gpus-per-node 2 --gpu-memory-gib 1.75").split()
    plans, _, _ = plan(argv + ["--max-pipeline-parallel", "1"])
    assert not any(p.fits for p in plans) and {p.knobs["pp"] for p in plans} == {1}
    plans, cluster, _ = plan(argv)
    assert plans[0].fits and plans[0].knobs["pp"] == 2
    assert plans[0].time.bubble > 0 and "--pipeline-model-parallel-size" in plans[0].pretrain_flags()
    assert " PP=2 " in commands(plans[0], cluster)    # the 40B sbatch script's variable


@pytest.mark.parametrize("capacity,expected", [([], "dropless"), (["--moe-expert-capacity-factor", "1.5"],
                                                                 "capacity factor 1.5 (min 4")])
def test_a_plans_launch_lines_keep_its_routing(capacity, expected):
    """The sbatch line and the torchrun flags the planner prints for a plan launch its routing: the
    40B script's own default capacity factor (1.0) must not replace a dropless plan's; each line's
    --dry-run states the plan's routing."""
    import shlex
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from plan_ted import commands, plan
    argv = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 4 --moe-router-topk 1 "
            "--seq-length 64 --max-position-embeddings 64 --global-batch-size 8 --vocab-size 250 "
            "--gpus-per-node 2 --fixed-layout --expert-model-parallel-size 2").split() + capacity
    plans, cluster, _ = plan(argv)
    sbatch, torchrun = (line.split(":", 1)[1] for line in commands(plans[0], cluster).splitlines())
    env = dict(w.split("=", 1) for w in shlex.split(sbatch) if "=" in w and not w.startswith("-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", SBATCH], env={**base, **env, "DRY_RUN": "1", "PYTHON": sys.executable,
                                             "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^MoE: 4 experts, top-1, .*" + re.escape(expected), r.stdout, re.M), r.stdout
    flags = shlex.split(torchrun)[shlex.split(torchrun).index("pretrain_gpt_moe.py") + 1:-3]   # less --data-path ...
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *flags, "--dry-run",
                        "--world-size", "2"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert re.search(r"^MoE: 4 experts, top-1, .*" + re.escape(expected), r.stdout, re.M), r.stdout
