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

Only sentencepiece is imported here (no torch, no megatron-core), so tools start fast.
"""
from __future__ import annotations

import os
from collections import OrderedDict

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "NullTokenizer")


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


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None):
    """Build a tokenizer by Megatron-LM's `--tokenizer-type` name; raises ValueError naming the flag."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if not tokenizer_model:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model <file.model>")
        if not os.path.isfile(tokenizer_model):
            raise ValueError(
                f"--tokenizer-model {tokenizer_model}: file not found "
                "(train one with tools/train_tokenizer.py)"
            )
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (N >= 1)")
        return NullTokenizer(int(vocab_size))
    raise ValueError(
        f"--tokenizer-type {tokenizer_type}: unsupported; choose one of {', '.join(TOKENIZER_TYPES)}"
    )
