"""RecordOps: the aten ops a block of code runs, one entry per tensor each op returns.

Tests use it to check what a path does, not only what it returns: no one-hot, no full-size cast,
no separate scaling pass, no [T*K, H] copy.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Output(NamedTuple):
    func: object            # the aten overload, e.g. torch.ops.aten.mul_.Scalar
    dtype: torch.dtype
    shape: tuple


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.outputs: list[Output] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [Output(func, t.dtype, tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def count(self, funcs) -> int:
        return sum(o.func in funcs for o in self.outputs)
