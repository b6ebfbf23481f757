"""This rank's pipeline stages: one GPTModel chunk per stage, and the module that holds them all
under the full model's logical parameter names.

    model = build_pipeline_model(config, moe, groups, seed, split)
    model.chunks          # the GPTModel of each stage this rank runs, in chunk order
    model.stage_indices   # their stage indices (PipelineSplit.stages_of_rank)
    model.named_parameters()  ->  embedding.weight, layers.{i}.*, final_norm.*, ... (global i)

The rank's module is what the gradient sync, the optimizer and checkpoints see: it registers the
chunks' embedding, layers, final norm and output weight (the same module objects, not copies), so
a parameter has the name it has in the unsplit model. A tied embedding has two copies when the first
and the last stage are on different ranks (`embedding_group`); when one rank runs both (PP 1, or
the V-shaped schedule's rank 0) the last chunk uses the first chunk's embedding itself.

`StageModule` wraps one chunk for torch.distributed.pipelining's PipelineStage: its forward is the
chunk's `forward_stage`, its MoE auxiliary losses enter the backward through `AuxLossGrad` on the
stage's output, and their values and routing statistics are kept (detached) for the step's log.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.model.builder import MoEConfig, build_gpt
from megatron_ted.model.gpt import GPTConfig, GPTModel, LayerStack
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.pipeline_split import PipelineSplit


class PipelineModel(nn.Module):
    """The stages of one pipeline rank under logical parameter names (see the module doc)."""

    def __init__(self, chunks: list[GPTModel], stage_indices: list[int], num_stages: int):
        super().__init__()
        self.chunks = list(chunks)            # a plain list: their modules are registered below
        self.stage_indices = list(stage_indices)
        self.num_stages = num_stages
        self.config = chunks[0].config
        self.model_config = getattr(chunks[0], "model_config", None)   # the whole model's identity (checkpoints)
        self.layers = LayerStack()
        for chunk in chunks:
            for name, child in chunk.named_children():
                if name == "layers":
                    for layer_name, layer in child.named_children():
                        self.layers.add_module(layer_name, layer)
                elif child is not None and not hasattr(self, name):
                    self.add_module(name, child)
            if chunk.output_weight is not None:
                self.output_weight = chunk.output_weight

    @property
    def first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def last(self) -> bool:
        return self.num_stages - 1 in self.stage_indices


def build_pipeline_model(config: GPTConfig, moe: MoEConfig | None, groups: ParallelGroups, seed: int,
                         split: PipelineSplit) -> PipelineModel:
    """This rank's chunks, each drawn from the seed on the full logical tensors (model/init.py)."""
    layers = split.stage_layers()
    indices = split.stages_of_rank(groups.pp.rank)
    chunks = [build_gpt(config, moe, groups, seed, layers[s], pre_process=s == 0,
                        post_process=s == split.num_stages - 1) for s in indices]
    first = next((c for c in chunks if c.pre_process), None)
    for chunk in chunks:
        if chunk.post_process and not chunk.pre_process and first is not None and chunk.embedding is not None:
            chunk.embedding = first.embedding   # the same rank runs both ends: one tied weight
    return PipelineModel(chunks, indices, split.num_stages)


class AuxLossGrad(torch.autograd.Function):
    """Identity on the stage output; in backward it also gives the stage's summed aux loss the
    gradient `scale` (its coefficient in the step's loss times the loss scale), so each stage's
    MoE aux/z losses join the backward where they were computed, without being sent anywhere
    (Megatron's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class StageModule(nn.Module):
    """One chunk as torch's PipelineStage runs it: forward(x, position_ids, token_ids,
    routing_seed, labels) -> hidden states [B, S, H] (per-token loss [B, S] on the last stage).

    routing_seed: a CPU int64 tensor [B] holding the micro-batch's routing seed in every row (-1:
    none), so the schedule's split of the batch into micro-batches hands each its own.
    `aux_grad_scale` is set for each step; `aux_sum` and `moe_stats` collect the step's values."""

    def __init__(self, chunk: GPTModel):
        super().__init__()
        self.chunk = chunk
        self.aux_grad_scale = 0.0
        self.reset_stats()

    def reset_stats(self) -> None:
        self.aux_sum = 0.0                    # float64 tensor once a micro-batch ran
        self.moe_stats: list[dict] = []       # per MoE layer of this chunk, in layer order

    def forward(self, x, position_ids, token_ids, routing_seed, labels):
        seed = int(routing_seed[0])
        out = self.chunk.forward_stage(x, position_ids, token_ids, labels, None if seed < 0 else seed)
        self.aux_sum = self.aux_sum + out.aux_loss.detach().double()
        for j, m in enumerate(out.moe):
            if j == len(self.moe_stats):
                self.moe_stats.append({"tokens_per_expert": torch.zeros_like(m.tokens_per_expert),
                                       "dropped": torch.zeros_like(m.num_dropped), "assigned": 0})
            self.moe_stats[j]["tokens_per_expert"] += m.tokens_per_expert
            self.moe_stats[j]["dropped"] += m.num_dropped
            self.moe_stats[j]["assigned"] += m.num_assignments
        result = out.loss if self.chunk.post_process else out.logits
        if out.aux_loss.requires_grad and torch.is_grad_enabled():
            result = AuxLossGrad.apply(result, out.aux_loss, self.aux_grad_scale)
        return result
