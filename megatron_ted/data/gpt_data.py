"""Train / valid / test GPT datasets from Megatron `.bin/.idx` files, through megatron-core.

    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        data_path=["0.7", "data/a_text_document", "0.3", "data/b_text_document"],  # or ["data/a_text_document"]
        split="969,30,1", seq_length=1024, seed=1234, tokenizer=tokenizer,
        num_samples=train_valid_test_num_samples(train_iters, eval_interval, eval_iters, global_batch_size),
    )
    train_ds[i] -> {"tokens", "labels", "loss_mask", "position_ids"} (+ "dataset_id" for a blend),
                   each of shape [seq_length]; tokens/labels/position_ids int64, loss_mask float32.

megatron-core's `BlendedMegatronDatasetBuilder` does the work (GPTDataset / MockGPTDataset /
BlendedDataset), so a given (data, split, seed, seq_length, num_samples) gives exactly the samples
Megatron-LM gives. What this module adds:

- `--data-path` parsing (Megatron's blend syntax) with one-line `ValueError`s naming the flag.
- The index cache (document / sample / shuffle indices as .npy, keyed by an MD5 of the config) goes
  to `data_cache_path`, default `<directory of the first prefix>/index-cache` when that directory is
  the user's and private, else the user's `~/.cache/megatron_ted/index-cache`. megatron-core unpickles
  these files, so the cache must be the user's own: created 0700, refused when another user owns it
  or group / others can write it (`prepare_cache_dir`). With several nodes all of them must see it.
- Damaged `.bin/.idx` files (a wrong header, a truncated file, an empty corpus) are one `ValueError`
  naming the file when a prefix is checked (`check_index_files`), before megatron-core opens it.
- Distributed use: the builder is collective when torch.distributed is initialised (every rank of
  the default group must call this function); rank 0 builds and caches the indices, a barrier, then
  the other ranks load them. Without torch.distributed, megatron-core 0.16.1's BlendedDataset
  still calls `torch.distributed.get_rank()` on a cache miss, so a one-process gloo group is set up
  for the duration of the build and torn down afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
import warnings
from typing import Callable, Optional, Sequence

import torch.distributed as dist

from megatron_ted.config.training import DataConfig


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], Optional[list[float]]]:
    """Megatron's `--data-path`: `[prefix, ...]` or `[weight, prefix, weight, prefix, ...]`.

    A single string is split on whitespace ("0.3 a 0.7 b"). Returns (prefixes, weights or None).
    """
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise ValueError("--data-path: empty; give 'prefix' or 'weight prefix weight prefix ...'")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    numeric = [is_number(s) for s in items]
    if not any(numeric):
        return items, None
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise ValueError(
            f"--data-path {' '.join(items)}: expected 'weight prefix weight prefix ...' "
            "(a weight before every prefix) or prefixes only"
        )
    weights = [float(w) for w in items[0::2]]
    if any(w <= 0 for w in weights):
        raise ValueError(f"--data-path {' '.join(items)}: weights must be > 0")
    return items[1::2], weights


def check_prefixes_exist(prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            hint = ""
            if prefix.endswith((".bin", ".idx")):
                hint = f" (give the prefix without the extension: {prefix[:-4]})"
            elif os.path.isfile(prefix + "_text_document.bin"):
                hint = f" (did you mean {prefix}_text_document?)"
            raise ValueError(
                f"--data-path {prefix}: {' and '.join(prefix + e for e in missing)} not found{hint}; "
                "make them with tools/preprocess_data.py"
            )
        check_index_files(prefix)


# Megatron's .idx: magic, version (u64), dtype code (u8), sequence count (u64), document count (u64),
# then int32 lengths and int64 pointers per sequence, int64 document indices (and an int8 mode per
# sequence in multimodal data). megatron-core asserts on some of this and misreads the rest.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}   # megatron-core's DType codes


def check_index_files(prefix: str) -> None:
    """The .idx header, its size against its counts, and the .bin length against the index: a damaged
    or foreign file is one ValueError naming it and what is wrong, not an error deep in megatron-core."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    where = f"--data-path {prefix}"
    remake = "re-run tools/preprocess_data.py"
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEADER.size)
        if not head.startswith(_IDX_MAGIC) and not _IDX_MAGIC.startswith(head):
            raise ValueError(f"{where}: {idx} is not a Megatron index (it starts {head[:9]!r}, "
                             f"not {_IDX_MAGIC!r}); {remake}")
        if len(head) < _IDX_HEADER.size:
            raise ValueError(f"{where}: {idx} is truncated ({idx_size} bytes, the header alone is "
                             f"{_IDX_HEADER.size}); {remake}")
        _, version, code, n_seq, n_doc = _IDX_HEADER.unpack(head)
        if version != 1:
            raise ValueError(f"{where}: {idx} has index version {version}, expected 1; {remake}")
        if code not in _DTYPE_SIZES:
            raise ValueError(f"{where}: {idx} names token dtype code {code}, not one of megatron-core's; {remake}")
        want = _IDX_HEADER.size + 12 * n_seq + 8 * n_doc
        if idx_size not in (want, want + n_seq):   # + n_seq: the modes of multimodal data
            what = "is truncated" if idx_size < want else "is longer than its counts say"
            raise ValueError(f"{where}: {idx} {what} ({idx_size} bytes; its header counts {n_seq} sequences "
                             f"and {n_doc} document boundaries, {want} bytes); {remake}")
        if n_seq == 0:
            raise ValueError(f"{where}: {idx} holds no sequences (an empty corpus); give a corpus with text")
        f.seek(_IDX_HEADER.size + 4 * (n_seq - 1))
        last_length = struct.unpack("<i", f.read(4))[0]
        f.seek(_IDX_HEADER.size + 4 * n_seq + 8 * (n_seq - 1))
        last_pointer = struct.unpack("<q", f.read(8))[0]
    need = last_pointer + last_length * _DTYPE_SIZES[code]
    bin_size = os.path.getsize(bin_)
    if bin_size < need:
        raise ValueError(f"{where}: {bin_} is truncated ({bin_size} bytes; its index {idx} needs {need}); {remake}")


class DataError(ValueError):
    """Bad data that the run finds once its process group is up (a split without tokens): every
    rank finds it alike, so the entry point reports it once, as one line."""


class TokenIdError(ValueError):
    """A batch holds an id outside the tokenizer's vocabulary: raised by the rank that read it."""


def check_token_ids(prefixes: Sequence[str], vocab_size: int, sample_tokens: int = 1 << 24) -> None:
    """The first `sample_tokens` ids of each corpus must be ids of the tokenizer (< vocab_size).

    A corpus made with another tokenizer is then one line before training, not an out-of-range
    embedding index mid-run (a device-side assert on GPU, or a silently wrong loss where the ids
    fall into the padded vocabulary). The first 16M tokens are a 32-64 MB read: any corpus of
    another vocabulary shows it there."""
    import numpy as np
    with warnings.catch_warnings():  # megatron.core warns at import that apex / TE are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    for prefix in prefixes:
        dtype = np.dtype(IndexedDataset(prefix).index.dtype)
        n = min(sample_tokens, os.path.getsize(prefix + ".bin") // dtype.itemsize)
        if n == 0:
            continue
        top = int(np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(n,)).max())
        if top >= vocab_size:
            raise ValueError(
                f"--data-path {prefix}: token id {top} (in its first {n:,} tokens) is outside the tokenizer's "
                f"vocabulary of {vocab_size}: the corpus was made with another tokenizer; give that one "
                "(--tokenizer-model, or --vocab-size for NullTokenizer) or re-run tools/preprocess_data.py")


def check_batch_token_ids(batch: dict, vocab_size: int, where: str) -> None:
    """Every token and label of a batch still on the host is an id of the tokenizer. check_token_ids
    reads the first 16M ids of each corpus at start-up; this covers the rest as it is read: a min and
    a max over the micro-batch on the host, before the copy to the device (no device work, no wait).
    Out of range, an id would index past the embedding (a device-side assert) or, where it falls
    into the padded vocabulary, give a silently wrong loss."""
    for key in ("tokens", "labels"):
        lo, hi = (int(v) for v in batch[key].aminmax())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise TokenIdError(f"{where}: {key} id {bad} is outside the tokenizer's vocabulary of {vocab_size}: "
                               "the corpus holds ids of another tokenizer past the ids checked at start-up "
                               "(--data-path, --tokenizer-model / --vocab-size)")


def check_split(split: str) -> None:
    """`--split` is up to three comma-separated non-negative numbers, not all zero ("969,30,1")."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values or len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"--split {split}: expected train,valid,test weights such as 969,30,1")


def check_splits_have_tokens(prefixes: Sequence[str], split: str) -> None:
    """Every split with a weight must get tokens from every dataset: megatron-core builds an empty
    one by adding epochs until its tokens reach the samples asked for, which never ends (a silent
    hang with small data). Its own ranges of sequences (the split matrix, rounded as it does)."""
    with warnings.catch_warnings():  # megatron.core warns at import that apex / TE are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix, parse_and_normalize_split)
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)   # kept alive: its lengths are a view of its memory map
        lengths = dataset.sequence_lengths
        n = lengths.shape[0]
        for name, bounds in zip(("train", "valid", "test"), split_matrix):
            if bounds is None:
                continue
            beg, end = (int(round(b * float(n))) for b in bounds)
            if end <= beg or int(lengths[beg:end].sum()) == 0:
                raise DataError(
                    f"--split {split}: the {name} split of {prefix} gets no tokens (sequences "
                    f"[{beg}, {end}) of {n}); use more data or give {name} weight 0 in --split")


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def default_cache_path(prefixes: Sequence[str]) -> str:
    """`<dir of first prefix>/index-cache` when that directory is this user's and private to them,
    else this user's own cache directory (`$XDG_CACHE_HOME` or `~/.cache`, then
    `megatron_ted/index-cache`). Never a directory another user can write: see `prepare_cache_dir`."""
    data_dir = os.path.dirname(os.path.abspath(prefixes[0]))
    st = os.stat(data_dir)
    if st.st_uid == os.getuid() and not _writable_by_others(st) and os.access(data_dir, os.W_OK | os.X_OK):
        return os.path.join(data_dir, "index-cache")
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user_cache, "megatron_ted", "index-cache")


def index_cache_path(data_cache_path: Optional[str], prefixes: Optional[Sequence[str]]) -> Optional[str]:
    """--data-cache-path, else (real data) `default_cache_path`; None for mock data without one."""
    if data_cache_path or not prefixes:
        return data_cache_path
    return default_cache_path(prefixes)


def check_cache_dir(path: str) -> None:
    """The checks of `prepare_cache_dir` without creating anything: run at start-up, before the
    process group, so that a bad --data-cache-path is one line before any work."""
    where = f"--data-cache-path {path}"
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if probe != os.path.abspath(path):  # to be created: its nearest existing parent must allow it
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            raise DataError(f"{where}: cannot create it ({probe} is not a writable directory); "
                            "give a directory of your own")
        return
    try:
        st = os.stat(path)
        entries = [(e.name, e.stat(follow_symlinks=False)) for e in os.scandir(path)]
    except OSError as err:
        raise DataError(f"{where}: cannot read it ({err.strerror}); give a directory of your own") from None
    uid = os.getuid()
    if st.st_uid != uid:
        raise DataError(f"{where}: owned by user id {st.st_uid}, not by you; the index cache is unpickled "
                        "when read, so give a directory of your own")
    if _writable_by_others(st):
        raise DataError(f"{where}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); the index "
                        f"cache is unpickled when read: chmod go-w {path}, or give a private directory")
    foreign = [(name, est.st_uid) for name, est in entries if est.st_uid != uid]
    if foreign:
        raise DataError(f"{where}: holds {foreign[0][0]}, owned by user id {foreign[0][1]}; the index cache is "
                        "unpickled when read: remove that file or give another directory")


def check_data_inputs(data: DataConfig, vocab_size: Optional[int] = None) -> None:
    """The data files, split and index cache directory a run reads once its process group is up,
    checked before any (dry run or not); with the tokenizer's vocab_size, also the corpora's token
    ids. The flags themselves are checked in training/arguments.py."""
    prefixes = None
    if data.data_path and not data.mock_data:
        prefixes, _ = parse_data_path(data.data_path)
        check_prefixes_exist(prefixes)   # and each .idx/.bin against damage
        check_split(data.split)
        if vocab_size is not None:
            check_token_ids(prefixes, vocab_size)
        check_splits_have_tokens(prefixes, data.split)
    if cache := index_cache_path(data.data_cache_path, prefixes):
        check_cache_dir(cache)


def prepare_cache_dir(path: str) -> None:
    """Create the index cache directory with mode 0700, or check an existing one. megatron-core reads
    its cache with numpy's allow_pickle=True, so a file there runs code when training starts: the
    directory must be this user's and not writable by group or others, and so must its files."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as err:
        raise DataError(f"--data-cache-path {path}: cannot create it ({err.strerror}); "
                        "give a directory of your own") from None
    check_cache_dir(path)


def train_valid_test_num_samples(train_iters: int, eval_interval: int, eval_iters: int,
                                 global_batch_size: int) -> tuple[int, int, int]:
    """Megatron-LM's sample counts: all training steps, every evaluation (plus the final one), test."""
    train = train_iters * global_batch_size
    valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size if eval_interval else 0
    test = eval_iters * global_batch_size
    return train, valid, test


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _quiet_mock_cache_warning(active: bool):
    """Mock indices are rebuilt in memory on purpose; drop megatron-core's "Unable to save" warning."""
    if not active:
        yield
        return
    logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
    drop = _DropMessages("Unable to save")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def _process_group_for_build():
    """Yield with torch.distributed initialised: the caller's group, or a temporary 1-rank one."""
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _import_megatron():
    with warnings.catch_warnings():  # megatron.core warns at import that apex / TE are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    return BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig, MockGPTDataset


def build_train_valid_test_datasets(
    data_path: Optional[Sequence[str] | str],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer,
    num_samples: tuple[int, int, int],
    mock: bool = False,
    *,
    data_cache_path: Optional[str] = None,
    mmap_bin_files: bool = True,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
):
    """Return (train, valid, test) megatron-core datasets; a split with weight 0 is None.

    data_path:   Megatron blend, see `parse_data_path`; ignored when `mock`.
    split:       "969,30,1": proportions of the sequences (one per JSONL line) that go to train /
                 valid / test, contiguous in file order (ignored by mock data: megatron-core
                 always splits mock data "1,1,1").
    num_samples: samples wanted per split; the datasets are at least this long (more epochs of the
                 data are drawn if needed).
    tokenizer:   from `megatron_ted.data.tokenizer.build_tokenizer` (needs vocab_size, eod,
                 unique_identifiers); `eod` drives eod_mask_loss / reset_* options.
    mock:        synthetic MockGPTDataset (use NullTokenizer); built in memory on every rank.
    is_built_on_rank: () -> bool, default every rank; a rank where it is False gets None.

    Collective when torch.distributed is initialised: call it on every rank.
    """
    if seq_length < 1:
        raise ValueError(f"--seq-length {seq_length}: must be >= 1")
    check_split(split)
    if len(num_samples) != 3 or any(n is None or n < 0 for n in num_samples):
        raise ValueError(f"num_samples {num_samples}: need three counts >= 0 (train, valid, test)")
    blend = None
    if not mock:
        if not data_path:
            raise ValueError("--data-path is required unless --mock-data is given")
        prefixes, weights = parse_data_path(data_path)
        check_prefixes_exist(prefixes)
        blend = (prefixes, weights)
    # mock data without --data-cache-path: indices rebuilt in memory, nothing written
    cache = index_cache_path(data_cache_path, None if mock else prefixes)
    if cache is not None:
        prepare_cache_dir(cache)

    Builder, GPTDataset, GPTDatasetConfig, MockGPTDataset = _import_megatron()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache,
        mmap_bin_files=mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # causal masking is the model's job; saves [s, s] per sample
    )
    if not mock:
        check_splits_have_tokens(prefixes, split)
    builder = Builder(
        MockGPTDataset if mock else GPTDataset,
        [int(n) for n in num_samples],
        is_built_on_rank or (lambda: True),
        config,
    )
    with _process_group_for_build(), _quiet_mock_cache_warning(mock and cache is None):
        train, valid, test = builder.build()
    return train, valid, test
