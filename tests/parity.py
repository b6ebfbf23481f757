"""Layout-invariance harness: train the same tiny model in a given (TP, EP, DP) layout and return
the full (unsharded) gradients and the loss curve, to compare with the single-process reference."""
from __future__ import annotations

import multiprocessing
import os
import tempfile

import torch
import torch.multiprocessing as mp

from megatron_ted.model.builder import MoEConfig, build_gpt
from megatron_ted.parallelize.compile import compile_layers
from megatron_ted.parallelize.cuda_graphs import capture_layer_fronts
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.parallelize.recompute import RecomputeConfig, apply_recompute
from megatron_ted.parallelize.sequence_parallel import apply_sequence_parallel
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.sharding import spec_of, unshard
from megatron_ted.training.grad_sync import GradientSync
from reference_adamw import MixedPrecisionAdamW
from megatron_ted.training.step import forward_backward
from multiproc import _worker, free_port

VOCAB, SEQ = 128, 8


def tiny_config(**overrides) -> GPTConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_attention_heads=4, ffn_hidden_size=32,
              max_position_embeddings=SEQ)
    kw.update(overrides)
    return GPTConfig(**kw)


def tiny_moe(num_experts=4, topk=2, capacity_factor=None, dtd=True, mlp_type="standard", experts_per_layer=None,
             a2a_algorithm="flat", a2a_node_size=None, shared_expert_size=None, shared_expert_gate=False,
             shared_expert_overlap=False, layer_freq=1, **router) -> MoEConfig:
    """experts_per_layer: a Pyramid-MoE's count per MoE layer; mlp_type "residual": Residual MoE;
    a2a_algorithm "hierarchical" with a2a_node_size ranks per (simulated) node; shared_expert_*:
    shared experts of that FFN size (gated, overlapped with the all-to-all)."""
    return MoEConfig(RouterConfig(num_experts=num_experts, topk=topk, capacity_factor=capacity_factor, **router),
                     ffn_hidden_size=32, layer_freq=layer_freq, duplicate_token_dropping=dtd, mlp_type=mlp_type,
                     num_experts_per_layer=experts_per_layer, a2a_algorithm=a2a_algorithm,
                     a2a_node_size=a2a_node_size, shared_expert_size=shared_expert_size,
                     shared_expert_gate=shared_expert_gate, shared_expert_overlap=shared_expert_overlap)


def global_batches(steps: int, global_batch: int, seed: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (global_batch, SEQ + 1), generator=g)
        mask = (torch.rand(global_batch, SEQ, generator=g) > 0.1).double()
        out.append(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                        position_ids=torch.arange(SEQ).expand(global_batch, SEQ)))
    return out


def micro_batches(batch: dict, dp_rank: int, dp_size: int, micro: int, step: int = 0) -> list[dict]:
    """DP rank d takes the d-th contiguous slice of the global batch. Each micro-batch carries its
    routing seed: its index in the global batch, counted over the steps, the same in every layout."""
    per_rank = batch["tokens"].shape[0] // dp_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in batch.items()}
    n_local = per_rank // micro
    return [dict({k: v[i:i + micro] for k, v in mine.items()}, routing_seed=(step * dp_size + dp_rank) * n_local + j)
            for j, i in enumerate(range(0, per_rank, micro))]


def train_layout(groups: ParallelGroups, config: GPTConfig, moe, steps=1, global_batch=8, micro=2,
                 dtype=torch.float64, lr=1e-2, clip_grad=0.0, seed=1234, sequence_parallel=False,
                 recompute: dict | None = None, compile_backend: str | None = None, cuda_graph_scope=None,
                 after_step=None):
    """Returns {"losses": [...], "grads": {name: full grad of step 1}, "stats": comm snapshot of step 1}.

    Also "aux_losses" (StepResult.aux_loss per step), "grad_norms" (the optimizer's global grad
    norm per step) and "moe_steps" (StepResult.moe per step); "moe" is the last step's.
    sequence_parallel: --sequence-parallel; recompute: RecomputeConfig fields (None: off).
    cuda_graph_scope: capture the layers' fronts (parallelize/cuda_graphs.py) through `eager_graphs`, the
    CPU stand-in for torch.cuda.make_graphed_callables; "graph_replays" counts each layer's replays.
    after_step(step, model): called after each optimizer step; its values are "after_step".
    """
    model = build_gpt(config, moe, groups, seed).to(dtype)
    if sequence_parallel:
        apply_sequence_parallel(model, groups.tp)
    if recompute is not None:
        apply_recompute(model, RecomputeConfig(**recompute))
    if compile_backend:
        compile_layers(model, compile_backend)
    sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=500,
                        tp=groups.tp if sequence_parallel else None)
    opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=lr, weight_decay=0.1, clip_grad=clip_grad)
    if cuda_graph_scope is not None:
        capture_layer_fronts(model.layers, micro, SEQ, dtype, cuda_graph_scope, rotary=model.rotary,
                             sequence_parallel_size=groups.tp.size if sequence_parallel else 1, make_graphed=eager_graphs)
    losses, grads, stats = [], None, None
    aux_losses, grad_norms, moe_steps, after = [], [], [], []
    for step, batch in enumerate(global_batches(steps, global_batch)):
        sync.zero_grad()
        groups.stats.reset()
        batch = {k: (v.to(dtype) if k == "loss_mask" else v) for k, v in batch.items()}
        result = forward_backward(model, micro_batches(batch, groups.dp.rank, groups.dp.size, micro, step), groups,
                                  sync)
        if step == 0:
            stats = groups.stats.snapshot()
            grads = {n: unshard(p.main_grad, spec_of(p), groups.tp, groups.ep).clone()
                     for n, p in model.named_parameters() if p.requires_grad}
        _, norm = opt.step(lr)
        losses.append(result.lm_loss)
        aux_losses.append(result.aux_loss)
        grad_norms.append(norm)
        moe_steps.append(result.moe)
        if after_step is not None:
            after.append(after_step(step, model))
    return {"after_step": after, "losses": losses, "grads": grads, "stats": stats, "moe": result.moe,
            "aux_losses": aux_losses, "grad_norms": grad_norms, "moe_steps": moe_steps,
            "graph_replays": [layer.graphed_front.replays if layer.graphed_front else 0 for layer in model.layers]}


def eager_graphs(callables, sample_args, num_warmup_iters=3):
    """CPU stand-in for torch.cuda.make_graphed_callables: its warm-up (forward, then the gradients
    of every output that requires one with respect to every input and parameter, unused ones an
    error as there) and the callables back, un-captured."""
    for fn, args in zip(callables, sample_args):
        for _ in range(num_warmup_iters):
            outs = [o for o in fn(*args) if o.requires_grad]
            inputs = [a for a in args if a.requires_grad] + [p for p in fn.parameters() if p.requires_grad]
            torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
    return callables


def run_layout(rank, world, layouts, config_kw, moe_kw, steps):
    """Worker: one entry per (tp, ep) in `layouts`."""
    out = []
    for tp, ep in layouts:
        groups = ParallelGroups.create(ParallelLayout(world, tp, ep))
        moe = tiny_moe(**moe_kw) if moe_kw is not None else None
        out.append(train_layout(groups, tiny_config(**config_kw), moe, steps=steps))
    return out


def reference(config_kw, moe_kw, steps):
    moe = tiny_moe(**moe_kw) if moe_kw is not None else None
    return train_layout(ParallelGroups.single(), tiny_config(**config_kw), moe, steps=steps)


def assert_same(result, ref, rtol=1e-9, atol=1e-11, what=""):
    for a, b in zip(result["losses"], ref["losses"]):
        assert abs(a - b) <= atol + rtol * abs(b), f"{what}: loss {a} != reference {b}"
    assert result["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(result["grads"][name], g, rtol=rtol * 1e3, atol=atol * 1e3,
                                   msg=lambda m: f"{what}: grad {name}: {m}")


# ---- helpers for the parallel test files ------------------------------------------------------

_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch.optim", "megatron_ted.model.builder",
            "megatron_ted.parallelize.sequence_parallel",
            "reference_adamw", "multiproc", "parity"]


def single_thread(fn):
    """fn() on one thread, the thread count restored: these tiny tensors run ~10x faster on one
    thread on a busy machine (the single-process references)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def run_forked(fn, world_size: int, *args):
    """`multiproc.run_distributed` with the "forkserver" start method.

    The fork server imports torch (and torch._dynamo, which torch.optim pulls in on first use)
    once per test session; each rank is then a fork of it instead of a fresh interpreter, so a
    spawn costs a fraction of a second instead of several seconds per rank. Same worker, same
    gloo setup, same results as run_distributed. fn must be a module-level function.
    """
    multiprocessing.set_forkserver_preload(_PRELOAD)  # only read when the fork server starts
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_worker, args=(world_size, free_port(), outdir, fn, args), nprocs=world_size,
                           join=True, start_method="forkserver")
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def job(tp=1, ep=1, config_kw=None, moe_kw=None, steps=1, micro=2, global_batch=8, local_grads=False,
        sequence_parallel=False, recompute=None, compile_backend=None, cuda_graph_scope=None) -> dict:
    """One training run to do in a layout: (tp, ep) of the world it runs in, model and batch shape.

    recompute: RecomputeConfig fields (activation checkpointing, CAC), or None.
    compile_backend: compile the layers with this torch.compile backend (parallelize/compile.py), or None.
    cuda_graph_scope: capture the layers' fronts with the CPU stand-in (`train_layout`), or None.

    local_grads: also return this rank's gradient contribution before the data-parallel reduction
    (see `local_grads`), under the key "local_grads".
    sequence_parallel, recompute: as `train_layout`'s.
    """
    return dict(tp=tp, ep=ep, config_kw=dict(config_kw or {}), moe_kw=None if moe_kw is None else dict(moe_kw),
                steps=steps, micro=micro, global_batch=global_batch, local_grads=local_grads,
                sequence_parallel=sequence_parallel, recompute=None if recompute is None else dict(recompute),
                compile_backend=compile_backend, cuda_graph_scope=cuda_graph_scope)


def run_job(groups: ParallelGroups, j: dict) -> dict:
    moe = tiny_moe(**j["moe_kw"]) if j["moe_kw"] is not None else None
    out = train_layout(groups, tiny_config(**j["config_kw"]), moe, steps=j["steps"],
                       global_batch=j["global_batch"], micro=j["micro"],
                       sequence_parallel=j.get("sequence_parallel", False), recompute=j.get("recompute"),
                       compile_backend=j.get("compile_backend"), cuda_graph_scope=j.get("cuda_graph_scope"))
    if j["local_grads"]:
        moe = tiny_moe(**j["moe_kw"]) if j["moe_kw"] is not None else None
        out["local_grads"] = local_grads(groups, tiny_config(**j["config_kw"]), moe,
                                         global_batch=j["global_batch"], micro=j["micro"])
    out["coords"] = dict(tp=groups.tp.rank, dp=groups.dp.rank, ep=groups.ep.rank,
                         expert_dp=groups.expert_dp.rank)
    out["sizes"] = dict(tp=groups.tp.size, dp=groups.dp.size, ep=groups.ep.size,
                        expert_dp=groups.expert_dp.size)
    return out


def run_jobs(rank, world, jobs):
    """Worker: run every `job` in this world (each builds its own groups); one result per job."""
    return [run_job(ParallelGroups.create(ParallelLayout(world, j["tp"], j["ep"])), j) for j in jobs]


def reference_job(j: dict) -> dict:
    """The single-process reference of a `job` (its tp/ep are ignored)."""
    return run_job(ParallelGroups.single(), dict(j, local_grads=False))


def local_grads(groups: ParallelGroups, config: GPTConfig, moe, global_batch=8, micro=2,
                dtype=torch.float64, seed=1234) -> dict:
    """Step-1 gradients of this rank's micro-batches only: no data-parallel reduction.

    A fresh model (same seed) runs forward_backward without a GradientSync, so `param.grad` holds
    this rank's share (the loss is still divided by the global token count); it is unsharded over
    TP and EP only. Summed over the DP ranks of one TP/EP slot, these give the reference gradients.
    """
    model = build_gpt(config, moe, groups, seed).to(dtype)
    batch = {k: (v.to(dtype) if k == "loss_mask" else v) for k, v in global_batches(1, global_batch)[0].items()}
    enabled, groups.stats.enabled = groups.stats.enabled, False
    try:
        forward_backward(model, micro_batches(batch, groups.dp.rank, groups.dp.size, micro), groups, None)
        return {n: unshard(p.grad, spec_of(p), groups.tp, groups.ep).clone() for n, p in model.named_parameters()
                if p.requires_grad}
    finally:
        groups.stats.enabled = enabled


def assert_same_state(a: dict, b: dict, what: str, exact=True):
    """Two {name: tensor} states (checkpoint round trips): the same keys, equal tensors (bitwise, or
    within float64 tolerances)."""
    assert a.keys() == b.keys(), f"{what}: {sorted(set(a) ^ set(b))[:4]}"
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{what}: {k}: {m}")


def max_errors(result: dict, ref: dict) -> tuple[float, float]:
    """(largest absolute loss difference over the curve, largest relative gradient difference
    max|g - g_ref| / max|g_ref| over all parameters)."""
    loss_err = max(abs(a - b) for a, b in zip(result["losses"], ref["losses"]))
    grad_err = max(float((result["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-300))
                   for n, g in ref["grads"].items())
    return loss_err, grad_err


def assert_matches(result: dict, ref: dict, what: str, loss_tol=1e-12, grad_rtol=1e-10, grad_atol=1e-13):
    """Tight float64 comparison: every loss of the curve and every parameter's full gradient."""
    assert len(result["losses"]) == len(ref["losses"]), what
    for i, (a, b) in enumerate(zip(result["losses"], ref["losses"])):
        assert abs(a - b) <= loss_tol * max(1.0, abs(b)), f"{what}: step {i + 1} loss {a!r} != reference {b!r}"
    assert result["grads"].keys() == ref["grads"].keys(), what
    for name, g in ref["grads"].items():
        assert result["grads"][name].shape == g.shape, f"{what}: grad {name} shape"
        torch.testing.assert_close(result["grads"][name], g, rtol=grad_rtol, atol=grad_atol,
                                   msg=lambda m, name=name: f"{what}: grad {name}: {m}")


def save_model_of_flags(argv: list[str], path: str):
    """Build the one-process model of pretrain_gpt_moe.py flags (NullTokenizer: --vocab-size, plus
    its end-of-document token) and save it as a checkpoint at iteration 1. Returns (model, args)."""
    from megatron_ted.training.arguments import padded_vocab_size, parse_args
    from megatron_ted.training.checkpoint import save_checkpoint
    from megatron_ted.config.from_flags import configs_from_args
    args = parse_args(argv, world_size=1)
    args.padded_vocab_size = padded_vocab_size(args.vocab_size + 1, args.make_vocab_size_divisible_by, 1)
    m = configs_from_args(args).model
    config, moe = m.gpt, m.moe
    model = build_gpt(config, moe, ParallelGroups.single(), args.seed)
    save_checkpoint(path, 1, model, None, ParallelGroups.single(), vars(args))
    return model, args
