"""The keys and values of every attention layer for B sequences, for prefill-then-decode generation.

Shapes: B sequences, S_max positions the cache holds, S new positions of this step, G local K/V
heads (groups), D head dim.

    cache = KVCache(batch=B, max_length=S_max)
    cache.begin(valid_BS)                # this step's S new positions: False where a prompt is padded
    out = model(tokens_BS, positions_BS, kv_cache=cache)    # each attention layer calls cache.layer(i)
    cache.end()

All sequences share the slots [0, length): prompts are left-padded to one length and padded slots
are masked out of every later query, so each sequence sees only its own tokens (its positions
count its real tokens, see generate.py). The mask is a boolean [B, 1, S, length + S] (True:
attend), built once per step: SDPA's `is_causal` cannot leave out padding. A query always sees its
own slot, so a padded query's softmax row is never empty (no NaN; its output is discarded).
A sliding-window layer (model/attention.py) asks for `window_mask(window)`: the step's mask and the
band of slots within the window, built once per step and window (left padding keeps a sequence's
slots consecutive, so slot distance is position distance).

Each layer's buffers are [B, G, S_max, D] for k and v, allocated on the layer's first write (the
layer's shapes and dtype are known then). Multi-latent attention stores its expanded per-head k
and v here like multi-head attention (model/mla.py says why).

StaticKVCache (below) keeps the same layout with shapes that never change, for a decode step
captured in a CUDA graph (inference/decode_step.py).
"""
from __future__ import annotations

import torch

from megatron_ted.model.attention import band


class LayerCache:
    """One attention layer's slot in a KVCache: `store` appends this step's k, v and returns all of them."""

    def __init__(self, cache: "KVCache", index: int):
        self.cache, self.index = cache, index

    @property
    def mask(self) -> torch.Tensor:
        return self.cache.mask_BQK

    def window_mask(self, window: int) -> torch.Tensor:
        """The step's mask, keys within `window` slots before each query only."""
        c = self.cache
        if window not in c.window_masks:
            c.window_masks[window] = c.mask_BQK & band(c.q_S, c.k_K, window)[None, None]
        return c.window_masks[window]

    def _buffers(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's [B, G, S_max, D] k and v buffers, allocated at its first store (the prefill)."""
        c = self.cache
        buffers = c.buffers.get(self.index)
        if buffers is None:
            buffers = c.buffers[self.index] = tuple(
                t.new_zeros(t.shape[0], t.shape[1], c.max_length, t.shape[3]) for t in (k, v))
        return buffers

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k [B, G, S, Dk], v [B, G, S, Dv] of the new positions -> k, v [B, G, length + S, D] so far."""
        c = self.cache
        buffers = self._buffers(k, v)
        start, end = c.length, c.length + k.shape[2]
        for buf, t in zip(buffers, (k, v)):
            buf[:, :, start:end] = t
        return buffers[0][:, :, :end], buffers[1][:, :, :end]


class KVCache:
    def __init__(self, batch: int, max_length: int, device: torch.device | str = "cpu"):
        self.batch, self.max_length = batch, max_length
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.valid_BS = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        self.length = 0                       # slots written by finished steps
        self.step = 0                         # new positions of the step in progress
        self.mask_BQK: torch.Tensor | None = None
        self.q_S = self.k_K = None            # the step's query slots and the slots it attends over
        self.window_masks: dict[int, torch.Tensor] = {}

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def begin(self, valid_BS: torch.Tensor) -> None:
        """Start a step of S = valid_BS.shape[1] new positions (valid_BS: False on padding)."""
        s = valid_BS.shape[1]
        start, end = self.length, self.length + s
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; this step needs {end}")
        self.valid_BS[:, start:end] = valid_BS
        q = torch.arange(start, end, device=valid_BS.device)
        k = torch.arange(end, device=valid_BS.device)
        causal_QK = k[None, :] <= q[:, None]
        mask = causal_QK[None] & self.valid_BS[:, None, :end]
        self.mask_BQK = (mask | (k[None, :] == q[:, None])[None]).unsqueeze(1)   # [B, 1, S, end]
        self.q_S, self.k_K, self.window_masks = q, k, {}
        self.step = s

    def end(self) -> None:
        self.length += self.step
        self.step, self.mask_BQK, self.window_masks = 0, None, {}


class StaticLayerCache(LayerCache):
    """One attention layer's slot in a StaticKVCache: `store` writes this step's k, v at the cache's
    slot tensor and returns the whole [B, G, S_max, D] buffers (same shapes every step)."""

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._buffers(k, v)   # allocated by the prefill, before any capture
        for buf, t in zip(buffers, (k, v)):
            buf.index_copy_(2, self.cache.slot_S, t)
        return buffers


class StaticKVCache:
    """KVCache's layout and masking with shapes that never change: every layer attends over all
    S_max slots, the step's slots are a device tensor (`slot_S`) and the mask is built from it, so
    a decode step reads no Python int that changes per token and can be captured in a CUDA graph
    (inference/decode_step.py). Slots past a sequence's written length, and its padding, are masked.

        cache.prefill(valid_BS)              # slots [0, L): the left-padded prompts
        model(tokens_BS, positions_BS, kv_cache=cache)
        cache.decode()                       # one new slot, the one after the last written
        model(ids_B1, positions_B1, kv_cache=cache)
        cache.advance()                      # in place, on the device
    """

    def __init__(self, batch: int, max_length: int, device: torch.device | str = "cpu"):
        self.batch, self.max_length = batch, max_length
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.valid_BK = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        self.slots_K = torch.arange(max_length, device=device)
        self.next_slot_1 = torch.zeros(1, dtype=torch.long, device=device)   # the slot a decode step writes
        self.slot_S: torch.Tensor | None = None
        self.mask_BQK: torch.Tensor | None = None
        self.window_masks: dict[int, torch.Tensor] = {}

    @property
    def q_S(self) -> torch.Tensor:
        return self.slot_S

    @property
    def k_K(self) -> torch.Tensor:
        return self.slots_K

    def layer(self, index: int) -> StaticLayerCache:
        return StaticLayerCache(self, index)

    def prefill(self, valid_BS: torch.Tensor) -> None:
        """The prompts' S = valid_BS.shape[1] slots [0, S) (valid_BS: False on padding)."""
        s = valid_BS.shape[1]
        if s >= self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions; the prompts need {s} and one more")
        self.valid_BK.zero_()
        self.valid_BK[:, :s] = valid_BS
        self.slot_S = self.slots_K[:s]
        self._mask(self.slot_S)
        self.next_slot_1.fill_(s)

    def decode(self) -> None:
        """One valid new position per sequence at next_slot_1 (no host read of it)."""
        self.slot_S = self.next_slot_1
        self.valid_BK.index_fill_(1, self.slot_S, True)
        self._mask(self.slot_S)

    def advance(self) -> None:
        self.next_slot_1.add_(1)

    def _mask(self, q_S: torch.Tensor) -> None:
        """[B, 1, S, S_max], True: attend. Causal over slots, padding and unwritten slots out; a
        query always sees its own slot (a padded query's row is never empty)."""
        causal_QK = self.slots_K[None, :] <= q_S[:, None]
        own_QK = self.slots_K[None, :] == q_S[:, None]
        self.mask_BQK = ((causal_QK[None] & self.valid_BK[:, None]) | own_QK[None]).unsqueeze(1)
        self.window_masks = {}
