"""ParallelLayout rank arithmetic (checked against megatron-core's RankGenerator) and ParallelGroups."""
import importlib
import importlib.util
import sys
import time
import types
import warnings

import pytest
import torch

from megatron_ted.parallel import CommStats, LayoutError, ParallelGroups, ParallelLayout, RankCoords
from megatron_ted.parallel import comm
from megatron_ted.parallel.layout import KINDS, ORDERS
from multiproc import run_distributed


def valid_layouts(worlds=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32)):
    for world in worlds:
        for pp in range(1, world + 1):
            if world % pp:
                continue
            stage = world // pp
            for tp in range(1, stage + 1):
                if stage % tp:
                    continue
                for ep in range(1, stage // tp + 1):
                    if (stage // tp) % ep:
                        continue
                    for order in ORDERS:
                        yield ParallelLayout(world, tp, ep, order, pipeline_parallel=pp)


# ---- (a) the docs/DESIGN.md example ------------------------------------------------------------

def test_design_example_16_ranks_tp2_ep4():
    lay = ParallelLayout(16, tensor_parallel=2, expert_parallel=4)
    assert (lay.data_parallel, lay.expert_data_parallel) == (8, 2)
    assert lay.groups("tp") == [(2 * i, 2 * i + 1) for i in range(8)]
    assert lay.groups("dp") == [tuple(range(0, 16, 2)), tuple(range(1, 16, 2))]
    assert sorted(lay.groups("ep")) == sorted([(0, 2, 4, 6), (8, 10, 12, 14), (1, 3, 5, 7), (9, 11, 13, 15)])
    assert lay.groups("ep") == [(0, 2, 4, 6), (1, 3, 5, 7), (8, 10, 12, 14), (9, 11, 13, 15)]
    assert lay.groups("expert_dp") == [(r, r + 8) for r in range(8)]
    assert lay.coords(10) == RankCoords(tp=0, dp=5, ep=1, expert_dp=1)
    assert lay.ep_group(10) == (8, 10, 12, 14) and lay.expert_dp_group(10) == (2, 10)
    assert str(lay) == "world 16 = TP 2 x DP 8 (EP 4 x expert-DP 2), order tp-ep-dp"


def test_alternative_order_keeps_expert_dp_contiguous():
    lay = ParallelLayout(16, tensor_parallel=2, expert_parallel=4, order="tp-dp-ep")
    # rank = t + TP * (d + DP_exp * e)
    assert lay.groups("expert_dp") == [(0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 14), (13, 15)]
    assert lay.groups("ep") == [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)]
    assert lay.groups("dp") == ParallelLayout(16, 2, 4).groups("dp")  # dense view does not depend on order
    assert lay.rank_of(tp=1, ep=2, expert_dp=1) == 1 + 2 * (1 + 2 * 2)


# ---- (b) groups partition the world, coords agree with membership -------------------------------

def test_groups_partition_and_coords_consistent():
    n = 0
    for lay in valid_layouts():
        n += 1
        sizes = {k: lay.size(k) for k in KINDS}
        assert sizes["tp"] * sizes["dp"] * sizes["pp"] == lay.world_size
        assert sizes["ep"] * sizes["expert_dp"] == sizes["dp"]
        for kind in KINDS:
            groups = lay.groups(kind)
            assert all(len(g) == sizes[kind] and list(g) == sorted(g) for g in groups)
            members = sorted(r for g in groups for r in g)
            if kind == "embedding":   # first and last stage only: the middle ones hold no embedding
                stages = {0, sizes["pp"] - 1}
                assert members == sorted(r for r in range(lay.world_size) if lay.coords(r).pp in stages)
                continue
            assert len(groups) == lay.world_size // sizes[kind]
            assert members == list(range(lay.world_size)), (lay, kind)
            assert [g[0] for g in groups] == sorted(g[0] for g in groups)
            for g in groups:
                for i, r in enumerate(g):
                    assert getattr(lay.coords(r), kind) == i
                    assert lay.group(kind, r) == g
        for r in range(lay.world_size):
            c = lay.coords(r)
            assert lay.rank_of(c.tp, c.ep, c.expert_dp, c.pp) == r
            # a stage is PP-outermost: contiguous ranks; the pipeline group has one rank per stage
            assert r in lay.stage_ranks(c.pp) and [lay.coords(q).pp for q in lay.pp_group(r)] == list(range(lay.pipeline_parallel))
            assert set(lay.dp_group(r)) <= set(lay.stage_ranks(c.pp))
            # EP and expert-DP groups are the two halves of the DP group.
            assert set(lay.ep_group(r)) <= set(lay.dp_group(r))
            assert set(lay.expert_dp_group(r)) <= set(lay.dp_group(r))
            assert set(lay.ep_group(r)) & set(lay.expert_dp_group(r)) == {r}
    assert n > 50


# ---- (c) megatron-core oracle ------------------------------------------------------------------

def rank_generator_class():
    """megatron-core's RankGenerator, imported without running megatron/core/__init__.py.

    The package init pulls in all of megatron-core (seconds); parallel_state needs only a few
    modules. The temporary package stub and everything imported under it are removed afterwards,
    so a later `import megatron.core` elsewhere starts clean.
    """
    if "megatron.core.parallel_state" in sys.modules:
        return sys.modules["megatron.core.parallel_state"].RankGenerator
    spec = importlib.util.find_spec("megatron.core")
    if spec is None:
        pytest.skip("megatron-core is not installed")
    before = set(sys.modules)
    stub = types.ModuleType("megatron.core")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["megatron.core"] = stub
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("megatron.core.parallel_state").RankGenerator
    finally:
        for name in set(sys.modules) - before:
            if name == "megatron" or name.startswith("megatron."):
                del sys.modules[name]


def megatron_groups(lay, RankGenerator):
    """The four kinds of groups as megatron-core's initialize_model_parallel would build them.

    Megatron uses two RankGenerators over the same order string: a dense one (ep=1, dp=DP) for the
    TP and DP groups and an expert one (tp=expert TP=TP, ep=EP, dp=DP_exp) for EP and expert-DP.
    Our "tp-ep-dp" is Megatron's default "tp-cp-ep-dp-pp"; "tp-dp-ep" swaps ep and dp. The
    embedding groups are the first and last rank of each pipeline group, as initialize_model_parallel
    builds them (the position-embedding group aside).
    """
    order = {"tp-ep-dp": "tp-cp-ep-dp-pp", "tp-dp-ep": "tp-cp-dp-ep-pp"}[lay.order]
    pp = lay.pipeline_parallel
    dense = RankGenerator(tp=lay.tensor_parallel, ep=1, dp=lay.data_parallel, pp=pp, cp=1, order=order)
    expert = RankGenerator(tp=lay.tensor_parallel, ep=lay.expert_parallel, dp=lay.expert_data_parallel,
                           pp=pp, cp=1, order=order)
    assert dense.get_ranks("tp") == expert.get_ranks("tp")
    assert sorted(dense.get_ranks("pp")) == sorted(expert.get_ranks("pp"))
    pipelines = dense.get_ranks("pp")
    return {"tp": dense.get_ranks("tp"), "dp": dense.get_ranks("dp"),
            "ep": expert.get_ranks("ep"), "expert_dp": expert.get_ranks("dp"), "pp": pipelines,
            "embedding": [sorted({g[0], g[-1]}) for g in pipelines]}


def test_groups_match_megatron_rank_generator():
    RankGenerator = rank_generator_class()
    n = 0
    for lay in valid_layouts(worlds=(1, 2, 4, 6, 8, 12, 16, 24, 32, 64)):
        oracle = megatron_groups(lay, RankGenerator)
        for kind in KINDS:
            # Megatron lists each group in group-rank order, as we do; only the list order differs.
            assert lay.groups(kind) == sorted(tuple(g) for g in oracle[kind]), (str(lay), kind)
        n += 1
    assert n > 200


def test_pipeline_rank_order_is_megatrons():
    """rank = t + TP * (e + EP * (d + DP_exp * p)), the DESIGN.md example with 2 stages."""
    lay = ParallelLayout(32, tensor_parallel=2, expert_parallel=4, pipeline_parallel=2)
    assert (lay.stage_size, lay.data_parallel, lay.expert_data_parallel) == (16, 8, 2)
    assert lay.coords(27) == RankCoords(tp=1, dp=5, ep=1, expert_dp=1, pp=1, embedding=1)
    assert lay.rank_of(tp=1, ep=1, expert_dp=1, pp=1) == 1 + 2 * (1 + 4 * (1 + 2 * 1))
    assert lay.pp_group(27) == (11, 27) and lay.embedding_group(11) == (11, 27)
    assert lay.ep_group(27) == (25, 27, 29, 31) and lay.expert_dp_group(27) == (19, 27)
    three = ParallelLayout(6, pipeline_parallel=3)
    assert three.embedding_group(2) == () and three.coords(2).embedding is None
    assert three.groups("embedding") == [(0, 4), (1, 5)]
    assert str(lay) == "world 32 = PP 2 x TP 2 x DP 8 (EP 4 x expert-DP 2), order tp-ep-dp"


# ---- (d) large worlds are instant; the table ----------------------------------------------------

def test_1024_ranks_is_instant():
    start = time.perf_counter()
    lay = ParallelLayout(1024, tensor_parallel=8, expert_parallel=16)
    for r in (0, 517, 1023):
        c = lay.coords(r)
        assert lay.tp_group(r)[c.tp] == r and lay.dp_group(r)[c.dp] == r
        assert lay.ep_group(r)[c.ep] == r and lay.expert_dp_group(r)[c.expert_dp] == r
    assert len(lay.groups("ep")) == 1024 // 16
    text = lay.table()
    assert time.perf_counter() - start < 0.5
    lines = text.splitlines()
    assert lines[0] == "world 1024: TP 8, DP 128, EP 16, expert-DP 8, order tp-ep-dp"
    assert any(line.strip() == "..." for line in lines)
    assert len(lines) == 2 + 16 + 1
    assert lines[-1].split() == ["1023", "7", "127", "15", "7"]


def test_small_table_lists_every_rank():
    text = ParallelLayout(8, 2, 2).table(gpus_per_node=4)
    lines = text.splitlines()
    assert "..." not in text and len(lines) == 2 + 8
    assert lines[1].split() == ["rank", "tp", "dp", "ep", "edp", "node"]
    assert lines[2 + 5].split() == ["5", "1", "2", "0", "1", "1"]
    lines = ParallelLayout(8, 2, 2, pipeline_parallel=2).table().splitlines()
    assert lines[0] == "world 8: PP 2, TP 2, DP 2, EP 2, expert-DP 1, order tp-ep-dp"
    assert lines[1].split() == ["rank", "pp", "tp", "dp", "ep", "edp"]
    assert lines[2 + 7].split() == ["7", "1", "1", "1", "1", "0"]


# ---- (e) errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, flag, fix", [
    ((8, 3), "--tensor-model-parallel-size 3", "pick a divisor of 8"),
    ((8, 2, 3), "--expert-model-parallel-size 3", "pick a divisor of 4"),
    ((8, 0), "--tensor-model-parallel-size 0", "at least 1"),
    ((8, 1, -2), "--expert-model-parallel-size -2", "at least 1"),
    ((0,), "world size 0", "at least 1"),
    ((8, 1, 1, "dp-ep-tp"), "--rank-order 'dp-ep-tp'", "tp-dp-ep"),
    ((8, 1, 1, "tp-ep-dp", 3), "--pipeline-model-parallel-size 3", "pick a divisor of 8"),
    ((8, 1, 1, "tp-ep-dp", 0), "--pipeline-model-parallel-size 0", "at least 1"),
    ((8, 4, 1, "tp-ep-dp", 4), "--tensor-model-parallel-size 4", "ranks per stage 2 (world 8 / PP 4)"),
    ((16, 2, 3, "tp-ep-dp", 2), "--expert-model-parallel-size 3", "world 16 / TP 2 / PP 2"),
])
def test_bad_layouts_raise_layout_error(args, flag, fix):
    with pytest.raises(LayoutError) as info:
        ParallelLayout(*args)
    msg = str(info.value)
    assert flag in msg and fix in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_rank_and_kind_out_of_range():
    lay = ParallelLayout(8, 2, 2)
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="outside"):
            lay.coords(bad)
        with pytest.raises(ValueError):
            lay.ep_group(bad)
    with pytest.raises(ValueError, match="unknown group kind"):
        lay.groups("cp")


# ---- (f) processes -------------------------------------------------------------------------------

def test_single_groups():
    g = ParallelGroups.single()
    assert g.layout.world_size == 1 and g.rank == 0
    assert all(g.group(k).size == 1 and g.group(k).stats is g.stats for k in KINDS)
    assert isinstance(g.stats, CommStats)
    t = torch.tensor([3.0])
    comm.all_reduce(t, g.ep)
    assert t.item() == 3.0 and g.stats.count("all_reduce") == 0


def _all_reduce_every_group(rank, world_size):
    out = {}
    for lay in (ParallelLayout(world_size, tensor_parallel=2, expert_parallel=2),
                ParallelLayout(world_size, tensor_parallel=1, expert_parallel=2, order="tp-dp-ep")):
        groups = ParallelGroups.create(lay)
        sums = {}
        for kind in KINDS:
            group = groups.group(kind)
            assert group.name == kind and group.stats is groups.stats
            assert group.ranks == lay.group(kind, rank) and group.ranks[group.rank] == rank
            t = torch.tensor([float(rank)])
            comm.all_reduce(t, group)
            sums[kind] = t.item()
        out[lay.order] = (sums, groups.stats.count("all_reduce"),
                          {k: groups.stats.count("all_reduce", k) for k in KINDS},
                          groups.ep.pg is groups.dp.pg, groups.ep is not groups.dp)
    return out


def test_parallel_groups_all_reduce_over_each_group():
    world = 4
    results = run_distributed(_all_reduce_every_group, world)
    layouts = {"tp-ep-dp": ParallelLayout(world, 2, 2), "tp-dp-ep": ParallelLayout(world, 1, 2, "tp-dp-ep")}
    for rank, out in enumerate(results):
        for order, lay in layouts.items():
            sums, total, per_kind, shared_pg, distinct = out[order]
            for kind in KINDS:
                assert sums[kind] == sum(lay.group(kind, rank)), (rank, order, kind)
            nontrivial = [k for k in KINDS if lay.size(k) > 1]
            assert total == len(nontrivial)
            assert per_kind == {k: int(k in nontrivial) for k in KINDS}
            assert distinct
            # TP 2, EP 2 at world 4: expert-DP is 1, so EP and DP are the same ranks and share a pg.
            assert shared_pg == (order == "tp-ep-dp")
