"""Pipeline parallelism: the layer split, stages chained equal the full model, and the schedules of
torch.distributed.pipelining at PP x TP x EP against the single-process reference (float64)."""
import pytest

from megatron_ted.parallel.pipeline_split import PipelineSplit


# ---- the split (pure arithmetic) ----------------------------------------------------------------

def test_even_uneven_and_virtual_splits():
    assert PipelineSplit(8, 2).stage_layers() == [range(0, 4), range(4, 8)]
    # Megatron: the first / last stage fixed, the rest even over the middle stages
    assert PipelineSplit(10, 3, first_stage_layers=2, last_stage_layers=4).stage_layers() == \
        [range(0, 2), range(2, 6), range(6, 10)]
    assert PipelineSplit(7, 3, first_stage_layers=1).stage_layers() == [range(0, 1), range(1, 4), range(4, 7)]
    loop = PipelineSplit(8, 2, layers_per_virtual_stage=2)
    assert (loop.chunks, loop.num_stages) == (2, 4)
    assert loop.stage_layers() == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert loop.stages_of_rank(0) == [0, 2] and loop.stages_of_rank(1) == [1, 3]
    v = PipelineSplit(8, 2, layers_per_virtual_stage=2, style="v")
    assert v.stages_of_rank(0) == [0, 3] and v.stages_of_rank(1) == [1, 2]


@pytest.mark.parametrize("kw, flag", [
    (dict(num_layers=7, pipeline_parallel=2), "--num-layers 7"),
    (dict(num_layers=8, pipeline_parallel=2, layers_per_virtual_stage=3), "--num-layers-per-virtual-pipeline-stage 3"),
    (dict(num_layers=8, pipeline_parallel=1, layers_per_virtual_stage=2), "--pipeline-model-parallel-size > 1"),
    (dict(num_layers=8, pipeline_parallel=3, first_stage_layers=7), "--decoder-first-pipeline-num-layers 7"),
    (dict(num_layers=4, pipeline_parallel=2, first_stage_layers=1, last_stage_layers=2), "--num-layers 4"),
])
def test_bad_splits_are_one_line(kw, flag):
    with pytest.raises(ValueError) as info:
        PipelineSplit(**kw)
    assert flag in str(info.value) and "\n" not in str(info.value)


# ---- stages chained in one process equal the full model -----------------------------------------

def _chained_vs_full(untie: bool, split: PipelineSplit):
    import torch
    from megatron_ted.model.builder import build_gpt
    from megatron_ted.parallel.groups import ParallelGroups
    from parity import global_batches, tiny_config, tiny_moe

    groups = ParallelGroups.single()
    config = tiny_config(num_layers=4, untie_embeddings_and_output_weights=untie)
    moe = tiny_moe(aux_loss_coeff=0.01)
    full = build_gpt(config, moe, groups, seed=5).double()
    bounds = split.stage_layers()
    stages = [build_gpt(tiny_config(num_layers=4, untie_embeddings_and_output_weights=untie), moe, groups, seed=5,
                        layers=r, pre_process=s == 0, post_process=s == len(bounds) - 1).double()
              for s, r in enumerate(bounds)]
    batch = global_batches(1, 2)[0]
    out = full(batch["tokens"], batch["position_ids"], batch["labels"], routing_seed=3)
    (out.loss.sum() + out.aux_loss).backward()
    x, aux = batch["tokens"], 0
    for stage in stages:
        o = stage.forward_stage(x, batch["position_ids"], batch["tokens"], batch["labels"], routing_seed=3)
        x = o.loss if stage.post_process else o.logits
        aux = aux + o.aux_loss
    (x.sum() + aux).backward()
    torch.testing.assert_close(x, out.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-12, atol=1e-12)
    assert float(aux.detach()) > 0   # the aux loss is part of what is compared
    staged = {}
    for stage in stages:
        for name, p in stage.named_parameters():
            staged[name] = staged[name] + p.grad if name in staged else p.grad   # tied copies: summed
    full_grads = {n: p.grad for n, p in full.named_parameters()}
    assert staged.keys() == full_grads.keys()
    for name, g in full_grads.items():
        torch.testing.assert_close(staged[name], g, rtol=1e-10, atol=1e-12, msg=name)
    # logical names: a layer is layers.{global index} on every stage, the tied copy starts equal
    assert any(n.startswith(f"layers.{bounds[-1].start}.") for n, _ in stages[-1].named_parameters())
    if not untie:
        assert torch.equal(stages[-1].embedding.weight, stages[0].embedding.weight)
        assert stages[-1].embedding.weight.spec.tied_copy and not stages[0].embedding.weight.spec.tied_copy


@pytest.mark.parametrize("untie, split", [(False, PipelineSplit(4, 2)), (True, PipelineSplit(4, 3, first_stage_layers=2)),
                                          (False, PipelineSplit(4, 2, layers_per_virtual_stage=1))])
def test_stages_chained_equal_the_full_model(untie, split):
    _chained_vs_full(untie, split)


# ---- 8 processes, PP 2 x TP 2 x EP 2, against the single-process reference ---------------------

AUX = dict(topk=2, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
STEPS = 3


def eval_loss(model, groups, runner=None):
    """training/train.py's evaluation of 2 validation batches (global batch 8, micro-batch 2) of
    this rank's data-parallel share; pipelined with the runner."""
    from megatron_ted.training.train import evaluate
    from parity import global_batches, micro_batches
    n_micro = 8 // 2 // groups.dp.size
    mbs = [{k: v for k, v in mb.items() if k != "routing_seed"}
           for b in global_batches(2, 8, seed=99)
           for mb in micro_batches(dict(b, loss_mask=b["loss_mask"].double()), groups.dp.rank, groups.dp.size, 2)]
    return evaluate(model, iter(mbs), groups, "cpu", eval_iters=2, num_micro_batches=n_micro, runner=runner)


def train_pipeline(groups, vp=None, schedule=None, distributed_optimizer=False, recompute=None, steps=STEPS):
    """parity.train_layout's run (4 layers, the AUX router, global batch 8, micro-batch 2, float64)
    through the pipeline; "grads" of step 1 (unsharded, with the replicated optimizer); "evals":
    the validation loss after each step but the last (the schedule switches to eval and back)."""
    import torch
    from megatron_ted.parallelize.recompute import RecomputeConfig, apply_recompute
    from megatron_ted.parallel.sharding import spec_of, unshard
    from megatron_ted.pipeline.schedule import PipelineRunner, pipeline_forward_backward
    from megatron_ted.parallel.pipeline_split import PipelineSplit
    from megatron_ted.pipeline.stage import build_pipeline_model
    from megatron_ted.training.grad_sync import GradientSync
    from reference_adamw import MixedPrecisionAdamW
    from megatron_ted.training.tiled_optimizer import TiledAdamW
    from parity import global_batches, micro_batches, tiny_config, tiny_moe

    split = PipelineSplit(4, groups.pp.size, vp, style="v" if schedule == "zbv" else "loop")
    model = build_pipeline_model(tiny_config(num_layers=4), tiny_moe(**AUX), groups, 1234, split).double()
    if recompute:
        for chunk in model.chunks:
            apply_recompute(chunk, RecomputeConfig(**recompute))
    sync = GradientSync(model, groups.dp, groups.expert_dp, bucket_elements=500, reduce_scatter=distributed_optimizer)
    if distributed_optimizer:
        opt = TiledAdamW(model, sync, groups.tp, groups.dp, lr=1e-2, weight_decay=0.1, clip_grad=0.0, tile_size=64,
                         pp=groups.pp)
    else:
        opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=1e-2, weight_decay=0.1, clip_grad=0.0, pp=groups.pp)
    runner = PipelineRunner(model, groups, 8 // 2 // groups.dp.size, schedule)
    out = {"losses": [], "aux_losses": [], "grad_norms": [], "grads": None, "loads": [], "evals": []}
    for step, batch in enumerate(global_batches(steps, 8)):
        sync.zero_grad()
        batch = {k: (v.double() if k == "loss_mask" else v) for k, v in batch.items()}
        result = pipeline_forward_backward(runner, micro_batches(batch, groups.dp.rank, groups.dp.size, 2, step),
                                           groups, sync)
        if step == 0 and not distributed_optimizer:
            out["grads"] = {n: unshard(p.main_grad, spec_of(p), groups.tp, groups.ep).clone()
                            for n, p in model.named_parameters()}
        _, norm = opt.step(1e-2)
        out["losses"].append(result.lm_loss)
        out["aux_losses"].append(result.aux_loss)
        out["grad_norms"].append(norm)
        out["loads"].append([m["tokens_per_expert"].tolist() for m in result.moe])
        if step < steps - 1:
            out["evals"].append(eval_loss(model, groups, runner))
    out["embedding"] = model.embedding.weight.detach().clone() if hasattr(model, "embedding") else None
    out["stages"] = model.stage_indices
    return out


PIPELINE_JOBS = {
    "1f1b": dict(),
    "interleaved": dict(vp=1),
    "dtd-cac-distopt": dict(distributed_optimizer=True,
                            recompute=dict(granularity="full", num_layers=1, moe_cac=True)),
}


def run_pipeline_jobs(rank, world):
    from megatron_ted.parallel.groups import ParallelGroups
    from megatron_ted.parallel.layout import ParallelLayout
    groups = ParallelGroups.create(ParallelLayout(world, tensor_parallel=2, expert_parallel=2, pipeline_parallel=2))
    assert groups.pp.ranks == (rank % 4, rank % 4 + 4) and groups.embedding.ranks == groups.pp.ranks
    return {name: train_pipeline(groups, **kw) for name, kw in PIPELINE_JOBS.items()}


@pytest.fixture(scope="module")
def pipeline_runs():
    from parity import run_forked
    return run_forked(run_pipeline_jobs, 8)


@pytest.fixture(scope="module")
def reference():
    from megatron_ted.model.builder import build_gpt  # noqa: F401 (warm import)
    from megatron_ted.parallel.groups import ParallelGroups
    from parity import single_thread, tiny_config, tiny_moe, train_layout
    single = ParallelGroups.single()
    return single_thread(lambda: train_layout(single, tiny_config(num_layers=4), tiny_moe(**AUX), steps=STEPS,
                                              after_step=lambda step, model: eval_loss(model, single)))


def _merged_grads(ranks: list[dict], name: str) -> dict:
    """Every parameter's full gradient from the ranks holding it; the ranks agree (the tied
    embedding's two copies included: their gradients were summed)."""
    import torch
    merged = {}
    for res in ranks:
        for n, g in res[name]["grads"].items():
            if n in merged:
                torch.testing.assert_close(g, merged[n], rtol=0, atol=0, msg=lambda m, n=n: f"{name}: {n}: {m}")
            merged[n] = g
    return merged


@pytest.mark.parametrize("name", list(PIPELINE_JOBS))
def test_pipeline_matches_single_process(pipeline_runs, reference, name):
    from parity import assert_matches
    assert 0.005 < reference["aux_losses"][0] < 0.1   # the aux loss is in play
    for rank, res in enumerate(pipeline_runs):
        run = res[name]
        for a, b in zip(run["losses"], reference["losses"]):
            assert a == pytest.approx(b, rel=1e-11), f"{name} rank {rank}: loss {a} != {b}"
        for a, b in zip(run["aux_losses"], reference["aux_losses"]):
            assert a == pytest.approx(b, rel=1e-11), f"{name} rank {rank}: aux loss {a} != {b}"
        assert len(run["evals"]) == STEPS - 1
        for a, b in zip(run["evals"], reference["after_step"]):
            assert a == pytest.approx(b, rel=1e-11), f"{name} rank {rank}: validation loss {a} != {b}"
        for a, b in zip(run["grad_norms"], reference["grad_norms"]):
            assert a == pytest.approx(b, rel=1e-10), f"{name} rank {rank}: grad norm {a} != {b}"
        # routing statistics of all 4 MoE layers on every rank (stages gathered), of this rank's
        # data-parallel share as without a pipeline: the two DP ranks' loads add up to the reference's
        partner = pipeline_runs[rank ^ 2][name]          # the other DP rank of this stage and TP rank
        for s in range(STEPS):
            want = [m["tokens_per_expert"].tolist() for m in reference["moe_steps"][s]]
            got = [[a + b for a, b in zip(x, y)] for x, y in zip(run["loads"][s], partner["loads"][s])]
            assert got == want, f"{name} rank {rank} step {s}"
    chunks = [[0, 2], [1, 3]] if name == "interleaved" else [[0], [1]]
    assert [pipeline_runs[r][name]["stages"] for r in (0, 4)] == chunks
    if name != "dtd-cac-distopt":
        grads = _merged_grads(pipeline_runs, name)
        assert_matches({"losses": reference["losses"], "grads": grads}, reference, name)
    # the tied embedding's copies stay equal after the optimizer steps
    import torch
    ends = [res[name]["embedding"] for res in pipeline_runs if res[name]["embedding"] is not None]
    assert len(ends) == 8 and all(torch.equal(ends[r], ends[r + 4]) for r in range(4))


# ---- the entry point: resume across P, bad input ------------------------------------------------

CLI = ("--num-layers 4 --hidden-size 16 --num-attention-heads 4 --seq-length 8 --micro-batch-size 1 "
       "--global-batch-size 4 --mock-data --vocab-size 128 --tokenizer-type NullTokenizer --eval-iters 0 "
       "--hidden-dropout 0 --attention-dropout 0 --lr 1e-2 --lr-decay-style constant --num-experts 2 --log-interval 1 --seed 3").split()


def _cli_worker(rank, world, port, argv):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    from megatron_ted.config.from_flags import configs_from_args
    from megatron_ted.data.tokenizer import build_tokenizer
    from megatron_ted.training.arguments import padded_vocab_size, parse_args
    from megatron_ted.training.train import train
    import megatron_ted.training.train as entry
    args = parse_args(argv, world_size=world)
    tok = build_tokenizer(args.tokenizer_type, None, args.vocab_size, None, None)
    args.padded_vocab_size = padded_vocab_size(tok.vocab_size, args.make_vocab_size_divisible_by, 1)
    write = entry.save_checkpoint

    def save_and_keep_own(save, it, model, *rest, **kw):   # this rank's parameters as it trained them
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                   os.path.join(save, f"params_{it}_rank{rank}.pt"))
        return write(save, it, model, *rest, **kw)

    entry.save_checkpoint = save_and_keep_own
    out = train(configs_from_args(args), tok, flops_per_token=0.0)   # the log's TFLOP/s are not checked here
    if rank == 0:
        torch.save(out["losses"], os.path.join(argv[argv.index("--save") + 1], "losses.pt"))


def _cli(world, extra, save):
    import os
    import torch
    import torch.multiprocessing as mp
    from multiproc import free_port
    argv = CLI + extra + ["--save", save]
    os.makedirs(save, exist_ok=True)
    mp.spawn(_cli_worker, args=(world, free_port(), argv), nprocs=world, join=True)
    return torch.load(os.path.join(save, "losses.pt"))


# llama-like (mixtral when exported: MoE on every layer, softmax top-2 renormalised)
LLAMA = ("--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
         "--untie-embeddings-and-output-weights --moe-router-topk 2 --moe-layer-freq 1").split()


def test_resume_across_pipeline_sizes(tmp_path):
    """4 iterations at PP 1; 2 at PP 2 saved and resumed at PP 1 (and the reverse), and 2 at PP 4 (one
    layer per stage, 4 processes) resumed at PP 2, continue the curve. The PP 2 checkpoint of
    iteration 2 serves inference and exports to Hugging Face."""
    whole = _cli(2, ["--train-iters", "4"] + LLAMA, str(tmp_path / "whole"))
    for first, then, name in ((2, 1, "p2p1"), (1, 2, "p1p2"), (4, 2, "p4p2")):
        d = str(tmp_path / name)
        head = _cli(max(2, first), ["--train-iters", "2", "--pipeline-model-parallel-size", str(first)] + LLAMA, d)
        if first == 2:
            _check_pipelined_checkpoint(d, tmp_path / "hf")
        tail = _cli(2, ["--train-iters", "4", "--pipeline-model-parallel-size", str(then), "--load", d] + LLAMA, d)
        assert head + tail == pytest.approx(whole, rel=1e-5), name


def _check_pipelined_checkpoint(save, hf_dir):
    """load_model (one process, P 1) holds exactly the two stages' trained parameters, every layer's;
    export-hf of the checkpoint loads in transformers with load_model's logits."""
    import os
    import subprocess
    import sys
    import torch
    import transformers
    from megatron_ted.inference import load_model
    stages = [torch.load(os.path.join(save, f"params_2_rank{r}.pt")) for r in (0, 1)]
    assert not stages[0].keys() & stages[1].keys()          # two stages, disjoint parts of the model
    trained = {**stages[0], **stages[1]}
    assert {n.split(".")[1] for n in trained if n.startswith("layers.")} == {"0", "1", "2", "3"}
    model = load_model(os.path.join(save, "iter_0000002"), dtype=torch.float32)
    loaded = dict(model.gpt.named_parameters())
    assert loaded.keys() == trained.keys()
    for n, p in trained.items():
        assert torch.equal(loaded[n], p), n
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "convert_checkpoint.py"), "export-hf",
                        "--load", save, "--hf-dir", str(hf_dir), "--dtype", "fp32"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), experts_implementation="eager").eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra, flag", [
    (["--pipeline-model-parallel-size", "3"], "--pipeline-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers-per-virtual-pipeline-stage 3"),
    (["--pipeline-model-parallel-size", "4", "--global-batch-size", "2"], "--global-batch-size"),
])
def test_bad_pipeline_flags_are_one_line(extra, flag):
    from megatron_ted.training.arguments import parse_args
    with pytest.raises(ValueError) as info:
        parse_args(CLI + ["--train-iters", "1"] + extra, world_size=4)
    assert flag in str(info.value) and "\n" not in str(info.value)


# ---- the per-stage memory model (planning/memory.py (stage_memory)) -----------------------------------

@pytest.mark.parametrize("untie, split", [(False, PipelineSplit(4, 2)), (True, PipelineSplit(4, 3, first_stage_layers=2)),
                                          (False, PipelineSplit(4, 2, layers_per_virtual_stage=1))])
def test_stage_parameter_counts_match_built_stages(untie, split):
    """Counted from the shapes per pipeline rank = the elements of the stages pipeline/stage.py builds
    (the tied copy on the last rank included); the in-flight rule: P - p for 1F1B, P + (P-1)/V first."""
    from types import SimpleNamespace
    from megatron_ted.parallel.groups import ParallelGroups
    from megatron_ted.pipeline.stage import build_pipeline_model
    from megatron_ted.planning.memory import Workload
    from megatron_ted.planning.memory import in_flight_micro_batches, stage_parameter_counts
    from parity import tiny_config, tiny_moe
    config, moe = tiny_config(num_layers=4, untie_embeddings_and_output_weights=untie), tiny_moe()
    wl = Workload(config, moe, seq_length=8, micro_batch=2)
    single = ParallelGroups.single()
    for p in range(split.pipeline_parallel):
        groups = SimpleNamespace(pp=SimpleNamespace(rank=p), tp=single.tp, ep=single.ep, dp=single.dp,
                                 expert_dp=single.expert_dp)
        built = build_pipeline_model(config, moe, groups, 1, split)
        counts = stage_parameter_counts(wl, split, p, 1, 1)
        assert counts.per_rank == sum(t.numel() for t in built.parameters()), p
    assert [in_flight_micro_batches(4, 1, p, 8) for p in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches(4, 1, 0, 2) == 2
    assert in_flight_micro_batches(4, 2, 0, 8) == 4 + 3 / 2    # Megatron: P (1 + (P-1)/(P V))
