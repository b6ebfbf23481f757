"""GPT: embeddings -> transformer layers (dense or MoE MLPs) -> final norm -> vocab-parallel logits/loss.

Shapes: B micro-batch, S sequence, H hidden, V padded vocabulary (sliced over TP).

With --sequence-parallel (parallelize/sequence_parallel.py) the embedding reduce-scatters its output to
this rank's sequence shard [B, S/TP, H], positions are those of the shard, every layer runs on the
shard between its tensor-parallel matmuls, and the final norm's output is all-gathered along the
sequence before the vocab-parallel output layer.

Pipeline stages (megatron_ted/pipeline/) are GPTModels built with `layers` (a run of global layer
indices), `pre_process` (the embedding) and `post_process` (final norm, output layer, loss), as
Megatron builds them; `forward_stage` runs one. Layers keep their global index as their name
(`layers.{i}`), so parameter names and checkpoints are the same at every pipeline size. A last
stage that is not also the first holds its own copy of a tied embedding (`embedding.weight`,
initialised from the same seed and name), kept equal by summing the two copies' gradients.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_ted.model.attention import AttentionConfig
from megatron_ted.model.mla import MLAConfig, MultiLatentAttention
from megatron_ted.tensor_parallel.mlp import MLP
from megatron_ted.model.norms import build_norm
from megatron_ted.model.positions import LearnedPositionEmbedding, RopeConfig, RotaryEmbedding
from megatron_ted.model.activation_checkpointing import RecomputeConfig, run_layers
from megatron_ted.model.transformer import TransformerLayer
from megatron_ted.moe.router import RouteInputs
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.sharding import set_spec, spec_of
from megatron_ted.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from megatron_ted.parallel import mappings


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int                 # padded, divisible by TP
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    max_position_embeddings: int
    position_embedding_type: str = "learned"   # learned | rope
    normalization: str = "LayerNorm"           # LayerNorm | RMSNorm
    swiglu: bool = False
    add_bias_linear: bool = True
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = False
    moe_layers: tuple[int, ...] = ()           # indices of the layers whose MLP is a MoE block
    attention: AttentionConfig = field(default_factory=AttentionConfig)   # GQA, head dim, qkv bias, qk norm
    add_position_embedding: bool = True        # False (--no-position-embedding): no learned positions
    rope: RopeConfig = field(default_factory=RopeConfig)   # RoPE options (position_embedding_type rope)
    mla: MLAConfig | None = None               # multi-latent attention (DeepSeek) instead of SelfAttention


@dataclass
class GPTOutput:
    loss: torch.Tensor | None               # per-token loss [B, S] (fp32) when labels are given
    logits: torch.Tensor | None             # this rank's vocab slice [B, S, V/TP] when no labels (or keep_logits)
    aux_loss: torch.Tensor                  # sum of the MoE layers' aux and z losses (scalar)
    moe: list = field(default_factory=list)  # one MoEOutput per MoE layer


class LayerStack(nn.ModuleList):
    """The transformer layers of a model or stage, named by their global index (`layers.{i}`)
    however many of them this stage holds; iterated, sliced and indexed by position as a list."""

    def __init__(self, layers=(), first_index: int = 0):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(first_index + i), layer)

    def __getitem__(self, idx):
        items = list(self._modules.values())
        return LayerStack(items[idx]) if isinstance(idx, slice) else items[idx]


class GPTModel(nn.Module):
    """`build_moe(layer_index)` returns the MoE block for the layers in `config.moe_layers`.

    layers / pre_process / post_process: a pipeline stage's part of the model (the default: all)."""

    def __init__(self, config: GPTConfig, tp: Group, build_moe=None, layers: range | None = None,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        c = self.config = config
        self.tp = tp
        self.pre_process, self.post_process = pre_process, post_process
        layers = range(c.num_layers) if layers is None else layers
        tied_copy = post_process and not pre_process and not c.untie_embeddings_and_output_weights
        self.embedding = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp) if pre_process or tied_copy else None
        if tied_copy:   # not counted twice in the gradient norm, not written twice to checkpoints
            w = self.embedding.weight
            w.spec = dataclasses.replace(spec_of(w), tied_copy=True)
        if c.position_embedding_type == "learned":
            self.position_embedding, self.rotary = LearnedPositionEmbedding(c.max_position_embeddings, c.hidden_size), None
            if not c.add_position_embedding:   # no position information but causality (NoPE)
                self.position_embedding = None
        elif c.position_embedding_type == "rope":
            rotary_dim = (c.mla.qk_pos_emb_head_dim if c.mla is not None
                          else c.attention.head_dim(c.hidden_size, c.num_attention_heads))
            self.position_embedding, self.rotary = None, RotaryEmbedding(rotary_dim, c.rope)
        else:
            raise ValueError(f"--position-embedding-type {c.position_embedding_type} is not supported; use learned or rope")
        if c.mla is not None and c.attention.window_size is not None:
            raise ValueError("--window-size with --multi-latent-attention is not supported; drop one")
        if c.mla is not None and self.rotary is None:
            raise ValueError("--multi-latent-attention needs --position-embedding-type rope")
        if not pre_process:
            self.position_embedding = None   # the rotary tables (no parameters) are every stage's
        self.embedding_dropout = nn.Dropout(c.hidden_dropout)

        modules = []
        for i in layers:
            if i in c.moe_layers:
                if build_moe is None:
                    raise ValueError("MoE layers requested but no MoE builder given")
                mlp = build_moe(i)
            else:
                mlp = MLP(c.hidden_size, c.ffn_hidden_size, tp, c.swiglu, c.add_bias_linear)
            attention = None
            if c.mla is not None:
                attention = MultiLatentAttention(c.hidden_size, c.num_attention_heads, c.mla, tp, c.attention_dropout,
                                                 c.add_bias_linear, c.layernorm_epsilon, c.rope.softmax_scale_factor())
            modules.append(TransformerLayer(c.hidden_size, c.num_attention_heads, mlp, tp, c.normalization,
                                            c.layernorm_epsilon, c.hidden_dropout, c.attention_dropout,
                                            c.add_bias_linear, attention, c.attention, c.attention.window_of(i)))
        self.layers = LayerStack(modules, layers.start if len(layers) else 0)
        self.final_norm = build_norm(c.normalization, c.hidden_size, c.layernorm_epsilon) if post_process else None
        if c.untie_embeddings_and_output_weights and post_process:
            self.output_weight = set_spec(nn.Parameter(torch.empty(c.vocab_size // tp.size, c.hidden_size)), tp_dim=0)
        else:
            self.output_weight = None
        self.recompute: RecomputeConfig | None = None   # full activation checkpointing: parallelize/recompute.py
        self.sequence_parallel = False                   # parallelize/sequence_parallel.py

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor | None = None,
                routing_seed: int | None = None, kv_cache=None, keep_logits: bool = False) -> GPTOutput:
        """routing_seed: this micro-batch's key for the random draws of the MoE routers (see
        moe/router.py); the MoE layers also get the token ids (hash routing).
        kv_cache: generation (inference/kv_cache.py): `tokens` are the step's new positions, each
        attention layer attends to its cached ones too, and the logits are the last position's only
        [B, 1, V/TP] (what sampling needs; a prompt's full [B, S, V] would be large).
        keep_logits: with labels, return the logits beside the loss (distillation compares them
        with a teacher's, training/distillation.py)."""
        x = self._embed(tokens, position_ids)                          # [B, S, H] ([B, S/TP, H] under SP)
        route = RouteInputs(token_ids=tokens, seed=routing_seed)
        rotary = self.rotary(position_ids) if self.rotary is not None else None

        aux_loss = x.new_zeros((), dtype=torch.float32)
        if kv_cache is None:
            x, moe_outputs = self._run_layers(x, rotary, route)
        else:
            x, moe_outputs = self._run_layers_cached(x, rotary, route, kv_cache)
            x = x[:, -1:]
        for moe_out in moe_outputs:
            aux_loss = aux_loss + moe_out.aux_loss
        loss, logits = self._head(x, labels, keep_logits)
        return GPTOutput(loss, logits, aux_loss, moe_outputs)

    def forward_stage(self, x: torch.Tensor, position_ids: torch.Tensor, token_ids: torch.Tensor,
                      labels: torch.Tensor, routing_seed: int | None = None) -> GPTOutput:
        """One pipeline stage: x is the token ids on the first stage, else the previous stage's
        hidden states; returns the hidden states as `logits` (the stage's output) on all but the
        last stage, the per-token loss on the last; the aux loss and MoE outputs of its layers."""
        if self.pre_process:
            x = self._embed(x, position_ids)
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        x, moe_outputs = self._run_layers(x, rotary, RouteInputs(token_ids=token_ids, seed=routing_seed))
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for moe_out in moe_outputs:
            aux_loss = aux_loss + moe_out.aux_loss
        if not self.post_process:
            return GPTOutput(None, x, aux_loss, moe_outputs)
        return GPTOutput(self._head(x, labels)[0], None, aux_loss, moe_outputs)

    def _embed(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(self._sequence_shard(position_ids))
        return self.embedding_dropout(x)

    def _head(self, x: torch.Tensor, labels: torch.Tensor | None, keep_logits: bool = False):
        """Final norm and output layer: (per-token loss, logits if keep_logits) with labels, else
        (None, logits)."""
        x = self.final_norm(x)
        weight = self.output_weight if self.output_weight is not None else self.embedding.weight
        if self.sequence_parallel:
            x = mappings.gather_partial(x, self.tp, dim=1)            # [B, S/TP, H] -> [B, S, H]
        else:
            x = mappings.copy_to(x, self.tp)
        logits = torch.nn.functional.linear(x, weight)                 # [B, S, V/TP]
        if labels is None:
            return None, logits
        vocab_start = self.tp.rank * logits.shape[-1]   # this rank's slice of the vocabulary
        loss = vocab_parallel_cross_entropy(logits, labels, self.tp, vocab_start)
        return loss, logits if keep_logits else None

    def _sequence_shard(self, t: torch.Tensor) -> torch.Tensor:
        """This TP rank's part of the sequence (dim 1) of t under SP; t itself otherwise."""
        if not self.sequence_parallel:
            return t
        s = t.shape[1] // self.tp.size
        return t[:, self.tp.rank * s:(self.tp.rank + 1) * s]

    def _run_layers_cached(self, x, rotary, route, kv_cache):
        moe_outputs = []
        for i, layer in enumerate(self.layers):
            x, moe_out = layer(x, rotary, route, kv_cache.layer(i))
            if moe_out is not None:
                moe_outputs.append(moe_out)
        return x, moe_outputs

    def _run_layers(self, x, rotary, route=None):
        """Every transformer layer in order; checkpointed in chunks when `apply_recompute` set it.
        `route` (token ids and the routing seed) goes to every MoE layer, so a recompute routes
        exactly as the forward did."""
        return run_layers(self.layers, x, rotary, self.recompute if self.training else None, route)
