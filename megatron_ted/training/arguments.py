"""Command line: Megatron-LM's flag names where one exists, ours in the same style.

`parse_args(argv, world_size)` parses and validates; every user error is a `ValueError` whose
one-line message names the flag and the fix, argparse's own (an unknown flag, a value of the wrong
type) included. The entry point turns it into one line on rank 0 and exit code 2 (`report_error`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

from megatron_ted.cli import OneLineErrorParser
from megatron_ted.data.tokenizer import TOKENIZER_TYPES, resolve_tokenizer_type
# the flags -> config mappings (config/from_flags.py); validate() builds the configs, whose
# constructors hold the checks of their own fields
from megatron_ted.config.from_flags import (attention_config, fp8_config, mla_config, moe_config,  # noqa: F401
                                            num_experts_per_layer, recompute_config, rope_config, router_config)
from megatron_ted.model.attention import check_attention, parse_window_size
from megatron_ted.model.layer_pattern import moe_layer_freq, window_attn_skip_freq
from megatron_ted.moe.hierarchical import check_node_size
from megatron_ted.parallel.layout import ParallelLayout
from megatron_ted.tensor_parallel import fp8
from megatron_ted.pipeline import flags as pipeline_flags
from megatron_ted.training import compat_flags, deepspeed_moe, run_length


class OneLineArgumentParser(OneLineErrorParser):
    """The tools' one-line parser (megatron_ted/cli.py: an unknown flag names the closest known one),
    but a mistake is a ValueError: the entry point reports it on rank 0 only (report_error)."""

    def error(self, message):
        raise ValueError(message.removeprefix("argument "))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description="Pretrain a GPT Mixture-of-Experts model with TED parallelism",
                                allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned", "rope", "learned_absolute", "none"],
                   default="learned", help="Megatron-LM's learned_absolute is learned; none: no position embedding")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm", "layernorm", "rmsnorm"], default="LayerNorm",
                   help="layernorm and rmsnorm: Megatron-DeepSpeed's spellings")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--layernorm-epsilon", "--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1,
                   help="K/V heads with --group-query-attention (ignored without it, as in Megatron-LM)")
    g.add_argument("--kv-channels", type=int, default=None, help="head dim; default hidden / heads")
    g.add_argument("--add-qkv-bias", action="store_true", help="q, k, v biases even with --disable-bias-linear")
    g.add_argument("--qk-layernorm", action="store_true", help="--normalization over each head's q and k")
    g.add_argument("--qk-layernorm-hidden-dim", action="store_true",
                   help="with --qk-layernorm: RMSNorm over the whole q and k projections, all heads together (OLMoE)")
    g.add_argument("--no-position-embedding", dest="add_position_embedding", action="store_false",
                   help="no learned absolute position embedding")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE theta")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="fraction of each head dim that RoPE rotates (the rest passes through)")
    g.add_argument("--rope-type", choices=["rope", "yarn"], default=None,
                   help="default: yarn with --multi-latent-attention (as Megatron), else rope")
    g.add_argument("--rotary-scaling-factor", type=float, default=1.0, help="YaRN's context scaling factor")
    g.add_argument("--mscale", type=float, default=1.0, help="YaRN mscale (DeepSeek)")
    g.add_argument("--mscale-all-dim", type=float, default=0.0, help="YaRN mscale_all_dim (DeepSeek)")
    g.add_argument("--original-max-position-embeddings", type=int, default=4096,
                   help="YaRN: the pretraining context (Megatron-core's MLA default 4096)")
    g.add_argument("--beta-fast", type=float, default=32.0, help="YaRN: rotations where the ramp starts")
    g.add_argument("--beta-slow", type=float, default=1.0, help="YaRN: rotations where the ramp ends")
    g.add_argument("--use-rope-scaling", action="store_true", help="Llama-3.x RoPE scaling")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="Llama-3.x RoPE scaling factor")
    g.add_argument("--multi-latent-attention", action="store_true", help="DeepSeek-V2/V3 multi-latent attention")
    g.add_argument("--q-lora-rank", type=int, default=None, help="MLA query latent rank (none: plain q projection)")
    g.add_argument("--kv-lora-rank", type=int, default=None, help="MLA key/value latent rank")
    g.add_argument("--qk-head-dim", type=int, default=128, help="MLA q/k head dim without RoPE")
    g.add_argument("--qk-pos-emb-head-dim", type=int, default=64, help="MLA q/k RoPE head dim (k's shared by heads)")
    g.add_argument("--v-head-dim", type=int, default=128, help="MLA value head dim")
    g.add_argument("--window-size", default=None,
                   help="sliding-window attention as Megatron-LM: left,right (right 0): a query sees the left "
                        "earlier positions and itself (Hugging Face's sliding_window W is W-1,0); -1,0: unbounded")
    g.add_argument("--window-attn-skip-freq", default=None,
                   help="with --window-size: int N keeps every N-th layer (1-based) full, or one 0/1 per layer "
                        "(1: windowed), e.g. \"[1,1,1,0]*3\"; default: every layer windowed")

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, nargs="+", default=None,
                   help="experts per MoE layer (none: dense model); one value per MoE layer for a pyramid, "
                        "e.g. --num-experts 32 32 64")
    g.add_argument("--mlp-type", default="standard",
                   help="standard: the MoE block alone; residual: a dense MLP plus the MoE mixed by a learned "
                        "coefficient (Residual MoE)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="shared experts: a dense MLP of this FFN size beside the routed experts of every MoE layer "
                        "(DeepSeekMoE; the sum of the sizes for several shared experts)")
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="scale the shared experts' output by sigmoid(x w), a learned [1, H] gate (Qwen2-MoE)")
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="run the shared experts while the dispatch all-to-all is in flight, forward and backward")
    g.add_argument("--moe-layer-freq", default=None,
                   help="int N: every N-th layer is MoE (default 2, as the paper; Megatron-DeepSpeed scripts: "
                        "--expert-interval 2); or one 0/1 per layer as Megatron-LM "
                        "writes it, e.g. \"([0]+[1]*23)\" or \"[0,1,1,1]\" (parsed, not evaluated)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="expert FFN size, default --ffn-hidden-size")
    g.add_argument("--moe-router-topk", type=int, default=None,
                   help="experts per token (default 2; Megatron-DeepSpeed scripts: 1, see training/deepspeed_moe.py)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="weight of the load-balancing loss (default 0; 0.1 in a Megatron-DeepSpeed script: "
                        "training/deepspeed_moe.py)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None, help="none: dropless")
    g.add_argument("--moe-token-drop-policy", choices=["probs", "position", "random"], default="probs",
                   help="which tokens an overflowing expert keeps: largest weight, first in order, or random "
                        "(Random Token Selection)")
    g.add_argument("--moe-router-type", default="topk",
                   help="the gate: topk (Switch k=1, GShard-style k=2), gshard (top-2 with random second "
                        "expert), hash, base, expert_choice, sinkhorn (see README)")
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   help="aux_loss, seq_aux_loss, global_aux_loss or none (with --moe-aux-loss-coeff)")
    g.add_argument("--moe-input-jitter-eps", type=float, default=None,
                   help="multiply the router input by U(1-eps, 1+eps) in training")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing: a per-expert selection bias updated from the load")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3,
                   help="step of the expert-bias update per iteration")
    g.add_argument("--moe-router-force-load-balancing", action="store_true",
                   help="benchmarks only: route on random logits (straight-through gradient), so every expert "
                        "gets ~T*k/E tokens, as a trained balanced router would; megatron-core's flag")
    g.add_argument("--moe-router-score-function", default="softmax",
                   help="softmax or sigmoid (DeepSeek-V3): the scores the top-k is chosen on and weighted by")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before the top-k; the weights are not renormalised")
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None,
                   help="multiply the combine weights by this factor")
    g.add_argument("--moe-router-num-groups", type=int, default=None,
                   help="group-limited routing: the experts split into this many groups")
    g.add_argument("--moe-router-group-topk", type=int, default=None,
                   help="group-limited routing: the top-k is chosen among the experts of this many best groups")
    g.add_argument("--moe-router-group-score", choices=["top_sum", "max"], default="top_sum",
                   help="group-limited routing: a group's score, the sum of its top topk/group-topk experts "
                        "(megatron-core) or its best expert (DeepSeek-V2)")
    g.add_argument("--moe-use-upcycling", action="store_true",
                   help="start this MoE from the dense checkpoint of --load: every expert a copy of the dense MLP, a "
                        "fresh router and optimizer; saved to --save as iteration 0 (training/upcycle.py)")
    g.add_argument("--moe-upcycling-granularity", type=int, default=1,
                   help="granular upcycling: each dense MLP cut into this many experts of FFN --ffn-hidden-size / G "
                        "(megatron-core's; training/upcycle.py)")
    g.add_argument("--moe-min-capacity", type=int, default=4, help="DeepSpeed's min capacity per expert")
    g.add_argument("--moe-no-duplicate-token-dropping", action="store_true",
                   help="send every TP rank's full token copy through the all-to-all (DTD off)")
    g.add_argument("--moe-cac", action="store_true",
                   help="communication-aware activation checkpointing: with --recompute-granularity full, "
                        "keep the MoE all-to-all outputs of the forward and reuse them in the recompute "
                        "(4 all-to-alls per MoE layer per micro-batch instead of 6)")
    g.add_argument("--moe-cac-tp", action="store_true",
                   help="with --moe-cac, also keep the MoE block's tensor-parallel collectives "
                        "(DTD all-gathers and reduce-scatter, or the expert all-reduce)")
    g.add_argument("--moe-a2a-algorithm", default="flat",
                   help="flat, or hierarchical: gather inside the node, one exchange between nodes, scatter "
                        "(HetuMoE)")
    g.add_argument("--moe-a2a-node-size", type=int, default=None,
                   help="ranks per node for --moe-a2a-algorithm hierarchical (default: LOCAL_WORLD_SIZE from "
                        "the launcher); smaller values simulate nodes")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with TP > 1, run norms, dropout, residuals and the MoE dispatch on 1/TP of the sequence "
                        "(all-gather + reduce-scatter instead of all-reduce; replaces DTD's drop); a no-op at TP 1")
    g.add_argument("--rank-order", choices=["tp-ep-dp", "tp-dp-ep"], default="tp-ep-dp",
                   help="tp-dp-ep keeps expert-DP reductions inside a node at the price of a wider all-to-all")
    g.add_argument("--world-size", type=int, default=None, help="for --dry-run without processes")
    g.add_argument("--gpus-per-node", type=int, default=None, help="for --dry-run: which groups cross nodes")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--no-overlap-grad-reduce", action="store_true")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_true",
                   help="write bf16 weight gradients and add them into the fp32 main gradients in a "
                        "hook, instead of accumulating in the weight-gradient GEMMs (tensor_parallel/wgrad_fusion.py)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="partition fp32 master weights and Adam moments: dense over DP, experts over expert-DP (ZeRO-1)")
    g.add_argument("--optimizer-tile-size", type=int, default=2**24,
                   help="elements per tile of the optimizer step (its extra memory is one tile); 0: no tiling")
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="keep fp32 master weights and Adam moments in host memory and step them on the CPU "
                        "(expert state first; docs/OPTIMIZER.md)")
    g.add_argument("--optimizer-offload-fraction", type=float, default=None,
                   help="with --optimizer-cpu-offload: the share of the optimizer state bytes offloaded (default 1.0)")
    g.add_argument("--optimizer-offload-policy", choices=["cpu-step"], default="cpu-step",
                   help="cpu-step: the update runs on the CPU, gradients go down and parameters come up")
    g.add_argument("--host-memory-per-node-gib", type=float, default=None,
                   help="for --dry-run and the planner: host memory a node gives to offloaded optimizer state")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro-batch x DP")
    g.add_argument("--train-iters", type=int, default=None, help="default 100, or from --train-samples/--train-tokens")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--fp8-format", default=None, metavar="|".join(fp8.FORMATS),
                   help="GEMMs of the TP linears and the experts in FP8 (tensor_parallel/fp8.py): e4m3 everywhere, "
                        "or hybrid (e5m2 output gradients); with --bf16. Emulated where the device has no FP8")
    g.add_argument("--fp8-recipe", default=None, metavar="|".join(fp8.RECIPES),
                   help="FP8 scales with current scaling: one per tensor (default), or one per row (token, output "
                        "feature); Megatron-LM's delayed runs as tensorwise (training/compat_flags.py)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**16, help="fp16: the dynamic loss scale's start")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16: the dynamic loss scale's floor")
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="fp16: multiply the loss scale by 2 after this many steps without overflow")
    g.add_argument("--hysteresis", type=int, default=2,
                   help="fp16: overflows tolerated before the loss scale halves; once exhausted every overflow "
                        "halves it, until the next growth restores the tolerance (Megatron's)")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: a static loss scale (default: dynamic)")
    g.add_argument("--check-for-nan-in-loss-and-grad", action="store_true", default=True,
                   help="stop (exit 2) at a NaN or Inf loss, or gradient norm without fp16 loss scaling; the "
                        "default (an fp16 gradient overflow stays a skipped step)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false", dest="check_for_nan_in_loss_and_grad",
                   help="train on through NaN or Inf losses")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: checkpoint whole layers; selective: recompute only the attention core")
    g.add_argument("--recompute-method", choices=["uniform"], default=None, help="full only; default uniform")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn off Python's threshold garbage collector and collect at the same step on every "
                        "rank (training/manual_gc.py): a collection on one rank stalls every collective it is in")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: collect every this many steps (0: not during training)")
    g.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                   help="with --manual-gc: do not collect before and after each evaluation")
    g.add_argument("--compile-layers", action="store_true",
                   help="torch.compile (Inductor) each transformer layer: fuses the router, permutation and "
                        "elementwise kernels (parallelize/compile.py); first steps pay the compile time")
    g.add_argument("--cuda-graph-impl", choices=["none", "local"], default="none",
                   help="local: capture each layer's static-shape front (--cuda-graph-scope) in CUDA graphs "
                        "with torch.cuda.make_graphed_callables and replay it in training (parallelize/cuda_graphs.py)")
    g.add_argument("--cuda-graph-scope", "--cuda-graph-modules", dest="cuda_graph_scope", nargs="+",
                   choices=["attn", "moe_router"], default=["attn"],
                   help="attn: norms, attention and residual; moe_router: also the MoE router (dropless MoE: "
                        "attn moe_router); --cuda-graph-modules is newer megatron-core's name")
    g.add_argument("--cuda-graph-warmup-steps", type=int, default=3,
                   help="eager warm-up iterations on the sample inputs before each capture")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full/uniform: consecutive layers per checkpointed chunk (default 1)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None, help="prefix, or 'w1 prefix1 w2 prefix2' for a blend")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens, same global batches in every layout")
    g.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                   help="default: GPT2BPETokenizer with --vocab-file, else NullTokenizer")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model file, or a directory with tokenizer.json (HuggingFaceTokenizer)")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: the vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: the merges.txt")
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--data-cache-path", default=None)

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--log-comm", action="store_true", help="log the collectives of each step (calls, MiB)")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None,
                   help="save every N iterations (and always at the end when --save is given)")
    g.add_argument("--no-load-optim", action="store_true", help="--load the model only: fresh optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="--load without the saved RNG states")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop after the iteration divisible by N (saving first when --save is given)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--profile", action="store_true",
                   help="profile iterations [--profile-step-start, --profile-step-end) on --profile-ranks "
                        "(Nsight range, or torch.profiler with --use-pytorch-profiler; training/profiling.py)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="with --profile: torch.profiler trace + op table per rank in --profile-dir")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    g.add_argument("--profile-dir", default=None, help="default: --tensorboard-dir, else ./profile")
    g.add_argument("--dry-run", action="store_true", help="resolve flags, print the layout and sizes, exit")
    g = p.add_argument_group("knowledge distillation (Megatron-DeepSpeed's flags; training/distillation.py)")
    g.add_argument("--kd", action="store_true", help="distil the frozen teacher --load-teacher into this model")
    g.add_argument("--mos", action="store_true", help="Mixture-of-Students: --kd into an MoE student")
    g.add_argument("--load-teacher", default=None, help="the teacher's checkpoint (its model flags are used)")
    g.add_argument("--num-layers-teacher", type=int, default=None, help="checked against the teacher checkpoint")
    g.add_argument("--hidden-size-teacher", type=int, default=None, help="checked against the teacher checkpoint")
    g.add_argument("--num-attention-heads-teacher", type=int, default=None,
                   help="checked against the teacher checkpoint")
    g.add_argument("--num-experts-teacher", type=int, nargs="+", default=None,
                   help="checked against the teacher checkpoint")
    g.add_argument("--kd-alpha-ce", type=float, default=1.0, help="weight of the LM loss")
    g.add_argument("--kd-beta-ce", type=float, default=1.0, help="weight of the KD loss T^2 * KL(teacher || student)")
    g.add_argument("--kd-temp", type=float, default=1.0, help="softmax temperature T of both models in the KL")
    g.add_argument("--kd-stop-iter", type=int, default=None,
                   help="staged KD: distil on iterations 1..N only, then the LM loss alone (default: always)")
    compat_flags.add_arguments(p)
    return p


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric flag: low <= v (low < v when low_open) and v < high."""
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def holds(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return (v > self.low if self.low_open else v >= self.low) and (v < self.high if self.high_open
                                                                        else v <= self.high)

    def __str__(self):
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE, COUNT = Range(0, low_open=True), Range(0), Range(1)
FRACTION = Range(0, 1)   # probabilities and betas: [0, 1)

# Every numeric flag of build_parser (tests check none is missing); None (flag omitted) is always
# valid. Counts are >= 1 unless 0 means "off": --optimizer-tile-size, --lr-warmup-iters,
# --eval-interval, --eval-iters, --manual-gc-interval, --moe-min-capacity.
NUMERIC_FLAGS: dict[str, Range] = {
    "num_layers": COUNT, "hidden_size": COUNT, "num_attention_heads": COUNT, "ffn_hidden_size": COUNT,
    "seq_length": COUNT, "max_position_embeddings": COUNT, "layernorm_epsilon": POSITIVE,
    "hidden_dropout": FRACTION, "attention_dropout": FRACTION, "init_method_std": POSITIVE,
    "make_vocab_size_divisible_by": COUNT,
    "num_experts": COUNT, "moe_shared_expert_intermediate_size": COUNT,
    "moe_ffn_hidden_size": COUNT, "moe_router_topk": COUNT, "moe_aux_loss_coeff": NON_NEGATIVE,
    "moe_z_loss_coeff": NON_NEGATIVE, "moe_expert_capacity_factor": POSITIVE,
    "moe_input_jitter_eps": Range(0, 1, low_open=True), "moe_router_bias_update_rate": NON_NEGATIVE,
    "moe_min_capacity": NON_NEGATIVE, "moe_a2a_node_size": COUNT,
    "tensor_model_parallel_size": COUNT, "expert_model_parallel_size": COUNT, "world_size": COUNT,
    "gpus_per_node": COUNT, "optimizer_tile_size": NON_NEGATIVE,
    "micro_batch_size": COUNT, "global_batch_size": COUNT, "train_iters": COUNT, "lr": NON_NEGATIVE,
    "min_lr": NON_NEGATIVE, "lr_warmup_iters": NON_NEGATIVE, "lr_decay_iters": COUNT,
    "weight_decay": NON_NEGATIVE, "adam_beta1": FRACTION, "adam_beta2": FRACTION, "adam_eps": POSITIVE,
    "clip_grad": NON_NEGATIVE, "seed": Range(0, 2**32),   # numpy's seed range (the datasets' shuffles)
    "initial_loss_scale": POSITIVE, "min_loss_scale": POSITIVE, "loss_scale_window": COUNT,
    "hysteresis": COUNT, "loss_scale": POSITIVE, "manual_gc_interval": NON_NEGATIVE,
    "cuda_graph_warmup_steps": COUNT, "recompute_num_layers": COUNT, "vocab_size": COUNT,
    "log_interval": COUNT, "eval_interval": NON_NEGATIVE, "eval_iters": NON_NEGATIVE, "save_interval": COUNT,
    "exit_interval": COUNT, "profile_step_start": COUNT, "profile_step_end": COUNT,
    "profile_ranks": NON_NEGATIVE,
    # attention and positions (GQA, MLA, RoPE); --rotary-percent 1 rotates the whole head
    "num_query_groups": COUNT, "kv_channels": COUNT, "q_lora_rank": COUNT, "kv_lora_rank": COUNT,
    "qk_head_dim": COUNT, "qk_pos_emb_head_dim": COUNT, "v_head_dim": COUNT, "rotary_base": POSITIVE,
    "rotary_percent": Range(0, 1, low_open=True, high_open=False), "rotary_scaling_factor": POSITIVE,
    "rope_scaling_factor": POSITIVE, "original_max_position_embeddings": COUNT, "beta_fast": POSITIVE,
    "beta_slow": POSITIVE, "mscale": NON_NEGATIVE, "mscale_all_dim": NON_NEGATIVE,
    # routers and MoE
    "moe_router_num_groups": COUNT, "moe_router_group_topk": COUNT, "moe_router_topk_scaling_factor": POSITIVE,
    "moe_eval_capacity_factor": POSITIVE, "moe_upcycling_granularity": COUNT, "topk": COUNT, "expert_interval": COUNT,
    # sizes of parallel dimensions we refuse above 1 (training/compat_flags.py)
    "pipeline_model_parallel_size": COUNT, "virtual_pipeline_model_parallel_size": COUNT,
    "context_parallel_size": COUNT, "expert_tensor_parallel_size": COUNT,
    "num_layers_per_virtual_pipeline_stage": COUNT, "decoder_first_pipeline_num_layers": COUNT,
    "decoder_last_pipeline_num_layers": COUNT,
    # run length and schedule in samples or tokens (0 warm-up: none)
    "train_samples": COUNT, "train_tokens": COUNT, "lr_decay_samples": COUNT, "lr_decay_tokens": COUNT,
    "lr_warmup_samples": NON_NEGATIVE, "lr_warmup_tokens": NON_NEGATIVE, "lr_warmup_fraction": FRACTION,
    "exit_duration_in_mins": POSITIVE, "distributed_timeout_minutes": POSITIVE,
    "zero_stage": Range(0, 3, high_open=False), "num_key_value_heads": COUNT,   # Megatron-DeepSpeed's
    # optimizer offload, data loading, logging
    "optimizer_offload_fraction": Range(0, 1, high_open=False), "host_memory_per_node_gib": POSITIVE,
    "num_workers": NON_NEGATIVE, "tensorboard_queue_size": COUNT,
    # knowledge distillation
    "num_layers_teacher": COUNT, "hidden_size_teacher": COUNT, "num_attention_heads_teacher": COUNT,
    "num_experts_teacher": COUNT, "kd_alpha_ce": NON_NEGATIVE, "kd_beta_ce": NON_NEGATIVE, "kd_temp": POSITIVE,
    "kd_stop_iter": NON_NEGATIVE,
}


def check_ranges(args: argparse.Namespace) -> None:
    """Each numeric flag within its range (before any default is derived from it)."""
    for dest, rule in NUMERIC_FLAGS.items():
        value = getattr(args, dest, None)   # compat flags are absent unless given
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not rule.holds(v):
                finite = "a finite number " if isinstance(v, float) and not math.isfinite(v) else ""
                raise ValueError(f"--{dest.replace('_', '-')} {v} must be {finite}{rule}")


def is_rank0() -> bool:
    """Rank 0 of the launch, from the launcher's environment (no process group needed)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


ERROR_GRACE_S = 3.0   # how long ranks > 0 wait for rank 0's line before they exit (see report_error)


def report_error(err) -> int:
    """A user error, every rank alike: rank 0 prints `error: <err>` and the others stay silent.
    Returns the exit code, 2.

    Under torchrun rank 0 also writes the line to its error file (TORCHELASTIC_ERROR_FILE, torch's
    format), so the launcher's failure summary shows it where it would show a link. The launcher
    stops every rank at the first exit: ranks > 0 wait a moment, so that exit is rank 0's, after
    its line (the launcher stops them then, the wait costs nothing)."""
    if not is_rank0():
        time.sleep(ERROR_GRACE_S)
        return 2
    line = f"error: {err}"
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": {"message": line,
                              "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        try:
            with open(path, "w") as f:
                json.dump(record, f)
        except OSError:
            pass   # the summary then shows torch's link; the line above is already printed
    return 2


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up to a multiple of --make-vocab-size-divisible-by (independent of TP,
    so every layout has the same logical model); it must then split evenly over TP."""
    padded = int(math.ceil(vocab_size / divisible_by) * divisible_by)
    if padded % tp:
        raise ValueError(f"padded vocabulary {padded} (--vocab-size {vocab_size} rounded up to "
                         f"--make-vocab-size-divisible-by {divisible_by}) is not divisible by "
                         f"--tensor-model-parallel-size {tp}; use a --make-vocab-size-divisible-by that is a multiple of {tp}")
    return padded


def need(cond, msg) -> None:
    """Raise the user error `msg` unless `cond` holds."""
    if not cond:
        raise ValueError(msg)


def validate(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Fill defaults and check combinations; raises ValueError naming the flag.
    The steps run in this order (later ones read what earlier ones derive)."""
    check_ranges(args)
    args.accepted_no_effect = compat_flags.apply(args)   # refuses what we lack; lists what changes nothing
    resolve_layout(args, world_size)
    tp = args.tensor_model_parallel_size
    check_attention_flags(args, tp)
    resolve_model_sizes(args, tp)
    check_position_flags(args)
    check_precision_flags(args)
    resolve_sequence_parallel(args, tp)
    resolve_batch_sizes(args, args.layout.data_parallel)
    args.pipeline_split = pipeline_flags.resolve(args)   # None without PP (megatron_ted/pipeline/flags.py)
    run_length.resolve(args)   # --train-iters/-samples/-tokens and the schedule, in iterations
    check_optimizer_flags(args)
    args.moe_layer_freq = moe_layer_freq(args.moe_layer_freq, args.num_layers)  # int, or a 0/1 list per layer
    if args.num_experts is not None:
        check_moe_flags(args, tp, world_size)
    else:
        check_dense_flags(args)
    if args.moe_use_upcycling:
        from megatron_ted.training.upcycle_flags import check_upcycling
        check_upcycling(args)
    check_data_flags(args)
    check_tokenizer_flags(args)
    check_io_flags(args, world_size)
    resolve_recompute(args)
    check_cuda_graph_flags(args, tp)
    check_distillation_flags(args)
    return args


def resolve_layout(args, world_size: int) -> None:
    args.world_size = world_size
    args.layout = ParallelLayout(world_size, args.tensor_model_parallel_size, args.expert_model_parallel_size,
                                 args.rank_order, pipeline_parallel=args.pipeline_model_parallel_size)


def check_attention_flags(args, tp: int) -> None:
    if not args.group_query_attention:
        args.num_query_groups = None   # Megatron-LM ignores --num-query-groups without --group-query-attention
    args.window_size = parse_window_size(args.window_size)
    args.window_attn_skip_freq = window_attn_skip_freq(args.window_attn_skip_freq, args.num_layers)
    need(args.window_attn_skip_freq is None or args.window_size is not None,
         "--window-attn-skip-freq needs --window-size; add it or drop --window-attn-skip-freq")
    need(args.window_size is None or not args.multi_latent_attention,
         "--window-size with --multi-latent-attention is not supported; drop one")
    check_attention(attention_config(args), args.hidden_size, args.num_attention_heads, tp)
    need(not args.qk_layernorm_hidden_dim or args.normalization == "RMSNorm",
         f"--qk-layernorm-hidden-dim needs --normalization RMSNorm, got {args.normalization}")


def resolve_model_sizes(args, tp: int) -> None:
    """--ffn-hidden-size and --max-position-embeddings: their defaults, then their checks."""
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    need(args.ffn_hidden_size % tp == 0,
         f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    need(args.max_position_embeddings >= args.seq_length,
         f"--max-position-embeddings {args.max_position_embeddings} is smaller than --seq-length {args.seq_length}")


def check_position_flags(args) -> None:
    """RoPE, and multi-latent attention (which rotates its own dims)."""
    rope_config(args)   # the RoPE flags: RopeConfig names the flag of any bad value
    if args.multi_latent_attention:
        need(args.position_embedding_type == "rope", "--multi-latent-attention needs --position-embedding-type rope")
        need(args.rotary_percent == 1.0, "--multi-latent-attention rotates all --qk-pos-emb-head-dim dims; "
                                         "drop --rotary-percent")
        mla_config(args)


def check_precision_flags(args) -> None:
    need(not (args.bf16 and args.fp16), "--bf16 and --fp16 are exclusive; pick one")
    need(not (args.fp8_format and args.fp16), "--fp8-format runs with --bf16 (the FP8 kernels write bf16); "
                                              "drop --fp16")
    fp8_config(args)   # FP8Config names the flag of an unknown format or recipe


def resolve_sequence_parallel(args, tp: int) -> None:
    if tp == 1:
        args.sequence_parallel = False   # as Megatron-LM: nothing to split the sequence over
    need(not args.sequence_parallel or args.seq_length % tp == 0,
         f"--sequence-parallel splits --seq-length {args.seq_length} over --tensor-model-parallel-size {tp}; "
         f"use a multiple of {tp}")


def resolve_batch_sizes(args, dp: int) -> None:
    """--global-batch-size (default: one micro-batch per DP rank) and the micro-batches per step."""
    per_step = args.micro_batch_size * dp
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    need(args.global_batch_size % per_step == 0,
         f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
         f"{args.micro_batch_size} x data-parallel size {dp} = {per_step}")
    args.num_micro_batches = args.global_batch_size // per_step


def check_optimizer_flags(args) -> None:
    need(args.min_lr <= args.lr, f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    need(args.optimizer_tile_size >= 0, f"--optimizer-tile-size {args.optimizer_tile_size} must be >= 0 (0: no tiling)")
    if args.optimizer_cpu_offload and args.optimizer_offload_fraction is None:
        args.optimizer_offload_fraction = 1.0
    need(args.optimizer_offload_fraction is None or args.optimizer_cpu_offload,
         f"--optimizer-offload-fraction {args.optimizer_offload_fraction} needs --optimizer-cpu-offload; add it")
    need(args.optimizer_offload_fraction is None or 0.0 <= args.optimizer_offload_fraction <= 1.0,
         f"--optimizer-offload-fraction {args.optimizer_offload_fraction} must be in [0, 1]")
    need(args.host_memory_per_node_gib is None or args.host_memory_per_node_gib > 0,
         f"--host-memory-per-node-gib {args.host_memory_per_node_gib} must be positive")


def check_moe_flags(args, tp: int, world_size: int) -> None:
    """An MoE model (--num-experts given): experts, gates, shared expert, all-to-all, token dropping."""
    check_expert_counts(args, tp)
    check_shared_expert_flags(args, tp)
    resolve_moe_a2a(args, world_size)
    check_token_dropping_flags(args, tp)


def check_expert_counts(args, tp: int) -> None:
    """Canonical --num-experts, --moe-ffn-hidden-size, and each distinct expert count against EP and the gate."""
    ep, k = args.expert_model_parallel_size, args.moe_router_topk
    counts = num_experts_per_layer(args)
    # canonical form: an int when every MoE layer has the same count (as before), else the list
    args.num_experts = counts[0] if len(set(counts)) == 1 else counts
    args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.ffn_hidden_size
    need(args.moe_ffn_hidden_size % tp == 0,
         f"--moe-ffn-hidden-size {args.moe_ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    tokens = args.micro_batch_size * args.seq_length
    for e in sorted(set(counts)):
        need(e % ep == 0, f"--num-experts {e} is not divisible by --expert-model-parallel-size {ep}; "
                          f"use a multiple of {ep} experts or a smaller EP")
        need(1 <= k <= e, f"--moe-router-topk {k} must be between 1 and --num-experts {e}")
        router_config(args, e)   # the gate flags: RouterConfig names the flag of any bad combination
        compat_flags.check_eval_capacity(router_config(args, e), args.moe_eval_capacity_factor)
        need(args.moe_router_type != "base" or tokens % e == 0,
             f"--moe-router-type base gives every expert the same share of a micro-batch's {tokens} tokens "
             f"(--micro-batch-size x --seq-length), which is not divisible by --num-experts {e}")


def check_shared_expert_flags(args, tp: int) -> None:
    shared = args.moe_shared_expert_intermediate_size
    need(shared is None or (shared > 0 and shared % tp == 0),
         f"--moe-shared-expert-intermediate-size {shared} must be positive and divisible by "
         f"--tensor-model-parallel-size {tp}")
    need(shared is not None or not (args.moe_shared_expert_gate or args.moe_shared_expert_overlap),
         "--moe-shared-expert-gate and --moe-shared-expert-overlap need --moe-shared-expert-intermediate-size")
    need(not (args.moe_shared_expert_overlap and args.moe_a2a_algorithm == "hierarchical"),
         "--moe-shared-expert-overlap overlaps the flat all-to-all; drop it with --moe-a2a-algorithm hierarchical")


def resolve_moe_a2a(args, world_size: int) -> None:
    """The all-to-all algorithm and, for the hierarchical one, the node size (default: the launcher's)."""
    if args.moe_a2a_algorithm == "hierarchical":
        args.moe_a2a_node_size = args.moe_a2a_node_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    moe_config(args)   # MoEConfig names the flag of a bad --mlp-type or --moe-a2a-algorithm
    if args.moe_a2a_node_size is not None:
        check_node_size(world_size, args.moe_a2a_node_size)


def check_token_dropping_flags(args, tp: int) -> None:
    need(not (args.sequence_parallel and args.moe_no_duplicate_token_dropping),
         "--sequence-parallel already gives each TP rank its own tokens; drop --moe-no-duplicate-token-dropping")
    tokens = args.micro_batch_size * args.seq_length
    if tp > 1 and not args.moe_no_duplicate_token_dropping:
        need(tokens % tp == 0, f"duplicate token dropping splits the {tokens} tokens of a micro-batch over "
                               f"--tensor-model-parallel-size {tp}; change --micro-batch-size/--seq-length "
                               f"or pass --moe-no-duplicate-token-dropping")


def check_dense_flags(args) -> None:
    """A dense model (no --num-experts): no flag that needs experts."""
    need(args.expert_model_parallel_size == 1,
         "--expert-model-parallel-size > 1 needs --num-experts")
    need(args.mlp_type == "standard", "--mlp-type residual needs --num-experts")
    need(args.moe_shared_expert_intermediate_size is None, "--moe-shared-expert-intermediate-size needs --num-experts")


def check_data_flags(args) -> None:
    if args.mock_data:
        need(args.data_path is None, "--mock-data and --data-path are exclusive; pick one")
    elif not args.dry_run:
        need(args.data_path, "no data: pass --data-path PREFIX (see tools/preprocess_data.py) or --mock-data")


def check_tokenizer_flags(args) -> None:
    """--tokenizer-type (derived from --vocab-file when not given) and the files it needs."""
    args.tokenizer_type = resolve_tokenizer_type(args.tokenizer_type, args.vocab_file)
    if args.tokenizer_type == "NullTokenizer":
        need(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size N")
    elif args.tokenizer_type == "GPT2BPETokenizer":
        for flag in ("vocab_file", "merge_file"):
            path = getattr(args, flag)
            need(path is not None and os.path.isfile(path),
                 f"--tokenizer-type GPT2BPETokenizer needs --{flag.replace('_', '-')} FILE"
                 + (f" ({path} does not exist)" if path else ""))
    else:
        need(args.tokenizer_model is not None, f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model PATH")
        need(os.path.exists(args.tokenizer_model), f"--tokenizer-model {args.tokenizer_model} does not exist")


def check_io_flags(args, world_size: int) -> None:
    """--load, the profiler and TensorBoard."""
    if args.load is not None:
        need(os.path.isdir(args.load) or args.load == args.save,
             f"--load {args.load} is not a directory")
    if args.profile:
        need(1 <= args.profile_step_start < args.profile_step_end,
             f"--profile-step-start {args.profile_step_start} must be >= 1 and below --profile-step-end "
             f"{args.profile_step_end}")
        bad = [r for r in args.profile_ranks if not 0 <= r < world_size]
        need(not bad, f"--profile-ranks {bad[0] if bad else ''} is not a rank of this world of {world_size}")
    if args.tensorboard_dir is not None:
        import importlib.util
        need(importlib.util.find_spec("tensorboard") is not None,
             "--tensorboard-dir needs the tensorboard package: pip install tensorboard (or pip install -e .[tensorboard])")


def resolve_recompute(args) -> None:
    """The recompute flags (full recompute's defaults) and CAC."""
    full = args.recompute_granularity == "full"
    need(args.recompute_method is None or full,
         f"--recompute-method {args.recompute_method} needs --recompute-granularity full")
    need(args.recompute_num_layers is None or full, "--recompute-num-layers needs --recompute-granularity full")
    if full:
        args.recompute_method = args.recompute_method or "uniform"
        args.recompute_num_layers = args.recompute_num_layers or 1
    need(not args.moe_cac or args.num_experts is not None, "--moe-cac needs an MoE model (--num-experts)")
    recompute_config(args)   # RecomputeConfig names the flag of a bad --moe-cac / --moe-cac-tp


def check_cuda_graph_flags(args, tp: int) -> None:
    if args.cuda_graph_impl == "local":
        from megatron_ted.parallelize.cuda_graphs import graph_blocker
        routers = [router_config(args, n) for n in num_experts_per_layer(args)] if args.num_experts else []
        why = graph_blocker(args.cuda_graph_scope, recompute=args.recompute_granularity is not None,
                            compiled=args.compile_layers, attention_dropout=args.attention_dropout, tp=tp,
                            router_configs=routers)
        need(why is None, why)


def check_distillation_flags(args) -> None:
    """--kd/--mos need --load-teacher; the teacher flags need --kd or --mos."""
    if args.kd or args.mos:
        if args.load_teacher is None:
            raise ValueError(f"--{'mos' if args.mos else 'kd'} needs --load-teacher DIR (the teacher's checkpoint)")
        if args.mos and args.num_experts is None:
            raise ValueError("--mos distils into a Mixture-of-Experts student: add --num-experts, or use --kd")
        return
    given = [f for f in ("load_teacher", "num_layers_teacher", "hidden_size_teacher", "num_attention_heads_teacher",
                         "num_experts_teacher", "kd_stop_iter") if getattr(args, f) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} needs --kd or --mos (distillation is off)")


def parse_args(argv=None, world_size: int | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.use_checkpoint_args:
        from megatron_ted.training.checkpoint_args import apply_checkpoint_args
        apply_checkpoint_args(args)
    if world_size is None:
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    return validate(args, world_size)


def flag_defaults() -> dict:
    """Every flag's default: what a run that predates a flag ran with (old checkpoints' flags). The
    defaults the dialect decides (training/deepspeed_moe.py) are ours: every saved run resolved them."""
    return {**vars(build_parser().parse_args([])), "moe_router_topk": deepspeed_moe.OUR_TOPK,
            "moe_layer_freq": deepspeed_moe.OUR_LAYER_FREQ, "moe_aux_loss_coeff": deepspeed_moe.OUR_AUX_LOSS_COEFF}
