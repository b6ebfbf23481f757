"""Knowledge distillation and Mixture-of-Students (DeepSpeed-MoE, arXiv 2201.05596, section 5).

A frozen teacher (a checkpoint of this system, e.g. a PR-MoE) runs in the same processes as the
student, at the same TP x EP layout, on the same micro-batches. Each micro-batch's loss is

    alpha * lm + beta * T^2 * KL(softmax(teacher / T) || softmax(student / T))

both terms averaged over the loss tokens of the global batch, as the LM loss is (training/step.py).
The KL is computed vocabulary-parallel (tensor_parallel/vocab.py vocab_parallel_kl_div): neither
model's logits leave their [B, S, V/TP] slices. Staged KD: after `stop_iter` the teacher is not
run and is freed, and the loss is the plain LM loss (the paper stops KD part-way through training,
because a smaller student eventually underfits a teacher it tries to imitate).

The teacher holds no optimizer state and no gradients (requires_grad False, eval mode, so no
dropout and dropless MoE routing, run under torch.no_grad). It is rebuilt from the model flags its
checkpoint saved (the --*-teacher flags are only checked against them) and loaded with the layout-
independent checkpoint loader, so a teacher saved at any layout serves a student at any layout.

Megatron-DeepSpeed's flags: --kd and --mos both distil (--mos asks for an MoE student);
--kd-beta-ce weighs the KD term there as here; --kd-alpha-ce is read but unused there (the LM term
has weight 1, our default); here it weighs the LM term. Megatron-DeepSpeed averages the KL over
every position; here over the loss tokens (the same when no position is masked).
"""
from __future__ import annotations

import filecmp
import os
from dataclasses import dataclass

import torch
from torch import nn

from megatron_ted.config.distillation import KDConfig
from megatron_ted.parallel.comm import Group
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.tensor_parallel import vocab_parallel_kl_div
from megatron_ted.training.checkpoint import find_checkpoint, read_metadata


@dataclass(frozen=True)
class TeacherCheckpoint:
    directory: str     # the iteration directory
    flags: dict        # the training flags the teacher was saved with


def _as_counts(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def check_teacher(config: KDConfig, padded_vocab: int, vocab_size: int, tokenizer_model: str | None,
                  tp: int, ep: int, seq_length: int) -> TeacherCheckpoint:
    """Before any process group: the teacher checkpoint exists, agrees with the --*-teacher flags,
    has the student's vocabulary and fits the layout. Raises ValueError (one line) otherwise."""
    path = config.teacher_path
    directory = find_checkpoint(path) if os.path.isdir(path) else None
    if directory is None:
        raise ValueError(f"--load-teacher {path}: no checkpoint there; train the teacher first "
                         f"(pretrain_gpt_moe.py --save {path}) or point at its save directory")
    flags = read_metadata(directory).get("args") or {}
    if "padded_vocab_size" not in flags or "num_layers" not in flags:
        raise ValueError(f"--load-teacher {path}: the checkpoint {directory} holds no model flags "
                         f"(not written by pretrain_gpt_moe.py); save the teacher with pretrain_gpt_moe.py")
    shape = config.teacher
    given = (("num_layers", shape.num_layers), ("hidden_size", shape.hidden_size),
             ("num_attention_heads", shape.num_attention_heads))
    for key, value in given:
        if value is not None and value != flags.get(key):
            raise ValueError(f"--{key.replace('_', '-')}-teacher {value} disagrees with the teacher checkpoint "
                             f"{directory} ({key} {flags.get(key)}); drop the flag or fix it")
    saved_experts = _as_counts(flags.get("num_experts"))
    if shape.num_experts is not None:
        want = shape.num_experts
        same = (saved_experts is not None and
                (want == saved_experts or (len(want) == 1 and set(saved_experts) == set(want))))
        if not same:
            raise ValueError(f"--num-experts-teacher {' '.join(map(str, want))} disagrees with the teacher "
                             f"checkpoint {directory} (num_experts {flags.get('num_experts')}); drop the flag or fix it")
    _check_vocabulary(path, directory, flags, padded_vocab, vocab_size, tokenizer_model)
    for e in sorted(set(saved_experts or ())):
        if e % ep:
            raise ValueError(f"--load-teacher {path}: the teacher's {e} experts are not divisible by "
                             f"--expert-model-parallel-size {ep}; the teacher runs at the student's layout")
    for key in ("num_attention_heads", "ffn_hidden_size", "moe_ffn_hidden_size"):
        if flags.get(key) is not None and int(flags[key]) % tp:
            raise ValueError(f"--load-teacher {path}: the teacher's {key} {flags[key]} is not divisible by "
                             f"--tensor-model-parallel-size {tp}; the teacher runs at the student's layout")
    if flags.get("position_embedding_type", "learned") == "learned" and \
            int(flags.get("max_position_embeddings") or seq_length) < seq_length:
        raise ValueError(f"--load-teacher {path}: the teacher has max_position_embeddings "
                         f"{flags['max_position_embeddings']}, below --seq-length {seq_length}")
    return TeacherCheckpoint(directory, flags)


def _check_vocabulary(path, directory, flags, padded_vocab, vocab_size, tokenizer_model) -> None:
    """The same vocabulary: the same padded size, the same true size where the checkpoint tells it,
    the same SentencePiece model where both have one."""
    from megatron_ted.data.tokenizer import true_vocab_size

    teacher_sp = os.path.join(directory, "tokenizer.model")
    teacher_vocab = true_vocab_size(flags)
    if teacher_vocab is None and os.path.isfile(teacher_sp):
        from megatron_ted.data.tokenizer import SentencePieceTokenizer
        teacher_vocab = SentencePieceTokenizer(teacher_sp).vocab_size
    differs = flags["padded_vocab_size"] != padded_vocab or teacher_vocab not in (None, vocab_size)
    if not differs and tokenizer_model and os.path.isfile(tokenizer_model) and os.path.isfile(teacher_sp):
        differs = not filecmp.cmp(tokenizer_model, teacher_sp, shallow=False)
    if differs:
        raise ValueError(f"--load-teacher {path}: the teacher's vocabulary ({teacher_vocab or '?'} tokens, padded "
                         f"{flags['padded_vocab_size']}, tokenizer {flags.get('tokenizer_type')}) differs from the "
                         f"student's ({vocab_size}, padded {padded_vocab}); distil with the teacher's tokenizer")


def build_teacher(checkpoint: TeacherCheckpoint, groups: ParallelGroups, device, dtype) -> nn.Module:
    """The frozen teacher at this rank's layout (collective: every rank calls it)."""
    from megatron_ted.training.saved_model import build_from_checkpoint   # dropout off, dropless routing, eval

    teacher = build_from_checkpoint(checkpoint.directory, device, dtype, groups)
    return teacher.requires_grad_(False).eval()


class Distillation:
    """A run's KD: the frozen teacher and the weights of the two loss terms."""

    def __init__(self, config: KDConfig, teacher: nn.Module, tp: Group):
        self.config, self.teacher, self.tp = config, teacher, tp

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def beta(self) -> float:
        return self.config.beta

    def for_iteration(self, iteration: int) -> Distillation | None:
        """self while KD lasts; None after --kd-stop-iter, and the teacher is freed then."""
        if self.config.active(iteration):
            return self
        self.teacher = None
        return None

    def token_losses(self, student_logits: torch.Tensor, micro_batch: dict) -> torch.Tensor:
        """Per-token T^2 * KL(teacher || student) [B, S] of one micro-batch (student logits [B, S, V/TP])."""
        with torch.no_grad():
            teacher_logits = self.teacher(micro_batch["tokens"], micro_batch["position_ids"],
                                          routing_seed=micro_batch.get("routing_seed")).logits
        return vocab_parallel_kl_div(student_logits, teacher_logits, self.tp, self.config.temperature)
