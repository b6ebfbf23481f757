"""Shared experts (--moe-shared-expert-intermediate-size, --moe-shared-expert-gate) and their
overlap with the dispatcher's all-to-alls (--moe-shared-expert-overlap).

- the block by hand: y = MoE(x) + sigmoid(x w_g) * (GeLU(x W1^T + b1) W2^T + b2), float64;
- layout invariance against one process (float64, 3-step curves and every full gradient,
  tests/parity.py) at (TP, EP) = (1, 2), (2, 1), (2, 2), (1, 4), with sequence parallelism, with
  Residual MoE, and where the dispatcher does not overlap: under activation checkpointing with
  CAC and with the layers traced by dynamo (aot_eager);
- the overlap moves no extra bytes (the same all-to-alls, counted) and gives the same numbers;
- the schedule: the shared experts' fc1 runs between the launch of the dispatch all-to-all and
  the wait for its rows, fc2 inside the combine's, and the backward of each inside the launch and
  wait of its mirror exchange; without the overlap all of them run outside the exchanges.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ted.model.init import init_parameters
from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.moe.router import RouterConfig
from megatron_ted.moe.shared_experts import SharedExperts
from megatron_ted.parallel import comm, mappings
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.training.arguments import parse_args
from megatron_ted.planning.flops import flops_per_token, mlp_flops_per_token
from parity import assert_matches, job, reference_job, run_forked, run_jobs, save_model_of_flags, single_thread

STEPS = 3
GATED = dict(shared_expert_size=24, shared_expert_gate=True)
OVERLAP = dict(GATED, shared_expert_overlap=True)
CAC = dict(granularity="full", moe_cac=True)
RESIDUAL = dict(OVERLAP, mlp_type="residual", topk=1)     # Residual MoE with shared experts

JOBS = {
    2: [job(1, 2, moe_kw=OVERLAP, steps=STEPS), job(1, 2, moe_kw=GATED, steps=STEPS),
        job(2, 1, moe_kw=OVERLAP, steps=STEPS),
        job(1, 2, moe_kw=OVERLAP, steps=STEPS, compile_backend="aot_eager")],   # traced: run after the exchange
    4: [job(2, 2, moe_kw=OVERLAP, steps=STEPS), job(1, 4, moe_kw=OVERLAP, steps=STEPS),
        job(2, 2, moe_kw=OVERLAP, steps=STEPS, sequence_parallel=True),
        job(1, 2, moe_kw=OVERLAP, steps=STEPS, recompute=CAC), job(2, 2, moe_kw=RESIDUAL, steps=STEPS)],
}


@pytest.fixture(scope="module")
def runs():
    return {world: run_forked(run_jobs, world, jobs) for world, jobs in JOBS.items()}


@pytest.fixture(scope="module")
def refs():
    return single_thread(lambda: {name: reference_job(job(moe_kw=kw, steps=STEPS))
                                  for name, kw in (("gated", GATED), ("residual", RESIDUAL))})


# ---- the block itself ---------------------------------------------------------------------------

def test_shared_experts_add_the_gated_mlp_to_the_routed_output():
    groups = ParallelGroups.single()
    cfg = RouterConfig(num_experts=4, topk=2)
    shared = SharedExperts(16, 24, groups.tp, gate=True)
    layer = MoELayer(16, 32, cfg, groups.tp, groups.ep, shared_experts=shared).double()
    init_parameters(layer, 3, 0.1, 2, groups.tp, groups.ep)
    plain = MoELayer(16, 32, cfg, groups.tp, groups.ep).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared_experts.")})
    with torch.no_grad():   # non-zero biases, so a missing bias would show
        for b in (shared.fc1.bias, shared.fc2.bias):
            b.normal_(0, 0.1)
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, out = layer(x)
    y_moe, _ = plain(x)
    W1, b1 = shared.fc1.weight.reshape(24, 16), shared.fc1.bias.reshape(24)
    mlp = F.gelu(x @ W1.T + b1) @ shared.fc2.weight.T + shared.fc2.bias
    torch.testing.assert_close(y, y_moe + torch.sigmoid(x @ shared.gate_weight.T) * mlp, rtol=1e-12, atol=1e-14)
    assert out.num_assignments == 20
    y.square().sum().backward()
    assert shared.gate_weight.grad.abs().max() > 0 and shared.fc1.weight.grad.abs().max() > 0


# ---- layout invariance ---------------------------------------------------------------------------

def test_matches_the_reference_in_every_layout(runs, refs):
    checked = set()
    for world, jobs in JOBS.items():
        for jj, j in enumerate(jobs):
            residual = j["moe_kw"].get("mlp_type") == "residual"
            for rank, per_rank in enumerate(runs[world]):
                what = (f"TP {j['tp']} EP {j['ep']} DP {world // j['tp']} sp={j['sequence_parallel']} "
                        f"cac={j['recompute'] is not None} overlap={j['moe_kw'].get('shared_expert_overlap')} "
                        f"residual={residual} compiled={j['compile_backend'] is not None}")
                assert_matches(per_rank[jj], refs["residual" if residual else "gated"], f"{what} rank {rank}")
                checked.add(what)
    assert len(checked) == 9, checked
    plain = single_thread(lambda: reference_job(job(moe_kw={}, steps=STEPS)))
    assert abs(plain["losses"][0] - refs["gated"]["losses"][0]) > 1e-6      # the shared experts change the model
    for ref in refs.values():
        assert ref["grads"]["layers.0.mlp.shared_experts.gate_weight"].abs().max() > 0


def test_the_overlap_moves_the_same_rows(runs):
    """EP 2: the overlapped and the plain run exchange the same all-to-alls, byte for byte."""
    overlapped, plain = runs[2][0][0]["stats"], runs[2][0][1]["stats"]
    assert overlapped["all_to_all/ep"] == plain["all_to_all/ep"]
    # 2 MoE layers x 2 micro-batches x (dispatch + combine) x (forward + backward)
    assert overlapped["all_to_all/ep"][0] == 2 * 2 * 2 * 2


# ---- the schedule ---------------------------------------------------------------------------------

def _schedule_rank(rank, world, overlap):
    """One MoE layer at EP 2 with shared experts; the order of: the row all-to-alls' launches, the
    waits of the overlapped exchanges, the shared experts' fc1 and fc2 in forward and backward."""
    groups = ParallelGroups.create(ParallelLayout(world, 1, world))
    events = []
    start, wait = comm.all_to_all_start, mappings._InFlight.wait

    def spy_start(t, group, output_splits=None, input_splits=None, kind="all_to_all"):
        if kind == "all_to_all":   # not the split sizes' exchange ("counts")
            events.append("launch")
        return start(t, group, output_splits, input_splits, kind)

    def spy_wait(self):
        events.append("wait")
        return wait(self)

    shared = SharedExperts(16, 24, groups.tp, gate=True)
    layer = MoELayer(16, 32, RouterConfig(num_experts=4, topk=2), groups.tp, groups.ep, shared_experts=shared,
                     overlap_shared_experts=overlap).double()
    init_parameters(layer, 3, 0.1, 2, groups.tp, groups.ep)
    def hooks(name):   # a hook on a layer's output runs when autograd starts that layer's backward
        def on_forward(module, inputs, out):
            events.append(f"{name} forward")
            out.register_hook(lambda g: events.append(f"{name} backward"))
        return on_forward

    shared.fc1.register_forward_hook(hooks("fc1"))
    shared.fc2.register_forward_hook(hooks("fc2"))
    x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    comm.all_to_all_start, mappings._InFlight.wait = spy_start, spy_wait
    try:
        y, _ = layer(x)
        y.square().sum().backward()
    finally:
        comm.all_to_all_start, mappings._InFlight.wait = start, wait
    return dict(events=events, y=y.detach(), grad=x.grad)


def test_shared_experts_run_while_the_rows_are_in_flight():
    """Launches: dispatch, combine (forward); the combine's mirror, the dispatch's mirror
    (backward). Overlapped, fc1 runs inside the dispatch's launch and wait, fc2 inside the
    combine's, and their backward inside the mirrors' in reverse. Without the overlap the shared
    experts run after both exchanges, and their backward (created last) before both mirrors."""
    over = run_forked(_schedule_rank, 2, True)
    plain = run_forked(_schedule_rank, 2, False)
    for o, p in zip(over, plain):
        assert o["events"] == ["launch", "fc1 forward", "wait", "launch", "fc2 forward", "wait",
                               "launch", "fc2 backward", "wait", "launch", "fc1 backward", "wait"], o["events"]
        assert p["events"] == ["launch", "launch", "fc1 forward", "fc2 forward",
                               "fc2 backward", "fc1 backward", "launch", "launch"], p["events"]
        torch.testing.assert_close(o["y"], p["y"], rtol=1e-13, atol=0)
        torch.testing.assert_close(o["grad"], p["grad"], rtol=1e-12, atol=1e-15)


# ---- flags, FLOPs -------------------------------------------------------------------------------

BASE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "200"]


@pytest.mark.parametrize("argv, world, flag", [
    (["--moe-shared-expert-intermediate-size", "64"], 1, "--moe-shared-expert-intermediate-size needs --num-experts"),
    (["--num-experts", "4", "--moe-shared-expert-overlap"], 1, "need --moe-shared-expert-intermediate-size"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "63", "--tensor-model-parallel-size", "2"], 2,
     "--moe-shared-expert-intermediate-size 63 must be positive and divisible"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-overlap",
      "--moe-a2a-algorithm", "hierarchical"], 1, "--moe-shared-expert-overlap overlaps the flat all-to-all"),
])
def test_flag_errors(argv, world, flag):
    with pytest.raises(ValueError, match=flag) as err:
        parse_args(BASE + argv, world_size=world)
    assert "\n" not in str(err.value)


def test_flops_count_the_shared_mlp_and_its_gate():
    """Per token forward: 2 * 2 * H * F_shared for the GeLU MLP, 2 * H for the gate, in every MoE layer."""
    h, layers, seq, ffn, vocab = 32, 4, 16, 128, 256
    base = flops_per_token(h, layers, seq, ffn, vocab, 2, 64, 2, 4)
    shared = flops_per_token(h, layers, seq, ffn, vocab, 2, 64, 2, 4, shared_ffn=48, shared_gate=True)
    assert shared - base == 3 * 2 * (2 * 2 * h * 48 + 2 * h)
    assert mlp_flops_per_token(h, 48) == 2 * 2 * h * 48


def test_checkpoint_records_the_shared_experts(tmp_path):
    """A checkpoint with gated shared experts loads for inference with the same weights; a run with
    another shared size refuses it."""
    from megatron_ted.inference import load_for_inference
    argv = BASE + ["--num-experts", "4", "--moe-shared-expert-intermediate-size", "48", "--moe-shared-expert-gate",
                   "--moe-shared-expert-overlap"]
    model, args = save_model_of_flags(argv, str(tmp_path))
    loaded, _, saved = load_for_inference(str(tmp_path))
    assert saved["moe_shared_expert_intermediate_size"] == 48 and saved["moe_shared_expert_gate"]
    got = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p), name
    assert got["layers.0.mlp.shared_experts.fc1.weight"].shape[-2] == 48
    assert "layers.0.mlp.shared_experts.gate_weight" in got
    from megatron_ted.training.checkpoint import CheckpointError, check_args_compatible
    other = parse_args(BASE + ["--num-experts", "4", "--moe-shared-expert-intermediate-size", "64"], world_size=1)
    other.padded_vocab_size = args.padded_vocab_size
    with pytest.raises(CheckpointError, match="--moe-shared-expert-intermediate-size 48 but this run has 64"):
        check_args_compatible(str(tmp_path), other)
