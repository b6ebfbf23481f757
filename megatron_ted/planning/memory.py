"""Per-GPU memory of a training run, from the configs and the layout alone: the one memory model of
`--dry-run` and of the planner (tools/plan_ted.py).

    peak = weights + main grads + optimizer states                       (static, all run long)
         + max(activation peak of one micro-batch + communication buffers,  (forward/backward)
               optimizer-step spike)                                      (the step, activations freed)
         + allocator allowance

Static, in bytes per parameter this rank holds (N = dense + expert shard elements,
planning/param_count.py):
  weights     2 (fp16/bf16) or 4 (fp32)
  gradients   4: GradientSync accumulates fp32 `main_grad` buffers for every parameter
  optimizer   Adam moments 4 + 4, plus a 4-byte fp32 master copy when the weights are fp16/bf16;
              replicated on every data-parallel rank, or with --use-distributed-optimizer (ZeRO-1)
              dense states split over DP and expert states over expert-DP.

Activations of one micro-batch (this system runs one micro-batch at a time: no pipeline), derived
from what the code paths save for backward. T = micro-batch x seq tokens, h hidden, a heads,
t = TP, w = 2 (fp16/bf16) or 4 bytes, F dense FFN, Fe expert FFN, k top-k, E experts. Tensors
replicated over TP count whole, TP-sliced ones 1/t:
  per layer, attention side   w*T*h*(4 + 4/t): the layer input (saved by the input norm), the
                              normed input (QKV linear), QKV output (3/t: SDPA saves q, k, v as
                              views of it), SDPA output (1/t; the fused kernels return it in
                              [B, S, heads, D] layout, so the projection's input is a view of it),
                              the residual sum (post-attention norm), its normed value (MLP input);
                              + 4*T*a/t (SDPA log-sum-exp, fp32) + norm statistics (fp32 mean and
                              rstd per token and norm: 16*T for LayerNorm, 8*T for RMSNorm);
                              multi-latent attention: `_mla_bytes`; grouped-query attention or
                              --kv-channels D: q and SDPA output a*D/t each, k and v D per K/V group
                              this rank holds (G/t, at least 1) each, in place of h/t (`_qkv_widths`)
  dense MLP                   w*T*F/t*2 (fc1 output, GeLU output) or *4 with SwiGLU (fc1's gate|up,
                              silu(gate), the product)
  MoE MLP                     rows = T*k (every routed assignment reaches one expert; dropless
                              expectation, and the upper bound with a capacity factor <= 1):
                              w*rows*h (expert input rows) + w*rows*Fe/t*(2, or 4 with SwiGLU)
                              + w*(T/t under DTD, else T)*k*h (combine: the un-permuted expert
                              output weighted per slot) + 4*T*h when w < 4 (the fp32 copy of the
                              router input) + routing bookkeeping 4*T*E*4 + 6*T*k*8 (scores,
                              probabilities, index vectors)
  hidden dropout > 0          1 byte per element of each of the 2 dropout masks per layer
  outside the layers          w*T*h*2 (final norm input and output) + 4*T*V/t (the loss keeps
                              fp32 log-probabilities / softmax over this rank's vocabulary slice)
Recomputation:
  full (chunks of n layers)   each chunk keeps only its input, w*T*h; in backward one chunk is
                              recomputed at a time (its activations as above are added to the peak)
  --moe-cac                   + per MoE layer the kept all-to-all outputs: the dispatched rows
                              (w*T*k*h/t under DTD, else w*T*k*h) and the combined rows (same);
                              --moe-cac-tp adds the TP collectives' outputs (w*h*(T*k + T*k/t + T))
  selective                   recomputes the attention core only; with fused SDPA kernels the
                              core keeps no S x S scores, and q, k, v and the output stay alive
                              anyway (the checkpoint's inputs, the projection's input), so the
                              saving is only the log-sum-exp. Counted as that.
Transients on top of the saved activations (the high-water mark of one micro-batch):
  loss                        the fp32 gradient of the logits and its cast: (4 + w)*T*V/t, and the
                              output-layer weight gradient w*V/t*h (with tied embeddings it is
                              held until the embedding's backward, at the end)
  MoE layer in flight         the all-to-all send/receive buffers and the replicated token copy the
                              permutation reads: w*h*(T*k/t_d + 2*T*k/t_d + T*k) (t_d = t under
                              DTD else 1; the last term is the TP all-gather of the routed rows)
                              -- reported as "communication buffers", not as activations
  layer backward              the layer's largest weight gradient (or the placeholder a fused
                              layer hands autograd, tensor_parallel/wgrad_fusion.py) and one
                              gradient of its widest activation; below the layer only the
                              gradient entering the stack, w*T*h, and with tied embeddings the
                              output layer's weight gradient, w*V/t*h, are left of the loss
Optimizer-step spike (training/tiled_optimizer.py): one fp32 temporary of a tile, 4*min(tile,
largest owned bucket range); without tiling 4 x the largest owned bucket range. Gradient buckets
are views of the main grads: no extra memory.
Optimizer offload (--optimizer-cpu-offload, --optimizer-offload-fraction F;
training/optimizer_offload.py): F x the rank's optimizer state bytes leave the GPU (an upper bound:
the run offloads whole owned bucket ranges, experts first, so it may offload up to one range less)
and their step spike with them (F = 1: none). In host memory per rank: 12 bytes per offloaded
element (fp32 master and moments; an fp32 model gets a host master too) plus the staging, two
gradient tiles (fp32) and two parameter tiles (model dtype). Per node: ranks per node x that.
Allocator allowance: 5% of the rest plus 0.5 GiB (CUDA context not included: torch's
max_memory_allocated does not see it either).

tests/test_planner.py checks the activation formulas against counted CPU allocations of the real
model (several layouts, recompute modes, dense and MoE) and bench/memory_model.py against
`torch.cuda.max_memory_allocated` on GPUs (docs/PERFORMANCE.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from megatron_ted.config.run import RunConfig
from megatron_ted.model.builder import MoEConfig, experts_per_layer, moe_layer_indices
from megatron_ted.model.gpt import GPTConfig
from megatron_ted.planning.param_count import ParamCounts, count_parameters, parameter_shapes
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.parallel.pipeline_split import PipelineSplit

GiB = 2**30
ALLOWANCE_FRACTION = 0.05
ALLOWANCE_BYTES = GiB // 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Static bytes per GPU: weights, fp32 main grads, optimizer states (both optimizer modes)."""

    weights: int
    gradients: int
    optimizer_replicated: int
    optimizer_distributed: int

    @property
    def total_replicated(self) -> int:
        return self.weights + self.gradients + self.optimizer_replicated

    @property
    def total_distributed(self) -> int:
        return self.weights + self.gradients + self.optimizer_distributed


def weight_bytes(precision: str) -> int:
    return {"fp32": 4, "fp16": 2, "bf16": 2}[precision]


def memory_per_gpu(counts: ParamCounts, layout: ParallelLayout, precision: str) -> MemoryEstimate:
    """Weights, fp32 main grads and Adam states of one rank (see the module docstring)."""
    w = weight_bytes(precision)
    state = 8 + (4 if w < 4 else 0)     # exp_avg + exp_avg_sq (+ fp32 master)
    n = counts.per_rank
    distributed = state * (_split(counts.dense_per_rank, layout.data_parallel)
                           + _split(counts.expert_per_rank, layout.expert_data_parallel))
    return MemoryEstimate(weights=w * n, gradients=4 * n, optimizer_replicated=state * n,
                          optimizer_distributed=distributed)


def _split(elements: int, parts: int) -> int:   # ZeRO-1 pads each partition to equal size
    return -(-elements // parts)


@dataclass(frozen=True)
class Workload:
    """What a run does with the model, besides its shape: the inputs of the activation model."""

    config: GPTConfig
    moe: MoEConfig | None
    seq_length: int
    micro_batch: int
    precision: str = "bf16"
    recompute: str | None = None          # None | "full" | "selective"
    recompute_num_layers: int = 1
    cac: bool = False
    cac_tp: bool = False
    distributed_optimizer: bool = False
    tile_size: int = 2**24                # --optimizer-tile-size (0: untiled)
    offload_fraction: float = 0.0         # --optimizer-offload-fraction with --optimizer-cpu-offload, else 0
    bucket_elements: int = 40_000_000     # GradientSync's default

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_length

    @property
    def w(self) -> int:
        return weight_bytes(self.precision)

    def dtd(self, tp: int) -> bool:
        return self.moe is not None and self.moe.duplicate_token_dropping and tp > 1

    def layer_kinds(self) -> list[int | None]:
        """Per layer: None (dense MLP) or the expert count of its MoE block."""
        c, moe = self.config, self.moe
        kinds: list[int | None] = [None] * c.num_layers
        if moe is not None:
            for i, e in zip(moe_layer_indices(c.num_layers, moe.layer_freq), experts_per_layer(moe, c.num_layers)):
                kinds[i] = e
        return kinds


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of one micro-batch's activations on one rank."""

    saved: int                 # alive between forward and backward
    peak: int                  # high-water mark of forward + backward (saved + transients)
    comm_buffers: int          # the largest all-to-all / TP-gather working set of a MoE layer
    parts: dict = field(default_factory=dict)   # named terms of `saved`, for reports


def _attention_bytes(wl: Workload, tp: int) -> int:
    c, T, w = wl.config, wl.tokens, wl.w
    norm_stats = (16 if c.normalization == "LayerNorm" else 8) * T      # two norms per layer
    if c.mla is not None:
        return _mla_bytes(wl, tp) + 4 * T * c.num_attention_heads // tp + norm_stats
    q, kv = _qkv_widths(c, tp)
    return w * T * (4 * c.hidden_size + 2 * q + kv) + 4 * T * c.num_attention_heads // tp + norm_stats


def _qkv_widths(c, tp: int) -> tuple[int, int]:
    """Elements per token on one rank of q (= of SDPA's output) and of k and v together: heads*D/t,
    and 2*D per K/V group this rank holds (with TP > G each rank holds one whole group)."""
    d = c.attention.head_dim(c.hidden_size, c.num_attention_heads)
    groups = c.attention.groups(c.num_attention_heads)
    return c.num_attention_heads * d // tp, 2 * d * max(groups // tp, 1)


def _mla_bytes(wl: Workload, tp: int) -> int:
    """Multi-latent attention's saved tensors: the layer input, normed input, residual sum and its
    norm (4 h); the kv down-projection's output (kept by its norm) and normed latent; with a q
    latent its down-projection's output and normed value; per head (1/t) SDPA's q and k (dn + dr
    each), the kv up-projection's output (v is a view of it) and SDPA's output; fp32 rstd of the
    latent RMSNorms. (The rotations save only their cos/sin tables.)"""
    c, T, w, m = wl.config, wl.tokens, wl.w, wl.config.mla
    replicated = 4 * c.hidden_size + 2 * m.kv_lora_rank + m.qk_pos_emb_head_dim
    norms = 1
    if m.q_lora_rank is not None:
        replicated, norms = replicated + 2 * m.q_lora_rank, 2
    per_head = 2 * m.q_head_dim + m.qk_head_dim + 2 * m.v_head_dim
    return w * T * (replicated + c.num_attention_heads * per_head // tp) + 4 * T * norms


def _dense_mlp_bytes(wl: Workload, tp: int, ffn: int) -> int:
    return wl.w * wl.tokens * ffn * (4 if wl.config.swiglu else 2) // tp


def _moe_mlp_bytes(wl: Workload, tp: int, num_experts: int) -> int:
    c, T, w, k = wl.config, wl.tokens, wl.w, wl.moe.router.topk
    h, fe = c.hidden_size, wl.moe.ffn_hidden_size
    rows = T * k
    combine_tokens = T // tp if wl.dtd(tp) else T
    out = w * rows * h + w * rows * fe * (4 if c.swiglu else 2) // tp + w * combine_tokens * k * h
    out += (4 * T * h if w < 4 else 0) + 16 * T * num_experts + 48 * T * k
    if wl.moe.mlp_type == "residual":
        out += _dense_mlp_bytes(wl, tp, fe) + w * T * h
    if wl.moe.shared_expert_size:   # the shared experts' MLP; the gate's product keeps its [T, H] and [T, 1]
        out += _dense_mlp_bytes(wl, tp, wl.moe.shared_expert_size)
        out += w * T * (h + 1) if wl.moe.shared_expert_gate else 0
    return out


def _dropout_bytes(wl: Workload) -> int:
    return 2 * wl.tokens * wl.config.hidden_size if wl.config.hidden_dropout > 0 else 0


def _layer_bytes(wl: Workload, tp: int, num_experts: int | None) -> int:
    mlp = _dense_mlp_bytes(wl, tp, wl.config.ffn_hidden_size) if num_experts is None \
        else _moe_mlp_bytes(wl, tp, num_experts)
    return _attention_bytes(wl, tp) + mlp + _dropout_bytes(wl)


def _cac_kept_bytes(wl: Workload, tp: int) -> int:
    """Per MoE layer: what --moe-cac (and --moe-cac-tp) keep from forward to backward."""
    if not wl.cac:
        return 0
    T, w, h, k = wl.tokens, wl.w, wl.config.hidden_size, wl.moe.router.topk
    sent = T * k // tp if wl.dtd(tp) else T * k
    kept = 2 * w * sent * h
    if wl.cac_tp and tp > 1:
        kept += w * h * (T * k + sent + T) if wl.dtd(tp) else w * h * T * k
    return kept


def moe_comm_buffer_bytes(wl: Workload, tp: int) -> int:
    """The transient buffers of one MoE layer's dispatch: the replicated token copy the permutation
    reads, the all-to-all send and receive buffers, and (DTD) the TP all-gather of the routed rows."""
    if wl.moe is None:
        return 0
    T, w, h, k = wl.tokens, wl.w, wl.config.hidden_size, wl.moe.router.topk
    sent = T * k // tp if wl.dtd(tp) else T * k
    return w * h * (3 * sent + (T * k if wl.dtd(tp) else 0))


def _largest_layer_parameter(wl: Workload, tp: int, ep: int) -> list[int]:
    """The largest local parameter of each transformer layer: its gradient exists, in the model's
    dtype, from its computation in backward until GradientSync's hook adds it into main_grad and
    frees it (one parameter's gradient at a time)."""
    out = [0] * wl.config.num_layers
    for s in parameter_shapes(wl.config, wl.moe):
        if s.name.startswith("layers."):
            i = int(s.name.split(".")[1])
            out[i] = max(out[i], s.local_numel(tp, ep))
    return out


def _widest_activation(wl: Workload, tp: int, num_experts: int | None) -> int:
    """Elements of the widest activation of a layer: its gradient and the next one coexist in backward."""
    c, T, g = wl.config, wl.tokens, 2 if wl.config.swiglu else 1
    q, kv = _qkv_widths(c, tp)
    mha = c.attention.groups(c.num_attention_heads) == c.num_attention_heads   # one fused qkv output
    attn = T * (q + kv if mha else max(q, kv))
    if c.mla is not None:   # q (and k) or the kv up-projection's output
        attn = T * c.num_attention_heads * max(c.mla.q_head_dim, c.mla.qk_head_dim + c.mla.v_head_dim) // tp
    if num_experts is None:
        return max(attn, T * g * c.ffn_hidden_size // tp)
    return max(attn, T * wl.moe.router.topk * g * wl.moe.ffn_hidden_size // tp)


def activation_memory(wl: Workload, tp: int, ep: int = 1, layers: list[int] | range | None = None,
                      last: bool = True) -> ActivationEstimate:
    """Activations of one micro-batch on one rank of TP size `tp` and EP size `ep` (module docstring).

    The peak is the largest of the phases of backward: the loss (every activation saved, plus the
    logits' gradients) and each layer (or recomputed chunk) with what is still saved below it and
    its backward transient (its largest weight gradient and one activation gradient).

    A pipeline stage (stage_memory below): `layers` its layers; not `last`: no final norm,
    loss or output layer, but the stage output the schedule keeps for its backward (w*T*h)."""
    c, T, w, h = wl.config, wl.tokens, wl.w, wl.config.hidden_size
    v = c.vocab_size // tp
    index = range(c.num_layers) if layers is None else layers
    kinds = [wl.layer_kinds()[i] for i in index]
    layers = [_layer_bytes(wl, tp, e) for e in kinds]
    if wl.recompute == "selective":
        layers = [b - 4 * T * c.num_attention_heads // tp for b in layers]
    largest = _largest_layer_parameter(wl, tp, ep)
    backward = [w * largest[i] + w * _widest_activation(wl, tp, e) for i, e in zip(index, kinds)]
    dropout_mask = T * h if c.hidden_dropout > 0 else 0
    outside = 2 * w * T * h + 4 * T * v + dropout_mask if last else w * T * h
    parts = {"outside layers": outside}
    # Once backward is inside the layers, the loss's and final norm's saved tensors are freed; what
    # stays is the gradient entering the stack and, with tied embeddings, the output layer's
    # weight gradient (held until the embedding's backward adds its part, at the very end).
    # (a pipeline's last stage uses its tied copy once: its gradient is not held)
    tied = 0 if c.untie_embeddings_and_output_weights or len(index) < c.num_layers else w * v * h
    below = w * T * h + dropout_mask + tied
    # the loss (tensor_parallel/vocab.py): beside its saved fp32 softmax, the logits in the model's
    # dtype while it is built, and their gradient (written in that dtype) in backward
    loss_transient = w * T * v if last else 0
    if wl.recompute == "full":
        n = wl.recompute_num_layers
        kept = _cac_kept_bytes(wl, tp) if ep > 1 else 0
        chunks = [range(i, min(i + n, len(layers))) for i in range(0, len(layers), n)]
        per_chunk = [w * T * h + kept * sum(kinds[i] is not None for i in ch) for ch in chunks]
        parts["checkpointed chunk inputs"] = len(chunks) * w * T * h
        parts["CAC kept collective outputs"] = sum(per_chunk) - parts["checkpointed chunk inputs"]
        # the recomputed first layer's input is the chunk input itself (not counted twice)
        # (backward then walks down the chunk, freeing the layers above as it goes)
        phases = [below + sum(per_chunk[:j + 1]) - w * T * h + sum(layers[ch.start:i + 1]) + backward[i]
                  for j, ch in enumerate(chunks) for i in ch]
    else:
        parts["transformer layers"] = sum(layers)
        phases = [below + sum(layers[:i + 1]) + backward[i] for i in range(len(layers))]
    saved = sum(parts.values())
    peak = max([saved + loss_transient] + phases)
    return ActivationEstimate(saved=saved, peak=peak, comm_buffers=moe_comm_buffer_bytes(wl, tp), parts=parts)


def optimizer_spike_bytes(wl: Workload, layout: ParallelLayout, counts: ParamCounts) -> int:
    """The step's fp32 temporary: one tile, at most the largest owned range of a bucket (a bucket is
    closed once it holds --bucket-elements, so it reaches at most that plus one parameter)."""
    largest = max(s.local_numel(layout.tensor_parallel, layout.expert_parallel)
                  for s in parameter_shapes(wl.config, wl.moe))
    ranges = []
    for total, group in ((counts.dense_per_rank, layout.data_parallel),
                         (counts.expert_per_rank, layout.expert_data_parallel)):
        bucket = min(total, max(wl.bucket_elements, largest))
        ranges.append(_split(bucket, group) if wl.distributed_optimizer else bucket)
    biggest = max(ranges)
    if wl.offload_fraction >= 1:
        return 0                          # every range is stepped on the CPU
    return 4 * (min(wl.tile_size, biggest) if wl.tile_size else biggest)


def _largest_owned_range(wl: Workload, layout: ParallelLayout, counts: ParamCounts) -> int:
    return optimizer_spike_bytes(replace(wl, tile_size=0, offload_fraction=0.0), layout, counts) // 4


def offload_bytes(wl: Workload, layout: ParallelLayout, counts: ParamCounts, optimizer: int) -> tuple[int, int]:
    """(optimizer state bytes that leave the GPU, host bytes per rank: their host state + staging)
    for `optimizer` bytes of state per GPU (module docstring)."""
    if not wl.offload_fraction:
        return 0, 0
    per_element = 8 + (4 if wl.w < 4 else 0)
    off = int(wl.offload_fraction * optimizer)
    largest = _largest_owned_range(wl, layout, counts)
    tile = min(wl.tile_size, largest) if wl.tile_size else largest
    return off, off // per_element * 12 + 2 * tile * (4 + wl.w)


@dataclass(frozen=True)
class PeakMemory:
    """Predicted peak bytes per GPU, by term (module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int           # peak of one micro-batch's forward + backward
    comm_buffers: int
    spike: int                 # optimizer step temporary
    allowance: int
    host: int = 0              # host memory per rank: offloaded optimizer state + staging

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.static + max(self.activations + self.comm_buffers, self.spike) + self.allowance


def peak_memory(wl: Workload, layout: ParallelLayout, counts: ParamCounts | None = None,
                activations: ActivationEstimate | None = None) -> PeakMemory:
    """activations: given for a pipeline rank (stage_memory below), else the whole model's."""
    counts = counts or count_parameters(wl.config, wl.moe, layout.tensor_parallel, layout.expert_parallel)
    static = memory_per_gpu(counts, layout, wl.precision)
    act = activations or activation_memory(wl, layout.tensor_parallel, layout.expert_parallel)
    spike = optimizer_spike_bytes(wl, layout, counts)
    optimizer = static.optimizer_distributed if wl.distributed_optimizer else static.optimizer_replicated
    offloaded, host = offload_bytes(wl, layout, counts, optimizer)
    optimizer -= offloaded
    body = static.weights + static.gradients + optimizer + max(act.peak + act.comm_buffers, spike)
    allowance = int(ALLOWANCE_FRACTION * body) + ALLOWANCE_BYTES
    return PeakMemory(weights=static.weights, gradients=static.gradients, optimizer=optimizer,
                      activations=act.peak, comm_buffers=act.comm_buffers, spike=spike, allowance=allowance,
                      host=host)


def check_host_memory(host_per_rank: int, ranks_per_node: int, budget_gib: float | None) -> None:
    """One line when the offloaded optimizer state of a node's ranks exceeds --host-memory-per-node-gib."""
    need = host_per_rank * ranks_per_node
    if budget_gib is not None and need > budget_gib * GiB:
        raise ValueError(f"--host-memory-per-node-gib {budget_gib:g}: the offloaded optimizer state needs "
                         f"{need / GiB:.1f} GiB per node ({ranks_per_node} ranks x {host_per_rank / GiB:.2f} GiB); "
                         f"lower --optimizer-offload-fraction, use more nodes or nodes with more memory")


def workload_of(run: RunConfig) -> Workload:
    """The Workload of a run's configuration."""
    recompute, opt = run.parallel.recompute, run.training.optimizer
    return Workload(config=run.model.gpt, moe=run.model.moe, seq_length=run.training.schedule.seq_length,
                    micro_batch=run.training.schedule.micro_batch_size, precision=run.training.precision.dtype,
                    recompute=recompute.granularity if recompute else None,
                    recompute_num_layers=recompute.num_layers if recompute else 1,
                    cac=bool(recompute and recompute.moe_cac), cac_tp=bool(recompute and recompute.moe_cac_tp),
                    distributed_optimizer=run.parallel.distributed_optimizer, tile_size=opt.tile_size,
                    offload_fraction=opt.offload_fraction)


# ---- pipeline parallelism: per-stage memory ----------------------------------------------------
# Per-GPU memory of each pipeline stage: what planning/memory.py models for one rank, restricted to
# the layers (and ends) a pipeline rank holds, with the activations of the micro-batches in flight.
#
#     stages = stage_memory(wl, layout, split, n_micro)    # one StageMemory per pipeline rank
#
# Parameters: rank p holds its stages' layers; the first stage the embedding (and learned positions),
# the last the final norm and the output layer, or with tied embeddings a copy of the embedding
# (pipeline/stage.py: it has weights, main grads and optimizer states like any parameter).
#
# Micro-batches in flight (activations saved at once; m micro-batches per step, P ranks, V chunks
# per rank). 1F1B: rank p runs P - 1 - p warm-up forwards, then one more before its first backward,
# so min(P - p, m) micro-batches: P on the first rank (Megatron's rule). Interleaved 1F1B (torch's
# ScheduleInterleaved1F1B, Megatron's warm-up): rank p runs 2 (P - 1 - p) + (V - 1) P chunk forwards
# before the steady state, plus one, each holding 1/V of the rank's layers: on the first rank
# (2 (P - 1) + (V - 1) P + 1) / V = P + (P - 1) / V micro-batches' worth, i.e. Megatron's factor
# 1 + (P - 1) / (P V) over plain 1F1B. The first rank is the peak of the pipeline unless the end
# stages hold much larger parameters (a large vocabulary on the last stage): the report shows each.
#
# Activations of one micro-batch of a rank: planning/memory.activation_memory over its layers
# (the loss terms on the last stage only); in flight: peak of one + (k - 1) x saved of one.


def in_flight_micro_batches(pipeline_parallel: int, chunks: int, pp_rank: int, n_micro: int) -> float:
    """Micro-batches' worth of this rank's activations saved at once (module docstring)."""
    p, v = pipeline_parallel, chunks
    if v == 1:
        return min(p - pp_rank, n_micro)
    return min(2 * (p - 1 - pp_rank) + (v - 1) * p + 1, n_micro * v) / v


def stage_parameter_counts(wl: Workload, split: PipelineSplit, pp_rank: int, tp: int, ep: int) -> ParamCounts:
    """The parameters pipeline rank `pp_rank` builds (pipeline/stage.py), counted by name."""
    ranges = split.stage_layers()
    stages = split.stages_of_rank(pp_rank)
    layers = {i for s in stages for i in ranges[s]}
    first, last = 0 in stages, split.num_stages - 1 in stages
    tied_copy = last and not first and not wl.config.untie_embeddings_and_output_weights

    def held(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in layers
        if name == "embedding.weight":
            return first or tied_copy
        if name == "position_embedding.weight":
            return first
        return last                      # final_norm.*, output_weight
    shapes = [s for s in parameter_shapes(wl.config, wl.moe) if held(s.name)]
    dense = [s for s in shapes if not s.expert]
    expert = [s for s in shapes if s.expert]
    return ParamCounts(dense=sum(s.numel for s in dense), expert=sum(s.numel for s in expert),
                       dense_per_rank=sum(s.local_numel(tp, ep) for s in dense),
                       expert_per_rank=sum(s.local_numel(tp, ep) for s in expert), active=0)


@dataclass(frozen=True)
class StageMemory:
    pp_rank: int
    layers: list[range]            # the global layer indices of each of its stages
    counts: ParamCounts
    in_flight: float               # micro-batches whose activations are saved at once
    memory: PeakMemory             # activations: all in-flight micro-batches


def stage_memory(wl: Workload, layout: ParallelLayout, split: PipelineSplit, n_micro: int) -> list[StageMemory]:
    tp, ep = layout.tensor_parallel, layout.expert_parallel
    ranges = split.stage_layers()
    out = []
    for p in range(split.pipeline_parallel):
        stages = split.stages_of_rank(p)
        counts = stage_parameter_counts(wl, split, p, tp, ep)
        layers = sorted(i for s in stages for i in ranges[s])
        act = activation_memory(wl, tp, ep, layers, last=split.num_stages - 1 in stages)
        k = in_flight_micro_batches(split.pipeline_parallel, split.chunks, p, n_micro)
        mem = peak_memory(wl, layout, counts, activations=replace(act, peak=act.peak + int((k - 1) * act.saved)))
        out.append(StageMemory(p, [ranges[s] for s in stages], counts, k, mem))
    return out
