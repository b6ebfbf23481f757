"""Sharded checkpoints by logical (full-tensor) name: written once per distinct shard, atomic, and
loadable at any layout (TP, EP, DP).

On disk (Megatron-LM's directory naming):

    <save>/latest_checkpointed_iteration.txt   the last complete iteration ("10"), replaced atomically
    <save>/iter_0000010/
        metadata.json       format version, iteration, consumed samples, LR-schedule inputs, loss
                            scaler, the training flags, the model config, the layout it was written
                            at, and the index: logical tensor -> full shape, dtype, shards
                            [{file, offsets, shape}]
        shards_r00003.pt    one file per writing rank, {key: shard}; keys "model/<param name>" and
                            "optim/<param name>/<master|exp_avg|exp_avg_sq|step>"
        rng_dp00001.pt      RNG states of data-parallel rank 1 (torch CPU and CUDA, python, numpy)
        tokenizer.model     a copy of the SentencePiece model the run trained with, if any

A parameter's local shard sits at `sharding.local_slices(spec, full_shape, tp, ep)` of its full
tensor; its optimizer state (fp32 master, Adam moments) has the same shape and place. Each distinct
shard is written by exactly one rank: dense parameters by one data-parallel replica, expert
parameters by one expert-data-parallel replica, TP-replicated ones by one TP rank; the replica that
writes is chosen round-robin over the parameters so that the writing is spread over ranks.

Loading reads, for each local shard, the overlapping pieces of the saved shards (files are opened
with `torch.load(mmap=True, weights_only=True)`, so only the bytes needed are read): a checkpoint
written at TP=2, EP=2, DP=2 loads at TP=1, EP=4 or in one process. The optimizer state is read
one parameter at a time, and with --use-distributed-optimizer only the elements the rank owns
(`flat_range_boxes`): the job reads the optimizer state about once, not once per DP replica.

Atomicity: every rank writes into `<save>/.iter_0000010.tmp/` and fsyncs; when all have
succeeded rank 0 writes metadata.json, renames the directory to `iter_0000010` and only then
replaces the tracker file (write a temporary, fsync, `os.replace`). A crash at any point leaves the
previous checkpoint and the tracker pointing at it intact, and the tracker never names a missing
directory, also when an iteration is saved again (`_publish`); what a killed save left (`.iter_N.tmp`,
`.iter_N.old`) is finished or undone by `recover_interrupted_saves` when the next run starts. A model
with a NaN or Inf parameter is refused, not saved.

Errors: a missing, truncated or inconsistent checkpoint, or one made for another model, raises
`CheckpointError` (a ValueError) whose one-line message names the checkpoint and the mismatch. Under
torch.distributed every rank raises the same error (ranks agree on failures before going on), so no
rank is left waiting in a collective.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from megatron_ted.data.output_files import fsync_file
from megatron_ted.config.compare import first_difference
from megatron_ted.config.serialize import model_config_from_dict, model_config_to_dict
from megatron_ted.model.config import ModelConfig
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.parallel.sharding import first_replica, full_shape, local_slices, spec_of

FORMAT = "megatron_ted-sharded-v1"
TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
OPTIM_KEYS = ("master", "exp_avg", "exp_avg_sq", "step")

# The model's identity is its ModelConfig, saved as "model_config" (config/serialize.py) and compared
# field by field (config/compare.py); checkpoints written before it are upgraded from their saved flags.


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message is one line naming the checkpoint."""


class LoadedCheckpoint(NamedTuple):
    iteration: int
    consumed_samples: int
    args: dict                # the training flags saved with the checkpoint
    metadata: dict            # everything in metadata.json (scheduler, loss scaler, layout, ...)
    rng: dict | None          # this data-parallel rank's RNG states, or None (see set_rng_state)
    directory: str            # the iteration directory that was read


def iteration_dir(path: str, iteration: int) -> str:
    return os.path.join(path, f"iter_{iteration:07d}")


# ---- small helpers -----------------------------------------------------------------------------

def _one_line(err: BaseException) -> str:
    """The first line of an error, cut after its first sentence (torch's zip errors run long)."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if ". " in first:
        first = first[:first.index(". ") + 1]
    return f"{type(err).__name__}: {first}".strip()


def _fsync_dir(path: str) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def _save_file(obj, path: str) -> None:
    torch.save(obj, path)
    fsync_file(path)


def _world(groups: ParallelGroups) -> int:
    return groups.layout.world_size if dist.is_initialized() else 1


def _allgather(obj, groups: ParallelGroups) -> list:
    """Every rank's `obj` (all ranks of the default group); [obj] in a world of one."""
    if _world(groups) == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree(error: str | None, groups: ParallelGroups) -> None:
    """Raise the first rank's error on every rank, if any rank has one."""
    errors = _allgather(error, groups)
    first = next(((r, e) for r, e in enumerate(errors) if e), None)
    if first is not None:
        raise CheckpointError(first[1] if first[0] == groups.rank or len(errors) == 1
                              else f"{first[1]} (reported by rank {first[0]})")


_SKIP = object()


def _jsonable(value) -> Any:
    """value with everything JSON cannot hold dropped (dict entries) or turned into _SKIP."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return _SKIP if any(i is _SKIP for i in items) else items
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _jsonable(v)) for k, v in value.items()) if v is not _SKIP}
    return _SKIP


def _clean_args(args_dict: dict | None) -> dict:
    return _jsonable(dict(args_dict or {}))


def _box(region: tuple[slice, ...], shape) -> list[tuple[int, int]]:
    """slices (possibly slice(None)) -> [(start, stop)] per dim."""
    return [(s.start or 0, dim if s.stop is None else s.stop) for s, dim in zip(region, shape)]


def _writer(index: int, spec, groups: ParallelGroups) -> bool:
    """Does this rank write the shard it holds of the index-th parameter (one writer per shard)?"""
    if spec.tied_copy:   # the last pipeline stage's copy of a tied embedding: the first stage writes it
        return False
    replicas = groups.expert_dp if spec.expert else groups.dp
    if replicas.rank != index % replicas.size:
        return False
    if spec.tp_dim is not None:
        return first_replica(spec, groups.tp)
    return groups.tp.rank == index % groups.tp.size


def model_identity(model) -> ModelConfig | None:
    """The ModelConfig a model was built from (build_gpt records it); a GPTModel built by hand is its
    GPTConfig alone; None for other modules."""
    identity = getattr(model, "model_config", None)
    if isinstance(identity, ModelConfig):
        return identity
    config = getattr(model, "config", None)
    from megatron_ted.model.gpt import GPTConfig
    return ModelConfig(config) if isinstance(config, GPTConfig) else None


def saved_model_config(meta: dict, directory: str = "") -> ModelConfig | None:
    """The ModelConfig of a checkpoint's metadata: the saved one (format version 2), or, for a
    checkpoint written before it, the one its saved flags give (flags it predates take the parser's
    defaults); None when it has neither (a model saved without the training flags)."""
    saved = meta.get("model_config")
    try:
        if isinstance(saved, dict) and "version" in saved:
            return model_config_from_dict(saved)
        flags = meta.get("args") or {}
        if "num_layers" not in flags or "padded_vocab_size" not in flags:
            return None
        from megatron_ted.config.from_flags import model_config_from_flags
        from megatron_ted.training.arguments import flag_defaults
        return model_config_from_flags({**flag_defaults(), **flags})
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {directory}: its model config is unreadable ({_one_line(err)})") from None


# ---- RNG ---------------------------------------------------------------------------------------

def get_rng_state() -> dict:
    """This process's RNG states, in a form `torch.load(weights_only=True)` reads back."""
    state = {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict | None) -> None:
    """Restore what `get_rng_state` returned (what `LoadedCheckpoint.rng` holds)."""
    if not state:
        return
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# ---- save --------------------------------------------------------------------------------------

def _local_shards(model, optimizer, groups: ParallelGroups) -> tuple[dict, list]:
    """(tensors this rank writes {key: cpu tensor}, index entries [(key, full, dtype, offsets, shape)])."""
    tp, ep = groups.tp, groups.ep
    mine = [(name, p) for index, (name, p) in enumerate(model.named_parameters())
            if _writer(index, spec_of(p), groups)]
    # collective for a partitioned optimizer (it gathers its partitions); only what this rank writes is built
    optim_state = optimizer.named_state(names={name for name, _ in mine}) if optimizer is not None else {}
    tensors, entries = {}, []
    for name, p in mine:
        spec = spec_of(p)
        full = full_shape(p.shape, spec, tp, ep)
        offsets = [start for start, _ in _box(local_slices(spec, full, tp, ep), full)]
        items = [(f"model/{name}", p)]
        items += [(f"optim/{name}/{k}", v) for k, v in optim_state.get(name, {}).items()]
        for key, t in items:
            t = t.detach()
            if t.dim() == 0:       # Adam's step: one scalar per parameter, written with the first shard
                if any(offsets):
                    continue
                tensors[key] = t.to("cpu", copy=True)
                entries.append((key, [], str(t.dtype), [], []))
            else:
                tensors[key] = t.to("cpu", copy=True).contiguous()   # a copy: never save a view's storage
                entries.append((key, list(full), str(t.dtype), offsets, list(t.shape)))
    return tensors, entries


def _non_finite(model, final: str, rank: int) -> str | None:
    """The refusal to save `model` if one of its parameters holds a NaN or an Inf, else None."""
    params = list(model.named_parameters())
    if not params:
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).tolist()   # one sync
    bad = next((name for (name, _), ok in zip(params, finite) if not ok), None)
    return None if bad is None else (f"checkpoint {final}: not saved, parameter {bad} holds NaN or Inf values "
                                     f"on rank {rank} (the run diverged; lower --lr or resume from an earlier "
                                     f"checkpoint)")


def save_checkpoint(path: str, iteration: int, model, optimizer, groups: ParallelGroups,
                    args_dict: dict | None = None, consumed_samples: int = 0, rng: bool | dict = True,
                    extra: dict | None = None, model_config: ModelConfig | None = None) -> str:
    """Write `<path>/iter_<iteration>` (collective: every rank of the job calls it) and point the
    tracker at it. Returns the iteration directory.

    optimizer: a `MixedPrecisionAdamW` or `TiledAdamW` (its state by logical name and its loss
    scaler) or None.
    args_dict: the training flags (JSON-able values are kept; `generate` rebuilds the model from them).
    model_config: the model's identity (default: what build_gpt recorded on the model).
    rng: True saves this process's RNG states (one file per data-parallel rank), a dict saves that
    dict, False saves none. extra: JSON-able data stored in metadata.json (e.g. the valid position).
    """
    rank, final = groups.rank, iteration_dir(path, iteration)
    tmp = os.path.join(path, f".iter_{iteration:07d}.tmp")
    args_dict = _clean_args(args_dict)
    identity = model_config if model_config is not None else model_identity(model)

    _agree(_non_finite(model, final, rank), groups)   # a diverged model is no checkpoint to resume from
    _make_tmp_dir(path, tmp, final, groups)
    entries, error = _write_rank_files(tmp, final, model, optimizer, groups, rng)
    all_entries = _gather_entries(entries, error, tmp, groups)
    _index_and_publish(path, tmp, final, iteration, all_entries, groups,
                       lambda index: _metadata(iteration, consumed_samples, groups, rng is not False, optimizer,
                                               args_dict, identity, extra, index))
    return final


def _index_and_publish(path: str, tmp: str, final: str, iteration: int, all_entries: list[list],
                       groups: ParallelGroups, metadata_for) -> None:
    """Rank 0 writes the index and metadata and publishes `tmp` as `final`, or removes `tmp`
    (collective: every rank raises on failure). metadata_for(index) builds metadata.json's content."""
    error = None
    if groups.rank == 0:
        try:
            _finish(path, tmp, final, iteration, metadata_for(_build_index(all_entries, final)))
        except Exception as err:  # noqa: BLE001
            error = f"checkpoint {final}: {_one_line(err)}"
            shutil.rmtree(tmp, ignore_errors=True)
    _agree(error, groups)


def _make_tmp_dir(path: str, tmp: str, final: str, groups: ParallelGroups) -> None:
    """Rank 0 creates an empty `tmp` (collective: every rank learns whether it could)."""
    error = None
    if groups.rank == 0:
        try:
            os.makedirs(path, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)   # left by a crashed save
            os.makedirs(tmp)
        except OSError as err:
            error = f"checkpoint {final}: cannot create {tmp}: {_one_line(err)}"
    _agree(error, groups)


def _write_rank_files(tmp: str, final: str, model, optimizer, groups: ParallelGroups,
                      rng: bool | dict) -> tuple[list, str | None]:
    """This rank's shards (and RNG file) into `tmp`: (its index entries, None) or ([], the error)."""
    rank, entries = groups.rank, []
    try:
        tensors, entries = _local_shards(model, optimizer, groups)
        fname = f"shards_r{rank:05d}.pt"
        if tensors:
            _save_file(tensors, os.path.join(tmp, fname))
        entries = [(key, full, dtype, fname, offsets, shape) for key, full, dtype, offsets, shape in entries]
        if rng is not False and groups.tp.rank == 0 and groups.pp.rank == 0:   # one file per DP rank
            state = rng if isinstance(rng, dict) else get_rng_state()
            _save_file(state, os.path.join(tmp, f"rng_dp{groups.dp.rank:05d}.pt"))
    except Exception as err:  # noqa: BLE001 -- reported on every rank by _gather_entries
        return entries, f"checkpoint {final}: rank {rank} failed to write its shards: {_one_line(err)}"
    return entries, None


def _gather_entries(entries: list, error: str | None, tmp: str, groups: ParallelGroups) -> list[list]:
    """Every rank's index entries, once every rank has written its files (collective); on any rank's
    failure rank 0 removes `tmp` and every rank raises."""
    try:
        _agree(error, groups)
        return _allgather(entries, groups)
    except CheckpointError:
        if groups.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _metadata(iteration: int, consumed_samples: int, groups: ParallelGroups, rng: bool, optimizer, args_dict: dict,
              identity: ModelConfig | None, extra: dict | None, index: dict) -> dict:
    return {
        "format": FORMAT,
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "layout": {"world_size": groups.layout.world_size, "tp": groups.tp.size, "ep": groups.ep.size,
                   "dp": groups.dp.size, "expert_dp": groups.expert_dp.size, "order": groups.layout.order,
                   "pp": groups.pp.size},
        "rng": rng,
        "optimizer": optimizer is not None,
        "loss_scaler": (optimizer.loss_scaler.state_dict()
                        if optimizer is not None and getattr(optimizer, "loss_scaler", None) else None),
        "scheduler": {"iteration": int(iteration),
                      **{k: args_dict.get(k) for k in ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters",
                                                      "lr_decay_style") if k in args_dict}},
        "model_config": model_config_to_dict(identity) if identity is not None else None,
        "args": args_dict,
        "extra": _jsonable(extra or {}),
        "tensors": index,
    }


def _finish(path: str, tmp: str, final: str, iteration: int, metadata: dict) -> None:
    """Rank 0, every shard in tmp: the tokenizer copy and metadata.json, then tmp becomes `final`."""
    tok = metadata["args"].get("tokenizer_model")
    if tok and os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(tmp, "tokenizer.model"))
        fsync_file(os.path.join(tmp, "tokenizer.model"))
    with open(os.path.join(tmp, METADATA), "w") as f:
        json.dump(metadata, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    _publish(path, tmp, final, iteration)


def save_tensors(path: str, iteration: int, tensors, model_config: ModelConfig, args_dict: dict | None = None,
                 extra: dict | None = None) -> str:
    """One process, no model: write `<path>/iter_<iteration>` from `tensors`, an iterable of (parameter
    name, full logical tensor) consumed one at a time, each into its own shard file, so memory stays at
    the largest tensor (Hugging Face import). The same format as `save_checkpoint` at TP = EP = DP = 1
    without optimizer or RNG state (the same metadata, the same logical tensors), loadable at any layout."""
    final, tmp = iteration_dir(path, iteration), os.path.join(path, f".iter_{iteration:07d}.tmp")
    os.makedirs(path, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)   # left by a crashed save
    os.makedirs(tmp)
    try:
        entries = []
        for i, (name, t) in enumerate(tensors):
            if not torch.isfinite(t).all():
                raise CheckpointError(f"checkpoint {final}: not saved, parameter {name} holds NaN or Inf values")
            key, fname = f"model/{name}", f"shards_t{i:05d}.pt"
            _save_file({key: t.detach().to("cpu", copy=True).contiguous()}, os.path.join(tmp, fname))
            entries.append((key, list(t.shape), str(t.dtype), fname, [0] * t.dim(), list(t.shape)))
        args_dict = _clean_args(args_dict)
        metadata = _metadata(iteration, 0, ParallelGroups.single(), False, None, args_dict, model_config, extra,
                             _build_index([entries], final))
        _finish(path, tmp, final, iteration, metadata)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _build_index(all_entries: list[list], final: str) -> dict:
    index: dict[str, dict] = {}
    for entries in all_entries:
        for key, full, dtype, fname, offsets, shape in entries:
            item = index.setdefault(key, {"shape": full, "dtype": dtype, "shards": []})
            if item["shape"] != full:
                raise RuntimeError(f"ranks disagree on the full shape of {key}: {item['shape']} vs {full}")
            item["shards"].append({"file": fname, "offsets": offsets, "shape": shape})
    for key, item in index.items():  # each logical tensor is tiled exactly once
        numel = 1
        for d in item["shape"]:
            numel *= d
        covered = 0
        for s in item["shards"]:
            n = 1
            for d in s["shape"]:
                n *= d
            covered += n
        if covered != numel:
            raise RuntimeError(f"shards of {key} cover {covered} of {numel} elements (writer assignment bug)")
    return index


def _aside(path: str, iteration: int) -> str:
    """Where the directory of an iteration saved again waits until its replacement is in place."""
    return os.path.join(path, f".iter_{iteration:07d}.old")


def _complete_iterations(path: str) -> list[int]:
    """Iterations with a complete directory (metadata.json is written last) in `path`, ascending."""
    return sorted(int(d[5:]) for d in os.listdir(path)
                  if re.fullmatch(r"iter_\d{7}", d) and os.path.isfile(os.path.join(path, d, METADATA)))


def _tracked(path: str) -> int | None:
    """The iteration the tracker names, or None (no tracker, or not a number)."""
    try:
        with open(os.path.join(path, TRACKER)) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _write_tracker(path: str, iteration: int) -> None:
    """Point the tracker at `iteration` (a temporary, fsync, `os.replace`: readers see old or new)."""
    tracker_tmp = os.path.join(path, f".{TRACKER}.tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(path, TRACKER))
    _fsync_dir(path)


def _publish(path: str, tmp: str, final: str, iteration: int) -> None:
    """Rename the complete directory into place, then move the tracker (each step atomic).

    Saving an iteration again: the old directory must go aside before the new one can take its
    name, so the tracker first steps back to the newest earlier complete iteration (or, with none,
    is removed: find_checkpoint then reads the aside copy), and only then do the renames happen.
    The tracker never names a missing directory; `recover_interrupted_saves` finishes a publish
    that a kill cut short.
    """
    old = None
    if os.path.exists(final):
        old = _aside(path, iteration)
        if _tracked(path) == iteration:
            earlier = [i for i in _complete_iterations(path) if i < iteration]
            if earlier:
                _write_tracker(path, earlier[-1])
            else:
                os.remove(os.path.join(path, TRACKER))
                _fsync_dir(path)
        shutil.rmtree(old, ignore_errors=True)   # a replaced copy left by a crash; `final` is newer
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(path)
    _write_tracker(path, iteration)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_saves(path: str) -> list[str]:
    """Finish or undo what a save killed midway left in `path`; returns one note per repair.

    Touches only the names a save creates: `.iter_N.tmp` (published when complete, since its
    metadata.json is written last, else removed), `.iter_N.old` (put back when `iter_N` is missing,
    else removed) and the tracker's temporary. Call it only while holding the directory
    (training/save_dir.py): another run's save in progress looks the same as a killed one.
    """
    if not os.path.isdir(path):
        return []
    notes = []
    pattern = re.compile(r"\.iter_(\d{7})\.(tmp|old)")
    # per iteration the .tmp first: a complete one is the newer save, to finish rather than undo
    found = sorted((m.groups() for m in map(pattern.fullmatch, os.listdir(path)) if m),
                   key=lambda g: (g[0], g[1] != "tmp"))
    for number, kind in found:
        it, here = int(number), os.path.join(path, f".iter_{number}.{kind}")
        final, name = iteration_dir(path, it), os.path.basename(here)
        tracked = _tracked(path)
        # the tracker named N when the save of N began, or an earlier iteration; never a later one
        behind = tracked is None or tracked < it or not os.path.isdir(iteration_dir(path, tracked))
        if kind == "tmp":
            if os.path.isfile(os.path.join(here, METADATA)) and behind:
                _publish(path, here, final, it)
                notes.append(f" > {path}: published iteration {it}, complete in {name} when its run stopped")
            else:
                shutil.rmtree(here)
                notes.append(f" > {path}: removed {name}, a save its run did not finish")
        elif os.path.isdir(here):           # .old, unless publishing the .tmp above removed it
            if os.path.isfile(os.path.join(final, METADATA)):
                shutil.rmtree(here)
                notes.append(f" > {path}: removed {name}, already replaced by iteration {it}")
            elif not os.path.exists(final):
                os.rename(here, final)
                notes.append(f" > {path}: restored iteration {it} from {name} (its replacement was interrupted)")
            else:
                continue                    # an iter_N that is not a checkpoint of ours: leave both alone
            if behind:
                _write_tracker(path, it)
    tracker_tmp = os.path.join(path, f".{TRACKER}.tmp")
    if os.path.exists(tracker_tmp):
        os.remove(tracker_tmp)
    return notes


# ---- find and check ----------------------------------------------------------------------------

def find_checkpoint(path: str) -> str | None:
    """The iteration directory that `--load path` means, or None when path holds no checkpoint yet.

    path may be a save directory (its tracker file names the iteration; without a tracker, the
    newest complete iter_* directory) or an iteration directory itself.
    """
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, METADATA)):
        return path
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise CheckpointError(f"checkpoint {path}: {TRACKER} holds {text[:40]!r}, not an iteration number")
        directory = iteration_dir(path, int(text))
        if not os.path.isdir(directory):
            raise CheckpointError(f"checkpoint {path}: {TRACKER} names iteration {int(text)} but "
                                  f"{os.path.basename(directory)} does not exist")
        return directory
    found = _complete_iterations(path)
    if found:
        return iteration_dir(path, found[-1])
    # the only copy of an iteration being saved again, set aside while the tracker is removed (_publish)
    aside = sorted(d for d in os.listdir(path)
                   if re.fullmatch(r"\.iter_\d{7}\.old", d) and os.path.isfile(os.path.join(path, d, METADATA)))
    return os.path.join(path, aside[-1]) if aside else None


def read_metadata(directory: str) -> dict:
    meta_path = os.path.join(directory, METADATA)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory}: {METADATA} is missing (not a complete checkpoint)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory}: {METADATA} is unreadable ({_one_line(err)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {directory}: format {found!r} is not {FORMAT!r}")
    for key in ("iteration", "tensors", "layout"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {directory}: {METADATA} has no {key!r} entry")
    return meta


def check_args_compatible(path: str, model) -> dict | None:
    """Before any process group: compare this run's model (a ModelConfig, or validated flags with
    padded_vocab_size) with the checkpoint's.

    Returns the metadata (None when path holds no checkpoint yet); raises CheckpointError naming
    the flag that differs.
    """
    directory = find_checkpoint(path)
    if directory is None:
        return None
    meta = read_metadata(directory)
    saved = saved_model_config(meta, directory)
    if saved is None:
        return meta
    if not isinstance(model, ModelConfig):
        from megatron_ted.config.from_flags import model_config_from_flags
        model = model_config_from_flags(model)
    diff = first_difference(saved, model)
    if diff is not None:
        was, now = diff.flag_values()
        raise CheckpointError(f"--load {path}: the checkpoint {directory} has {diff.flag} {was} but this run "
                              f"has {now}; use the checkpoint's model flags or another --load")
    return meta


# ---- load --------------------------------------------------------------------------------------

class _Reader:
    """Reads pieces of saved shards; each file is opened once, memory-mapped."""

    def __init__(self, directory: str, index: dict):
        self.directory, self.index, self.files = directory, index, {}

    def _file(self, fname: str) -> dict:
        if fname not in self.files:
            fpath = os.path.join(self.directory, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"checkpoint {self.directory}: file {fname} is missing")
            try:
                self.files[fname] = torch.load(fpath, mmap=True, weights_only=True, map_location="cpu")
            except Exception as err:  # noqa: BLE001 -- truncated, not a zip, ...
                raise CheckpointError(f"checkpoint {self.directory}: cannot read {fname} "
                                      f"(truncated or corrupt: {_one_line(err)})") from None
        return self.files[fname]

    def read_into(self, key: str, out: torch.Tensor, region: list[tuple[int, int]]) -> None:
        """Fill `out` (the box `region` of the full tensor `key`) from the overlapping shards."""
        item = self.index[key]
        covered = 0
        for shard in item["shards"]:
            tensors = self._file(shard["file"])
            if key not in tensors:
                raise CheckpointError(f"checkpoint {self.directory}: {shard['file']} lacks {key}")
            src = tensors[key]
            if list(src.shape) != list(shard["shape"]):
                raise CheckpointError(f"checkpoint {self.directory}: {key} in {shard['file']} has shape "
                                      f"{list(src.shape)}, the index says {shard['shape']}")
            if not region:                      # a scalar
                out.copy_(src)
                covered = 1
                break
            src_idx, dst_idx = [], []
            for (lo, hi), off, n in zip(region, shard["offsets"], shard["shape"]):
                a, b = max(lo, off), min(hi, off + n)
                if a >= b:
                    break
                src_idx.append(slice(a - off, b - off))
                dst_idx.append(slice(a - lo, b - lo))
            else:
                piece = src[tuple(src_idx)]
                out[tuple(dst_idx)].copy_(piece)
                covered += piece.numel()
        if covered != out.numel():
            raise CheckpointError(f"checkpoint {self.directory}: the shards of {key} cover {covered} of the "
                                  f"{out.numel()} elements this rank needs (incomplete checkpoint)")


def _check_config(directory: str, meta: dict, model) -> None:
    saved, current = saved_model_config(meta, directory), model_identity(model)
    if saved is None or current is None:
        return
    diff = first_difference(saved, current)
    if diff is not None:
        raise CheckpointError(f"checkpoint {directory}: model {diff.field} is {diff.saved} in the checkpoint but "
                              f"{diff.current} in this model ({diff.flag})")


def _check_shape(directory: str, key: str, saved: list, want: tuple, expert: bool) -> None:
    if list(saved) == list(want):
        return
    if expert and len(saved) == len(want) and saved[1:] == list(want[1:]):
        raise CheckpointError(f"checkpoint {directory}: {key} has {saved[0]} experts in the checkpoint but "
                              f"{want[0]} in this model (--num-experts)")
    raise CheckpointError(f"checkpoint {directory}: {key} has full shape {list(saved)} in the checkpoint but "
                          f"{list(want)} in this model")


def load_checkpoint(path: str, model, optimizer, groups: ParallelGroups, strict: bool = True,
                    load_optim: bool = True, load_rng: bool = True, restore_rng: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint written at any layout into this rank's shards (collective under
    torch.distributed: every rank calls it). Returns (iteration, consumed_samples, args, metadata,
    rng, directory).

    path: a save directory (its tracker names the iteration) or an iteration directory.
    optimizer: a `MixedPrecisionAdamW`, a `TiledAdamW` or None; with load_optim its master weights, moments and
    loss scaler are restored, else its master weights are reset from the loaded model.
    strict: every model parameter must be in the checkpoint and every saved parameter in the model.
    load_rng: read this data-parallel rank's RNG states (only when the checkpoint was written at the
    same DP size); restore_rng: also set them now (else see `set_rng_state(result.rng)`).
    """
    error, result = None, None
    try:
        result = _load_local(path, model, optimizer, groups, strict, load_optim, load_rng)
    except CheckpointError as err:
        error = str(err)
    except Exception as err:  # noqa: BLE001 -- e.g. out of memory; every rank must hear of it
        error = f"checkpoint {path}: loading failed on rank {groups.rank}: {_one_line(err)}"
    _agree(error, groups)
    if restore_rng and result.rng is not None:
        set_rng_state(result.rng)
    return result


class _OptimStateReader(Mapping):
    """The optimizer state of this rank's parameters by name, read from the checkpoint when asked.

    `optimizer.load_named_state` walks it one parameter at a time and each entry reads a key only
    when it is looked up (the step without the moments, say), so a rank holds at most one
    parameter's master and moments besides its own optimizer state, never its whole unpartitioned
    local state (12 bytes per local parameter: 79 GB per GPU for the 40B run at TP 1 EP 16). The
    partitioned optimizer reads only its elements (`_OptimEntry.read_flat`); a whole tensor, once
    read, stays with the last entry, which is kept."""

    def __init__(self, reader: "_Reader", index: dict, places: dict[str, tuple[torch.Tensor, list]]):
        self.reader, self.index, self.places = reader, index, places
        self._last: tuple[str, _OptimEntry] | None = None

    def __getitem__(self, name: str) -> "_OptimEntry":
        if name not in self.places:
            raise KeyError(name)
        if self._last is None or self._last[0] != name:
            self._last = (name, _OptimEntry(self, name))
        return self._last[1]

    def __iter__(self):
        return iter(self.places)

    def __len__(self) -> int:
        return len(self.places)


class _OptimEntry(Mapping):
    """One parameter's {"master", "exp_avg", "exp_avg_sq", "step"} (those the checkpoint has)."""

    def __init__(self, states: _OptimStateReader, name: str):
        self.states, self.name = states, name
        self.keys_ = [k for k in OPTIM_KEYS if f"optim/{name}/{k}" in states.index]
        self._read: dict[str, torch.Tensor] = {}

    def __getitem__(self, k: str) -> torch.Tensor:
        """The whole local-shard tensor of state `k` (read once, then kept)."""
        if k not in self._read:
            if k == "step":
                self._read[k] = self._read_boxes(k, [[]]).reshape(())
            else:
                p = self.states.places[self.name][0]
                self._read[k] = self.read_flat(k, 0, p.numel()).view(p.shape)
        return self._read[k]

    def read_flat(self, k: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened local shard of state `k`, reading only those: the
        partitioned optimizer asks for its part, so a rank reads 1/DP of a dense parameter's state."""
        if k in self._read or k == "step":
            return self[k].reshape(-1)[lo:hi]
        return self._read_boxes(k, flat_range_boxes(tuple(self.states.places[self.name][0].shape), lo, hi))

    def _read_boxes(self, k: str, boxes: list[list[tuple[int, int]]]) -> torch.Tensor:
        """The boxes (in local-shard coordinates) of state `k`, read and concatenated flat."""
        if k not in self.keys_:
            raise KeyError(k)
        okey, (p, region) = f"optim/{self.name}/{k}", self.states.places[self.name]
        dtype = getattr(torch, self.states.index[okey]["dtype"].split(".")[-1])
        device = torch.device("cpu") if k == "step" else p.device
        pieces = []
        for box in boxes:
            buf = torch.empty([b - a for a, b in box], dtype=dtype, device=device)
            self.states.reader.read_into(okey, buf, [(r0 + a, r0 + b) for (a, b), (r0, _) in zip(box, region)])
            pieces.append(buf.reshape(-1))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def __contains__(self, k) -> bool:          # without reading the tensor (Mapping's default would)
        return k in self.keys_

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def flat_range_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """Boxes (per dim [a, b)) of a tensor of `shape` whose elements, each box in row-major order,
    one box after the other, are its flat elements [lo, hi): a partial leading row, whole rows, a
    partial trailing row (partial rows recursively). At most 2 * ndim - 1 boxes."""
    if hi <= lo:
        return []
    if len(shape) <= 1:
        return [[(lo, hi)]] if shape else [[]]
    row = math.prod(shape[1:])
    first, last = lo // row, (hi - 1) // row                  # the rows the range touches
    if first == last:
        return [[(first, first + 1)] + b for b in flat_range_boxes(shape[1:], lo - first * row, hi - first * row)]
    boxes = []
    if lo % row:                                               # the end of row `first`
        boxes += [[(first, first + 1)] + b for b in flat_range_boxes(shape[1:], lo % row, row)]
        first += 1
    full_end = last + 1 if hi % row == 0 else last
    if full_end > first:                                       # whole rows
        boxes.append([(first, full_end)] + [(0, d) for d in shape[1:]])
    if hi % row:                                               # the start of row `last`
        boxes += [[(last, last + 1)] + b for b in flat_range_boxes(shape[1:], 0, hi % row)]
    return boxes


@torch.no_grad()
def _load_local(path, model, optimizer, groups, strict, load_optim, load_rng) -> LoadedCheckpoint:
    directory = find_checkpoint(path)
    if directory is None:
        raise CheckpointError(f"checkpoint {path}: no checkpoint there (no {TRACKER} and no iter_* directory)")
    meta = read_metadata(directory)
    index = meta["tensors"]
    _check_config(directory, meta, model)
    tp, ep = groups.tp, groups.ep
    reader = _Reader(directory, index)

    params = list(model.named_parameters())
    names = {f"model/{n}" for n, _ in params}
    if groups.pp.size > 1:   # a pipeline stage holds part of the model: the stages together hold it all
        parts = [None] * groups.pp.size
        dist.all_gather_object(parts, names, group=groups.pp.pg)
        names = set().union(*parts)
    if strict:
        unexpected = sorted(k for k in index if k.startswith("model/") and k not in names)
        if unexpected:
            raise CheckpointError(f"checkpoint {directory}: holds {len(unexpected)} parameter(s) this model lacks, "
                                  f"e.g. {unexpected[0][6:]}")
    want_optim = optimizer is not None and load_optim
    has_optim = any(k.startswith("optim/") for k in index)
    optim_places: dict[str, tuple[torch.Tensor, list]] = {}   # name -> (param, its box in the full tensor)
    for name, p in params:
        spec = spec_of(p)
        full = full_shape(p.shape, spec, tp, ep)
        region = _box(local_slices(spec, full, tp, ep), full)
        key = f"model/{name}"
        if key not in index:
            if strict:
                raise CheckpointError(f"checkpoint {directory}: parameter {name} is missing")
            continue
        _check_shape(directory, key, index[key]["shape"], full, spec.expert)
        # An fp32 model reads the fp32 master weights when the run that saved kept them (bf16/fp16).
        source = key
        master_key = f"optim/{name}/master"
        if master_key in index and p.dtype in (torch.float32, torch.float64):
            source = master_key
        reader.read_into(source, p.data, region)
        if want_optim and has_optim:
            for k in OPTIM_KEYS:
                okey = f"optim/{name}/{k}"
                if k != "step" and okey in index:
                    _check_shape(directory, okey, index[okey]["shape"], full, spec.expert)
            optim_places[name] = (p, region)

    if optimizer is not None:
        if want_optim and has_optim:
            optimizer.load_named_state(_OptimStateReader(reader, index, optim_places))
            scaler = getattr(optimizer, "loss_scaler", None)
            if scaler is not None and meta.get("loss_scaler"):
                scaler.load_state_dict(meta["loss_scaler"])
        else:
            optimizer.sync_master_from_model()

    rng = None
    if load_rng and meta.get("rng") and meta["layout"].get("dp") == groups.dp.size:
        fname = f"rng_dp{groups.dp.rank:05d}.pt"
        fpath = os.path.join(directory, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {directory}: file {fname} is missing")
        try:
            rng = torch.load(fpath, weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {directory}: cannot read {fname} (truncated or corrupt: "
                                  f"{_one_line(err)})") from None
    return LoadedCheckpoint(int(meta["iteration"]), int(meta.get("consumed_samples", 0)), meta.get("args") or {},
                            meta, rng, directory)
