"""parallelize() (megatron_ted/parallelize/) applies the ParallelConfig's build-time modes to a plain
model: each mode reaches the modules it names, and a mode left off leaves the model plain."""
from parity import tiny_config, tiny_moe

from megatron_ted.config.parallel import ParallelConfig
from megatron_ted.model.builder import build_gpt
from megatron_ted.moe.experts import GroupedExperts
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallelize import parallelize, parallelize_after_load
from megatron_ted.parallelize.recompute import RecomputeConfig
from megatron_ted.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron_ted.tensor_parallel.fp8 import FP8Config


def _gemm_modules(model):
    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear, GroupedExperts))]


def test_parallelize_applies_each_mode_of_the_config_and_nothing_else():
    groups = ParallelGroups.single()
    plain = parallelize(build_gpt(tiny_config(), tiny_moe(), groups, 1), ParallelConfig(ParallelLayout(1)), groups.tp)
    assert plain.recompute is None and not any(layer.attention.recompute_core for layer in plain.layers)
    assert all(m.fp8 is None for m in _gemm_modules(plain))
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in plain.layers)

    recompute, fp8 = RecomputeConfig("full", num_layers=2, moe_cac=True), FP8Config("hybrid", "tensorwise")
    parallel = ParallelConfig(ParallelLayout(1), recompute=recompute, fp8=fp8, compile_layers=True)
    model = parallelize(build_gpt(tiny_config(), tiny_moe(), groups, 1), parallel, groups.tp)
    assert model.recompute is recompute
    gemms = _gemm_modules(model)
    assert any(isinstance(m, GroupedExperts) for m in gemms) and all(m.fp8 is fp8 for m in gemms)
    assert all(layer._compiled_call_impl is not None for layer in model.layers)   # compiled at the first call
    selective = ParallelConfig(ParallelLayout(1), recompute=RecomputeConfig("selective"))
    model = parallelize(build_gpt(tiny_config(), tiny_moe(), groups, 1), selective, groups.tp)
    assert model.recompute is None and all(layer.attention.recompute_core for layer in model.layers)
    # no CUDA graphs asked for: the after-load step captures nothing
    assert parallelize_after_load(model, selective, 2, 16, model.layers[0].input_norm.weight.dtype, groups.tp) == 0
