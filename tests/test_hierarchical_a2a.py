"""Hierarchical all-to-all (HetuMoE) against the flat one on 8 gloo processes with simulated nodes:
the same rows in the same order forward, the same input gradients backward, uneven splits
(zero blocks, a rank that sends nothing, a rank that receives nothing), the traffic counted per
step in CommStats; and a whole TED model trained with it equals one process.

Layouts (world 8): TP 1 x EP 8 as 2 nodes of 4 and as 4 nodes of 2; TP 2 x EP 4 (EP groups
[0,2,4,6] and [1,3,5,7]: 2 members on each of 2 nodes); EP 4 with expert-DP before EP (order
tp-dp-ep: EP group [0,2,4,6]); and EP 4 inside one node of 4, where the flat exchange is used.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ted.moe.hierarchical import create_groups, hierarchical_all_to_all, node_members
from megatron_ted.parallel import mappings
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.training.arguments import parse_args
from parity import assert_matches, job, reference_job, run_forked, run_jobs, single_thread

H = 3
CASES = [  # (tp, ep, order, node size)
    (1, 8, "tp-ep-dp", 4),
    (1, 8, "tp-ep-dp", 2),
    (2, 4, "tp-ep-dp", 4),
    (1, 4, "tp-dp-ep", 4),
    (1, 4, "tp-ep-dp", 4),
]


def split_matrix(P: int, seed: int) -> torch.Tensor:
    """S[i][j] rows from EP rank i to EP rank j: random 0..4, EP rank 1 sends nothing, EP rank P-1
    receives nothing, and one large block."""
    S = torch.randint(0, 5, (P, P), generator=torch.Generator().manual_seed(seed))
    S[1, :] = 0
    S[:, P - 1] = 0
    S[0, P - 2] = 9
    return S


def exchange_worker(rank, world, cases):
    out = []
    for case_index, (tp, ep, order, node_size) in enumerate(cases):
        layout = ParallelLayout(world, tp, ep, order)
        groups = ParallelGroups.create(layout)
        hier = create_groups(layout, rank, node_size, groups.stats)
        P, r = groups.ep.size, groups.ep.rank
        S = split_matrix(P, 100 + case_index)            # the same matrix on every rank
        x = torch.randn(int(S[r].sum()), H, dtype=torch.float64, requires_grad=True,
                        generator=torch.Generator().manual_seed(1000 * case_index + rank))
        grad_y = torch.randn(int(S[:, r].sum()), H, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(2000 * case_index + rank))
        result = dict(case=(tp, ep, order, node_size), S=S, ep_rank=r, members=hier.members, useful=hier.useful,
                      leader=hier.inter is not None)
        for name, fn in (("hier", lambda: hierarchical_all_to_all(x, groups.ep, hier, S[:, r].tolist(), S[r].tolist())),
                         ("flat", lambda: mappings.all_to_all(x, groups.ep, S[:, r].tolist(), S[r].tolist()))):
            groups.stats.reset()
            y = fn()
            (y * grad_y).sum().backward()
            result[name] = dict(y=y.detach().clone(), grad=x.grad.clone(), stats=groups.stats.snapshot())
            x.grad = None
        out.append(result)
    return out


@pytest.fixture(scope="module")
def exchanges():
    return run_forked(exchange_worker, 8, CASES)


def _by_case(exchanges, i):
    return [per_rank[i] for per_rank in exchanges]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_same_rows_forward_and_same_gradients_backward(exchanges, i):
    for res in _by_case(exchanges, i):
        assert res["hier"]["y"].shape == res["flat"]["y"].shape
        assert torch.equal(res["hier"]["y"], res["flat"]["y"]), (CASES[i], res["ep_rank"])
        assert torch.equal(res["hier"]["grad"], res["flat"]["grad"]), (CASES[i], res["ep_rank"])


def test_the_splits_are_uneven(exchanges):
    S = exchanges[0][0]["S"]
    assert S[1].sum() == 0 and S[:, -1].sum() == 0 and (S == 0).any() and S.max() == 9
    assert len(set(S.sum(1).tolist())) > 2


def test_node_split_of_each_layout(exchanges):
    members = [exchanges[0][i]["members"] for i in range(len(CASES))]
    assert members[0] == ((0, 1, 2, 3), (4, 5, 6, 7))        # EP 8, 2 nodes of 4
    assert members[1] == ((0, 1), (2, 3), (4, 5), (6, 7))    # EP 8, 4 nodes of 2
    assert members[2] == ((0, 1), (2, 3))                    # [0,2,4,6]: global 0,2 | 4,6
    assert members[3] == ((0, 1), (2, 3))                    # tp-dp-ep: [0,2,4,6] as well
    assert members[4] == ((0, 1, 2, 3),)                     # inside one node: flat
    assert [exchanges[0][i]["useful"] for i in range(len(CASES))] == [True, True, True, True, False]
    assert node_members((0, 1, 2, 3, 4, 5, 6, 7), 4) == members[0]


def test_traffic_is_counted(exchanges):
    """TP 1 x EP 8 as 2 nodes of 4, one exchange forward and its mirror backward, rows of H fp64.

    Flat: every rank makes one all_to_all over "ep" per direction and sends its own rows, so the
    world sends all R rows twice. Hierarchical: each rank sends its rows to its leader ("gather"
    over "ep_intra", 1 call per direction); only the 2 leaders (EP ranks 0 and 4) cross nodes, one
    all_to_all each over "ep_inter" per direction carrying every row of their node, so R rows
    twice in all; each leader hands every row out again ("scatter"). The split matrix is
    all-gathered once (forward): P int64 per rank ("counts" over "ep").
    """
    results = _by_case(exchanges, 0)
    R = int(results[0]["S"].sum())
    row = H * 8
    assert sum(r["flat"]["stats"]["all_to_all/ep"][1] for r in results) == 2 * R * row
    assert all(r["flat"]["stats"]["all_to_all/ep"][0] == 2 for r in results)
    inter = [r["hier"]["stats"].get("all_to_all/ep_inter") for r in results]
    leaders = [r["ep_rank"] for r in results if r["leader"]]
    assert leaders == [0, 4]
    assert all((calls == 2) == r["leader"] for r, (calls, _) in zip(results, [i or (0, 0) for i in inter]))
    assert sum(nbytes for calls, nbytes in (i for i in inter if i)) == 2 * R * row
    assert sum(r["hier"]["stats"]["gather/ep_intra"][1] for r in results) == 2 * R * row
    assert sum(r["hier"]["stats"]["scatter/ep_intra"][1] for r in results) == 2 * R * row
    assert all(r["hier"]["stats"]["counts/ep"] == (1, 8 * 8) for r in results)
    assert all("all_to_all/ep" not in r["hier"]["stats"] for r in results)
    # inside one node the flat exchange runs
    assert all("all_to_all/ep" in r["hier"]["stats"] for r in _by_case(exchanges, 4))


# ---- a whole model ---------------------------------------------------------------------------------

HIER = dict(num_experts=8, topk=2, a2a_algorithm="hierarchical", a2a_node_size=4)
HIER_CAP = dict(HIER, topk=1, capacity_factor=1.0, min_capacity=1, drop_policy="random")
FULL = dict(granularity="full")
CAC = dict(granularity="full", moe_cac=True)
MODEL_JOBS = [job(1, 8, moe_kw=HIER, steps=2, global_batch=16), job(2, 4, moe_kw=HIER, steps=2, global_batch=16),
              job(1, 8, moe_kw=HIER_CAP, steps=2, global_batch=16),
              job(1, 8, moe_kw=HIER, steps=2, global_batch=16, recompute=FULL),
              job(1, 8, moe_kw=HIER, steps=2, global_batch=16, recompute=CAC)]


def _without_a2a(kw):
    return {k: v for k, v in kw.items() if not k.startswith("a2a")}


@pytest.fixture(scope="module")
def model_runs():
    return run_forked(run_jobs, 8, MODEL_JOBS)


@pytest.mark.parametrize("jj", range(len(MODEL_JOBS)))
def test_model_with_hierarchical_exchange_equals_one_process(model_runs, jj):
    j = MODEL_JOBS[jj]
    ref = single_thread(lambda: reference_job(dict(j, moe_kw=_without_a2a(j["moe_kw"]), recompute=None)))
    for rank, per_rank in enumerate(model_runs):
        res = per_rank[jj]
        assert_matches(res, ref, f"hierarchical TP {j['tp']} EP {j['ep']} rank {rank}")
        # every rank gathers to its leader, only the leaders exchange between nodes, no flat exchange
        assert res["stats"]["gather/ep_intra"][0] > 0 and res["stats"]["scatter/ep_intra"][0] > 0
        assert ("all_to_all/ep_inter" in res["stats"]) == (res["coords"]["ep"] in (0, j["ep"] // 2))
        assert "all_to_all/ep" not in res["stats"]


def test_split_matrix_is_exchanged_once_per_moe_layer_call(model_runs):
    """Dispatch and combine need the split matrix and its transpose: one all-gather serves both.
    Per MoE layer per micro-batch the node gathers run 4 times (dispatch and combine, forward and
    backward) and the "counts" exchanges twice (the dispatcher's split sizes, the matrix)."""
    plain = MODEL_JOBS.index(next(j for j in MODEL_JOBS if j["moe_kw"] == HIER and j["tp"] == 1
                                  and j.get("recompute") is None))
    for per_rank in model_runs:
        stats = per_rank[plain]["stats"]
        layer_calls = stats["gather/ep_intra"][0] // 4
        assert layer_calls > 0 and stats["gather/ep_intra"][0] == 4 * layer_calls
        assert stats["counts/ep"][0] == 2 * layer_calls


def test_cac_keeps_the_hierarchical_exchange(model_runs):
    """Per step, checkpointing recomputes the forward exchanges (dispatch + combine): the leaders'
    inter-node all-to-alls and the node gathers/scatters grow 4 -> 6 per MoE layer per micro-batch,
    and the split matrices are exchanged again. CAC reuses the forward's: the counts of no
    checkpointing, byte for byte."""
    plain, full, kept = (MODEL_JOBS.index(j) for j in MODEL_JOBS if j["tp"] == 1 and j["moe_kw"] == HIER)
    for per_rank in model_runs:
        for key in ("gather/ep_intra", "scatter/ep_intra", "all_to_all/ep_inter", "counts/ep"):
            none = per_rank[plain]["stats"].get(key)
            if none is None:                      # not a leader: no inter-node exchange
                assert key == "all_to_all/ep_inter"
                continue
            assert per_rank[kept]["stats"][key] == none, key
            calls_full, calls_none = per_rank[full]["stats"][key][0], none[0]
            if key == "counts/ep":   # 1 split-size exchange + 1 split matrix per layer: 2 -> 4
                assert calls_full == 2 * calls_none, key
            else:
                assert 2 * calls_full == 3 * calls_none, key


def test_flags():
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--mock-data", "--vocab-size", "200", "--num-experts", "8",
            "--expert-model-parallel-size", "8"]
    args = parse_args(base + ["--moe-a2a-algorithm", "hierarchical", "--moe-a2a-node-size", "4"], world_size=8)
    assert args.moe_a2a_node_size == 4
    with pytest.raises(ValueError, match="--moe-a2a-node-size 3"):
        parse_args(base + ["--moe-a2a-algorithm", "hierarchical", "--moe-a2a-node-size", "3"], world_size=8)
    with pytest.raises(ValueError, match="--moe-a2a-algorithm"):
        parse_args(base + ["--moe-a2a-algorithm", "tree"], world_size=8)
