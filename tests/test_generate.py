"""Generation from a checkpoint: deterministic with a seed, at most --max-new-tokens, never a
padding id; a tiny model trained on a repeated sentence says it back greedily; the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_ted.config.from_flags import configs_from_args
from megatron_ted.data.tokenizer import build_tokenizer
from megatron_ted.inference import generate_ids, generate_text, load_for_inference
from megatron_ted.model.builder import build_gpt
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.arguments import padded_vocab_size, parse_args
from megatron_ted.training.checkpoint import save_checkpoint
from megatron_ted.training.grad_sync import GradientSync
from reference_adamw import MixedPrecisionAdamW
from megatron_ted.training.step import forward_backward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--num-experts", "4", "--moe-router-topk", "2", "--moe-layer-freq", "2", "--micro-batch-size", "8",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--mock-data"]


def build(argv, tokenizer):
    args = parse_args(argv, world_size=1)
    args.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by, 1)
    m = configs_from_args(args).model
    config, moe = m.gpt, m.moe
    return args, build_gpt(config, moe, ParallelGroups.single(), args.seed)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """An untrained model's checkpoint (NullTokenizer, 200 ids + EOD, vocabulary padded to 256)."""
    path = str(tmp_path_factory.mktemp("gen") / "ck")
    args, model = build(MODEL + ["--vocab-size", "200", "--init-method-std", "0.2"], build_tokenizer("NullTokenizer", vocab_size=200))
    save_checkpoint(path, 1, model, None, ParallelGroups.single(), vars(args))
    return path, model


def test_loaded_model_is_the_saved_one_and_sampling_is_seeded(untrained):
    path, saved = untrained
    model, tokenizer, args = load_for_inference(path)
    assert tokenizer.vocab_size == 201 and args["padded_vocab_size"] == 256
    tokens = torch.tensor([[1, 2, 3, 4]])
    pos = torch.arange(4)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, pos).logits, saved.eval()(tokens, pos).logits, rtol=0, atol=0)

    kw = dict(vocab_size=tokenizer.vocab_size, temperature=1.0, eod=tokenizer.eod)
    a = generate_ids(model, [5, 6, 7], 20, seed=3, stop_at_eod=False, **kw)
    b = generate_ids(model, [5, 6, 7], 20, seed=3, stop_at_eod=False, **kw)
    c = generate_ids(model, [5, 6, 7], 20, seed=4, stop_at_eod=False, **kw)
    assert a == b and a != c and len(a) == 20
    assert generate_ids(model, [5], 0, seed=3, **kw) == []
    assert len(generate_ids(model, [5], 7, seed=3, **kw)) <= 7
    greedy = generate_ids(model, [5, 6, 7], 10, vocab_size=tokenizer.vocab_size, temperature=0, seed=1)
    assert greedy == generate_ids(model, [5, 6, 7], 10, vocab_size=tokenizer.vocab_size, top_k=1, seed=2)
    text = generate_text(model, tokenizer, "5 6 7", max_new_tokens=5, seed=1, stop_at_eod=False)
    assert len(text.split()) == 5


def test_padding_ids_are_never_sampled(untrained):
    path, _ = untrained
    model, tokenizer, _ = load_for_inference(path)
    # a hot, untrained model: without the mask about a fifth of the draws would be padding ids 201..255
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2]]), torch.arange(2)[None]).logits[0, -1]
    assert logits.shape[-1] == 256 and logits[201:].max() > logits[:201].min()
    ids = generate_ids(model, [1, 2], 300, tokenizer.vocab_size, temperature=3.0, seed=0, stop_at_eod=False)
    assert len(ids) == 300 and max(ids) < tokenizer.vocab_size and len(set(ids)) > 50
    ids = generate_ids(model, [1, 2], 50, tokenizer.vocab_size, temperature=3.0, top_k=250, seed=0,
                       stop_at_eod=False, banned_ids=(7,))
    assert max(ids) < tokenizer.vocab_size and 7 not in ids


SENTENCE = "The quick brown fox jumps over the lazy dog, and the cat sleeps in the warm sun. "


def test_a_model_trained_on_a_repeated_sentence_says_it_back(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from train_tokenizer import train as train_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    with open(corpus, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": SENTENCE + " ".join(words[i % 7:i % 7 + 9])}) + "\n")
    tok_path = train_tokenizer(str(corpus), str(tmp_path / "tok"), vocab_size=400, num_threads=1)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tok_path)
    args, model = build(MODEL + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok_path,
                                 "--lr", "3e-3"], tokenizer)
    groups = ParallelGroups.single()
    sync = GradientSync(model, groups.dp, groups.expert_dp)
    opt = MixedPrecisionAdamW(model, groups.tp, groups.ep, lr=3e-3, weight_decay=0.0, clip_grad=1.0)

    stream = torch.tensor(tokenizer.tokenize(SENTENCE * 40))
    period = len(tokenizer.tokenize(SENTENCE * 2)) - len(tokenizer.tokenize(SENTENCE))
    seq, batch = args.seq_length, args.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: one thread is fastest
    try:
        losses = _train(model, sync, opt, groups, stream, period, seq, batch, gen)
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.05, losses[::20]

    path = str(tmp_path / "ck")
    save_checkpoint(path, len(losses), model, opt, groups, vars(args))
    os.remove(tok_path)   # generation uses the copy saved with the checkpoint
    model, tokenizer, _ = load_for_inference(path)
    text = generate_text(model, tokenizer, "The quick brown", max_new_tokens=40, temperature=0)
    expected = (SENTENCE * 4)[len("The quick brown"):]
    assert text == expected[:len(text)] and len(text) > 60, repr(text)


def _train(model, sync, opt, groups, stream, period, seq, batch, gen, max_steps=300) -> list[float]:
    losses = []
    for _ in range(max_steps):
        starts = torch.randint(0, period, (batch,), generator=gen)
        windows = torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])
        mb = dict(tokens=windows[:, :-1], labels=windows[:, 1:], loss_mask=torch.ones(batch, seq),
                  position_ids=torch.arange(seq).expand(batch, seq))
        sync.zero_grad()
        losses.append(forward_backward(model, [mb], groups, sync).lm_loss)
        opt.step(3e-3)
        if losses[-1] < 0.01:
            break
    return losses


def test_cli(untrained, tmp_path):
    path, _ = untrained
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "tools", "generate_text.py")
    r = subprocess.run([sys.executable, script, "--load", path, "--prompt", "1 2 3", "--max-new-tokens", "6",
                        "--top-k", "20", "--seed", "5", "--ignore-eod", "--num-samples", "2"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    samples = [line for line in r.stdout.splitlines() if not line.startswith("---")]
    assert len(samples) == 2 and all(len(s.split()) == 9 and s.startswith("1 2 3 ") for s in samples), r.stdout
    for argv, needle in ((["--load", str(tmp_path / "none")], "no checkpoint there"),
                         (["--load", path, "--top-k", "-1"], "--top-k -1")):
        r = subprocess.run([sys.executable, script, *argv], env=env, capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_cli_bad_prompts_are_one_line(untrained):
    """An id beyond the vocabulary raised IndexError, text on a NullTokenizer checkpoint said
    "invalid literal for int()": now one line naming --prompt and what to give."""
    path, _ = untrained
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "tools", "generate_text.py")
    for prompt, needle in (("1 2 999", "token id 999 is outside"), ("hello world", "give the prompt as token ids")):
        r = subprocess.run([sys.executable, script, "--load", path, "--prompt", prompt, "--max-new-tokens", "2"],
                           env=env, capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert lines[0].startswith("error: --prompt") and needle in lines[0], lines[0]
