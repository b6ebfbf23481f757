"""A training step through torch.distributed.pipelining's schedules.

    runner = PipelineRunner(model, groups, n_micro_batches, schedule="1f1b")
    result = pipeline_forward_backward(runner, micro_batches, groups, grad_sync, loss_scale)

The loss is training/step.py's: each micro-batch's sum of token losses / the global batch's loss
tokens, plus the MoE aux losses / the global batch's micro-batches, times the loss scale. The
schedule's loss_fn computes the first part on the last stage (`scale_grads=False`: nothing else
divides); the aux losses enter each stage's backward through `AuxLossGrad` (pipeline/stage.py).
After the schedule: the tied embedding's two copies sum their gradients over the embedding group
(before the data-parallel reduction, so a partitioned optimizer's chunks agree), the DP reduction,
the expert-bias update of this stage's routers; the losses and routing statistics are summed over
the pipeline so every rank logs the same numbers. The gradient norm over all stages is the
optimizer's (its `pp` group).
"""
from __future__ import annotations

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from megatron_ted.moe.router import update_expert_bias
from megatron_ted.parallel import comm
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.pipeline.stage import PipelineModel, StageModule
from megatron_ted.training.step import StepResult

# name -> (torch schedule, stages per rank: one or several, placement style). torch's zero-bubble
# schedules (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble) do not compose yet: their split
# weight-gradient pass detaches gradients in place, and ours are views of the flat fp32 buffers
# (training/grad_sync.py) - torch 2.13 raises "Can't detach views in-place".
SCHEDULES = {"1f1b": (Schedule1F1B, "single", "loop"),
             "interleaved-1f1b": (ScheduleInterleaved1F1B, "multi", "loop")}


def schedule_name(name: str | None, chunks: int) -> str:
    """The schedule to run: the given one, checked, else 1F1B (one chunk) or interleaved 1F1B."""
    name = name or ("1f1b" if chunks == 1 else "interleaved-1f1b")
    if name not in SCHEDULES:
        raise ValueError(f"--pipeline-schedule {name} is unknown; pick one of {', '.join(SCHEDULES)}")
    kind = SCHEDULES[name][1]
    if (kind == "single") != (chunks == 1):
        raise ValueError(f"--pipeline-schedule {name} runs {'one stage' if kind == 'single' else 'several stages'} "
                         f"per rank but --num-layers-per-virtual-pipeline-stage gives {chunks}; "
                         f"{'drop the flag' if kind == 'single' else 'set it'} or pick another schedule")
    return name


def check_micro_batches(n_micro: int, pipeline_parallel: int) -> None:
    """torch's 1F1B schedules need at least as many micro-batches per step as pipeline ranks (and
    the interleaved ones a multiple of them)."""
    if n_micro < pipeline_parallel or n_micro % pipeline_parallel:
        raise ValueError(f"--global-batch-size / (--micro-batch-size x DP) gives {n_micro} micro-batches per step; "
                         f"the pipeline schedules need a multiple of --pipeline-model-parallel-size "
                         f"{pipeline_parallel}: raise --global-batch-size")


class _TokenLoss:
    """The schedule's loss_fn: sum(per-token loss x mask) / global loss tokens x loss scale."""

    def __init__(self):
        self.global_tokens, self.loss_scale = 1.0, 1.0

    def __call__(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        return (per_token_loss * loss_mask).sum() * (self.loss_scale / self.global_tokens)


class PipelineRunner:
    """This rank's StageModules, their PipelineStages and the schedule over them. The stages'
    tensor shapes (static, so torch infers nothing) come from the first step's micro-batches."""

    def __init__(self, model: PipelineModel, groups: ParallelGroups, n_micro: int, schedule: str | None = None,
                 sequence_parallel: bool = False):
        check_micro_batches(n_micro, groups.pp.size)
        self.model, self.groups, self.n_micro = model, groups, n_micro
        self.name = schedule_name(schedule, len(model.chunks))
        self.modules = [StageModule(chunk) for chunk in model.chunks]
        self.loss_fn = _TokenLoss()
        self.sequence_parallel = sequence_parallel
        self.schedule = None

    def _build(self, mb: dict) -> None:
        b, s = mb["tokens"].shape
        device = mb["tokens"].device
        param = next(self.model.parameters())
        h = self.model.config.hidden_size
        s_local = s // self.groups.tp.size if self.sequence_parallel else s
        # requires_grad: the stage sends the gradient of its received input back
        hidden = torch.empty(b, s_local, h, dtype=param.dtype, device="meta", requires_grad=True)
        stages = []
        for module, index in zip(self.modules, self.model.stage_indices):
            first, last = module.chunk.pre_process, module.chunk.post_process
            inputs = torch.empty(b, s, dtype=mb["tokens"].dtype, device="meta") if first else hidden
            loss_dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype
            outputs = torch.empty(b, s, dtype=loss_dtype, device="meta") if last else hidden
            stages.append(PipelineStage(module, index, self.model.num_stages, device, input_args=(inputs,),
                                        output_args=(outputs,), group=self.groups.pp.pg))
        cls, kind, _ = SCHEDULES[self.name]
        self.schedule = cls(stages[0] if kind == "single" else stages, self.n_micro, loss_fn=self.loss_fn,
                            scale_grads=False)

    def run(self, micro_batches: list[dict], global_tokens: float, loss_scale: float, aux_scale: float) -> list:
        """One schedule step; returns the last stage's scaled micro-batch losses ([] elsewhere)."""
        self.loss_fn.global_tokens, self.loss_fn.loss_scale = global_tokens, loss_scale
        for module in self.modules:
            module.aux_grad_scale = aux_scale
        return self._call("step", micro_batches)

    def eval_loss_sum(self, micro_batches: list[dict]) -> float:
        """Forward only (the schedule's eval): the sum of the micro-batches' masked token losses on
        the last stage, 0.0 elsewhere. Call under torch.no_grad(), the model in eval mode."""
        self.loss_fn.global_tokens, self.loss_fn.loss_scale = 1.0, 1.0
        losses = self._call("eval", micro_batches)
        return float(sum(float(l.detach().double()) for l in losses))

    def _call(self, method: str, micro_batches: list[dict]) -> list:
        """The schedule's `step` (forward and backward) or `eval` (forward only) over the micro-batches."""
        if self.schedule is None:
            self._build(micro_batches[0])
        for module in self.modules:
            module.reset_stats()
        cat = {k: torch.cat([mb[k] for mb in micro_batches]) for k in ("tokens", "position_ids", "labels", "loss_mask")}
        seeds = torch.cat([torch.full((mb["tokens"].shape[0],), mb.get("routing_seed", -1), dtype=torch.int64)
                           for mb in micro_batches])
        args = (cat["tokens"],) if self.model.first else ()
        losses: list = []
        getattr(self.schedule, method)(*args, position_ids=cat["position_ids"], token_ids=cat["tokens"], routing_seed=seeds,
                                       labels=cat["labels"], target=cat["loss_mask"] if self.model.last else None,
                                       losses=losses)
        return losses


def sync_tied_embedding(model: PipelineModel, groups: ParallelGroups) -> None:
    """Sum the tied embedding's gradient over its two copies (first and last stage)."""
    holds_copy = model.first != model.last and not model.config.untie_embeddings_and_output_weights
    if holds_copy and groups.embedding.size > 1:
        comm.all_reduce(model.embedding.weight.main_grad, groups.embedding)


def pipeline_forward_backward(runner: PipelineRunner, micro_batches: list[dict], groups: ParallelGroups,
                              grad_sync=None, loss_scale: float = 1.0) -> StepResult:
    dp, pp = groups.dp, groups.pp
    device = micro_batches[0]["tokens"].device
    local_tokens = sum(mb["loss_mask"].sum() for mb in micro_batches).to(torch.float64)
    global_tokens = comm.all_reduce(local_tokens.reshape(1).clone(), dp).item()
    n_micro_global = len(micro_batches) * dp.size
    if grad_sync is not None:
        grad_sync.sync_now = False            # reduced once after the schedule (finish)
    losses = runner.run(micro_batches, global_tokens, loss_scale, loss_scale / n_micro_global)
    model = runner.model
    if grad_sync is not None:
        sync_tied_embedding(model, groups)
        grad_sync.finish()
    update_expert_bias(model, dp)
    lm_sum = sum((l.detach().double() for l in losses), torch.zeros((), dtype=torch.float64, device=device))
    lm_sum = lm_sum * (global_tokens / loss_scale)
    aux_sum = sum((torch.as_tensor(m.aux_sum, dtype=torch.float64, device=device) for m in runner.modules),
                  torch.zeros((), dtype=torch.float64, device=device))
    sums = comm.all_reduce(comm.all_reduce(torch.stack([lm_sum, aux_sum]), pp), dp)
    return StepResult(lm_loss=sums[0].item() / global_tokens, aux_loss=sums[1].item() / n_micro_global,
                      num_tokens=int(global_tokens), moe=_moe_stats(runner, groups))


def _moe_stats(runner: PipelineRunner, groups: ParallelGroups) -> list[dict]:
    """Every MoE layer's routing statistics of the step, in layer order over all stages."""
    mine = [(index, [{k: (int(v) if k == "dropped" else v.cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
                     for s in module.moe_stats])
            for index, module in zip(runner.model.stage_indices, runner.modules)]
    if groups.pp.size > 1:
        everyone = [None] * groups.pp.size
        torch.distributed.all_gather_object(everyone, mine, group=groups.pp.pg)
        mine = [item for part in everyone for item in part]
    return [layer for _, stats in sorted(mine, key=lambda item: item[0]) for layer in stats]
