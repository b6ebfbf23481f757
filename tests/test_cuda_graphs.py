"""--cuda-graph-impl local (parallelize/cuda_graphs.py): the layers' fronts (norms, attention, residual, and
the MoE router) as separate graphed callables.

On CPU the capture goes through `parity.eager_graphs`, a stand-in for torch.cuda.make_graphed_callables
that runs its warm-up and returns the fronts un-captured: these tests check the plumbing around the
graphs (what a front returns, the routing handed to the MoE layer, the weights' gradients leaving
the front as ordinary gradients, the restored RNG and buffers, eager fall-backs, the flags) against
the float64 single-process reference. The graphs themselves run in tests/test_gpu.py.
"""
import pytest
import torch

from parity import (SEQ, eager_graphs, global_batches, job, micro_batches, reference_job, run_forked, run_jobs,
                    single_thread, tiny_config, tiny_moe, assert_matches)

from megatron_ted.model.builder import build_gpt
from megatron_ted.parallelize.cuda_graphs import capture_layer_fronts, graph_blocker, router_graph_blocker
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.arguments import parse_args
from megatron_ted.training.grad_sync import GradientSync
from megatron_ted.training.step import forward_backward

BOTH = ("attn", "moe_router")
# (tp, ep, scope, sequence parallel, MoE flags) in a world of 4; each against its un-graphed reference
CASES = [(2, 2, BOTH, False, {}),
         (1, 4, BOTH, False, dict(enable_expert_bias=True)),
         (2, 2, BOTH, True, {}),
         (2, 1, ("attn",), False, dict(router_type="sinkhorn")),
         (1, 4, BOTH, False, dict(router_type="expert_choice")),     # routing fields that are None
         (2, 2, BOTH, False, dict(mlp_type="residual"))]


def _job(tp, ep, scope, sp, moe_kw, graphs=True):
    return job(tp, ep, config_kw=dict(position_embedding_type="rope"), moe_kw=moe_kw, steps=2,
               sequence_parallel=sp, cuda_graph_scope=scope if graphs else None)


def test_graphed_fronts_match_the_reference_in_every_layout():
    jobs = [_job(*case) for case in CASES]
    results = run_forked(run_jobs, 4, jobs)
    for (tp, ep, scope, sp, moe_kw), j, i in zip(CASES, jobs, range(len(CASES))):
        ref = single_thread(lambda: reference_job(_job(tp, ep, scope, sp, moe_kw, graphs=False)))
        what = f"TP {tp} EP {ep} {'+'.join(scope)}{' SP' if sp else ''} {moe_kw}"
        dp = 4 // tp
        for rank, res in enumerate(results):
            assert_matches(res[i], ref, f"{what}, rank {rank}")
            # 2 steps x (8 sequences / DP / micro-batch 2) micro-batches, every layer replayed each time
            assert res[i]["graph_replays"] == [2 * 8 // dp // 2] * 2, what


def _model(moe=None, **config):
    torch.manual_seed(0)
    return build_gpt(tiny_config(**config), moe or tiny_moe(), ParallelGroups.single(), 5).double()


def test_the_router_runs_once_per_micro_batch_inside_the_front():
    """With moe_router the MoE layer takes the front's routing; it must not route again."""
    model = _model()
    capture_layer_fronts(model.layers, 2, SEQ, torch.float64, BOTH, make_graphed=eager_graphs)
    calls = []
    for layer in model.layers:
        layer.mlp.router.register_forward_hook(lambda *_: calls.append(1))
    batch = {k: (v.double() if k == "loss_mask" else v) for k, v in global_batches(1, 4)[0].items()}
    forward_backward(model, micro_batches(batch, 0, 1, 2), ParallelGroups.single(), GradientSync(
        model, ParallelGroups.single().dp, ParallelGroups.single().expert_dp))
    assert len(calls) == 2 * 2                          # 2 layers x 2 micro-batches
    assert [layer.graphed_front.replays for layer in model.layers] == [2, 2]


def test_capture_leaves_the_rng_and_the_routers_buffers_as_they_were():
    model = _model(tiny_moe(enable_expert_bias=True))
    cpu = torch.get_rng_state()
    capture_layer_fronts(model.layers, 2, SEQ, torch.float64, BOTH, warmup_iters=3, make_graphed=eager_graphs)
    assert torch.equal(torch.get_rng_state(), cpu)
    for layer in model.layers:   # the probe and 3 warm-ups routed 4 x 16 tokens: all forgotten
        assert layer.mlp.router.local_tokens_per_expert.sum() == 0


def test_evaluation_and_other_shapes_run_the_layer_eagerly():
    plain, graphed = _model(), _model()
    capture_layer_fronts(graphed.layers, 2, SEQ, torch.float64, BOTH, make_graphed=eager_graphs)
    tokens = global_batches(1, 3)[0]["tokens"]
    pos = torch.arange(SEQ).expand(3, SEQ)
    for mode in ("eval", "train"):                      # train: 3 sequences, captured for 2
        getattr(plain, mode)(), getattr(graphed, mode)()
        torch.testing.assert_close(graphed(tokens, pos).logits, plain(tokens, pos).logits, rtol=0, atol=0)
    assert [layer.graphed_front.replays for layer in graphed.layers] == [0, 0]
    graphed.train()
    graphed(tokens[:2], pos[:2])
    assert [layer.graphed_front.replays for layer in graphed.layers] == [1, 1]


def test_capture_needs_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        capture_layer_fronts(_model().layers, 2, SEQ, torch.float64, BOTH)


BASE = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4", "--seq-length", "8",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--num-experts", "4",
        "--mock-data", "--vocab-size", "128", "--cuda-graph-impl", "local"]


@pytest.mark.parametrize("extra,flag", [
    (["--recompute-granularity", "full"], "--recompute-granularity"),
    (["--compile-layers"], "--compile-layers"),
    (["--tensor-model-parallel-size", "2"], "--attention-dropout"),
    (["--cuda-graph-scope", "moe_router"], "needs attn"),
    (["--cuda-graph-scope", "attn", "moe_router", "--moe-router-force-load-balancing"],
     "--moe-router-force-load-balancing"),
    (["--cuda-graph-scope", "attn", "moe_router", "--moe-router-type", "sinkhorn"], "sinkhorn"),
    (["--cuda-graph-scope", "attn", "moe_router", "--moe-router-load-balancing-type", "global_aux_loss"],
     "global_aux_loss"),
])
def test_flags_refuse_what_a_graph_cannot_hold(extra, flag):
    with pytest.raises(ValueError, match=flag):
        parse_args(BASE + extra, world_size=2)


def test_flags_accept_the_dropless_moe_scope():
    args = parse_args(BASE + ["--cuda-graph-scope", "attn", "moe_router", "--tensor-model-parallel-size", "2",
                              "--attention-dropout", "0"], world_size=2)
    assert args.cuda_graph_impl == "local" and args.cuda_graph_scope == ["attn", "moe_router"]
    newer = parse_args(BASE + ["--cuda-graph-modules", "attn", "moe_router"], world_size=1)   # megatron-core's later name
    assert newer.cuda_graph_scope == ["attn", "moe_router"]
    # the gates that draw on the host are refused by name; plain top-k and expert choice pass
    assert router_graph_blocker(RouterConfig(num_experts=4, topk=2)) is None
    assert router_graph_blocker(RouterConfig(num_experts=4, topk=2, router_type="expert_choice")) is None
    assert "gshard" in router_graph_blocker(RouterConfig(num_experts=4, topk=2, router_type="gshard"))
    assert graph_blocker(["attn"], router_configs=[RouterConfig(num_experts=4, topk=2, router_type="gshard")]) is None


def test_multi_latent_attention_layers_are_captured():
    """The front's input width comes from the layer, whatever its attention class (MLA has no qkv)."""
    from megatron_ted.model.mla import MLAConfig
    mla = dict(position_embedding_type="rope", mla=MLAConfig(kv_lora_rank=8, qk_head_dim=4, qk_pos_emb_head_dim=2,
                                                             v_head_dim=4))
    plain, graphed = _model(**mla), _model(**mla)
    assert capture_layer_fronts(graphed.layers, 2, SEQ, torch.float64, BOTH, rotary=graphed.rotary,
                                make_graphed=eager_graphs) == 2
    tokens = global_batches(1, 2)[0]["tokens"]
    pos = torch.arange(SEQ).expand(2, SEQ)
    plain.train(), graphed.train()
    torch.testing.assert_close(graphed(tokens, pos).logits, plain(tokens, pos).logits, rtol=0, atol=0)
    assert [layer.graphed_front.replays for layer in graphed.layers] == [1, 1]
