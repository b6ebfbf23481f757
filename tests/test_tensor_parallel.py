"""Tensor-parallel building blocks against unsharded torch, at TP = 2 and 4 (gloo, CPU, float64).

One process launch per world size runs every check and returns the local tensors and the counted
communication; the tests below compare them with references computed here in one process:

  - ColumnParallelLinear (fused 1 and 3), RowParallelLinear: F.linear on the full weight;
  - VocabParallelEmbedding: F.embedding; vocab_parallel_cross_entropy: F.cross_entropy (also at
    TP 1 in one process, in fp64 and bf16/fp16, and with no one-hot or full-size cast in its ops);
  - the autograd mappings: forward and backward built by hand from rank-dependent inputs;
  - CommStats: calls and bytes of each collective, forward and backward;
  - shard / unshard round trip at TP x EP layouts.

World 4 runs the checks twice: TP = 4 (one group) and TP = 2 (two groups [0, 1], [2, 3], so a
group rank differs from the global rank).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ted.parallel import comm, mappings
from megatron_ted.parallel.comm import CommStats, Group
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.sharding import ParamSpec, shard, unshard
from megatron_ted.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                          vocab_parallel_cross_entropy)
from op_record import RecordOps
from parity import run_forked

D = torch.float64
IN, OUT = 6, 8            # linear layers: OUT (column) and IN' = 8 (row) divisible by TP = 4
VOCAB, EMB = 16, 4
LABELS = [[0, 5, 9], [15, 4, 12]]  # token ids / labels that hit every vocab shard at TP 2 and 4
IDS = [[0, 3, 4, 7, 8], [11, 12, 15, 5, 9]]


def _full_tensors():
    """Every full (unsharded) tensor of the checks, drawn from one seed: identical on every rank."""
    g = torch.Generator().manual_seed(11)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=D) * scale

    t = {}
    for fused in (1, 3):
        t[f"col{fused}.W"] = r(fused, OUT, IN)
        t[f"col{fused}.b"] = r(fused, OUT)
        t[f"col{fused}.x"] = r(2, 3, IN)
        t[f"col{fused}.dy"] = r(2, 3, fused * OUT)
    t["row.W"] = r(IN, OUT)
    t["row.b"] = r(IN)
    t["row.x"] = r(2, 3, OUT)
    t["row.dy"] = r(2, 3, IN)
    t["emb.W"] = r(VOCAB, EMB)
    t["emb.dy"] = r(2, 5, EMB)
    t["ce.logits"] = r(2, 3, VOCAB, scale=3.0)
    t["ce.dy"] = r(2, 3)
    return t


def _tp_slice(n: int, size: int, rank: int) -> slice:
    return slice(rank * n // size, (rank + 1) * n // size)


def _full_size(outputs, shape) -> list:
    """The recorded outputs with at least as many elements as a tensor of `shape` (the logits)."""
    n = torch.Size(shape).numel()
    return [o for o in outputs if torch.Size(o.shape).numel() >= n]


def _integer(outputs) -> list:
    return [o for o in outputs if not (o.dtype.is_floating_point or o.dtype.is_complex)]


# ---- the worker: one TP group, every building block ---------------------------------------------

def _stats_of(group: Group):
    snap = group.stats.snapshot()
    group.stats.reset()
    return snap


def _layers(tp: Group) -> dict:
    full, out, P, r = _full_tensors(), {}, tp.size, tp.rank
    tp.stats.reset()
    for fused in (1, 3):
        k = f"col{fused}"
        layer = ColumnParallelLinear(IN, OUT, tp, bias=True, fused=fused).to(D)
        with torch.no_grad():
            layer.weight.copy_(full[f"{k}.W"][:, _tp_slice(OUT, P, r)])
            layer.bias.copy_(full[f"{k}.b"][:, _tp_slice(OUT, P, r)])
        x = full[f"{k}.x"].clone().requires_grad_()
        y = layer(x)
        fwd = _stats_of(tp)
        dy = full[f"{k}.dy"].view(2, 3, fused, OUT)[..., _tp_slice(OUT, P, r)].flatten(-2)
        (y * dy).sum().backward()
        out[k] = dict(y=y.detach(), x_grad=x.grad, W_grad=layer.weight.grad, b_grad=layer.bias.grad,
                      fwd=fwd, bwd=_stats_of(tp))

    layer = RowParallelLinear(OUT, IN, tp, bias=True).to(D)
    with torch.no_grad():
        layer.weight.copy_(full["row.W"][:, _tp_slice(OUT, P, r)])
        layer.bias.copy_(full["row.b"])
    x = full["row.x"][..., _tp_slice(OUT, P, r)].clone().requires_grad_()
    y = layer(x)
    fwd = _stats_of(tp)
    (y * full["row.dy"]).sum().backward()
    out["row"] = dict(y=y.detach(), x_grad=x.grad, W_grad=layer.weight.grad, b_grad=layer.bias.grad,
                      fwd=fwd, bwd=_stats_of(tp))

    emb = VocabParallelEmbedding(VOCAB, EMB, tp).to(D)
    with torch.no_grad():
        emb.weight.copy_(full["emb.W"][_tp_slice(VOCAB, P, r)])
    y = emb(torch.tensor(IDS))
    fwd = _stats_of(tp)
    (y * full["emb.dy"]).sum().backward()
    out["emb"] = dict(y=y.detach(), W_grad=emb.weight.grad, start=emb.start, fwd=fwd, bwd=_stats_of(tp))

    logits = full["ce.logits"][..., _tp_slice(VOCAB, P, r)].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, torch.tensor(LABELS), tp, vocab_start=r * VOCAB // P)
    fwd = _stats_of(tp)
    with RecordOps() as ops:
        (loss * full["ce.dy"]).sum().backward()
    out["ce"] = dict(loss=loss.detach(), grad=logits.grad, fwd=fwd, bwd=_stats_of(tp),
                     bwd_full=[o._replace(func=str(o.func)) for o in _full_size(ops.outputs, logits.shape)])
    return out


# Uneven all-to-all: SPLITS[P][i][j] = rows group rank i sends to group rank j. At P = 4, rank 2
# sends nothing (an empty [0, h] input) and rank 3 receives nothing.
SPLITS = {2: [[1, 2], [3, 0]],
          4: [[1, 0, 2, 0], [0, 3, 1, 0], [0, 0, 0, 0], [2, 1, 1, 0]]}
H_A2A = 3


def _a2a_input(i: int, rows: int) -> torch.Tensor:
    """Row k of rank i: [1000 i + 10 k + c for c in 0..2], float32."""
    return (1000.0 * i + 10.0 * torch.arange(rows).unsqueeze(1) + torch.arange(H_A2A)).float()


def _a2a_grad(j: int, rows: int) -> torch.Tensor:
    """Upstream gradient of rank j's all-to-all output: -(100 j + m + 0.1 c)."""
    return -(100.0 * j + torch.arange(rows).unsqueeze(1) + 0.1 * torch.arange(H_A2A)).float()


def _rank_tensor(r: int, *shape) -> torch.Tensor:
    """A tensor whose values name the rank: 100 r + 0, 1, 2, ... (float64)."""
    return (100.0 * r + torch.arange(torch.Size(shape).numel(), dtype=D)).view(*shape)


def _mappings(tp: Group) -> dict:
    P, r, out = tp.size, tp.rank, {}
    tp.stats.reset()

    def run(name, fn, x, grad):
        x = x.clone().requires_grad_()
        y = fn(x)
        fwd = _stats_of(tp)
        y.backward(grad)
        out[name] = dict(y=y.detach(), x_grad=x.grad, fwd=fwd, bwd=_stats_of(tp))

    run("copy_to", lambda x: mappings.copy_to(x, tp), _rank_tensor(0, 2, 3), -_rank_tensor(r, 2, 3))
    run("reduce_from", lambda x: mappings.reduce_from(x, tp), _rank_tensor(r, 2, 3), -_rank_tensor(0, 2, 3))
    # split the middle dim of a replicated [2, 2P, 3]; the grad of the kept chunk is rank-dependent
    run("split", lambda x: mappings.split(x, tp, dim=1), _rank_tensor(0, 2, 2 * P, 3), -_rank_tensor(r, 2, 2, 3))
    run("gather", lambda x: mappings.gather(x, tp, dim=1), _rank_tensor(r, 2, 2, 3), -_rank_tensor(r, 2, 2 * P, 3))
    run("gather_partial", lambda x: mappings.gather_partial(x, tp), _rank_tensor(r, 2, 3),
        -_rank_tensor(r, 2 * P, 3))
    run("reduce_scatter", lambda x: mappings.reduce_scatter(x, tp), _rank_tensor(r, 2 * P, 3),
        -_rank_tensor(r, 2, 3))
    S = SPLITS[P]
    send, recv = S[r], [S[i][r] for i in range(P)]
    run("all_to_all", lambda x: mappings.all_to_all(x, tp, output_splits=recv, input_splits=send),
        _a2a_input(r, sum(send)), _a2a_grad(r, sum(recv)))
    # equal splits (both None), float32 [n, h] with n = 2P
    run("all_to_all_equal", lambda x: mappings.all_to_all(x, tp), _a2a_input(r, 2 * P), _a2a_grad(r, 2 * P))
    # the split-size exchange is counted under its own kind
    counts = comm.all_to_all(torch.tensor(send, dtype=torch.int64), tp, kind="counts")
    out["counts"] = dict(y=counts, fwd=_stats_of(tp))
    return out


def _shards(groups: ParallelGroups) -> dict:
    full = torch.arange(4 * 8 * 12, dtype=D).view(4, 8, 12)
    out = {}
    for spec in _SPECS:
        local = shard(full, spec, groups.tp, groups.ep)
        out[spec] = dict(local=local.clone(), back=unshard(local, spec, groups.tp, groups.ep))
    return out


_SPECS = [ParamSpec(), ParamSpec(tp_dim=0), ParamSpec(tp_dim=1), ParamSpec(tp_dim=2),
          ParamSpec(expert=True), ParamSpec(tp_dim=1, expert=True), ParamSpec(tp_dim=2, expert=True)]


def _worker(rank, world):
    out = {}
    for tp_size in sorted({world, 2}, reverse=True):
        groups = ParallelGroups.create(ParallelLayout(world, tensor_parallel=tp_size))
        out[tp_size] = dict(tp_rank=groups.tp.rank, layers=_layers(groups.tp), mappings=_mappings(groups.tp))
    # shard/unshard: every TP x EP layout of this world
    for tp_size, ep_size in ((1, world), (world, 1), (2, world // 2)):
        groups = ParallelGroups.create(ParallelLayout(world, tp_size, ep_size))
        out[("shard", tp_size, ep_size)] = dict(tp=groups.tp.rank, ep=groups.ep.rank, shards=_shards(groups))
    return out


@pytest.fixture(scope="module")
def ranks():
    """{world: [rank 0 result, rank 1 result, ...]}: one launch per world size."""
    return {world: run_forked(_worker, world) for world in (2, 4)}


def _cases(ranks):
    """(world, tp size, group rank, that rank's result) for every TP group checked."""
    for world, results in ranks.items():
        for res in results:
            for tp_size in sorted({world, 2}, reverse=True):
                yield world, tp_size, res[tp_size]["tp_rank"], res[tp_size]


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, **kw)


# ---- layers --------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [1, 3])
def test_column_parallel_linear(ranks, fused):
    full, k = _full_tensors(), f"col{fused}"
    W = full[f"{k}.W"].clone().requires_grad_()
    b = full[f"{k}.b"].clone().requires_grad_()
    x = full[f"{k}.x"].clone().requires_grad_()
    y = F.linear(x, W.flatten(0, 1), b.flatten())            # [2, 3, fused * OUT], projection-major
    (y * full[f"{k}.dy"]).sum().backward()
    for world, P, r, res in _cases(ranks):
        got, cols = res["layers"][k], _tp_slice(OUT, P, r)
        # this rank's output: rows `cols` of each of the `fused` projections
        close(got["y"], y.detach().view(2, 3, fused, OUT)[..., cols].flatten(-2))
        close(got["x_grad"], x.grad)                           # replicated input: full gradient
        close(got["W_grad"], W.grad[:, cols])
        close(got["b_grad"], b.grad[:, cols])
        # forward: no communication; backward: one all-reduce of the input gradient over TP
        assert got["fwd"] == {}
        assert got["bwd"] == {"all_reduce/tp": (1, x.numel() * 8)}, (world, P, r)


def test_row_parallel_linear(ranks):
    full = _full_tensors()
    W = full["row.W"].clone().requires_grad_()
    b = full["row.b"].clone().requires_grad_()
    x = full["row.x"].clone().requires_grad_()
    y = F.linear(x, W, b)
    (y * full["row.dy"]).sum().backward()
    for world, P, r, res in _cases(ranks):
        got, cols = res["layers"]["row"], _tp_slice(OUT, P, r)
        close(got["y"], y.detach())                            # full output on every rank
        close(got["x_grad"], x.grad[..., cols])
        close(got["W_grad"], W.grad[:, cols])
        close(got["b_grad"], b.grad)
        assert got["fwd"] == {"all_reduce/tp": (1, y.numel() * 8)}
        assert got["bwd"] == {}


def test_vocab_parallel_embedding(ranks):
    full = _full_tensors()
    W = full["emb.W"].clone().requires_grad_()
    ids = torch.tensor(IDS)
    y = F.embedding(ids, W)
    (y * full["emb.dy"]).sum().backward()
    for world, P, r, res in _cases(ranks):
        got, rows = res["layers"]["emb"], _tp_slice(VOCAB, P, r)
        assert got["start"] == rows.start
        # every shard owns some of the ids, so each rank contributes rows to the sum
        assert any(rows.start <= i < rows.stop for i in ids.flatten().tolist())
        close(got["y"], y.detach())
        close(got["W_grad"], W.grad[rows])
        assert got["fwd"] == {"all_reduce/tp": (1, y.numel() * 8)}
        assert got["bwd"] == {}


def test_vocab_parallel_cross_entropy(ranks):
    full = _full_tensors()
    logits = full["ce.logits"].clone().requires_grad_()
    labels = torch.tensor(LABELS)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 3)
    (loss * full["ce.dy"]).sum().backward()
    for world, P, r, res in _cases(ranks):
        got, cols = res["layers"]["ce"], _tp_slice(VOCAB, P, r)
        assert any(cols.start <= t < cols.stop for t in labels.flatten().tolist()), "labels in every shard"
        close(got["loss"], loss.detach())
        close(got["grad"], logits.grad[..., cols])
        # forward: all-reduce of the max, of the label logit and of the sum of exps: 3 x [2, 3] fp64
        assert got["fwd"] == {"all_reduce/tp": (3, 3 * 6 * 8)}
        assert got["bwd"] == {}
        # backward builds no [tokens, V/TP] integer tensor (a one-hot of the labels)
        assert got["bwd_full"] and not _integer(got["bwd_full"]), got["bwd_full"]


# ---- the cross entropy at TP 1, in one process -------------------------------------------------

def _ce(fn, logits, labels, dy):
    """fn's per-token loss and the gradient of sum(loss * dy) with respect to the logits."""
    x = logits.clone().requires_grad_()
    loss = fn(x, labels)
    (loss * dy).sum().backward()
    return loss.detach(), x.grad


def _torch_ce(x, labels):
    return F.cross_entropy(x.float().flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)


def _tp1_ce(x, labels):
    return vocab_parallel_cross_entropy(x, labels, Group.single("tp"))


def _ce_inputs(dtype, vocab=37):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, vocab, generator=g, dtype=D) * 3
    logits[1] += 1000.0                                  # large logits: the max shift keeps exp finite
    labels = torch.randint(0, vocab, (3, 4), generator=g)
    labels[0, :2] = torch.tensor([0, vocab - 1])         # the vocab edges
    labels[2, 2:] = torch.tensor([vocab - 1, 0])
    return logits.to(dtype), labels, torch.randn(3, 4, generator=g, dtype=D)


def test_cross_entropy_at_tp1_is_torch_cross_entropy():
    logits, labels, dy = _ce_inputs(D)
    loss, grad = _ce(_tp1_ce, logits, labels, dy)
    ref_loss, ref_grad = _ce(lambda x, y: F.cross_entropy(x.flatten(0, 1), y.flatten(), reduction="none")
                             .view(y.shape), logits, labels, dy)
    assert loss.dtype == grad.dtype == D
    close(loss, ref_loss)
    close(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_at_tp1_half_precision(dtype):
    """bf16/fp16 logits: the loss in fp32, the gradient in the logits' dtype, both as F.cross_entropy
    on the fp32 upcast gives them."""
    logits, labels, dy = _ce_inputs(dtype)
    dy = dy.float()
    loss, grad = _ce(_tp1_ce, logits, labels, dy)
    ref_loss, ref_grad = _ce(_torch_ce, logits, labels, dy)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad)           # dtype's own tolerance: a rounding apart at most


def test_cross_entropy_builds_no_one_hot_and_no_full_size_cast():
    """The ops of forward and backward at TP 1 on bf16 logits: no [tokens, V] integer tensor (a
    one-hot of the labels) and no separate full-size cast (aten._to_copy): the upcast happens in
    the subtraction of the max, the downcast of the gradient in its multiply."""
    logits, labels, dy = _ce_inputs(torch.bfloat16)
    x = logits.clone().requires_grad_()
    with RecordOps() as fwd:
        loss = _tp1_ce(x, labels)
    with RecordOps() as bwd:
        (loss * dy.float()).sum().backward()
    for ops in (fwd.outputs, bwd.outputs):
        full = _full_size(ops, logits.shape)
        assert full and not _integer(full), full
        assert not [o for o in full if o.func is torch.ops.aten._to_copy.default], full
    assert x.grad.dtype == torch.bfloat16


# ---- mappings, against hand-built expectations -----------------------------------------------

def _m(res, name):
    return res["mappings"][name]


def test_copy_to_and_reduce_from(ranks):
    for world, P, r, res in _cases(ranks):
        m = _m(res, "copy_to")
        close(m["y"], _rank_tensor(0, 2, 3))                                # identity
        close(m["x_grad"], -sum(_rank_tensor(s, 2, 3) for s in range(P)))   # sum of the ranks' grads
        assert m["fwd"] == {} and m["bwd"] == {"all_reduce/tp": (1, 6 * 8)}
        m = _m(res, "reduce_from")
        close(m["y"], sum(_rank_tensor(s, 2, 3) for s in range(P)))
        close(m["x_grad"], -_rank_tensor(0, 2, 3))                          # identity
        assert m["fwd"] == {"all_reduce/tp": (1, 6 * 8)} and m["bwd"] == {}


def test_split_and_gather(ranks):
    for world, P, r, res in _cases(ranks):
        m = _m(res, "split")
        close(m["y"], _rank_tensor(0, 2, 2 * P, 3)[:, 2 * r:2 * r + 2])     # own chunk of dim 1
        close(m["x_grad"], torch.cat([-_rank_tensor(s, 2, 2, 3) for s in range(P)], dim=1))
        assert m["fwd"] == {} and m["bwd"] == {"all_gather/tp": (1, 12 * 8)}
        m = _m(res, "gather")
        close(m["y"], torch.cat([_rank_tensor(s, 2, 2, 3) for s in range(P)], dim=1))
        close(m["x_grad"], -_rank_tensor(r, 2, 2 * P, 3)[:, 2 * r:2 * r + 2])
        assert m["fwd"] == {"all_gather/tp": (1, 12 * 8)} and m["bwd"] == {}


def test_gather_partial_and_reduce_scatter(ranks):
    for world, P, r, res in _cases(ranks):
        m = _m(res, "gather_partial")
        close(m["y"], torch.cat([_rank_tensor(s, 2, 3) for s in range(P)]))
        # backward: the upstream grads are partial sums: reduce over ranks, keep own rows
        close(m["x_grad"], -sum(_rank_tensor(s, 2 * P, 3) for s in range(P))[2 * r:2 * r + 2])
        assert m["fwd"] == {"all_gather/tp": (1, 6 * 8)}
        assert m["bwd"] == {"reduce_scatter/tp": (1, 2 * P * 3 * 8)}
        m = _m(res, "reduce_scatter")
        close(m["y"], sum(_rank_tensor(s, 2 * P, 3) for s in range(P))[2 * r:2 * r + 2])
        close(m["x_grad"], torch.cat([-_rank_tensor(s, 2, 3) for s in range(P)]))
        assert m["fwd"] == {"reduce_scatter/tp": (1, 2 * P * 3 * 8)}
        assert m["bwd"] == {"all_gather/tp": (1, 6 * 8)}


def test_all_to_all_uneven(ranks):
    for world, P, r, res in _cases(ranks):
        S = SPLITS[P]
        m = _m(res, "all_to_all")
        # forward: rank r receives, from each source i in order, the rows i addressed to r
        expect = torch.cat([_a2a_input(i, sum(S[i]))[sum(S[i][:r]): sum(S[i][:r + 1])] for i in range(P)])
        close(m["y"], expect)
        # backward: the reverse exchange; rank r's input rows sent to j get the matching rows of j's grad
        expect_grad = torch.cat([
            _a2a_grad(j, sum(S[i][j] for i in range(P)))[sum(S[i][j] for i in range(r)):
                                                         sum(S[i][j] for i in range(r + 1))]
            for j in range(P)])
        close(m["x_grad"], expect_grad)
        sent, received = sum(S[r]), sum(S[i][r] for i in range(P))
        # an [n, 3] float32 tensor records n * 3 * 4 bytes, counted for the rows this rank sends
        assert m["fwd"] == {"all_to_all/tp": (1, sent * H_A2A * 4)}
        assert m["bwd"] == {"all_to_all/tp": (1, received * H_A2A * 4)}

        m = _m(res, "all_to_all_equal")
        n = 2 * P
        close(m["y"], torch.cat([_a2a_input(i, n)[2 * r:2 * r + 2] for i in range(P)]))
        close(m["x_grad"], torch.cat([_a2a_grad(j, n)[2 * r:2 * r + 2] for j in range(P)]))
        assert m["fwd"] == {"all_to_all/tp": (1, n * H_A2A * 4)}
        assert m["bwd"] == {"all_to_all/tp": (1, n * H_A2A * 4)}

        m = res["mappings"]["counts"]
        assert m["y"].tolist() == [S[i][r] for i in range(P)]
        assert m["fwd"] == {"counts/tp": (1, P * 8)}                   # int64 split sizes


def test_every_rank_and_group_was_checked(ranks):
    seen = {(world, P, r) for world, P, r, _ in _cases(ranks)}
    # world 2: TP 2; world 4: TP 4 (ranks 0..3) and TP 2 (two groups, ranks 0, 1 twice)
    assert seen == {(2, 2, 0), (2, 2, 1), (4, 4, 0), (4, 4, 1), (4, 4, 2), (4, 4, 3), (4, 2, 0), (4, 2, 1)}
    assert sum(1 for w, P, *_ in _cases(ranks) if (w, P) == (4, 2)) == 4


# ---- CommStats (no processes) ----------------------------------------------------------------

def test_comm_stats_counts_calls_and_bytes():
    s = CommStats()
    s.record("all_to_all", "ep", 5 * 16 * 4)
    s.record("all_to_all", "ep", 3 * 16 * 4)
    s.record("counts", "ep", 4 * 8)
    s.record("all_reduce", "dp", 100)
    assert s.count("all_to_all") == 2 and s.nbytes("all_to_all", "ep") == 8 * 16 * 4
    assert s.count("all_to_all", "tp") == 0 and s.count("counts") == 1
    assert s.snapshot() == {"all_reduce/dp": (1, 100), "all_to_all/ep": (2, 512), "counts/ep": (1, 32)}
    s.enabled = False
    s.record("all_reduce", "dp", 7)
    assert s.count("all_reduce") == 1
    s.enabled = True
    s.reset()
    assert s.snapshot() == {} and s.summary() == "none"


def test_size_one_group_is_a_free_no_op():
    g = Group.single("tp")
    t = torch.ones(4, 3)
    assert comm.all_reduce(t, g) is t and comm.all_gather(t, g) is t
    assert comm.reduce_scatter(t, g) is t and comm.all_to_all(t, g, [4], [4]) is t
    assert mappings.split(t, g) is t and mappings.gather_partial(t, g) is t
    assert g.stats.snapshot() == {}


# ---- shard / unshard -------------------------------------------------------------------------

def test_unshard_of_shard_round_trip(ranks):
    full = torch.arange(4 * 8 * 12, dtype=D).view(4, 8, 12)
    for world, results in ranks.items():
        for tp_size, ep_size in ((1, world), (world, 1), (2, world // 2)):
            distinct = {spec: set() for spec in _SPECS}
            for res in results:
                out = res[("shard", tp_size, ep_size)]
                t, e = out["tp"], out["ep"]
                for spec, got in out["shards"].items():
                    idx = [slice(None)] * 3
                    if spec.expert:                      # contiguous block of experts per EP rank
                        idx[0] = _tp_slice(4, ep_size, e)
                    if spec.tp_dim is not None:
                        idx[spec.tp_dim] = _tp_slice(full.shape[spec.tp_dim], tp_size, t)
                    close(got["local"], full[tuple(idx)])
                    close(got["back"], full)
                    distinct[spec].add(tuple(got["local"].flatten().tolist()))
            for spec, pieces in distinct.items():
                # how many different pieces the layout must produce for this spec
                n = (tp_size if spec.tp_dim is not None else 1) * (ep_size if spec.expert else 1)
                assert len(pieces) == n, (world, tp_size, ep_size, spec)


# ---- attention dropout over TP -------------------------------------------------------------------

def _attention_dropout(rank, world):
    from megatron_ted.model.attention import SelfAttention
    groups = ParallelGroups.create(ParallelLayout(world, world, 1))
    attn = SelfAttention(16, 4, groups.tp, dropout=0.5, bias=False).train()
    q = torch.linspace(-1, 1, 2 * 2 * 6 * 4).view(2, 2, 6, 4)     # the same heads on every rank
    torch.manual_seed(7)
    first = attn._core(q, q, q)
    after = torch.rand(3)                                           # the shared stream after the call
    torch.manual_seed(7)
    again = attn._core(q, q, q)                                     # what a recompute would see
    attn.eval()
    return first, after, again, attn._core(q, q, q)


def test_attention_dropout_masks_differ_over_tp_and_replay():
    """Head shards of different TP ranks get different dropout masks (same inputs, different
    outputs); a replay from the same RNG state gives the same masks (recompute); the shared stream
    advances identically on every rank (replicated hidden dropout stays identical over TP)."""
    (first0, after0, again0, eval0), (first1, after1, again1, eval1) = run_forked(_attention_dropout, 2)
    assert torch.equal(eval0, eval1)                 # no dropout: identical heads give identical outputs
    assert not torch.equal(first0, first1)           # dropout: each TP rank its own masks
    assert not torch.equal(first0, eval0)            # dropout really ran
    assert torch.equal(first0, again0) and torch.equal(first1, again1)
    assert torch.equal(after0, after1)
