"""One decode step of batched generation on a StaticKVCache: the same shapes and no host
synchronisation every token, so on a GPU it is captured once in a CUDA graph and replayed.

    step = DecodeStep(model, cache, next_position_B, cuda_graph=True)   # after the prefill
    logits_BV = step(ids_B)            # the next position's logits [B, V], gathered over TP

The step reads its inputs from static buffers (the ids copied in, the positions and the cache's
slot advanced in place on the device) and runs the model with the MoE layers' DecodeDispatcher
(inference/decode_moe.py). With `cuda_graph` the first call runs eagerly on a side stream (it warms
up the kernels and NCCL, and its result is used) and the graph is captured after it; capture runs
nothing, so every later call is one replay. The graph keeps the model's and the cache's buffers
by address: the cache, the model's weights and these buffers must stay where they are.
"""
from __future__ import annotations

import torch

from megatron_ted.inference.decode_moe import decode_blocker, decode_dispatchers
from megatron_ted.inference.kv_cache import StaticKVCache
from megatron_ted.parallel import mappings


def cuda_graph_blocker(model, device: torch.device) -> str | None:
    """Why --cuda-graph-decode cannot run for this model on `device` (one line), or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "--cuda-graph-decode needs a CUDA GPU (the model is on the CPU); drop the flag"
    reason = decode_blocker(model)
    if reason is not None:
        return f"--cuda-graph-decode: the MoE layers' decode step cannot be captured with {reason}; drop the flag"
    return None


class DecodeStep:
    def __init__(self, model, cache: StaticKVCache, next_position_B: torch.Tensor, cuda_graph: bool = False):
        self.model, self.cache = model, cache
        self.ids_B1 = torch.zeros(cache.batch, 1, dtype=torch.long, device=next_position_B.device)
        self.positions_B1 = next_position_B[:, None].clone()
        self.dispatch = decode_blocker(model) is None   # else the model's own dispatcher (it syncs)
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits_BV: torch.Tensor | None = None

    def __call__(self, ids_B: torch.Tensor) -> torch.Tensor:
        self.ids_B1.copy_(ids_B[:, None])
        if self.graph is not None:
            self.graph.replay()
            return self.logits_BV
        if not self.cuda_graph:
            return self._step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits_BV = self._step()                       # the warm-up is this token's real step
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_BV = self._step()
        return logits_BV

    def _step(self) -> torch.Tensor:
        self.cache.decode()
        if self.dispatch:
            with decode_dispatchers(self.model):
                logits = self.model(self.ids_B1, self.positions_B1, kv_cache=self.cache).logits
        else:
            logits = self.model(self.ids_B1, self.positions_B1, kv_cache=self.cache).logits
        self.cache.advance()
        self.positions_B1.add_(1)
        return mappings.gather(logits[:, -1], self.model.tp, dim=-1)    # [B, V]
