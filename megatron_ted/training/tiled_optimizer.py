"""Tiled AdamW on the flat gradient buffers, optionally partitioned ZeRO-1 style (the distributed optimizer).

DeepSpeed-TED's memory optimization (docs/DESIGN.md, "The tiled, partitioned optimizer"). The optimizer works on
`GradientSync`'s flat buffers, one per reduction group (dense over DP, experts over expert-DP), each
cut into buckets (grad_sync.py). The model's parameters are re-pointed into a flat parameter buffer
with the same layout, so a range of the gradient buffer, of the parameter buffer and of the
optimizer state all describe the same elements:

    grad buffer   (fp32)   | bucket 0 ......................... | bucket 1 ...
    param buffer  (model dtype, the parameters are views of it)  same layout
    owned range            all of every bucket,      or with partitioning (`GradientSync(...,
                           reduce_scatter=True)`) the rank's 1/size chunk of every bucket
    state per owned range  fp32 master (the parameters themselves for an fp32/fp64 model),
                           exp_avg, exp_avg_sq

A step:
  1. the global gradient norm, computed once: each rank sums the squares of its chunk of every
     bucket (its partition, or the same chunk of the replicated buffer without partitioning), per
     class [dense TP-sliced, dense TP-replicated, expert TP-sliced, expert TP-replicated]; one
     all-reduce over DP (which sums the dense chunks over DP and the expert chunks over expert-DP
     and EP, since EP x expert-DP = DP) and one over TP (TP-replicated classes are then counted TP
     times and divided by TP). Every rank of the job ends with the same value, so the fp16
     overflow decision (inf/nan norm: skip the step) agrees everywhere by construction.
  2. the owned ranges walked in tiles of at most `tile_size` elements: unscale and clip the
     tile's gradient (in place), decoupled weight decay, the Adam moments, the update of the fp32
     master (these four in one pass for fp32 gradients: torch's fused AdamW kernel on CUDA and
     CPU, the clipping as its grad_scale, no temporary),
     the write of the low-precision parameter. The op-by-op form (other devices, `fused=False`)
     has one temporary (Adam's denominator) of a tile: the extra memory of the step is at most
     one tile, not the partition.
  3. with partitioning, each bucket's parameters are all-gathered in place in the parameter buffer
     (NCCL; gloo stages its output, so there the gather goes in rounds of one tile per rank).

The update is torch.optim.AdamW's (single-tensor form: bias corrections, eps added after the
square root and the bias correction, weight decay multiplied into the weights first); no weight
decay on 1-D parameters (biases, norms), as MixedPrecisionAdamW. The interface is
MixedPrecisionAdamW's: `step(lr) -> (applied, grad_norm)`, `loss_scale`, `named_state` /
`load_named_state` by logical parameter name with whole local-shard tensors (partitions are
gathered on save, sliced on load), so checkpoints move between layouts and between the two optimizers.

Create it after the model has its final device and dtype (`model.to(...)` afterwards would detach
the parameters from the parameter buffer; `step` checks).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_ted.parallel import comm
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import first_replica, spec_of
from megatron_ted.training.grad_sync import Bucket, GradBuffer, GradientSync
from megatron_ted.training.loss_scaler import DynamicLossScaler
from megatron_ted.training.optimizer_offload import OFFLOAD_POLICIES, HostStaging, choose_offloaded, host_tensor

DEFAULT_TILE_SIZE = 2**24   # elements: a 64 MiB fp32 temporary; see docs/OPTIMIZER.md

# classes of gradient elements for the norm
DENSE_SLICED, DENSE_REPLICATED, EXPERT_SLICED, EXPERT_REPLICATED = range(4)


@torch.no_grad()
def adamw_update_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, betas: tuple[float, float], eps: float) -> None:
    """torch.optim.AdamW's update of one tile after its weight decay (`master *= 1 - lr * wd`),
    op for op as its single-tensor implementation; allocates one temporary of the tile's size."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    denom = exp_avg_sq.sqrt().div_(bias_correction2 ** 0.5).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-step_size)


@dataclass(eq=False)
class _Piece:
    """The part of one parameter inside an owned range: parameter elements [p_lo, p_hi) (flat,
    row-major) are owned-range elements [at, at + p_hi - p_lo)."""
    name: str
    param: nn.Parameter
    p_lo: int
    p_hi: int
    at: int


@dataclass(eq=False)
class _Shard:
    """This rank's owned range [lo, hi) of one bucket (buffer coordinates) and its optimizer state."""
    bucket: Bucket
    lo: int
    hi: int
    grad: torch.Tensor          # grad buffer [lo, hi)
    param: torch.Tensor         # param buffer [lo, hi), model dtype
    master: torch.Tensor        # fp32 master of [lo, hi) (`param` itself for an fp32/fp64 model)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    bucket_param: torch.Tensor  # param buffer [bucket.start, bucket.end): the all-gather's output
    offloaded: bool = False     # master and moments in host memory, updated on the CPU
    pieces: list[_Piece] = field(default_factory=list)
    decay_runs: list[tuple[int, int]] = field(default_factory=list)      # [a, b) relative to lo
    norm_runs: list[tuple[int, int, int]] = field(default_factory=list)  # [a, b) of the buffer, class

    @property
    def separate_master(self) -> bool:
        return self.master is not self.param


def _merge(runs: list[tuple]) -> list[tuple]:
    """Join adjacent runs (a, b, *key) with b == next a and the same key."""
    out = []
    for run in runs:
        if out and out[-1][1] == run[0] and out[-1][2:] == run[2:]:
            out[-1] = (out[-1][0], run[1], *run[2:])
        else:
            out.append(tuple(run))
    return out


def _within(runs: list[tuple[int, int]], starts: list[int], lo: int, hi: int):
    """The runs clipped to [lo, hi) (runs sorted, not overlapping; starts = their starts)."""
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    while i < len(runs) and runs[i][0] < hi:
        a, b = max(runs[i][0], lo), min(runs[i][1], hi)
        if a < b:
            yield a, b
        i += 1


def _fused_adamw_on(device: torch.device) -> bool:
    """torch's fused AdamW kernel exists for this device (CUDA, CPU; else the op-by-op update)."""
    return hasattr(torch, "_fused_adamw_") and device.type in ("cuda", "cpu")


def _gathers_in_place(group: Group) -> bool:
    return group.pg is not None and torch.distributed.get_backend(group.pg) == "nccl"


class TiledAdamW:
    """AdamW with fp32 master weights on GradientSync's flat buffers, stepping in tiles; ZeRO-1
    partitioned over DP (dense) and expert-DP (experts) when `grad_sync.reduce_scatter`.

    tile_size: elements per tile; 0 = no tiling (each owned range in one piece).
    offload_fraction: the share of this rank's state bytes kept in host memory and updated on the
    CPU (--optimizer-cpu-offload, --optimizer-offload-fraction; expert ranges first:
    training/optimizer_offload.py); 0 = none.
    """

    def __init__(self, model: nn.Module, grad_sync: GradientSync, tp: Group, dp: Group, lr: float,
                 weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8, clip_grad: float = 1.0,
                 loss_scaler: DynamicLossScaler | None = None, tile_size: int = DEFAULT_TILE_SIZE,
                 fused: bool | None = None, offload_fraction: float = 0.0, offload_policy: str = "cpu-step",
                 pp: Group | None = None):
        """fused: torch's fused AdamW kernel for the update (None: where the device has it).
        pp: the pipeline group: the gradient norm (and so the fp16 overflow check) sums its stages."""
        if tile_size < 0:
            raise ValueError(f"tile_size {tile_size} must be >= 0 (0: no tiling)")
        if offload_policy not in OFFLOAD_POLICIES:
            raise ValueError(f"--optimizer-offload-policy {offload_policy} is not one of {', '.join(OFFLOAD_POLICIES)}")
        self.tp, self.dp, self.grad_sync, self.pp = tp, dp, grad_sync, pp
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.clip_grad, self.loss_scaler, self.tile_size = clip_grad, loss_scaler, tile_size
        self.distributed = grad_sync.reduce_scatter
        self.fused = fused
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._name_of = {id(p): n for n, p in named}
        self.step_count = 0
        owned = []                  # (bucket, its parameter buffer, lo, hi) with lo < hi
        for buf in grad_sync.buffers:
            pbuf = self._param_buffer(buf)
            for bucket in buf.buckets:
                lo, hi = self._owned(bucket)
                if hi > lo:
                    owned.append((bucket, pbuf, lo, hi))
        # decided before any state exists: offloaded state is never allocated on the device
        state = 3 if owned and owned[0][1].dtype in (torch.float16, torch.bfloat16) else 2
        host = choose_offloaded([((hi - lo) * state, b.buffer.name == "expert") for b, _, lo, hi in owned],
                                offload_fraction) if offload_fraction else [False] * len(owned)
        self.shards: list[_Shard] = [self._shard(*o, offloaded=h) for o, h in zip(owned, host)]
        self.staging = None
        if any(host):
            largest = max(s.hi - s.lo for s in self.shards if s.offloaded)
            s0 = self.shards[0]
            self.staging = HostStaging(min(tile_size or largest, largest), s0.grad.dtype, s0.param.dtype,
                                       s0.grad.device)
        self._ptrs = [p.data_ptr() for p in self.params]

    # ---- construction ------------------------------------------------------------------------

    @staticmethod
    @torch.no_grad()
    def _param_buffer(buf: GradBuffer) -> torch.Tensor:
        """A flat buffer in the model's dtype laid out like the grad buffer; the parameters become views of it."""
        params = [p for b in buf.buckets for p in b.params]
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"the {buf.name} parameters mix dtypes {sorted(map(str, dtypes))}; "
                             f"cast the model to one dtype before building the optimizer")
        pbuf = torch.zeros(buf.flat.numel(), dtype=params[0].dtype, device=buf.flat.device)
        for b in buf.buckets:
            for p, off in zip(b.params, b.offsets):
                view = pbuf[off: off + p.numel()]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
        return pbuf

    def _owned(self, bucket: Bucket) -> tuple[int, int]:
        return bucket.chunk if self.distributed else (bucket.start, bucket.end)

    def _shard(self, bucket: Bucket, pbuf: torch.Tensor, lo: int, hi: int, offloaded: bool = False) -> _Shard:
        param = pbuf[lo:hi]
        low_precision = param.dtype in (torch.float16, torch.bfloat16)
        if offloaded:                # a host master even for fp32/fp64: the CPU updates it
            dtype = torch.float32 if low_precision else param.dtype
            master = host_tensor(hi - lo, dtype, param.device).copy_(param)
            moments = [host_tensor(hi - lo, dtype, param.device).zero_() for _ in range(2)]
        else:
            # fp32/fp64: the parameters are their own master
            master = param.float() if low_precision else param
            moments = [torch.zeros_like(master), torch.zeros_like(master)]
        shard = _Shard(bucket, lo, hi, bucket.buffer.flat[lo:hi], param, master, *moments,
                       pbuf[bucket.start:bucket.end], offloaded=offloaded)
        n_lo, n_hi = bucket.chunk    # the share of the norm (= the owned range when partitioned)
        decay, norm = [], []
        for p, off in zip(bucket.params, bucket.offsets):
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                shard.pieces.append(_Piece(self._name_of[id(p)], p, a - off, b - off, a - lo))
                if p.dim() > 1:
                    decay.append((a - lo, b - lo))
            a, b = max(n_lo, off), min(n_hi, off + p.numel())
            spec = spec_of(p)
            if a < b and not spec.tied_copy and (spec.tp_dim is None or first_replica(spec, self.tp)):
                # a shared slice counts once, a tied embedding's last-stage copy not at all
                norm.append((a, b, (2 if spec.expert else 0) + (0 if spec.tp_dim is not None else 1)))
        shard.decay_runs = [(a, b) for a, b in _merge(decay)]
        shard.norm_runs = _merge(norm)
        return shard

    # ---- the step ------------------------------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler else 1.0

    def grad_norm(self) -> torch.Tensor:
        """sqrt of the sum of squares of every logical gradient element, identical on every rank
        (collective over DP and TP). Needs the reduced gradients (after `grad_sync.finish()`)."""
        buffers = self.grad_sync.buffers
        dtype = buffers[0].flat.dtype if buffers else torch.float32
        device = buffers[0].flat.device if buffers else "cpu"
        sq = torch.zeros(4, dtype=dtype, device=device)
        for shard in self.shards:
            flat = shard.bucket.buffer.flat
            for a, b, cls in shard.norm_runs:
                g = flat[a:b]
                sq[cls] += torch.dot(g, g)
        comm.all_reduce(sq, self.dp)
        comm.all_reduce(sq, self.tp)
        if self.pp is not None:
            comm.all_reduce(sq, self.pp)
        replicated = (sq[DENSE_REPLICATED] + sq[EXPERT_REPLICATED]) / self.tp.size
        return (sq[DENSE_SLICED] + sq[EXPERT_SLICED] + replicated).sqrt()

    @torch.no_grad()
    def step(self, lr: float) -> tuple[bool, float]:
        """Returns (applied, grad_norm). A step with an inf/nan gradient anywhere is skipped on every rank."""
        if [p.data_ptr() for p in self.params] != self._ptrs:
            raise RuntimeError("a parameter no longer lives in the optimizer's parameter buffer "
                               "(model.to(...) after building TiledAdamW?); build the optimizer last")
        norm = (self.grad_norm() / self.loss_scale).item()
        overflow = not math.isfinite(norm)
        if self.loss_scaler:
            self.loss_scaler.update(overflow)
        if overflow:
            return False, float("nan")
        # unscale and clip: the gradient is divided by `divisor` (a division, as torch's fused
        # kernel applies its grad_scale, so both paths give the same bits in fp32)
        divisor = self.loss_scale
        if self.clip_grad and self.clip_grad > 0 and norm > self.clip_grad:
            divisor *= (norm + 1e-6) / self.clip_grad
        self.step_count += 1
        # the fused kernel reads the step count (and the divisor, as grad_scale) from the device:
        # one copy per step, not per tile; the divisor goes into its single pass over the gradient
        resident = [s for s in self.shards if not s.offloaded]
        fused = self._fused_args(resident, divisor)
        for shard in resident:      # on CUDA these kernels run while the CPU updates the host ranges
            self._update(shard, divisor, lr, fused)
        offloaded = [s for s in self.shards if s.offloaded]
        if offloaded:
            self._host_update(offloaded, divisor, lr, self._fused_args(offloaded, divisor, host=True))
        if self.distributed:
            for shard in self.shards:
                self._gather(shard)
        return True, norm

    def _gather(self, shard: _Shard) -> None:
        """All-gather a bucket's updated parameters into the parameter buffer. NCCL gathers in place
        (`shard.param` is this rank's chunk of the output): no temporary. gloo stages an in-place
        gather's whole output, so with tiling it gathers in rounds of one tile per rank instead."""
        group, out = shard.bucket.group, shard.bucket_param
        if group.size == 1:
            return
        if not self.tile_size or _gathers_in_place(group):
            comm.all_gather(shard.param, group, out=out)
            return
        n = shard.hi - shard.lo
        for t0 in range(0, n, self.tile_size):
            t1 = min(n, t0 + self.tile_size)
            rows = out.view(group.size, n)                                  # [rank, chunk]
            comm.all_gather_into([rows[r, t0:t1] for r in range(group.size)], shard.param[t0:t1], group)

    def _fused_args(self, shards: list[_Shard], divisor: float, host: bool = False) -> torch.Tensor | None:
        """[step count, divisor] where the shards' state lives, for torch's fused kernel (read from
        there: one copy per step, not per tile); None: the op-by-op update."""
        device = torch.device("cpu") if host else shards[0].grad.device if shards else None
        if device is None or not (self.fused if self.fused is not None else _fused_adamw_on(device)):
            return None
        return torch.tensor([float(self.step_count), divisor], dtype=torch.float32, device=device)

    def _tiles(self, shard: _Shard):
        """(t0, t1, the weight-decayed runs of [t0, t1) relative to t0) of each tile of an owned range."""
        n, starts = shard.hi - shard.lo, [a for a, _ in shard.decay_runs]
        tile = self.tile_size or n
        for t0 in range(0, n, tile):
            t1 = min(n, t0 + tile)
            yield t0, t1, [(a - t0, b - t0) for a, b in _within(shard.decay_runs, starts, t0, t1)]

    def _update(self, shard: _Shard, divisor: float, lr: float, fused: torch.Tensor | None) -> None:
        """fused: [step count, divisor] on the device for torch's fused kernel (None: op by op)."""
        for t0, t1, decayed in self._tiles(shard):
            self._tile_update(shard.master[t0:t1], shard.grad[t0:t1], shard.exp_avg[t0:t1],
                              shard.exp_avg_sq[t0:t1], decayed, divisor, lr, fused)
            if shard.separate_master:
                shard.param[t0:t1].copy_(shard.master[t0:t1])

    def _host_update(self, shards: list[_Shard], divisor: float, lr: float, fused: torch.Tensor | None) -> None:
        """The offloaded ranges, tile by tile on the CPU: tile i + 1's gradient is on its way down
        while tile i is updated, and tile i's parameter goes up while tile i + 1 is updated."""
        tiles = [(s, *t) for s in shards for t in self._tiles(s)]
        staging = self.staging
        staging.begin()
        staging.fetch(0, tiles[0][0].grad[tiles[0][1]:tiles[0][2]])
        for i, (shard, t0, t1, decayed) in enumerate(tiles):
            if i + 1 < len(tiles):
                nxt, n0, n1, _ = tiles[i + 1]
                staging.fetch((i + 1) % 2, nxt.grad[n0:n1])
            grad = staging.fetched(i % 2, t1 - t0)
            self._tile_update(shard.master[t0:t1], grad, shard.exp_avg[t0:t1], shard.exp_avg_sq[t0:t1],
                              decayed, divisor, lr, fused)
            staging.push(i % 2, shard.master[t0:t1], shard.param[t0:t1])
        staging.end()

    def _tile_update(self, master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                     exp_avg_sq: torch.Tensor, decayed: list[tuple[int, int]], divisor: float, lr: float,
                     fused: torch.Tensor | None) -> None:
        """Unscale and clip (divide by `divisor`), weight decay on the `decayed` runs, Adam: one tile
        (views of the same elements; the gradient is modified in place)."""
        # the fused kernel reads grad_scale as fp32: fp64 gradients (exact tests) are divided apart
        in_kernel = fused is not None and divisor != 1.0 and grad.dtype == torch.float32
        if divisor != 1.0 and not in_kernel:
            grad.div_(divisor)          # unscale (fp16) and clip, in place
        if fused is not None:
            self._fused_update(master, grad, exp_avg, exp_avg_sq, decayed, lr, fused[0],
                               fused[1] if in_kernel else None)
            return
        if self.weight_decay != 0:
            decay = 1 - lr * self.weight_decay
            for a, b in decayed:
                master[a:b].mul_(decay)
        adamw_update_(master, grad, exp_avg, exp_avg_sq, self.step_count, lr, self.betas, self.eps)

    def _fused_update(self, master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                      exp_avg_sq: torch.Tensor, decayed: list[tuple[int, int]], lr: float,
                      step: torch.Tensor, grad_scale: torch.Tensor | None) -> None:
        """The same update in one pass over the tile (torch's fused AdamW kernel: reads master, grad
        and moments once, writes them once, where the op-by-op form makes ~9 passes, ~10 with the
        clipping; equal to it up to the last bits, which its vector lanes round differently). One
        call for the tile's weight-decayed runs, one for the rest. grad_scale: the gradient is
        divided by it first (and stored so)."""
        decayed = decayed if self.weight_decay != 0 else []
        plain, at = [], 0
        for a, b in decayed + [(master.numel(), master.numel())]:
            if at < a:
                plain.append((at, a))
            at = b
        for runs, wd in ((decayed, self.weight_decay), (plain, 0.0)):
            if runs:
                torch._fused_adamw_([master[a:b] for a, b in runs], [grad[a:b] for a, b in runs],
                                    [exp_avg[a:b] for a, b in runs], [exp_avg_sq[a:b] for a, b in runs],
                                    [], [step] * len(runs), lr=lr, beta1=self.betas[0], beta2=self.betas[1],
                                    weight_decay=wd, eps=self.eps, amsgrad=False, maximize=False,
                                    grad_scale=grad_scale)

    # ---- sizes ---------------------------------------------------------------------------------

    def state_numel(self, host: bool = False) -> dict[str, int]:
        """Elements of optimizer state this rank holds ({"dense": n, "expert": n}): the separate fp32
        master (bf16/fp16 models; offloaded ranges always have one) and the two Adam moments of its
        owned ranges, on the device (host=False) or in host memory (host=True)."""
        out = {buf.name: 0 for buf in self.grad_sync.buffers}
        for s in self.shards:
            if s.offloaded == host:
                out[s.bucket.buffer.name] += (s.hi - s.lo) * (3 if s.separate_master else 2)
        return out

    # ---- state by logical parameter name (checkpoints) -------------------------------------------

    MOMENTS = ("exp_avg", "exp_avg_sq", "step")

    @torch.no_grad()
    def named_state(self, names=None) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: {"master"?, "exp_avg", "exp_avg_sq", "step"}}: whole local-shard tensors
        (the local parameter's shape), as MixedPrecisionAdamW. With partitioning the owned chunks
        are all-gathered, one bucket at a time (collective over DP / expert-DP: every rank calls it,
        whatever `names`). names: only these entries are built (default all). The tensors are
        copies; "master" only for a bf16/fp16 model, the Adam entries only after a first step.
        """
        wanted = set(self.names) if names is None else set(names)
        out = {n: {} for n in self.names if n in wanted}
        low_precision = bool(self.params) and self.params[0].dtype in (torch.float16, torch.bfloat16)
        kinds = ["master"] if low_precision else []   # the same on every rank: the gathers must match
        kinds += ["exp_avg", "exp_avg_sq"] if self.step_count > 0 else []
        for shard in self.shards:
            b = shard.bucket
            params = [(p, off) for p, off in zip(b.params, b.offsets) if self._name_of[id(p)] in wanted]
            for kind in kinds:
                # offloaded state goes back to the device for the gather: the same tensors either way
                own = getattr(shard, kind).to(shard.param.device)
                full = comm.all_gather(own, b.group) if self.distributed else own   # the bucket, [start, end)
                for p, off in params:
                    entry = out[self._name_of[id(p)]]
                    entry[kind] = full[off - b.start: off - b.start + p.numel()].view(p.shape).clone()
        if self.step_count > 0:
            for entry in out.values():
                entry["step"] = torch.tensor(float(self.step_count), dtype=torch.float32)
        return out

    @torch.no_grad()
    def load_named_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of `named_state`: whole local-shard tensors by name; each rank keeps its owned
        part (a checkpoint's lazy entries read only that part: training/checkpoint.py). An entry without "master" takes the master from the model weights; the moments of a
        parameter without them start at zero; the step is the largest saved one (0 if none)."""
        steps = [float(e["step"]) for e in states.values() if all(k in e for k in self.MOMENTS)]
        self.step_count = int(max(steps)) if steps else 0
        for shard in self.shards:
            if shard.separate_master:
                shard.master.copy_(shard.param)
            shard.exp_avg.zero_()
            shard.exp_avg_sq.zero_()
            for piece in shard.pieces:
                entry = states.get(piece.name, {})
                at, n = piece.at, piece.p_hi - piece.p_lo
                if shard.separate_master and "master" in entry:
                    shard.master[at:at + n].copy_(_flat_range(entry, "master", piece.p_lo, piece.p_hi))
                if self.step_count and all(k in entry for k in self.MOMENTS):
                    shard.exp_avg[at:at + n].copy_(_flat_range(entry, "exp_avg", piece.p_lo, piece.p_hi))
                    shard.exp_avg_sq[at:at + n].copy_(_flat_range(entry, "exp_avg_sq", piece.p_lo, piece.p_hi))

    @torch.no_grad()
    def sync_master_from_model(self) -> None:
        """Reset the fp32 master copies to the model's weights (after loading weights only)."""
        for shard in self.shards:
            if shard.separate_master:
                shard.master.copy_(shard.param)

    def state_dict(self):
        """By logical name: {"params": {name: {...}}, "loss_scaler": ...} (see `named_state`; collective)."""
        return {"params": self.named_state(),
                "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler else None}

    def load_state_dict(self, sd):
        self.load_named_state(sd["params"])
        if self.loss_scaler and sd.get("loss_scaler"):
            self.loss_scaler.load_state_dict(sd["loss_scaler"])


def _flat_range(entry, key: str, lo: int, hi: int) -> torch.Tensor:
    """entry[key].reshape(-1)[lo:hi]. An entry that can read a flat range by itself (a checkpoint
    being loaded) reads just those elements: each rank's I/O is its partition, not its shard."""
    read = getattr(entry, "read_flat", None)
    return read(key, lo, hi) if read is not None else entry[key].reshape(-1)[lo:hi]
