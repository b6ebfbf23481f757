"""Data-parallel gradient reduction into fp32 buckets, overlapped with backward.

Gradients accumulate across micro-batches in fp32 `param.main_grad` views of one flat buffer per
reduction group: dense parameters reduce over the data-parallel group, expert parameters over the
expert-data-parallel group only (TED: each expert lives on DP/EP replicas). The buffer is cut into
buckets; on the last micro-batch a bucket's all-reduce starts as soon as backward has produced
all its gradients (`overlap=True`), else all buckets are reduced after backward.
The reduction is a SUM: the loss is already divided by the global token count.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import is_expert


class _Bucket:
    def __init__(self, params, flat: torch.Tensor, group: Group):
        self.params, self.flat, self.group = params, flat, group
        self.pending = len(params)
        self.work = None

    def launch(self):
        if self.work is None:
            self.work = comm.all_reduce(self.flat, self.group, async_op=True) or _Done()

    def wait(self):
        self.launch()
        self.work.wait()
        self.work = None
        self.pending = len(self.params)


class _Done:
    def wait(self):
        pass


class GradientSync:
    def __init__(self, model: nn.Module, dp: Group, expert_dp: Group, bucket_elements: int = 40_000_000,
                 overlap: bool = True):
        self.overlap = overlap
        self.sync_now = True  # False on all but the last micro-batch of a step
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[nn.Parameter, _Bucket] = {}
        params = [p for p in model.parameters() if p.requires_grad]
        for group, members in ((dp, [p for p in params if not is_expert(p)]),
                               (expert_dp, [p for p in params if is_expert(p)])):
            self._build(list(reversed(members)), group, bucket_elements)  # backward visits last params first
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _build(self, params, group: Group, bucket_elements: int):
        if not params:
            return
        device = params[0].device
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32  # fp64 for exact tests
        flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        offset, start, members = 0, 0, []
        for p in params:
            p.main_grad = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
            members.append(p)
            if offset - start >= bucket_elements or p is params[-1]:
                bucket = _Bucket(members, flat[start:offset], group)
                self.buckets.append(bucket)
                for m in members:
                    self.bucket_of[m] = bucket
                start, members = offset, []

    def _on_grad(self, p: nn.Parameter):
        p.main_grad.add_(p.grad)
        p.grad = None
        if self.sync_now and self.overlap:
            bucket = self.bucket_of[p]
            bucket.pending -= 1
            if bucket.pending == 0:
                bucket.launch()

    def zero_grad(self):
        for b in self.buckets:
            b.flat.zero_()
            b.pending = len(b.params)

    def finish(self):
        """Complete every bucket's reduction (launching those backward did not)."""
        for b in self.buckets:
            b.wait()
