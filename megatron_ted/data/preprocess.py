"""JSONL -> Megatron `.bin/.idx`, the engine behind `tools/preprocess_data.py`.

Same flags, file names and contents as Megatron-LM's `tools/preprocess_data.py`: for each
`--json-keys` key, `<output-prefix>_<key>_document.bin/.idx` written by megatron-core's
`IndexedDatasetBuilder`, one document per JSONL line, one sequence per document (a list value is a
document of several sequences), token dtype `DType.optimal_dtype(vocab_size)` (uint16 below 65500
ids, else int32), `--append-eod` adding the tokenizer's EOD to every non-empty document. Empty
documents are kept as documents without sequences, as Megatron-LM does.

Bad input (missing file, bad JSON line, missing key, tokenizer problem) is a one-line
`error: ...` on stderr and exit status 1 or 2. Outputs are written to temporaries next to them and
renamed into place only when the whole input is converted: a failed run removes its temporaries
and leaves an existing dataset under the same prefix untouched.

megatron-core is imported only when the first document is written: its import costs seconds, and
errors in the flags or the first lines are reported before that.
"""
from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
import time
import warnings

from megatron_ted.cli import OneLineErrorParser
from megatron_ted.data.output_files import create_temporary, fsync_file, make_output_dir, remove_created_dirs
from megatron_ted.data.tokenizer import TOKENIZER_TYPES, build_tokenizer


class InputError(Exception):
    """A problem with the user's input, reported as one line."""


# ---------------------------------------------------------------------------------------- encoding
# One tokenizer per worker process, built by `_init_worker` (also used in-process for --workers 1).
_WORKER: dict = {}


def _init_worker(tokenizer_args, json_keys, append_eod, input_name):
    _WORKER.update(
        tokenizer=build_tokenizer(*tokenizer_args),
        json_keys=json_keys, append_eod=append_eod, input_name=input_name,
    )


def _encode(numbered_line):
    """(lineno, line) -> (lineno, {key: (ids, sequence_lengths)}, nbytes), or (lineno, None, error)."""
    lineno, line = numbered_line
    if not line.strip():
        return lineno, None, None  # blank line: no document
    where = f"--input {_WORKER['input_name']} line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return lineno, None, f"{where}: invalid JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return lineno, None, f"{where}: expected a JSON object, got {type(record).__name__}"
    tokenizer = _WORKER["tokenizer"]
    out = {}
    for key in _WORKER["json_keys"]:
        if key not in record:
            return lineno, None, f"{where}: no key {key!r} (see --json-keys)"
        value = record[key]
        sequences = value if isinstance(value, list) else [value]
        doc_ids, lengths = [], []
        for text in sequences:
            if not isinstance(text, str):
                return lineno, None, f"{where}: key {key!r} holds {type(text).__name__}, expected text"
            try:
                ids = tokenizer.tokenize(text)
            except ValueError as err:  # NullTokenizer on non-integer text
                return lineno, None, f"{where}: cannot tokenize key {key!r} ({err})"
            if ids:
                doc_ids.extend(ids)
                lengths.append(len(ids))
        if doc_ids and _WORKER["append_eod"]:
            doc_ids.append(tokenizer.eod)
            lengths[-1] += 1
        out[key] = (doc_ids, lengths)
    return lineno, out, len(line)


# ------------------------------------------------------------------------------------------ output
def output_prefix_for(output_prefix: str, key: str, level: str = "document") -> str:
    """Megatron-LM's naming: `<output-prefix>_<key>_document` (+ .bin / .idx)."""
    return f"{output_prefix}_{key}_{level}"


class _Writers:
    """One IndexedDatasetBuilder per key, writing temporaries next to the outputs; `finalize` renames
    them into place at the very end, `abort` removes them: a failed run leaves any existing dataset
    under the same prefix as it was."""

    def __init__(self, output_prefix: str, json_keys: list[str], vocab_size: int):
        self.prefixes = {key: output_prefix_for(output_prefix, key) for key in json_keys}
        self.vocab_size = vocab_size
        self.builders = None
        self.temporaries: dict[str, str] = {}   # final path -> this run's temporary

    def _open(self):
        with warnings.catch_warnings():  # megatron.core warns that apex / TE are absent
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
        dtype = DType.optimal_dtype(self.vocab_size)
        for prefix in self.prefixes.values():
            for path in (prefix + ".bin", prefix + ".idx"):
                self.temporaries[path] = create_temporary(path)
        self.builders = {key: IndexedDatasetBuilder(self.temporaries[prefix + ".bin"], dtype=dtype)
                         for key, prefix in self.prefixes.items()}

    def add(self, doc: dict) -> None:
        if self.builders is None:
            self._open()
        for key, (ids, lengths) in doc.items():
            self.builders[key].add_document(ids, lengths)

    def finalize(self) -> None:
        if self.builders is None:
            self._open()  # no documents: still write a valid, empty dataset
        for key, builder in self.builders.items():
            builder.finalize(self.temporaries[self.prefixes[key] + ".idx"])
        for tmp in self.temporaries.values():
            fsync_file(tmp)
        for final, tmp in self.temporaries.items():  # each rename atomic, all of them back to back
            os.replace(tmp, final)
        self.temporaries = {}

    def abort(self) -> None:
        if self.builders is not None:
            for builder in self.builders.values():
                builder.data_file.close()
        for tmp in self.temporaries.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        self.temporaries = {}


# ---------------------------------------------------------------------------------------- progress
class _Progress:
    """tqdm on an interactive stderr when installed, else a line on stdout every `interval` docs."""

    def __init__(self, interval: int):
        self.interval, self.count, self.nbytes, self.start = interval, 0, 0, None
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(unit="doc", desc="tokenizing")
            except ImportError:
                pass

    def update(self, nbytes: int) -> None:
        if self.start is None:  # rates from the first document on, not counting start-up
            self.start = time.time()
        self.count += 1
        self.nbytes += nbytes
        if self.bar is not None:
            self.bar.update(1)
        elif self.interval > 0 and self.count % self.interval == 0:
            self.report("processed")

    def report(self, verb: str) -> None:
        elapsed = max(time.time() - (self.start or time.time()), 1e-9)
        print(f"{verb} {self.count} documents ({self.count / elapsed:.1f} docs/s, "
              f"{self.nbytes / elapsed / 2**20:.2f} MB/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -------------------------------------------------------------------------------------------- main
def get_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        description="Tokenize JSONL into Megatron .bin/.idx files (Megatron-LM compatible).")
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSONL file (optionally .gz), one document per line")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each line")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, help=" | ".join(TOKENIZER_TYPES))
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece model file, or a directory with tokenizer.json (HuggingFaceTokenizer)")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="ids of NullTokenizer (EOD is one more)")
    group.add_argument("--append-eod", action="store_true", help="append the EOD id to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes <prefix>_<key>_document.bin and .idx for each key")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def _open_input(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def preprocess(args: argparse.Namespace) -> dict:
    """Run the conversion; returns {key: output prefix}. Raises InputError on bad input."""
    if not os.path.isfile(args.input):
        raise InputError(f"--input {args.input}: file not found")
    tokenizer_args = (args.tokenizer_type, args.tokenizer_model, args.vocab_size,
                      getattr(args, "vocab_file", None), getattr(args, "merge_file", None))
    try:
        tokenizer = build_tokenizer(*tokenizer_args)
    except ValueError as err:
        raise InputError(str(err)) from None
    try:
        created = make_output_dir(args.output_prefix, "--output-prefix")
    except ValueError as err:
        raise InputError(str(err)) from None

    init_args = (tokenizer_args, list(args.json_keys),
                 args.append_eod, args.input)
    writers = _Writers(args.output_prefix, list(args.json_keys), tokenizer.vocab_size)
    progress = _Progress(args.log_interval)
    pool, done = None, False
    try:
        with _open_input(args.input) as fin:
            lines = enumerate(fin, 1)
            if args.workers > 1:
                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
                pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=init_args)
                results = pool.imap(_encode, lines, 32)  # ordered: output independent of --workers
            else:
                _init_worker(*init_args)
                results = map(_encode, lines)
            for lineno, doc, info in results:
                if doc is None:
                    if info is not None:
                        raise InputError(info)
                    continue
                writers.add(doc)
                progress.update(info)
        writers.finalize()
        done = True
    except UnicodeDecodeError as err:
        raise InputError(f"--input {args.input}: not UTF-8 text ({err.reason})") from None
    except (OSError, EOFError) as err:  # unreadable / truncated .gz input, full disk, ...
        raise InputError(f"--input {args.input} -> --output-prefix {args.output_prefix}: {err}") from None
    finally:
        if not done:  # remove only what this run made: its temporaries and the directories it created
            writers.abort()
            remove_created_dirs(args.output_prefix, created)
        progress.close()
        if pool is not None:
            pool.terminate()  # all results are consumed on success; on error, stop the workers
            pool.join()
    progress.report("wrote")
    return writers.prefixes


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        prefixes = preprocess(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; this run's temporary files removed", file=sys.stderr)
        return 130
    for key, prefix in prefixes.items():
        print(f"{key}: {prefix}.bin / {prefix}.idx")
    return 0
