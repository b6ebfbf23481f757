"""Data pipeline: corpus -> tokenizer -> .bin/.idx -> GPTDataset / blend -> per-DP-rank micro-batches."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

from megatron_ted.data.gpt_data import build_train_valid_test_datasets, parse_data_path
from megatron_ted.data.preprocess import main as preprocess_main
from megatron_ted.data.sampler import PretrainingSampler, build_pretraining_data_loader
from megatron_ted.data.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
WORDS = ("the a model data token layer expert parallel gradient batch sample loss train value "
         "tensor rank group split router capacity dropless shard weight step").split()


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_corpus(path, n_docs, seed):
    rng = random.Random(seed)
    texts = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))).capitalize() + "."
                     for _ in range(rng.randint(1, 6))]
        texts.append(" ".join(sentences) + ("\n  indented 42" if rng.random() < 0.2 else ""))
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return texts


def preprocess(tmp, corpus, prefix, model, workers=1):
    argv = ["--input", corpus, "--json-keys", "text", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", model, "--append-eod", "--workers", str(workers),
            "--output-prefix", os.path.join(tmp, prefix)]
    assert preprocess_main(argv) == 0
    return os.path.join(tmp, f"{prefix}_text_document")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two tiny corpora, a tokenizer trained on the first, both preprocessed."""
    tmp = str(tmp_path_factory.mktemp("data"))
    corpus_a, corpus_b = os.path.join(tmp, "a.jsonl"), os.path.join(tmp, "b.jsonl")
    texts_a = write_corpus(corpus_a, 120, seed=0)
    texts_b = write_corpus(corpus_b, 80, seed=1)
    train_tokenizer = load_tool("train_tokenizer")
    assert train_tokenizer.main(["--input", corpus_a, "--json-keys", "text", "--vocab-size", "320",
                                 "--output-prefix", os.path.join(tmp, "tok")]) == 0
    model = os.path.join(tmp, "tok.model")
    tok = build_tokenizer("SentencePieceTokenizer", model)
    prefix_a = preprocess(tmp, corpus_a, "a", model, workers=1)
    prefix_a2 = preprocess(tmp, corpus_a, "a2", model, workers=2)
    prefix_b = preprocess(tmp, corpus_b, "b", model)
    return dict(tmp=tmp, model=model, tok=tok, texts_a=texts_a, texts_b=texts_b, corpus_a=corpus_a,
                prefix_a=prefix_a, prefix_a2=prefix_a2, prefix_b=prefix_b)


# ------------------------------------------------------------------------------------- tokenizers
def test_tokenizers(data):
    tok = data["tok"]
    assert tok.eod == 3 and tok.pad == 0 and tok.vocab_size == 320
    text = data["texts_a"][0] + "\n\tünïcode 123"
    assert tok.detokenize(tok.tokenize(text)) == text  # byte fallback, identity normalisation
    null = build_tokenizer("NullTokenizer", vocab_size=100)  # Megatron: 100 ids + EOD
    assert (null.vocab_size, null.eod) == (101, 100)
    assert null.tokenize("5 7 99") == [5, 7, 99] and null.detokenize([5, 7]) == "5 7"
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", os.path.join(data["tmp"], "missing.model"))
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer")


def test_tokenizer_training_is_deterministic(data, tmp_path):
    train_tokenizer = load_tool("train_tokenizer")
    again = str(tmp_path / "tok")
    assert train_tokenizer.main(["--input", data["corpus_a"], "--vocab-size", "320",
                                 "--output-prefix", again, "--num-threads", "1"]) == 0
    with open(data["model"].replace(".model", ".vocab")) as f1, open(again + ".vocab") as f2:
        assert f1.read() == f2.read()


# ------------------------------------------------------------------------------------- preprocess
def test_preprocess_round_trip(data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = data["tok"]
    ds = IndexedDataset(data["prefix_a"])
    assert len(ds) == len(data["texts_a"]) and ds.index.dtype == np.uint16
    assert list(ds.document_indices) == list(range(len(data["texts_a"]) + 1))
    for i, text in enumerate(data["texts_a"]):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]
    for ext in (".bin", ".idx"):  # --workers 2 writes the same bytes
        with open(data["prefix_a"] + ext, "rb") as f1, open(data["prefix_a2"] + ext, "rb") as f2:
            assert f1.read() == f2.read()


def test_preprocess_errors_in_process(data, tmp_path, capsys):
    base = ["--json-keys", "text", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", data["model"], "--output-prefix", str(tmp_path / "out")]
    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    cases = [
        (["--input", str(tmp_path / "missing.jsonl")] + base, "file not found"),
        (["--input", str(no_key)] + base, "line 2: no key 'text'"),
        (["--input", str(no_key), "--json-keys", "text", "--tokenizer-type", "SentencePieceTokenizer",
          "--tokenizer-model", str(tmp_path / "nope.model"), "--output-prefix", str(tmp_path / "o")],
         "--tokenizer-model"),
    ]
    for argv, message in cases:
        assert preprocess_main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any(p.name.startswith("out_") for p in tmp_path.iterdir())  # partial outputs removed


def test_preprocess_bad_json_subprocess(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first document"}\n{"text": "unterminated\n')
    proc = subprocess.run(
        [sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input", str(bad),
         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data["model"],
         "--append-eod", "--output-prefix", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2: invalid JSON" in lines[0], proc.stderr
    assert not list(tmp_path.glob("bad_text_document.*"))


# -------------------------------------------------------------------------------------- datasets
def stream_of(dataset, indexed):
    """The token stream GPTDataset cuts windows from: documents in its (shuffled) document order."""
    return np.concatenate([indexed[int(d)] for d in dataset.document_index]).astype(np.int64)


def test_gpt_dataset_windows(data, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    seq = 32
    train, valid, test = build_train_valid_test_datasets(
        [data["prefix_a"]], "8,1,1", seq, 1234, data["tok"], (200, 20, 5),
        data_cache_path=str(tmp_path / "cache"))
    assert len(train) >= 200 and valid is not None and test is not None
    assert os.listdir(tmp_path / "cache")  # indices cached where asked
    assert not torch.distributed.is_initialized()  # the temporary 1-rank group is gone
    stream = stream_of(train, IndexedDataset(data["prefix_a"]))
    for i in range(0, len(train), 7):
        item = train[i]
        j = int(train.shuffle_index[i])
        window = torch.from_numpy(stream[j * seq: j * seq + seq + 1])  # seq + 1 tokens
        assert torch.equal(item["tokens"], window[:-1]) and torch.equal(item["labels"], window[1:])
        assert item["tokens"].dtype == torch.int64 and item["position_ids"].tolist() == list(range(seq))
        assert item["loss_mask"].sum() == seq
    # train documents are the first 80% of the documents, valid the next 10%
    assert set(train.document_index.tolist()) == set(range(96))
    assert set(valid.document_index.tolist()) == set(range(96, 108))


def test_blend_of_two_prefixes(data, tmp_path):
    n = 400
    train, _, _ = build_train_valid_test_datasets(
        f"0.25 {data['prefix_a']} 0.75 {data['prefix_b']}", "1,0,0", 16, 7, data["tok"], (n, 0, 0),
        data_cache_path=str(tmp_path / "cache"))
    assert len(train) == n
    counts = np.bincount(train.dataset_index, minlength=2)
    assert abs(counts[0] - 0.25 * n) <= 1 and abs(counts[1] - 0.75 * n) <= 1
    for i in range(0, n, 13):
        item = train[i]
        source = train.datasets[item["dataset_id"]][int(train.dataset_sample_index[i])]
        assert torch.equal(item["tokens"], source["tokens"])
    assert [d.dataset_path for d in train.datasets] == [data["prefix_a"], data["prefix_b"]]
    assert parse_data_path(["3", "x", "1", "y"]) == (["x", "y"], [3.0, 1.0])
    assert parse_data_path("x y") == (["x", "y"], None)
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(["0.5", "x", "y"])
    with pytest.raises(ValueError, match="--data-path"):
        build_train_valid_test_datasets([data["prefix_a"] + ".bin"], "1,0,0", 16, 7, data["tok"], (1, 0, 0))


def test_a_split_without_tokens_is_refused_not_hung(tmp_path):
    """megatron-core builds an empty split by adding epochs until its tokens reach the samples
    asked for: with 10 sequences, --split 969,30,1 leaves valid and test none, and it never
    returned. Now a one-line error; a split that has documents (or weight 0) builds."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "small_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(10):
        builder.add_document(torch.arange(1, 30), [29])
    builder.finalize(prefix + ".idx")
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    with pytest.raises(ValueError, match=r"--split 969,30,1: the valid split of .* gets no tokens \(sequences \[10, 10\) of 10\)"):
        build_train_valid_test_datasets([prefix], "969,30,1", 16, 7, tok, (4, 1, 1))
    train, valid, test = build_train_valid_test_datasets([prefix], "8,2,0", 16, 7, tok, (4, 1, 0))
    assert len(train) >= 4 and len(valid) >= 1 and test is None


# --------------------------------------------------------------------------------------- sampler
def global_batches(total, consumed, mbs, dp, steps, micro_per_step):
    """Per step: the indices read by all DP ranks together, in rank order per micro-step."""
    iters = [iter(PretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro_per_step):
            for it in iters:
                step.extend(next(it))
        out.append(step)
    return out


def test_sampler_layout_invariance_and_resume():
    G, mbs = 24, 2
    reference = global_batches(1000, 0, mbs, 1, steps=5, micro_per_step=G // mbs)
    assert reference[0] == list(range(24)) and reference[1] == list(range(24, 48))
    for dp in (2, 3, 4):
        got = global_batches(1000, 0, mbs, dp, steps=5, micro_per_step=G // (mbs * dp))
        assert [sorted(b) for b in got] == reference
        first = next(iter(PretrainingSampler(1000, 0, mbs, 1, dp)))
        assert first == [2, 3]  # global sample i -> rank (i // mbs) % dp
    resumed = global_batches(1000, 2 * G, mbs, 4, steps=3, micro_per_step=G // (mbs * 4))
    assert [sorted(b) for b in resumed] == reference[2:5]
    assert len(PretrainingSampler(100, 0, 4, 0, 2)) == 12  # the incomplete last step is dropped
    with pytest.raises(ValueError):
        PretrainingSampler(100, 100, 4, 0, 2)


def test_mock_data_identical_across_dp_sizes():
    tok = build_tokenizer("NullTokenizer", vocab_size=500)
    seq, mbs, G = 16, 2, 8

    train = build_train_valid_test_datasets(None, "1,0,0", seq, 1234, tok, (200, 0, 0), mock=True)[0]

    def step_tokens(dp, consumed, steps):
        iters = [iter(build_pretraining_data_loader(train, consumed, mbs, r, dp)) for r in range(dp)]
        out = []
        for _ in range(steps):
            rows = []
            for _ in range(G // (mbs * dp)):
                for it in iters:
                    batch = next(it)
                    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
                    assert batch["tokens"].shape == (mbs, seq) and batch["tokens"].dtype == torch.int64
                    rows.append(batch["tokens"])
            out.append(torch.cat(rows))
        return out

    reference = step_tokens(1, 0, 3)
    assert int(max(t.max() for t in reference)) < tok.vocab_size
    for dp in (2, 4):
        got = step_tokens(dp, 0, 3)
        for a, b in zip(reference, got):  # same samples; rows in the same order too
            assert torch.equal(a, b)
    assert torch.equal(step_tokens(2, G, 2)[0], reference[1])  # resume after one step


# ---------------------------------------------------------------------------------- distributed
def _build_on_rank(rank, world_size, prefix, model, cache):
    tok = build_tokenizer("SentencePieceTokenizer", model)
    train, _, _ = build_train_valid_test_datasets([prefix], "8,1,1", 32, 99, tok, (64, 8, 4),
                                                  data_cache_path=cache)
    assert torch.distributed.is_initialized()  # the caller's group is left alone
    return torch.stack([train[i]["tokens"] for i in range(len(train))])


def _forked_worker(rank, world_size, port, outdir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(outdir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run_forked(fn, world_size, *args):
    """multiproc.run_distributed with fork: the children inherit the imported megatron-core (the
    import costs ~10 s per spawned process)."""
    from multiproc import free_port

    with tempfile.TemporaryDirectory() as outdir:
        torch.multiprocessing.start_processes(
            _forked_worker, args=(world_size, free_port(), outdir, fn, args), nprocs=world_size,
            join=True, start_method="fork")
        return [torch.load(os.path.join(outdir, f"{r}.pt")) for r in range(world_size)]


def test_build_under_torch_distributed(data, tmp_path):
    cache = str(tmp_path / "cache")
    results = run_forked(_build_on_rank, 2, data["prefix_a"], data["model"], cache)
    tok = data["tok"]
    single = build_train_valid_test_datasets([data["prefix_a"]], "8,1,1", 32, 99, tok, (64, 8, 4),
                                             data_cache_path=str(tmp_path / "other"))[0]
    expected = torch.stack([single[i]["tokens"] for i in range(len(single))])
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)


# ---------------------------------------------------------------------------------------- corpus
def test_make_corpus(tmp_path):
    out = tmp_path / "corpus.jsonl"
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "make_corpus.py"), "--output", str(out),
                           "--max-docs", "40"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 60
    texts = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(texts) == 40 and len(set(texts)) == 40
    assert all(len(t) >= 100 for t in texts)
    assert sum(t.count(" the ") for t in texts) > 40  # English prose
