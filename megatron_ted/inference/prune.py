"""Expert pruning for inference (Kim et al., "Scalable and Efficient MoE Training for Multitask
Multilingual Models", arXiv 2109.10465): measure how often each expert is routed to on a data
sample, keep the most used experts of every MoE layer and write a smaller checkpoint.

    usage = expert_usage(model, sample_sequences(...))            # per MoE layer: counts, weights
    kept  = choose_experts(usage, [2, 2])                          # expert indices kept per layer
    model = prune_model(model, kept)                               # a model with fewer experts

Routing frequency = (token, expert) assignments of the loaded model's gate in inference mode
(dropless), summed over the sample; ties go to the larger summed combine weight, then the lower
expert index. Pruning an expert removes its weights and its router row (and expert-bias entry),
so the gate's softmax renormalises over the experts that remain and a token whose choice was
pruned goes to its best remaining expert. The pruned checkpoint saves the source's ModelConfig with
the kept counts per MoE layer (`with_expert_counts`) as its identity and its saved --num-experts set
to them (a list when they differ per layer: tools/prune_experts.py); it has the same format
(training/checkpoint.py), and loads in tools/generate_text.py or for further training at an EP that
divides the counts.
Hash routing cannot be pruned this way (a dropped expert's token ids would have nowhere to go).
"""
from __future__ import annotations

import dataclasses
import ctypes
import json
import os
import re
import shutil
import tempfile

import torch

from megatron_ted.model.builder import build_model
from megatron_ted.model.config import ModelConfig
from megatron_ted.parallel.groups import ParallelGroups


def sample_sequences(tokenizer, seq_length: int, num_samples: int, data_path: str | None = None,
                     text_file: str | None = None, seed: int = 1234) -> torch.Tensor:
    """[N, seq_length] token ids: documents of a Megatron .bin/.idx prefix (`data_path`) or of a
    text file (one document per line, JSONL {"text": ...} or plain text), each followed by the
    end-of-document id and cut into sequences; or, with neither, random ids from `seed`."""
    if num_samples < 1:
        raise ValueError(f"--num-samples {num_samples} must be at least 1")
    need = num_samples * seq_length
    if data_path is None and text_file is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, tokenizer.vocab_size, (num_samples, seq_length), generator=gen)
    ids: list[int] = []
    if data_path is not None:
        from megatron_ted.data.gpt_data import check_prefixes_exist
        check_prefixes_exist([data_path])   # missing or damaged files: one line naming the file
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(data_path)
        for i in range(len(dataset)):
            ids.extend(int(t) for t in dataset[i])
            if len(ids) >= need:
                break
    else:
        if not os.path.isfile(text_file):
            raise ValueError(f"--text-file {text_file} does not exist")
        with open(text_file) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                text = line
                if line.startswith("{"):
                    try:
                        text = json.loads(line).get("text", "")
                    except ValueError:
                        pass
                ids.extend(tokenizer.tokenize(text) + [tokenizer.eod])
                if len(ids) >= need:
                    break
    n = min(num_samples, len(ids) // seq_length)
    if n < 1:
        source = f"--data-path {data_path}" if data_path is not None else f"--text-file {text_file}"
        raise ValueError(f"{source} holds {len(ids)} tokens, fewer than one sequence of {seq_length}")
    return torch.tensor(ids[: n * seq_length], dtype=torch.int64).view(n, seq_length)


def _moe_blocks(model) -> list[tuple[int, torch.nn.Module]]:
    return [(i, model.layers[i].mlp) for i in model.config.moe_layers]


@torch.no_grad()
def expert_usage(model, sequences: torch.Tensor, micro_batch_size: int = 8) -> list[dict]:
    """Per MoE layer (in layer order): {"layer", "counts" [E] int64, "weights" [E] float64} summed
    over `sequences` in inference mode."""
    usage, handles = [], []
    for layer, block in _moe_blocks(model):
        if block.router.config.router_type == "hash":
            raise ValueError("--load: the checkpoint uses hash routing; pruning an expert would strand the token "
                             "ids mapped to it, so hash-routed experts cannot be pruned")
        num_experts = block.router.config.num_experts
        entry = {"layer": layer, "counts": torch.zeros(num_experts, dtype=torch.int64),
                 "weights": torch.zeros(num_experts, dtype=torch.float64)}
        usage.append(entry)

        def hook(_module, _inputs, routing, entry=entry):
            entry["counts"] += routing.routing_map_TE.sum(0).cpu()
            entry["weights"] += routing.probs_TE.sum(0).double().cpu()
        handles.append(block.router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, sequences.shape[0], micro_batch_size):
            tokens = sequences[start:start + micro_batch_size].to(device)
            model(tokens, torch.arange(tokens.shape[1], device=device).expand_as(tokens))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return usage


def choose_experts(usage: list[dict], keep: list[int], topk: int) -> list[list[int]]:
    """Expert indices kept per MoE layer, ascending: the `keep` most used (count, then weight, then
    the lower index). `keep`: one value for every layer or one per MoE layer."""
    if len(keep) == 1:
        keep = keep * len(usage)
    if len(keep) != len(usage):
        raise ValueError(f"--keep-experts has {len(keep)} values but the checkpoint has {len(usage)} MoE layers; "
                         f"give one value or one per MoE layer")
    kept = []
    for n, u in zip(keep, usage):
        E = u["counts"].numel()
        if n < topk:
            raise ValueError(f"--keep-experts {n} is below the checkpoint's --moe-router-topk {topk}")
        if n > E:
            raise ValueError(f"--keep-experts {n} exceeds the {E} experts of layer {u['layer']}")
        order = sorted(range(E), key=lambda e: (-int(u["counts"][e]), -float(u["weights"][e]), e))
        kept.append(sorted(order[:n]))
    return kept


def with_expert_counts(config: ModelConfig, counts: list[int]) -> ModelConfig:
    """`config` with `counts` experts in its MoE layers (one per MoE layer, in layer order)."""
    moe = dataclasses.replace(config.moe, num_experts_per_layer=tuple(counts),
                              router=dataclasses.replace(config.moe.router, num_experts=counts[0]))
    return dataclasses.replace(config, moe=moe)


@torch.no_grad()
def prune_model(model, kept: list[list[int]]):
    """A one-process model with only the kept experts, built from `model`'s ModelConfig with the kept
    counts. The kept experts' weights, router rows and bias entries are copied in their original
    order; every other parameter is copied as is."""
    pruned = build_model(with_expert_counts(model.model_config, [len(k) for k in kept]), ParallelGroups.single())
    pruned.to(next(model.parameters()).dtype)
    source = dict(model.named_parameters())
    done = set()
    for (layer, block), index in zip(_moe_blocks(model), kept):
        idx = torch.tensor(index, dtype=torch.int64, device=next(model.parameters()).device)
        prefix = f"layers.{layer}.mlp."
        for name in ("experts.fc1", "experts.fc2", "router.weight", "router.expert_bias"):
            if prefix + name in source:
                dict(pruned.named_parameters())[prefix + name].copy_(source[prefix + name].index_select(0, idx))
                done.add(prefix + name)
    for name, p in pruned.named_parameters():
        if name not in done:
            if source[name].shape != p.shape:
                raise AssertionError(f"unexpected shape change of {name}")
            p.copy_(source[name])
    return pruned.eval()


# ------------------------------------------------------------------------------- the --save directory
def holds_checkpoint(path: str) -> bool:
    """A save directory with a tracker file or an iteration directory in it."""
    if not os.path.isdir(path):
        return False
    return any(name == "latest_checkpointed_iteration.txt" or re.fullmatch(r"iter_\d+", name)
               for name in os.listdir(path))


def check_save_target(save: str, overwrite: bool) -> None:
    """--save must be a directory (or not exist); one that holds a checkpoint only with --overwrite."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise ValueError(f"--save {save} is a file, not a directory")
    if holds_checkpoint(save) and not overwrite:
        raise ValueError(f"--save {save} already holds a checkpoint; give a new directory, or pass "
                         "--overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(save))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--save {save}: {parent} is not a writable directory")


def staging_dir_for(save: str) -> str:
    """A new, empty directory next to `save` (same file system: a rename moves it into place)."""
    parent, name = os.path.split(os.path.abspath(save))
    return tempfile.mkdtemp(prefix=f".{name}.pruning-", dir=parent)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_directory(new: str, target: str) -> None:
    """Put the complete directory `new` at `target`, then remove the old `target`. An atomic swap
    where the file system has one; else rename the old one aside first. Either way the old or the
    new checkpoint is whole on disk at every moment, and the old one is removed only at the end."""
    if _exchange(new, target):
        shutil.rmtree(new)  # now holds the old target
        return
    aside = new + ".old"
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside)

