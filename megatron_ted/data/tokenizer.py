"""Tokenizers with the interface megatron-core's datasets and the training loop need.

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model="tok.model")
    tok = build_tokenizer("NullTokenizer", vocab_size=V)

Both expose `.vocab_size`, `.eod`, `.pad`, `.tokenize(text) -> list[int]`, `.detokenize(ids) -> str`
and `.unique_identifiers` (megatron-core hashes it into the dataset-index cache key).

Id semantics follow Megatron-LM so that `.bin/.idx` files mean the same thing in both:
- SentencePieceTokenizer (alias GPTSentencePieceTokenizer): ids are `SentencePieceProcessor.encode`
  without BOS/EOS; `eod` is the model's EOS id (as Megatron-LM's GPTSentencePieceTokenizer and
  megatron-core's SentencePieceTokenizer). `tools/train_tokenizer.py` names that piece `<EOD>`, so
  Megatron-LM's legacy `SentencePieceTokenizer` finds the same id.
- NullTokenizer(V): text is space-separated ids; `vocab_size` is V + 1 and `eod` is V, i.e. the
  last id (Megatron-LM's `_NullTokenizer`; `--vocab-size V` means V ordinary ids plus EOD).

- Llama2Tokenizer (SentencePiece): as above, with BOS before every text (Megatron-LM's).
- GPT2BPETokenizer (`--vocab-file`, `--merge-file`) and HuggingFaceTokenizer (`--tokenizer-model`
  a local directory with tokenizer.json): Hugging Face's `tokenizers` library; `eod` is
  <|endoftext|>, resp. the EOS token tokenizer_config.json names.

Only sentencepiece and tokenizers are imported here (no torch, no megatron-core), so tools start fast.
"""
from __future__ import annotations

import os
from collections import OrderedDict

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "GPT2BPETokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer")


class SentencePieceTokenizer:
    """A SentencePiece model; `eod` is its EOS id."""

    def __init__(self, model_path: str):
        import sentencepiece

        self.model_path = model_path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(f"--tokenizer-model {model_path}: not a SentencePiece model ({err})") from None
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"--tokenizer-model {model_path}: the SentencePiece model has no EOS piece to use as "
                "end-of-document; retrain it with tools/train_tokenizer.py (it defines <EOD>)"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        """-1 when the model has no pad piece (megatron-core then pads with -1 and masks it)."""
        return self._sp.pad_id()

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", type(self).__name__), ("model", os.path.basename(self.model_path)),
             ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's Llama2Tokenizer: a SentencePiece model, every text starting with BOS."""

    def __init__(self, model_path: str):
        super().__init__(model_path)
        if self._sp.bos_id() < 0:
            raise ValueError(f"--tokenizer-model {model_path}: Llama2Tokenizer needs a BOS piece; this model has none")

    def tokenize(self, text: str) -> list[int]:
        return [self._sp.bos_id()] + self._sp.encode(text)


class _TokenizersLibrary:
    """A `tokenizers.Tokenizer` (Hugging Face's Rust library) with Megatron's interface."""

    def __init__(self, tokenizer, eod: int, source: str):
        self._tok, self._eod, self.source = tokenizer, eod, source

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return -1

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", type(self).__name__), ("source", self.source),
                            ("vocab_size", self.vocab_size), ("eod", self.eod)])


class GPT2BPETokenizer(_TokenizersLibrary):
    """GPT-2's byte-level BPE from vocab.json + merges.txt; `eod` is <|endoftext|> (Megatron-LM)."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as err:  # noqa: BLE001 -- the library raises its own exception types
            raise ValueError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not a GPT-2 BPE pair "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        eod = tok.token_to_id("<|endoftext|>")
        if eod is None:
            raise ValueError(f"--vocab-file {vocab_file}: no <|endoftext|> token to use as end-of-document")
        super().__init__(tok, eod, os.path.basename(vocab_file))


# EOS spellings tried, in order, when a tokenizer directory has no tokenizer_config.json naming one
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class HuggingFaceTokenizer(_TokenizersLibrary):
    """A local Hugging Face tokenizer directory (tokenizer.json); `eod` is its EOS token, as
    tokenizer_config.json names it. Encoding adds the tokenizer's own special tokens (e.g. BOS),
    as Megatron-LM's HuggingFaceTokenizer does."""

    def __init__(self, directory: str):
        import json

        from tokenizers import Tokenizer

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"--tokenizer-model {directory}: no tokenizer.json there (HuggingFaceTokenizer "
                             f"takes a local tokenizer directory)")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"--tokenizer-model {directory}: cannot read tokenizer.json ({type(err).__name__})") from None
        names = list(_EOS_NAMES)
        config = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                names = [eos]
        ids = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
        if not ids:
            raise ValueError(f"--tokenizer-model {directory}: no end-of-document token ({' '.join(names)}); "
                             f"name it as eos_token in tokenizer_config.json")
        super().__init__(tok, ids[0], os.path.basename(os.path.normpath(directory)))


class NullTokenizer:
    """Synthetic tokenizer: text is space-separated integer ids; ids 0..V-1 plus eod = V."""

    def __init__(self, vocab_size: int):
        self._vocab_size_without_eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._vocab_size_without_eod

    @property
    def pad(self) -> int:
        return -1

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", type(self).__name__), ("vocab_size", self.vocab_size)])


def resolve_tokenizer_type(tokenizer_type: str | None, vocab_file: str | None) -> str:
    """--tokenizer-type, defaulting as Megatron-DeepSpeed's scripts assume: GPT2BPETokenizer when
    --vocab-file is given, else NullTokenizer."""
    return tokenizer_type or ("GPT2BPETokenizer" if vocab_file else "NullTokenizer")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None,
                    vocab_file: str | None = None, merge_file: str | None = None):
    """Build a tokenizer by Megatron-LM's `--tokenizer-type` name; raises ValueError naming the flag."""
    if tokenizer_type == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path or not os.path.isfile(path):
                raise ValueError(f"--tokenizer-type GPT2BPETokenizer needs {flag} FILE"
                                 + (f" ({path}: file not found)" if path else ""))
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model or not os.path.isdir(tokenizer_model):
            raise ValueError(f"--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR (a local "
                             f"directory with tokenizer.json){f'; {tokenizer_model} is not one' if tokenizer_model else ''}")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        if not tokenizer_model:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model <file.model>")
        if not os.path.isfile(tokenizer_model):
            raise ValueError(
                f"--tokenizer-model {tokenizer_model}: file not found "
                "(train one with tools/train_tokenizer.py)"
            )
        return (Llama2Tokenizer if tokenizer_type == "Llama2Tokenizer" else SentencePieceTokenizer)(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (N >= 1)")
        return NullTokenizer(int(vocab_size))
    raise ValueError(
        f"--tokenizer-type {tokenizer_type}: unsupported; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def true_vocab_size(flags: dict) -> int | None:
    """The vocabulary without the padding rows, from the saved flags (None: unknown)."""
    if flags.get("vocab_size") is None:
        return None
    if flags.get("tokenizer_type") == "NullTokenizer":
        return int(flags["vocab_size"]) + 1
    if flags.get("tokenizer_type") == "HuggingFaceTokenizer":   # as import-hf writes it: the model's vocabulary
        return int(flags["vocab_size"])
    return None
