"""moe/permute.py: full permutations go through gathers in both directions (no index_put_, no
zero-fill + index_copy_), with the same numbers as the general scatter/gather pair; and the
dispatcher's send order, built before the host sync when the router fixes the experts per token."""
import pytest
import torch

from megatron_ted.model.builder import MoEConfig, build_gpt
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.moe import permute
from megatron_ted.moe.dispatcher import TokenDispatcher, chunk_order_index
from megatron_ted.moe.moe_layer import MoELayer
from megatron_ted.moe.router import RouterConfig
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from op_record import RecordOps
from parity import run_forked

SORTS = {torch.ops.aten.sort.default, torch.ops.aten.sort.stable}
SCATTERS = {torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default,
            torch.ops.aten.index_copy_.default, torch.ops.aten.index_copy.default}
GATHERS = {torch.ops.aten.index_select.default}


def test_permutation_with_inverse_equals_the_general_pair():
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(7, generator=g)
    inv = permute.inverse_permutation(idx)
    assert torch.equal(idx[inv], torch.arange(7)) and torch.equal(inv[idx], torch.arange(7))
    x = torch.randn(7, 3, dtype=torch.float64, generator=g)
    dy = torch.randn(7, 3, dtype=torch.float64, generator=g)
    for op in (lambda t, i: permute.gather_rows(t, idx, i), lambda t, i: permute.scatter_rows(t, idx, 7, i)):
        out = {}
        for inverse in (None, inv):
            xr = x.clone().requires_grad_()
            with RecordOps() as ops:
                y = op(xr, inverse)
                y.backward(dy)
            out[inverse is None] = (y.detach(), xr.grad, ops.count(SCATTERS))
        assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
        assert out[True][2] == 1 and out[False][2] == 0      # one scatter (forward or backward) vs none


def test_repeated_rows_are_gathered_without_building_the_repeated_tensor():
    """The dispatcher's send buffer: each token's row repeated K times, then permuted. With the
    inverse the repeat is never materialised (one [T*K, H] tensor in forward: the output); values
    and gradients equal the expand-copy + general gather."""
    T, K, H = 5, 3, 4
    g = torch.Generator().manual_seed(2)
    idx = torch.randperm(T * K, generator=g)
    inv = permute.inverse_permutation(idx)
    x = torch.randn(T, H, dtype=torch.float64, generator=g)
    dy = torch.randn(T * K, H, dtype=torch.float64, generator=g)

    out = {}
    for inverse in (None, inv):
        xr = x.clone().requires_grad_()
        with RecordOps() as fwd:
            y = permute.gather_repeated_rows(xr, K, idx, inverse)
        y.backward(dy)
        made = [o for o in fwd.outputs if o.func is not torch.ops.aten.view.default]
        out[inverse is None] = (y.detach(), xr.grad, [o.shape for o in made].count((T * K, H)))
    assert torch.equal(out[True][0], x.repeat_interleave(K, 0)[idx])
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert out[False][2] == 1 and out[True][2] == 2     # the output only vs the repeat copy too


def _model(capacity, groups=None):
    cfg = GPTConfig(vocab_size=64, hidden_size=16, num_layers=2, num_attention_heads=2, ffn_hidden_size=32,
                    max_position_embeddings=8)
    router = RouterConfig(num_experts=4, topk=2, capacity_factor=capacity, min_capacity=1)
    return build_gpt(cfg, MoEConfig(router, ffn_hidden_size=24, layer_freq=1), groups or ParallelGroups.single(),
                     3).double()


def _run(capacity, general, groups=None):
    model = _model(capacity, groups)
    tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    saved = permute._permutes
    if general:
        permute._permutes = lambda inverse: False
    try:
        with RecordOps() as ops:
            out = model(tokens, torch.arange(8).expand(4, 8), tokens)
            (out.loss.sum() + out.aux_loss).backward()
    finally:
        permute._permutes = saved
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, ops


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_moe_layers_permute_by_gathers_when_dropless(capacity):
    """Dropless: each MoE layer's dispatch and its local-expert reorder are full permutations, so
    forward and backward scatter nothing; with a capacity that drops, the dispatch is partial
    and keeps the index_put_/index_copy_ pair. Losses and gradients equal the general pair exactly."""
    loss, grads, ops = _run(capacity, general=False)
    ref_loss, ref_grads, ref_ops = _run(capacity, general=True)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    # the general path, per MoE layer: the combine's scatter forward, the send gather's backward
    # (at EP 1 the rows reach the experts in local-expert order: no reorder)
    assert ref_ops.count(SCATTERS) == 2 * 2
    if capacity is None:
        assert ops.count(SCATTERS) == 0
        assert ops.count(GATHERS) == 2 * 4                       # send and combine, forward and backward
    else:
        assert ops.count(SCATTERS) == 2 * 2                      # the partial dispatch's pair per layer


def _dtd_rank(rank, world, tp, ep):
    groups = ParallelGroups.create(ParallelLayout(world, tp, ep))
    pads, dtd = [], TokenDispatcher._experts_dtd

    def spy(self, x_RH, counts_TPL, rows_T, *rest):        # rows the TP group padded, per call
        pads.append(max(rows_T) * len(rows_T) - sum(rows_T))
        return dtd(self, x_RH, counts_TPL, rows_T, *rest)

    TokenDispatcher._experts_dtd = spy
    try:
        loss, grads, ops = _run(None, False, groups)
        pads_fast = list(pads)
        ref_loss, ref_grads, ref_ops = _run(None, True, groups)
    finally:
        TokenDispatcher._experts_dtd = dtd
    torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-12, atol=1e-15)
    return dict(pads=pads_fast, scatters=ops.count(SCATTERS), ref_scatters=ref_ops.count(SCATTERS))


@pytest.mark.parametrize("world,tp,ep", [(2, 1, 2), (2, 2, 1), (4, 2, 2)])
def test_expert_reorder_permutes_by_gathers_in_every_layout(world, tp, ep):
    """Dropless. EP 2: the rows from each source rank are reordered by local expert, a full
    permutation. DTD (TP 2): at EP 1 every TP rank holds as many rows (its half of the tokens, K
    each), so the gathered buffer has no padding; at EP 2 the TP ranks receive different row counts
    and pad, and the zero pad rows go through the last local expert, so the reorder is still a
    full permutation. Every way: no scatter forward or backward, and the numbers of the general pair."""
    results = run_forked(_dtd_rank, world, tp, ep)
    for r in results:   # the general pair per MoE layer: combine, reorder (x2), send gather's backward
        assert r["ref_scatters"] == 2 * 4 and r["scatters"] == 0
    padded = sum(p for r in results for p in r["pads"])
    assert (padded > 0) if (tp, ep) == (2, 2) else (padded == 0)    # TP 2 x EP 2 does exercise the padding


def _layer(early_send_order=True, **router):
    """early_send_order=False: the late path, as if the router had not said how many experts each
    token keeps (nor which)."""
    torch.manual_seed(0)
    tp, ep = Group.single("tp"), Group.single("ep")
    dispatcher = TokenDispatcher(4, ep, tp, early_send_order=early_send_order)
    layer = MoELayer(16, 24, RouterConfig(num_experts=4, **router), tp, ep, dispatcher=dispatcher).double()
    with torch.no_grad():
        for p in (layer.experts.fc1, layer.experts.fc2):
            p.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("router, per_token", [
    (dict(topk=2), 2), (dict(topk=1, router_type="sinkhorn"), 1),
    (dict(topk=2, capacity_factor=0.5, min_capacity=1), None),      # drops: 0..2 experts per token
    (dict(topk=2, router_type="gshard"), None),                     # the second expert is sampled
    (dict(topk=2, router_type="expert_choice"), None)])             # 0..E experts per token
def test_routers_say_when_every_token_keeps_exactly_k_experts(router, per_token):
    x = torch.randn(2, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _layer(**router).router(x).experts_per_token == per_token


@pytest.mark.parametrize("router", [dict(topk=2), dict(topk=1, router_type="sinkhorn")])
def test_send_order_queued_before_the_host_sync_equals_the_late_one(router):
    """With K fixed by the router the dispatcher builds the send order before it waits for the
    split sizes, from the router's own top-k indices and weights. Same numbers as building it
    after from the [T, E] map and weights (the path of routers that do not fix K), without that
    path's per-token sort of the map."""
    x = torch.randn(2, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results, map_sorts = [], []
    for early in (True, False):
        layer = _layer(early, **router)
        xr = x.clone().requires_grad_()
        with RecordOps() as ops:
            y, _ = layer(xr)
        map_sorts.append(sum(o.func in SORTS and o.dtype == torch.uint8 for o in ops.outputs))
        y.pow(2).sum().backward()
        results.append((y.detach(), xr.grad, [p.grad for p in layer.parameters() if p.grad is not None]))
    (y0, g0, p0), (y1, g1, p1) = results
    assert torch.equal(y0, y1) and torch.equal(g0, g1) and len(p0) == len(p1) == 3
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert map_sorts == [0, 1]


def test_a_router_that_misstates_experts_per_token_is_an_error():
    layer = _layer(topk=2)
    x_TH = torch.randn(4, 16, dtype=torch.float64)
    map_TE = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    with pytest.raises(RuntimeError, match="promised 2 experts"):      # token 2 keeps only one
        layer.dispatcher(x_TH, map_TE.double() / 2, map_TE, layer.experts, 2)
    y, _ = layer.dispatcher(x_TH, map_TE.double() / 2, map_TE, layer.experts, None)
    assert y.shape == x_TH.shape


def _by_hand(counts_SL):
    """Rows arrive as chunks (source s, local expert l) in (s, l) order; the index that lists them
    in (l, s) order, built with Python loops."""
    starts, at = {}, 0
    for s_, row in enumerate(counts_SL.tolist()):
        for l, n in enumerate(row):
            starts[s_, l], at = at, at + n
    S, L = counts_SL.shape
    return [starts[s_, l] + i for l in range(L) for s_ in range(S) for i in range(int(counts_SL[s_, l]))]


@pytest.mark.parametrize("S,L", [(2, 4), (4, 1), (3, 2)])
def test_receive_reorder_on_a_bound_equals_the_one_on_the_exact_count(S, L):
    """The local-expert reorder queued before the host knows the received row count R: on a
    bound >= R it is a permutation whose first R entries are the reorder (zero-row chunks
    included) and whose inverse's first R entries invert them."""
    g = torch.Generator().manual_seed(S * 10 + L)
    for trial in range(5):
        counts = torch.randint(0, 4, (S, L), generator=g)
        counts[0, 0] = 0 if trial % 2 else counts[0, 0]
        R = int(counts.sum())
        want = _by_hand(counts)
        assert chunk_order_index(counts, R).tolist() == want
        for bound in (R, R + 7):
            idx = chunk_order_index(counts, bound)
            assert sorted(idx.tolist()) == list(range(bound))
            assert idx[:R].tolist() == want and idx[R:].tolist() == list(range(R, bound))
            inv = permute.inverse_permutation(idx)
            assert torch.equal(idx[:R][inv[:R]], torch.arange(R))


INDEX_MATH = {torch.ops.aten.cumsum.default, torch.ops.aten.searchsorted.Tensor,
              torch.ops.aten.repeat_interleave.Tensor, torch.ops.aten.arange.start_step}


def _reorder_rank(rank, world, tp, ep):
    groups = ParallelGroups.create(ParallelLayout(world, tp, ep))
    _, _, ops = _run(None, False, groups)
    out = ops.outputs
    L = 4 // ep                                # the split sizes the host waits for: sends per EP rank,
    n_sizes = ep + ep * L + 1 + (tp + L if tp > 1 else 0)   # receives per (rank, expert), K, and DTD's
    waits = [i for i, o in enumerate(out)
             if o.func is torch.ops.aten.cat.default and o.dtype == torch.int64 and o.shape == (n_sizes,)]
    windows, end = [], 0
    for w in waits:   # this layer's ops before its wait, and from the wait to the gather of the received rows
        start, end = end, next(i for i in range(w + 1, len(out))
                               if out[i].func in GATHERS and out[i].dtype == torch.float64)
        windows.append(([str(o.func) for o in out[w + 1:end] if o.func in INDEX_MATH],
                        [str(o.func) for o in out[start:w] if o.func in INDEX_MATH]))
    return windows


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_expert_reorder_is_queued_before_the_host_waits(tp, ep):
    """Dropless top-2: the experts' reorder by local expert is computed before the host waits for
    the split sizes (EP 2: on the bound of EP x T x K received rows; DTD at TP 2 x EP 1: on the
    exact TP x T x K gathered rows), so between the wait and the gather of the rows the host
    launches no index arithmetic (the reorder's numbers: the test above,
    test_expert_reorder_permutes_by_gathers_in_every_layout and the parity tests)."""
    for windows in run_forked(_reorder_rank, 2, tp, ep):
        assert len(windows) == 2                                 # one wait per MoE layer forward
        for index_math_after, index_math_before in windows:
            assert index_math_after == [] and "aten.cumsum.default" in index_math_before
