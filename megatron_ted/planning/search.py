"""Size, time and rank the layouts of a model on a cluster: one RunConfig per candidate.

`evaluate(run, cluster)` gives a Plan: parameter counts (param_count.py), peak memory (memory.py),
communication (comm.py) and step time (throughput.py) of one run's configuration. The candidates
themselves (the run's own flags with the planned knobs set, each validated by the trainer's flag
checks, so a listed layout is one the trainer accepts) are enumerated at the CLI edge:
megatron_ted/launch/plan.py.

Ranking (`rank`): layouts that fit (predicted peak <= 90% of the GPU memory: the memory model's
validated error is within +-15%, docs/PLANNER.md) first, by predicted tokens per second (higher
first); then the ones that do not fit, by how far they exceed the memory.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_ted.config.run import RunConfig
from megatron_ted.model.builder import experts_per_layer
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.planning.comm import Volume, step_comm
from megatron_ted.planning.flops import flops_per_token_of_model
from megatron_ted.planning.memory import GiB, PeakMemory, Workload, peak_memory, stage_memory, workload_of
from megatron_ted.planning.param_count import ParamCounts, count_parameters
from megatron_ted.planning.throughput import Cluster, StepTime, step_time


@dataclass(frozen=True)
class Plan:
    run: RunConfig                 # the validated configuration of this layout
    layout: ParallelLayout
    counts: ParamCounts
    memory: PeakMemory
    comm: list[Volume]
    time: StepTime
    tokens_per_second: float
    fits: bool
    host_fits: bool = True         # offloaded state of a node's ranks within --host-memory-per-node-gib

    @property
    def knobs(self) -> dict:
        rc, layout = self.run.parallel.recompute, self.layout
        return dict(tp=layout.tensor_parallel, ep=layout.expert_parallel, pp=layout.pipeline_parallel,
                    expert_dp=layout.expert_data_parallel, micro_batch=self.run.training.schedule.micro_batch_size,
                    recompute=rc.granularity if rc else "none", cac=bool(rc and rc.moe_cac),
                    dist_opt=self.run.parallel.distributed_optimizer,
                    offload=self.run.training.optimizer.offload_fraction > 0)

    def pretrain_flags(self) -> list[str]:
        """pretrain_gpt_moe.py's flags for this model and layout (data flags not included). The
        routing is stated either way: a capacity factor, or dropless (--disable-moe-token-dropping;
        the launch scripts' defaults are not dropless)."""
        c, moe, t, k = self.run.model.gpt, self.run.model.moe, self.run.training, self.knobs
        flags = ["--num-layers", c.num_layers, "--hidden-size", c.hidden_size,
                 "--num-attention-heads", c.num_attention_heads, "--ffn-hidden-size", c.ffn_hidden_size,
                 "--seq-length", t.schedule.seq_length, "--max-position-embeddings", c.max_position_embeddings]
        if moe is not None:
            counts = experts_per_layer(moe, c.num_layers)
            freq = moe.layer_freq if isinstance(moe.layer_freq, int) else "[" + ",".join(map(str, moe.layer_freq)) + "]"
            flags += ["--num-experts", *(counts[:1] if len(set(counts)) == 1 else counts), "--moe-layer-freq", freq,
                      "--moe-router-topk", moe.router.topk, "--moe-ffn-hidden-size", moe.ffn_hidden_size]
            cf = moe.router.capacity_factor
            flags += ["--moe-expert-capacity-factor", cf] if cf is not None else ["--disable-moe-token-dropping"]
        if k["pp"] > 1:
            flags += ["--pipeline-model-parallel-size", k["pp"]]
        flags += ["--tensor-model-parallel-size", k["tp"], "--expert-model-parallel-size", k["ep"],
                  "--micro-batch-size", k["micro_batch"], "--global-batch-size", t.schedule.global_batch_size]
        if k["recompute"] == "full":
            flags += ["--recompute-granularity", "full"] + (["--moe-cac"] if k["cac"] else [])
        if k["dist_opt"]:
            flags.append("--use-distributed-optimizer")
        if k["offload"]:
            flags += ["--optimizer-cpu-offload", "--optimizer-offload-fraction", t.optimizer.offload_fraction]
        if t.precision.dtype != "fp32":
            flags.append("--" + t.precision.dtype)
        if t.data.vocab_size:
            flags += ["--vocab-size", t.data.vocab_size]
        return [str(f) for f in flags]


def evaluate(run: RunConfig, cluster: Cluster) -> Plan:
    """Size and time one run's configuration on `cluster`."""
    layout, sched = run.parallel.layout, run.training.schedule
    n_micro = sched.num_micro_batches
    wl: Workload = workload_of(run)
    counts = count_parameters(wl.config, wl.moe, layout.tensor_parallel, layout.expert_parallel)
    mem = peak_memory(wl, layout, counts)
    volumes = step_comm(wl, layout, n_micro, counts)
    pp, split = layout.pipeline_parallel, run.parallel.pipeline
    if split is not None:
        # the largest stage's memory decides; each rank runs 1/P of the layers' TP and EP collectives
        # and reduces its own stage's gradients (the stage-to-stage sends are not modelled: T x H per
        # micro-batch, small beside the layers' collectives)
        worst = max(stage_memory(wl, layout, split, n_micro), key=lambda st: st.memory.total)
        mem, counts = worst.memory, worst.counts
        volumes = [v for v in step_comm(wl, layout, n_micro, counts) if v.group not in ("tp", "ep")]
        volumes += [replace(v, calls=v.calls // pp, bytes=v.bytes // pp, wire=v.wire / pp)
                    for v in step_comm(wl, layout, n_micro) if v.group in ("tp", "ep")]
    fpt = flops_per_token_of_model(run.model, sched.seq_length)
    tokens = sched.global_batch_size * sched.seq_length
    t = step_time(fpt * tokens / layout.world_size, wl.recompute == "full", volumes, layout, cluster,
                  run.model.gpt.num_layers // pp * n_micro, bubble=(pp - 1) / n_micro)
    budget = run.training.optimizer.host_memory_per_node_gib
    host_fits = budget is None or mem.host * min(cluster.gpus_per_node, layout.world_size) <= budget * GiB
    return Plan(run, layout, counts, mem, volumes, t, tokens / t.total,
                mem.total <= cluster.usable_bytes and host_fits, host_fits)


def rank(plans: list[Plan]) -> list[Plan]:
    """The plans in the module docstring's order (equal estimates: resident before offloaded)."""
    return sorted(plans, key=lambda p: (not p.fits, -p.tokens_per_second if p.fits else p.memory.total,
                                        p.knobs["offload"]))


def made_possible_by_offload(plans: list[Plan]) -> list[Plan]:
    """The fitting offloaded plans whose layout (every knob but offload) does not fit resident."""
    def key(p):
        return tuple(v for k, v in p.knobs.items() if k != "offload")
    resident = {key(p) for p in plans if p.fits and not p.knobs["offload"]}
    return [p for p in plans if p.fits and p.knobs["offload"] and key(p) not in resident]
