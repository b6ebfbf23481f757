"""Expert pruning for inference: the tool keeps the most-routed experts (checked against routing
counted independently through GPTModel's MoE outputs), writes a smaller checkpoint that loads with
fewer experts and generates text, keeps everything else bit for bit, and rejects bad input with one
line naming the flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy
import pytest
import torch

from megatron_ted.config.from_flags import configs_from_args
from megatron_ted.data.tokenizer import build_tokenizer
from megatron_ted.inference import generate_text, load_for_inference
from megatron_ted.inference.prune import choose_experts, expert_usage, prune_model, sample_sequences
from megatron_ted.model.builder import build_gpt
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.arguments import padded_vocab_size, parse_args
from megatron_ted.training.checkpoint import find_checkpoint, read_metadata, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "prune_experts.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
from prune_experts import main as prune_main  # noqa: E402
# 4 layers, MoE every other layer: MoE layers 0 and 2, 4 experts, top-2; NullTokenizer, 200 ids + EOD
MODEL = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--num-experts", "4", "--moe-router-topk", "2", "--moe-layer-freq", "2", "--micro-batch-size", "4",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--mock-data", "--vocab-size", "200",
         "--init-method-std", "0.2"]


def checkpoint(path, extra=()):
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=200)
    args = parse_args(MODEL + list(extra), world_size=1)
    args.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by, 1)
    m = configs_from_args(args).model
    config, moe = m.gpt, m.moe
    model = build_gpt(config, moe, ParallelGroups.single(), args.seed)
    save_checkpoint(str(path), 7, model, None, ParallelGroups.single(), vars(args))
    return str(path)


def run_tool(*argv):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *argv], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("prune") / "ck")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample") / "sample.jsonl"
    gen = torch.Generator().manual_seed(3)
    with open(path, "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(str(int(i)) for i in torch.randint(0, 200, (30,), generator=gen))}) + "\n")
    return str(path)


def test_tool_keeps_the_most_routed_experts_and_the_result_generates(original, text_file, tmp_path):
    out = str(tmp_path / "pruned")
    r = run_tool("--load", original, "--save", out, "--keep-experts", "2", "--text-file", text_file,
                 "--num-samples", "48")
    assert r.returncode == 0, r.stderr
    assert "keeping" in r.stdout

    # independent count: the loaded model's per-layer MoE loads on the same sample, from GPTOutput.moe
    model, tokenizer, args = load_for_inference(original)
    sample = sample_sequences(tokenizer, 16, 48, text_file=text_file)
    assert sample.shape == (48, 16)
    counts = [torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)]
    with torch.no_grad():
        for i in range(0, 48, 8):
            mb = sample[i:i + 8]
            for c, m in zip(counts, model(mb, torch.arange(16).expand_as(mb)).moe):
                c += m.tokens_per_expert
    assert all(int(c.sum()) == 48 * 16 * 2 for c in counts)       # top-2 over every token
    meta = read_metadata(find_checkpoint(out))
    kept = meta["extra"]["kept_experts"]
    for c, k in zip(counts, kept):
        top = sorted(torch.argsort(c, descending=True, stable=True)[:2].tolist())
        assert c.sort(descending=True).values[1] > c.sort(descending=True).values[2], "tie at the cut"
        assert k == top, (c.tolist(), k)
    assert [u["counts"] for u in meta["extra"]["expert_usage"]] == [c.tolist() for c in counts]

    # fewer experts; the kept experts' weights and router rows, everything else unchanged
    pruned, tok2, pargs = load_for_inference(out)
    assert pargs["num_experts"] == 2 and meta["args"]["num_experts"] == 2
    assert meta["tensors"]["model/layers.0.mlp.experts.fc1"]["shape"][0] == 2
    old, new = dict(model.named_parameters()), dict(pruned.named_parameters())
    for layer, k in zip((0, 2), kept):
        for name in ("experts.fc1", "experts.fc2", "router.weight"):
            key = f"layers.{layer}.mlp.{name}"
            assert new[key].shape[0] == 2 and old[key].shape[0] == 4
            assert torch.equal(new[key], old[key][k])
    assert torch.equal(new["embedding.weight"], old["embedding.weight"])
    assert torch.equal(new["layers.1.mlp.fc1.weight"], old["layers.1.mlp.fc1.weight"])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())

    text = generate_text(pruned, tok2, "1 2 3", max_new_tokens=8, seed=1, stop_at_eod=False)
    assert len(text.split()) == 8
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate_text.py"), "--load", out, "--prompt", "5 6",
                        "--max-new-tokens", "5", "--ignore-eod"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and len(r.stdout.split()) == 7, r.stderr


def test_keeping_every_expert_changes_nothing(original):
    model, tokenizer, args = load_for_inference(original)
    sample = sample_sequences(tokenizer, 16, 8)
    usage = expert_usage(model, sample)
    same = prune_model(model, choose_experts(usage, [4], 2))
    tokens = sample[:2]
    pos = torch.arange(16).expand_as(tokens)
    with torch.no_grad():
        assert torch.equal(same(tokens, pos).logits, model(tokens, pos).logits)


def test_pruning_changes_routing_only_where_a_choice_was_pruned(original):
    """A token whose top-2 experts are both kept is routed exactly as before (the router keeps
    their rows; softmax over the remaining experts renormalises but top-2 weights are the softmax
    over the two chosen logits either way)."""
    model, tokenizer, args = load_for_inference(original)
    sample = sample_sequences(tokenizer, 16, 16)
    usage = expert_usage(model, sample)
    kept = choose_experts(usage, [3], 2)
    pruned = prune_model(model, kept)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    before = model.layers[0].mlp.router(x)
    after = pruned.layers[0].mlp.router(x)
    index = torch.tensor(kept[0])
    both_kept = before.routing_map_TE[:, index].sum(1) == 2
    assert both_kept.any() and (~both_kept).any()
    torch.testing.assert_close(after.probs_TE[both_kept], before.probs_TE[both_kept][:, index])
    assert (after.routing_map_TE.sum(1) == 2).all()


def test_per_layer_counts_and_a_megatron_data_sample(original, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "sample_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        doc = torch.randint(0, 200, (50,), generator=gen, dtype=torch.int32)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    out = str(tmp_path / "pyramid")
    r = run_tool("--load", original, "--save", out, "--keep-experts", "3", "2", "--data-path", prefix,
                 "--num-samples", "32")
    assert r.returncode == 0, r.stderr
    model, tokenizer, args = load_for_inference(out)
    assert args["num_experts"] == [3, 2]
    assert dict(model.named_parameters())["layers.0.mlp.experts.fc1"].shape[0] == 3
    assert dict(model.named_parameters())["layers.2.mlp.experts.fc1"].shape[0] == 2
    assert len(generate_text(model, tokenizer, "4", max_new_tokens=4, seed=2, stop_at_eod=False).split()) == 4


@pytest.mark.parametrize("argv, needle", [
    (["--keep-experts", "1"], "--keep-experts 1 is below the checkpoint's --moe-router-topk 2"),
    (["--keep-experts", "5"], "--keep-experts 5 exceeds the 4 experts"),
    (["--keep-experts", "2", "2", "2"], "--keep-experts has 3 values"),
    (["--keep-experts", "2", "--data-path", "missing"], "--data-path missing"),
    (["--keep-experts", "2", "--text-file", "missing.jsonl"], "--text-file missing.jsonl"),
])
def test_bad_input(original, tmp_path, argv, needle, capsys):
    rc = prune_main(["--load", original, "--save", str(tmp_path / "out"), *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not os.path.exists(tmp_path / "out")


def test_bad_checkpoints(original, tmp_path, capsys):
    hashed = checkpoint(tmp_path / "hash", ["--moe-router-type", "hash", "--moe-router-topk", "1"])
    for load, save, needle in ((hashed, str(tmp_path / "o1"), "hash routing"),
                               (original, original, "--save"),
                               (str(tmp_path / "nothing"), str(tmp_path / "o2"), "no checkpoint")):
        rc = prune_main(["--load", load, "--save", save, "--keep-experts", "2"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    # the same through the command line: exit code 2, one line, no traceback
    r = run_tool("--load", original, "--save", str(tmp_path / "o3"), "--keep-experts", "9")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def _hashes(directory) -> dict:
    import hashlib
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_a_save_directory_holding_a_checkpoint_is_replaced_only_with_overwrite(original, tmp_path):
    """--save into a directory that holds a checkpoint exited 0 and silently replaced it; now one
    line and nothing changed, unless --overwrite: then the pruned checkpoint and nothing beside it."""
    existing = checkpoint(tmp_path / "existing")
    before = _hashes(existing)
    r = run_tool("--load", original, "--save", existing, "--keep-experts", "2")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"--save {existing} already holds a checkpoint" in lines[0] and "--overwrite" in lines[0]
    assert _hashes(existing) == before
    r = run_tool("--load", original, "--save", existing, "--keep-experts", "2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert read_metadata(find_checkpoint(existing))["args"]["num_experts"] == 2
    assert sorted(os.listdir(tmp_path)) == ["existing"]   # no staging directory or old copy left
    assert sorted(os.listdir(existing)) == ["iter_0000007", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_replace_directory_keeps_one_whole_copy(tmp_path, monkeypatch, atomic_swap):
    """With or without the file system's atomic swap, the new directory ends at the target and the
    old one is gone; without it, a failed second rename puts the old one back."""
    from megatron_ted.inference import prune
    if not atomic_swap:
        monkeypatch.setattr(prune, "_exchange", lambda a, b: False)
    target = tmp_path / "ck"
    target.mkdir()
    (target / "f").write_text("old")
    new = prune.staging_dir_for(str(target))
    with open(os.path.join(new, "f"), "w") as f:
        f.write("new")
    prune.replace_directory(new, str(target))
    assert (target / "f").read_text() == "new" and os.listdir(tmp_path) == ["ck"]
    if not atomic_swap:
        new = prune.staging_dir_for(str(target))
        monkeypatch.setattr(prune.os, "rename", _fail_second(os.rename))
        with pytest.raises(OSError):
            prune.replace_directory(new, str(target))
        assert (target / "f").read_text() == "new"


def _fail_second(rename):
    calls = []

    def wrapped(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise OSError("simulated failure")
        return rename(a, b)
    return wrapped


def test_the_pruned_checkpoint_saves_the_source_model_with_the_kept_counts(tmp_path, capsys):
    """The pruned checkpoint's saved ModelConfig is the source's (its dropout and capacity as trained, not
    inference's dropout-free dropless model) with the kept experts per MoE layer, and the flags saved beside
    it give the same model (--use-checkpoint-args, a resumed run's comparison)."""
    import dataclasses

    from megatron_ted.config.from_flags import model_config_from_flags
    from megatron_ted.training.arguments import flag_defaults
    from megatron_ted.training.checkpoint import saved_model_config

    source = checkpoint(tmp_path / "ck", ["--hidden-dropout", "0.1", "--moe-expert-capacity-factor", "1.5"])
    out = str(tmp_path / "pruned")
    assert prune_main(["--load", source, "--save", out, "--keep-experts", "3", "2", "--num-samples", "8"]) == 0
    before = saved_model_config(read_metadata(find_checkpoint(source)))
    meta = read_metadata(find_checkpoint(out))
    after = saved_model_config(meta)
    router = dataclasses.replace(before.moe.router, num_experts=3)
    assert after == dataclasses.replace(before, moe=dataclasses.replace(before.moe, router=router,
                                                                        num_experts_per_layer=(3, 2)))
    assert after.gpt.hidden_dropout == 0.1 and after.moe.router.capacity_factor == 1.5
    assert model_config_from_flags({**flag_defaults(), **meta["args"]}) == after
