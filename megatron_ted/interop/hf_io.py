"""Import a Hugging Face model into our checkpoint format, and export ours to Hugging Face.

Import plans the parameters of the HF config's flags (hf_config.flags_from_hf; their names and shapes
from planning/param_count.py, no model is built), then reads, transforms (the architecture's table,
hf_weights) and writes one logical tensor at a time with `checkpoint.save_tensors`, in the format of
`save_checkpoint`, so memory stays at the largest tensor, the result loads at any TP/EP/DP layout and
pretrain_gpt_moe.py --load takes it. Export reads the checkpoint (written at any layout) one logical tensor at a time and streams the
HF tensors into safetensors files whose headers are planned first, so memory stays at the largest
tensor, not the model. Both write into a temporary sibling and rename it into place at the end;
an existing non-empty destination is refused unless `overwrite`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct

import torch

from megatron_ted.data.tokenizer import true_vocab_size
from megatron_ted.interop.hf_config import flags_from_hf
from megatron_ted.interop.hf_export import architecture_for, hf_config_json
from megatron_ted.interop.hf_weights import ARCHITECTURES, IGNORED_SUFFIXES, features_of, mappings
from megatron_ted.model.builder import moe_layer_indices
from megatron_ted.model.config import ModelConfig
from megatron_ted.training.checkpoint import _Reader  # noqa: PLC2701 -- the sharded reader
from megatron_ted.training.checkpoint import find_checkpoint, read_metadata
from megatron_ted.training.saved_model import checkpoint_model_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
HF_SUBDIR = "hf"          # in an iteration directory: the tokenizer files and generation_config.json
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_FLOAT_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}


# ---- destinations ------------------------------------------------------------------------------

def _check_destination(path: str, flag: str, overwrite: bool) -> None:
    if os.path.isfile(path):
        raise ValueError(f"{flag} {path} is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"{flag} {path} is not empty; choose an empty or new directory, or pass --overwrite")


def _temporary(path: str) -> str:
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)      # ours: named by this process
    os.makedirs(tmp)
    return tmp


def _publish(tmp: str, path: str) -> None:
    """Rename tmp to path; an existing path (--overwrite, or empty) is replaced only once tmp is complete."""
    old = None
    if os.path.isdir(path):
        old = tmp + ".old"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old)


# ---- Hugging Face files ------------------------------------------------------------------------

class HFTensors:
    """The tensors of a HF model directory (model.safetensors, or shards with their index), read lazily."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise ValueError(f"--hf-dir {hf_dir}: no model.safetensors or model.safetensors.index.json "
                             f"(pickled .bin weights are not read)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles, self.where = {}, {}
        for name in files:
            fpath = os.path.join(hf_dir, name)
            if not os.path.isfile(fpath):
                raise ValueError(f"--hf-dir {hf_dir}: shard {name} named by the index is missing")
            self.handles[name] = safe_open(fpath, "pt")
            for key in self.handles[name].keys():
                self.where[key] = name
        if weight_map and set(weight_map) != set(self.where):
            raise ValueError(f"--hf-dir {hf_dir}: model.safetensors.index.json and the shards disagree on the tensors")

    def shape(self, name: str) -> list[int]:
        return list(self.handles[self.where[name]].get_slice(name).get_shape())

    def float_dtype(self, name: str) -> torch.dtype | None:
        """The tensor's floating dtype from the file's header (without reading it); None: not floating."""
        return _FLOAT_DTYPES.get(self.handles[self.where[name]].get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)


def _plan(maps, shapes: dict[str, list[int]], ctx: dict) -> list[tuple[str, list[int]]]:
    """[(hf name, shape)] of every mapping, from the logical shapes (on the meta device: no data)."""
    out = []
    for m in maps:
        for name, t in zip(m.hf, m.transform.to_hf(torch.empty(shapes[m.ours], device="meta"), ctx)):
            out.append((name, list(t.shape)))
    return out


# ---- import ------------------------------------------------------------------------------------

def import_hf(hf_dir: str, save: str, overwrite: bool = False, vocab_divisible_by: int = 128) -> list[str]:
    """Write `save` (our checkpoint, iteration 0) from the HF model in `hf_dir`; returns the training flags."""
    from megatron_ted.config.from_flags import model_config_from_flags
    from megatron_ted.planning.param_count import parameter_shapes
    from megatron_ted.training.arguments import padded_vocab_size, parse_args
    from megatron_ted.training.checkpoint import save_tensors

    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--hf-dir {hf_dir}: no config.json there")
    with open(cfg_path) as f:
        cfg = json.load(f)
    padded = padded_vocab_size(cfg["vocab_size"], vocab_divisible_by, 1)
    final_tokenizer = _tokenizer_dir(hf_dir, save, padded, vocab_divisible_by)
    # parsed against the source directory (it exists now); saved naming the copy in the checkpoint
    flags = flags_from_hf(cfg, vocab_divisible_by, hf_dir if final_tokenizer else None)
    _check_destination(save, "--save", overwrite)
    hf = HFTensors(hf_dir)
    args = parse_args(flags, world_size=1)
    args.padded_vocab_size = padded
    if final_tokenizer:
        args.tokenizer_model = final_tokenizer
        flags[flags.index("--tokenizer-model") + 1] = final_tokenizer
    model_config = model_config_from_flags(args)
    moe = model_config.moe   # the identity build_gpt records: the GPTConfig with its MoE layers
    config = dataclasses.replace(model_config.gpt, moe_layers=moe_layer_indices(model_config.gpt.num_layers,
                                                                                moe.layer_freq) if moe else ())
    model_config = dataclasses.replace(model_config, gpt=config)
    dtype = next((hf.float_dtype(n) for n in hf.where if hf.float_dtype(n)), torch.float32)
    params = {s.name: list(s.shape) for s in parameter_shapes(config, moe)}   # no model is built
    maps = mappings(ARCHITECTURES[cfg["model_type"]], config.num_layers, set(config.moe_layers),
                    moe.router.num_experts if moe else 0, config.untie_embeddings_and_output_weights,
                    features_of(model_config))
    assert {m.ours for m in maps} == set(params), "table and model disagree"
    ctx = _context(model_config, cfg["vocab_size"], cfg.get("rope_interleave", True))
    expected = dict(_plan(maps, params, ctx))
    for name, shape in expected.items():       # every check before any tensor is read
        if name not in hf.where:
            raise ValueError(f"--hf-dir {hf_dir}: tensor {name} is missing ({cfg['model_type']} with this config.json "
                             f"has it)")
        if hf.shape(name) != shape:
            what = "vocabulary mismatch: " if "embed" in name or "lm_head" in name else ""
            raise ValueError(f"--hf-dir {hf_dir}: {what}{name} has shape {hf.shape(name)} but config.json implies "
                             f"{shape}")
    tied = None if config.untie_embeddings_and_output_weights else "lm_head.weight"
    extra = sorted(n for n in hf.where if n not in expected and n != tied and not n.endswith(IGNORED_SUFFIXES)
                   and not _next_token_layer(n, cfg))
    if extra:
        raise ValueError(f"--hf-dir {hf_dir}: {len(extra)} tensor(s) this converter does not map, e.g. {extra[0]} "
                         f"(a feature of the model it does not support)")

    def tensors():   # one logical tensor at a time, as the model would hold it (dtype: Router._apply's rule)
        for m in maps:
            keep32 = m.ours.endswith("expert_bias") and dtype in (torch.float16, torch.bfloat16)
            t = m.transform.to_ours([hf.get(n).to(dtype) for n in m.hf], ctx).to(torch.float32 if keep32 else dtype)
            assert list(t.shape) == params[m.ours], m.ours
            yield m.ours, t

    tmp = _temporary(save)
    try:
        directory = save_tensors(tmp, 0, tensors(), model_config, vars(args),
                                 extra={"hf_import": {"model_type": cfg["model_type"], "config": cfg}})
        keep = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
        if keep:
            os.makedirs(os.path.join(directory, HF_SUBDIR))
            for n in keep:
                shutil.copyfile(os.path.join(hf_dir, n), os.path.join(directory, HF_SUBDIR, n))
        _publish(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return flags


def _tokenizer_dir(hf_dir: str, save: str, padded: int, divisible_by: int) -> str | None:
    """Where the imported checkpoint's HuggingFaceTokenizer will be (its iteration's hf/), or None
    (NullTokenizer) when hf_dir has no tokenizer.json or its ids pad to another vocabulary than the
    model's (a training run pads the tokenizer's count, and must meet the checkpoint's rows)."""
    from megatron_ted.data.tokenizer import HuggingFaceTokenizer
    from megatron_ted.training.arguments import padded_vocab_size

    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return None
    if padded_vocab_size(HuggingFaceTokenizer(hf_dir).vocab_size, divisible_by, 1) != padded:
        return None
    return os.path.join(os.path.abspath(save), "iter_0000000", HF_SUBDIR)


def _next_token_layer(name: str, cfg: dict) -> bool:
    """DeepSeek-V3's multi-token-prediction layers (model.layers.{n..}), which transformers drops too."""
    if not cfg.get("num_nextn_predict_layers") or not name.startswith("model.layers."):
        return False
    return int(name.split(".")[2]) >= cfg["num_hidden_layers"]


def _context(model: ModelConfig, vocab: int, rope_interleave: bool) -> dict:
    """What the transforms need besides the tensors: vocabulary sizes, heads, MLA's rope rows."""
    mla = model.gpt.mla
    return {"vocab": vocab, "padded_vocab": model.gpt.vocab_size, "heads": model.gpt.num_attention_heads,
            "rope_dim": mla.qk_pos_emb_head_dim if mla else None,
            "rope_interleave": mla is not None and rope_interleave}


# ---- export ------------------------------------------------------------------------------------

def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = str(text).strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * scale)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size {text}: give bytes or a size like 5GB, 500MB")


def _write_header(f, tensors: list[tuple[str, list[int]]], dtype: torch.dtype) -> None:
    """safetensors: u64 header length, JSON header (names, dtypes, shapes, byte ranges), then the data."""
    header, offset, item = {"__metadata__": {"format": "pt"}}, 0, torch.empty((), dtype=dtype).element_size()
    for name, shape in tensors:
        n = math.prod(shape) * item
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def export_hf(load: str, hf_dir: str, architecture: str | None = None, dtype: str | None = None,
              max_shard_size: str = "5GB", overwrite: bool = False) -> list[str]:
    """Write the HF model of checkpoint `load` into `hf_dir`; returns notes for the user (one line each)."""
    directory = find_checkpoint(load) if os.path.isdir(load) else None
    if directory is None:
        raise ValueError(f"--load {load}: no checkpoint there")
    meta = read_metadata(directory)
    model = checkpoint_model_config(directory)   # the model's shape (checkpoints before it: from their flags)
    # the training run's flags: its tokenizer and unpadded vocabulary are data, not part of the model
    saved_flags, index = meta.get("args") or {}, meta["tensors"]
    arch = architecture_for(model, architecture)
    limit = _parse_size(max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose bf16 or fp32")
    _check_destination(hf_dir, "--hf-dir", overwrite)
    notes = []
    vocab = true_vocab_size(saved_flags)
    if vocab is None:
        vocab = model.gpt.vocab_size
        notes.append(f"vocabulary: the checkpoint does not say its unpadded size; exported all {vocab} rows")
    gpt = model.gpt
    maps = mappings(ARCHITECTURES[arch], gpt.num_layers, set(gpt.moe_layers),
                    model.moe.router.num_experts if model.moe else 0, gpt.untie_embeddings_and_output_weights,
                    features_of(model))
    ours = {f"model/{m.ours}" for m in maps}
    have = {k for k in index if k.startswith("model/")}
    if ours != have:
        odd = sorted(have - ours) or sorted(ours - have)
        raise ValueError(f"--load {load}: the checkpoint {'holds' if have - ours else 'lacks'} {odd[0][6:]}, "
                         f"which the {arch} table does not expect")
    out_dtype = DTYPES[dtype] if dtype else getattr(torch, index["model/embedding.weight"]["dtype"].split(".")[-1])
    if out_dtype not in _ST_DTYPES:
        raise ValueError(f"--dtype: the checkpoint's {out_dtype} cannot be written; pass --dtype bf16 or fp32")
    ctx = _context(model, vocab, rope_interleave=True)   # DeepSeek's own layout, which engines expect
    plan = _plan(maps, {m.ours: index[f"model/{m.ours}"]["shape"] for m in maps}, ctx)
    item = torch.empty((), dtype=out_dtype).element_size()
    shards, size = [[]], 0
    for name, shape in plan:                    # greedy in order; a shard holds at least one tensor
        n = math.prod(shape) * item
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])

    generation = {}
    hf_files = os.path.join(directory, HF_SUBDIR)
    if not os.path.isdir(hf_files) and saved_flags.get("tokenizer_type") == "HuggingFaceTokenizer":
        hf_files = saved_flags.get("tokenizer_model") or hf_files   # a run continued from an import names it
    if os.path.isfile(os.path.join(hf_files, "generation_config.json")):
        with open(os.path.join(hf_files, "generation_config.json")) as f:
            generation = json.load(f)
    elif saved_flags.get("tokenizer_type") == "NullTokenizer":
        generation = {"eos_token_id": vocab - 1}     # NullTokenizer: end-of-document is the last id
    tmp = _temporary(hf_dir)
    try:
        reader = _Reader(directory, index)
        shard_iter = iter(zip(names, shards))
        fname, tensors = next(shard_iter)
        f = open(os.path.join(tmp, fname), "wb")
        _write_header(f, tensors, out_dtype)
        left = len(tensors)
        for m in maps:                           # one logical tensor at a time, in the planned order
            key = f"model/{m.ours}"
            master = f"optim/{m.ours}/master"
            source = master if master in index and out_dtype == torch.float32 else key
            shape = index[source]["shape"]
            full = torch.empty(shape, dtype=getattr(torch, index[source]["dtype"].split(".")[-1]))
            reader.read_into(source, full, [(0, d) for d in shape])
            for t in m.transform.to_hf(full, ctx):
                f.write(t.to(out_dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                left -= 1
                if left == 0:
                    f.close()
                    nxt = next(shard_iter, None)
                    if nxt is not None:
                        fname, tensors = nxt
                        f = open(os.path.join(tmp, fname), "wb")
                        _write_header(f, tensors, out_dtype)
                        left = len(tensors)
            del full
        if len(shards) > 1:
            total = sum(math.prod(s) * item for _, s in plan)
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), {
                "metadata": {"total_size": total},
                "weight_map": {name: fn for fn, group in zip(names, shards) for name, _ in group}})
        dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64",
                      torch.float16: "float16"}[out_dtype]
        _write_json(os.path.join(tmp, "config.json"), hf_config_json(model, arch, vocab, dtype_name, generation))
        _write_json(os.path.join(tmp, "generation_config.json"), {"_from_model_config": False, **generation})
        copied = [n for n in TOKENIZER_FILES if n != "generation_config.json"
                  and os.path.isfile(os.path.join(hf_files, n))]
        for n in copied:
            shutil.copyfile(os.path.join(hf_files, n), os.path.join(tmp, n))
        if not copied:
            notes.append("tokenizer: not exported (the checkpoint holds no Hugging Face tokenizer files, only a "
                         f"{saved_flags.get('tokenizer_type')}); copy the tokenizer files of the source model into {hf_dir}")
        _publish(tmp, hf_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes.insert(0, f"exported {directory} as {arch} ({len(plan)} tensors, {len(shards)} file(s), {out_dtype}) to "
                    f"{hf_dir}")
    return notes


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
