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
