"""Data side: tokenizers, Megatron `.bin/.idx` datasets through megatron-core, per-DP-rank loaders.

    from megatron_ted.data.tokenizer import build_tokenizer
    from megatron_ted.data.gpt_data import build_train_valid_test_datasets, train_valid_test_num_samples
    from megatron_ted.data.sampler import build_pretraining_data_loader

Tools: tools/make_corpus.py (stdlib docstrings -> JSONL), tools/train_tokenizer.py (SentencePiece),
tools/preprocess_data.py (JSONL -> .bin/.idx, Megatron-LM compatible).
Submodules are not imported here: megatron-core's import takes seconds.
"""
