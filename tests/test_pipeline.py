"""Pipeline parallelism: the layer split, stages chained equal the full model, and the schedules of
torch.distributed.pipelining at PP x TP x EP against the single-process reference (float64)."""
import pytest

from megatron_ted.pipeline.split import PipelineSplit


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
