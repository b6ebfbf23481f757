#!/usr/bin/env python
"""Tokenize JSONL into Megatron `.bin/.idx` files; Megatron-LM's flags and output names.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --append-eod --workers 4 --output-prefix data/corpus
    # -> data/corpus_text_document.bin / .idx; train with --data-path data/corpus_text_document

The work is done by `megatron_ted.data.preprocess` (see its docstring).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
