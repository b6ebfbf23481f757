"""Hugging Face import/export and upcycling, against transformers itself (the oracle): tiny random
models in float64, saved with save_pretrained, imported, compared logit for logit.

Relative 1e-6, not float64's 1e-15: transformers computes some pieces in float32 whatever the
model's dtype (the softmax of the Qwen routers, DeepSeek-V3's router logits and sigmoid, the RoPE
cos/sin tables), so float32's rounding is what is reachable."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_ted.inference import load_model  # noqa: E402
from megatron_ted.interop import hf_io  # noqa: E402
from megatron_ted.training.checkpoint import _Reader, find_checkpoint, read_metadata  # noqa: E402
from multiproc import free_port, run_distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 100
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=48, vocab_size=VOCAB, rope_theta=10000.0, max_position_embeddings=64)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)
YARN = dict(rope_type="yarn", rope_theta=1000.0, factor=4.0, mscale=0.707, mscale_all_dim=0.707, beta_fast=32.0,
            beta_slow=1.0, original_max_position_embeddings=16)   # the ramp inside this tiny rope dim
DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=16,
                n_shared_experts=2, routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=12,
                qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10, rope_interleave=True, norm_topk_prob=True)
# name: (model_type, config); GQA (2 K/V heads of 4) unless said otherwise
ARCHS = {
    "llama": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3)),
    "mistral": ("mistral", dict(sliding_window=None, tie_word_embeddings=True)),          # multi-head: fused qkv
    "qwen2": ("qwen2", dict(num_key_value_heads=2, rope_theta=1e6)),                      # + q/k/v biases
    # sliding windows shorter than IDS (12): a query sees 5 positions, itself included; qwen2 windows
    # only layer 1 (max_window_layers 1: layer 0 keeps full attention)
    "mistral_window": ("mistral", dict(sliding_window=5, num_key_value_heads=2)),
    "qwen2_window": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24, qkv_bias=True, norm_topk_prob=False,
                                    num_key_value_heads=2)),
    # dense with per-head qk-norm, head_dim 12 != 32 / 4, tied embeddings (the small Qwen3s)
    "qwen3": ("qwen3", dict(head_dim=12, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=12,
                                    norm_topk_prob=True, mlp_only_layers=[0], num_key_value_heads=2)),
    # softmax top-k, not renormalised; q_norm / k_norm over the whole q / k projection
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, num_key_value_heads=2)),
    "deepseek_v3": ("deepseek_v3", dict(DEEPSEEK, q_lora_rank=16, rope_parameters=YARN)),
    "deepseek_v3_plain_q": ("deepseek_v3", dict(DEEPSEEK, q_lora_rank=None, n_group=1, topk_group=1,
                                                num_experts_per_tok=2, norm_topk_prob=True)),
    # DeepSeek-V3's MoE block with GQA, q/k/v biases, per-head qk-norm, half the head dim rotated
    "glm4_moe": ("glm4_moe", dict(n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
                                  moe_intermediate_size=16, n_shared_experts=2, routed_scaling_factor=2.5,
                                  first_k_dense_replace=1, norm_topk_prob=True, head_dim=12, num_key_value_heads=2,
                                  attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5)),
    # softmax top-k; groups scored by their best expert, k // topk_group = 2 (not the sum of the top 2)
    "deepseek_v2": ("deepseek_v2", dict(DEEPSEEK, q_lora_rank=16, num_experts_per_tok=4, topk_group=2,
                                        norm_topk_prob=False, topk_method="group_limited_greedy",
                                        rope_parameters=YARN)),
}
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _hf_model(name, seed=0, **overrides):
    model_type, arch = ARCHS[name]
    cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **arch, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").double().eval()
    return _away_from_init(model, biases=True)


def _away_from_init(model, biases: bool):
    """Norms away from 1 so that a misplaced norm weight shows; routers, expert biases and (biases)
    the linears' biases large enough that a misplaced one shows."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key or (biases and key.endswith("bias")):
                p.add_(0.2 * torch.randn_like(p))
            if key.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
        for key, b in model.named_buffers():
            if key.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{name: (hf dir, our checkpoint, HF logits on IDS)}; llama's directory has a tokenizer."""
    root, out = tmp_path_factory.mktemp("hf"), {}
    for mt in ARCHS:
        model = _hf_model(mt)
        model.save_pretrained(root / mt)
        if mt == "llama":
            _save_tokenizer(root / mt)
        with torch.no_grad():
            logits = model(IDS).logits
        hf_io.import_hf(str(root / mt), str(root / f"ck_{mt}"))
        out[mt] = (str(root / mt), str(root / f"ck_{mt}"), logits)
    return out


def _save_tokenizer(directory):
    """A word-level tokenizer of VOCAB ids (tokenizer.json) whose end-of-sequence token is id 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_imported_logits_equal_hugging_face(imported, model_type):
    _, ckpt, expected = imported[model_type]
    with torch.no_grad():
        ours = load_model(ckpt, dtype=torch.float64)(IDS)
    assert ours.shape == expected.shape
    assert _rel(expected, ours) < 1e-6


def _upcycled_logits(dense, flags, granularity, tp, ep, world):
    """The imported dense llama upcycled in process (training/upcycle.upcycle) into 4 experts, top-2,
    with --moe-upcycling-granularity G, at TP x EP, in float64: its logits (every vocabulary row)."""
    from megatron_ted.config.from_flags import model_config_from_flags
    from megatron_ted.model.builder import build_model
    from megatron_ted.parallel import comm
    from megatron_ted.parallel.groups import ParallelGroups
    from megatron_ted.parallel.layout import ParallelLayout
    from megatron_ted.training.arguments import parse_args
    from megatron_ted.training.upcycle import upcycle

    args = parse_args([*flags, "--num-experts", "4", "--moe-layer-freq", "1", "--moe-router-topk", "2",
                       "--moe-ffn-hidden-size", str(COMMON["intermediate_size"] // granularity),
                       "--moe-use-upcycling", "--moe-upcycling-granularity", str(granularity), "--load", dense,
                       "--save", "unused", "--mock-data", "--tensor-model-parallel-size", str(tp),
                       "--expert-model-parallel-size", str(ep), "--seed", "7"], world_size=world)
    groups = ParallelGroups.single() if world == 1 else ParallelGroups.create(ParallelLayout(world, tp, ep))
    vocab = read_metadata(find_checkpoint(dense))["args"]["padded_vocab_size"]
    model = build_model(model_config_from_flags(args, vocab), groups).double().eval()
    upcycle(model, dense, groups, granularity)
    with torch.no_grad():
        local = model(IDS, torch.arange(IDS.shape[1]).expand_as(IDS)).logits
    return comm.all_gather(local, groups.tp, dim=-1)[..., :VOCAB]


def _tp2_ep2_logits(rank, world, ckpts, upcycling=None):
    """Every imported checkpoint built and loaded at TP 2 x EP 2 (DP 2); the full-vocabulary logits.
    With `upcycling` (dense checkpoint, its flags): also the upcycled MoE's, per granularity."""
    from megatron_ted.model.builder import build_gpt
    from megatron_ted.parallel import comm
    from megatron_ted.parallel.groups import ParallelGroups
    from megatron_ted.parallel.layout import ParallelLayout
    from megatron_ted.training.checkpoint import load_checkpoint
    from megatron_ted.config.from_flags import model_config_from_flags

    groups = ParallelGroups.create(ParallelLayout(world, 2, 2))
    out = {}
    for mt, ckpt in ckpts.items():
        args = read_metadata(find_checkpoint(ckpt))["args"]
        m = model_config_from_flags(args)   # the saved flags, with their padded vocabulary
        config, moe = m.gpt, m.moe
        model = build_gpt(config, moe, groups, 0).double()
        load_checkpoint(ckpt, model, None, groups, load_rng=False, restore_rng=False)
        model.eval()
        with torch.no_grad():
            local = model(IDS, torch.arange(IDS.shape[1]).expand_as(IDS)).logits
        out[mt] = comm.all_gather(local, groups.tp, dim=-1)[..., :VOCAB]
    for g in (1, 2) if upcycling else ():
        out[f"upcycled G={g}"] = _upcycled_logits(*upcycling, g, 2, 2, world)
    return out


def _llama_flags(imported):
    from megatron_ted.interop.hf_config import flags_from_hf

    with open(os.path.join(imported["llama"][0], "config.json")) as f:
        return flags_from_hf(json.load(f))


def test_imported_logits_equal_hugging_face_at_tp2_ep2(imported):
    """... and the upcycled llama (G = 1, 2) computes the dense model's logits at TP 2 x EP 2."""
    dense = imported["llama"][1]
    results = run_distributed(_tp2_ep2_logits, 4, {mt: ck for mt, (_, ck, _) in imported.items()},
                              (dense, _llama_flags(imported)))
    for mt, (_, _, expected) in imported.items():
        for r in results:
            assert _rel(expected, r[mt]) < 1e-6, mt
    with torch.no_grad():
        dense_logits = load_model(dense, dtype=torch.float64)(IDS)
    for r in results:
        for g in (1, 2):
            assert _rel(dense_logits, r[f"upcycled G={g}"]) < 1e-12, g


@pytest.mark.parametrize("granularity", [1, 2])
def test_granular_upcycling_equals_the_dense_model(imported, granularity):
    """One process: the MoE of 4 experts of FFN 48 / G, each run of G experts one cut-up copy of the
    dense MLP (G = 2: the router rows tied in pairs, fc2 scaled by G), computes the dense logits."""
    dense = imported["llama"][1]
    with torch.no_grad():
        dense_logits = load_model(dense, dtype=torch.float64)(IDS)
    upcycled = _upcycled_logits(dense, _llama_flags(imported), granularity, 1, 1, 1)
    assert _rel(dense_logits, upcycled) < 1e-12


@pytest.mark.parametrize("extra,word", [
    (["--moe-ffn-hidden-size", "20"], "--moe-ffn-hidden-size 20 x 2 must equal --ffn-hidden-size 48"),
    (["--num-experts", "3", "--moe-router-topk", "2"], "must divide --num-experts 3"),
    (["--moe-router-topk", "3"], "--moe-router-topk 3 must be a multiple"),
    (["--moe-router-pre-softmax"], "--moe-router-pre-softmax"),
    (["--moe-router-num-groups", "4", "--moe-router-group-topk", "2"], "experts per router group"),
])
def test_bad_upcycling_granularity_is_one_line(imported, tmp_path, extra, word):
    from megatron_ted.training.arguments import parse_args

    argv = [*_llama_flags(imported), "--num-experts", "4", "--moe-layer-freq", "1", "--moe-router-topk", "2",
            "--moe-ffn-hidden-size", "24", "--moe-use-upcycling", "--moe-upcycling-granularity", "2",
            "--load", imported["llama"][1], "--save", str(tmp_path / "up"), "--mock-data", *extra]
    with pytest.raises(ValueError, match=re.escape(word)) as err:
        parse_args(argv, world_size=1)
    assert "\n" not in str(err.value) and not (tmp_path / "up").exists()


def _read_all(ckpt):
    directory = find_checkpoint(ckpt)
    index = read_metadata(directory)["tensors"]
    reader, out = _Reader(directory, index), {}
    for key in index:
        if key.startswith("model/"):
            t = torch.empty(index[key]["shape"], dtype=getattr(torch, index[key]["dtype"].split(".")[-1]))
            reader.read_into(key, t, [(0, d) for d in t.shape])
            out[key] = t
    return out


def test_upcycle_train_at_tp2_ep2_export_and_reimport(imported, tmp_path):
    """A dense model trained here (the imported llama's flags, 2 steps, one process) upcycled through
    the entry point into 4 experts with --moe-upcycling-granularity 2 at TP 2 x EP 2: iteration 0 is
    saved before the first step and computes the dense model's logits; it trains; its export loads in
    transformers with our logits; the import of that export holds exactly the trained tensors.
    (The imported dense model's upcycling: test_imported_logits_equal_hugging_face_at_tp2_ep2.)"""
    flags = _llama_flags(imported)
    dense, up = str(tmp_path / "dense"), str(tmp_path / "up")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = [*flags, "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-2"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *run, "--train-iters", "2",
                        "--save", dense], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(free_port()),
            os.path.join(ROOT, "pretrain_gpt_moe.py"), *run, "--num-experts", "4", "--moe-layer-freq", "1",
            "--moe-ffn-hidden-size", "24", "--moe-upcycling-granularity", "2", "--moe-router-topk", "2",
            "--moe-use-upcycling", "--load", dense, "--save", up, "--tensor-model-parallel-size", "2",
            "--expert-model-parallel-size", "2", "--train-iters", "3"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"lm loss: ([0-9.E+-]+)", r.stdout)]
    assert len(losses) == 3 and "upcycled the dense checkpoint" in r.stdout

    with torch.no_grad():
        dense_logits = load_model(dense, dtype=torch.float32)(IDS)
        step0 = load_model(os.path.join(up, "iter_0000000"), dtype=torch.float32)(IDS)
        trained = load_model(up, dtype=torch.float32)(IDS)
    assert read_metadata(find_checkpoint(dense))["iteration"] == 2      # trained here, not imported
    assert _rel(dense_logits, step0) < 1e-5
    assert _rel(dense_logits, trained) > 1e-3            # it did train

    out = tmp_path / "exported"
    notes = hf_io.export_hf(up, str(out), dtype="fp32", max_shard_size="20KB")
    assert "mixtral" in notes[0]
    assert (out / "model.safetensors.index.json").is_file() and json.loads((out / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), experts_implementation="eager").eval()
    with torch.no_grad():
        assert _rel(trained, hf(IDS).logits) < 1e-5
    hf_io.import_hf(str(out), str(tmp_path / "back"))
    original, back = _read_all(up), _read_all(str(tmp_path / "back"))
    assert original.keys() == back.keys()
    for key in original:   # an HF model has no vocabulary padding rows: the import's are zeros
        rows = VOCAB if key in ("model/embedding.weight", "model/output_weight") else None
        assert torch.equal(original[key][:rows], back[key][:rows]), key


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe",
                                  "deepseek_v2", "mistral_window", "qwen2_window"])
def test_export_loads_in_transformers_and_reimports_bit_identical(imported, tmp_path, name):
    """Our checkpoint -> export-hf (the architecture inferred from its saved ModelConfig alone) -> from_pretrained
    computes our logits; its import holds exactly our tensors (deepseek_v3: the rope rows permuted to
    DeepSeek's interleaved layout on the way out and back on the way in)."""
    _, ckpt, _ = imported[name]
    out = tmp_path / "exported"
    notes = hf_io.export_hf(ckpt, str(out))
    assert f" as {ARCHS[name][0]} " in notes[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float64,
                                                           experts_implementation="eager").eval()
    with torch.no_grad():
        assert _rel(load_model(ckpt, dtype=torch.float64)(IDS), hf(IDS).logits) < 1e-6
    if name == "llama":   # imported with its tokenizer: the checkpoint's flags use it, the export carries it
        args = read_metadata(find_checkpoint(ckpt))["args"]
        assert args["tokenizer_type"] == "HuggingFaceTokenizer" and os.path.isdir(args["tokenizer_model"])
        assert (out / "tokenizer.json").read_text() == open(os.path.join(imported[name][0], "tokenizer.json")).read()
        assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    hf_io.import_hf(str(out), str(tmp_path / "back"))
    original, back = _read_all(ckpt), _read_all(str(tmp_path / "back"))
    assert original.keys() == back.keys()
    for key in original:
        assert torch.equal(original[key], back[key]), key


def _convert(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *argv],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))


def test_bad_inputs_are_one_line_and_write_nothing(imported, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir, ckpt, _ = imported["mixtral"]
    cases = {}
    for name, change in {"model_type": {"model_type": "gpt_bigcode"}, "sliding": {"sliding_window": 0},
                         "gelu": {"hidden_act": "gelu"}, "vocab": {"vocab_size": VOCAB + 1}}.items():
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads(open(os.path.join(hf_dir, "config.json")).read())
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        os.link(os.path.join(hf_dir, "model.safetensors"), d / "model.safetensors")
        cases[name] = d
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, edit in {"missing": lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"),
                       "extra": lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.zeros(32))}.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
        t = dict(tensors)
        edit(t)
        save_file(t, str(d / "model.safetensors"))
        cases[name] = d
    expect = {"model_type": "model_type 'gpt_bigcode'", "sliding": "sliding_window 0", "gelu": "hidden_act 'gelu'",
              "vocab": "vocabulary mismatch", "missing": "experts.3.w2.weight is missing", "extra": "o_proj.bias"}
    for name, d in cases.items():
        save = tmp_path / f"out_{name}"
        with pytest.raises(ValueError) as err:
            hf_io.import_hf(str(d), str(save))
        assert expect[name] in str(err.value) and "\n" not in str(err.value), name
        assert not save.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")], name

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    r = _convert("import-hf", "--hf-dir", hf_dir, "--save", str(busy))     # the tool: one line, exit 2
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="not empty"):
        hf_io.export_hf(ckpt, str(busy))
    assert os.listdir(busy) == ["mine.txt"] and (busy / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="exports as mixtral"):
        hf_io.export_hf(ckpt, str(tmp_path / "as_llama"), architecture="llama")


def _saved_model(flags: dict):
    """The ModelConfig of a checkpoint saved with these flags (the parser's defaults for the others), as
    training/checkpoint.py saved_model_config upgrades a checkpoint that predates the saved ModelConfig."""
    from megatron_ted.config.from_flags import model_config_from_flags
    from megatron_ted.training.arguments import flag_defaults

    return model_config_from_flags({**flag_defaults(), "hidden_size": 32, "ffn_hidden_size": 64,
                                    "max_position_embeddings": 16, "padded_vocab_size": 128, "kv_lora_rank": 8,
                                    **flags})


def test_a_model_no_hf_architecture_expresses_is_refused(tmp_path):
    from megatron_ted.interop.hf_export import architecture_for

    base = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, disable_bias_linear=True,
                num_layers=2, num_attention_heads=4, num_experts=4, moe_layer_freq=1, moe_router_topk=2)
    assert architecture_for(_saved_model(base)) == "mixtral"
    for change, word in ((dict(position_embedding_type="learned"), "learned absolute positions"),
                         (dict(normalization="LayerNorm"), "LayerNorm"), (dict(mlp_type="residual"), "Residual MoE"),
                         (dict(num_experts=[4, 8]), "per-layer expert counts"),
                         (dict(moe_shared_expert_intermediate_size=16), "glm4_moe's router is sigmoid")):
        with pytest.raises(ValueError, match=word):
            architecture_for(_saved_model({**base, **change}))


@pytest.mark.parametrize("name,change,field", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=0), "sliding_window 0"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "chunked_attention"]),
     "layer_types ['chunked_attention']"),
    ("qwen3_moe", dict(attention_bias=True), "attention_bias"),
    ("qwen3_moe", dict(norm_topk_prob=True, num_experts_per_tok=1), "num_experts_per_tok 1"),
    ("llama", dict(rope_parameters=dict(LLAMA3, low_freq_factor=2.0)), "low_freq_factor"),
    ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "rope type 'dynamic'"),
    ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor"),
    ("deepseek_v3", dict(rope_parameters=dict(YARN, truncate=False)), "truncate"),
    ("deepseek_v3", dict(rope_parameters=dict(YARN, mscale=0.0)), "mscale_all_dim without mscale"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
    ("deepseek_v3", dict(topk_method="group_limited_greedy"), "topk_method"),
    ("deepseek_v3", dict(norm_topk_prob=False), "norm_topk_prob false"),
    ("deepseek_v3", dict(num_experts_per_tok=2), "topk_group 2 != 2"),
    ("deepseek_v3", dict(n_shared_experts=0), "n_shared_experts 0"),
    ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob true"),
    ("deepseek_v2", dict(scoring_func="sigmoid"), "scoring_func 'sigmoid'"),
    ("mixtral", dict(mlp_bias=True), "mlp_bias"),
    ("glm4_moe", dict(norm_topk_prob=False), "norm_topk_prob false"),
    ("glm4_moe", dict(num_experts_per_tok=2), "topk_group 2 != 2"),
    ("glm4_moe", dict(n_shared_experts=0), "n_shared_experts 0"),
    ("qwen3", dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_hf_fields_are_refused_by_name(name, change, field):
    from megatron_ted.interop.hf_config import flags_from_hf

    model_type, arch = ARCHS[name]
    cfg = {**COMMON, **arch, **change, "model_type": model_type}
    with pytest.raises(ValueError, match=re.escape(field)) as err:
        flags_from_hf(cfg)
    assert "\n" not in str(err.value) and f"({model_type})" in str(err.value)


def test_export_refuses_what_the_inferred_architecture_cannot_express():
    from megatron_ted.interop.hf_export import architecture_for

    dense = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, disable_bias_linear=True,
                 num_layers=2, num_attention_heads=4)
    moe = dict(dense, num_experts=4, moe_layer_freq=1, moe_router_topk=2)
    mla = dict(moe, multi_latent_attention=True, moe_router_score_function="sigmoid", moe_ffn_hidden_size=16,
               moe_router_enable_expert_bias=True, moe_shared_expert_intermediate_size=32, moe_layer_freq=[0, 1])
    gated = dict(moe, moe_shared_expert_intermediate_size=8, moe_shared_expert_gate=True)
    glm = dict(mla, multi_latent_attention=False, moe_shared_expert_intermediate_size=16, rotary_percent=0.5,
               group_query_attention=True, num_query_groups=2, add_qkv_bias=True, qk_layernorm=True)
    models = (dense, dict(dense, add_qkv_bias=True), dict(dense, qk_layernorm=True), moe, dict(moe, qk_layernorm=True),
              gated, mla, glm)
    assert [architecture_for(_saved_model(a)) for a in models] == ["llama", "qwen2", "qwen3", "mixtral", "qwen3_moe",
                                                                   "qwen2_moe", "deepseek_v3", "glm4_moe"]
    for args, word in ((dict(dense, qk_layernorm=True, add_qkv_bias=True), "--qk-layernorm and --add-qkv-bias"),
                       (dict(moe, moe_router_pre_softmax=True), "exports as mixtral"),
                       (dict(moe, moe_router_score_function="sigmoid"), "without --moe-router-enable-expert-bias "
                                                                        "(glm4_moe"),
                       (dict(moe, moe_router_enable_expert_bias=True), "glm4_moe's router is sigmoid"),
                       (dict(moe, rotary_percent=0.5), "--rotary-percent 0.5 (partial rotary) in mixtral"),
                       (dict(glm, moe_layer_freq=[1, 0]), "MoE layers [0]"),
                       (dict(glm, window_size=(3, 0)), "glm4_moe has no sliding window"),
                       (dict(mla, moe_layer_freq=[1, 0]), "MoE layers [0]"),
                       (dict(mla, moe_router_score_function="softmax"), "softmax router"),
                       (dict(mla, moe_router_enable_expert_bias=False), "e_score_correction_bias"),
                       (dict(mla, moe_shared_expert_intermediate_size=24), "multiple of --moe-ffn-hidden-size"),
                       (dict(mla, moe_router_num_groups=2, moe_router_group_topk=2), "deepseek_v3 scores a group")):
        with pytest.raises(ValueError, match=re.escape(word)):
            architecture_for(_saved_model(args))


def test_export_writes_the_sliding_window_or_refuses_layers_the_architecture_cannot_say():
    from megatron_ted.interop.hf_export import architecture_for, hf_config_json

    dense = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, disable_bias_linear=True,
                 num_layers=2, num_attention_heads=4, window_size=(3, 0))
    model = _saved_model(dense)
    assert architecture_for(model) == "mistral"   # llama has no sliding window
    assert hf_config_json(model, "mistral", VOCAB, "float32", {})["sliding_window"] == 4   # 3 earlier + itself
    qwen2 = _saved_model(dict(dense, add_qkv_bias=True, window_attn_skip_freq=(0, 1)))
    cfg = hf_config_json(qwen2, architecture_for(qwen2), VOCAB, "float32", {})
    assert (cfg["use_sliding_window"], cfg["sliding_window"], cfg["max_window_layers"]) == (True, 4, 1)
    for args, word in ((dict(dense, window_attn_skip_freq=2), "mistral windows every layer"),
                       (dict(dense, add_qkv_bias=True, window_attn_skip_freq=(1, 0)), "windowed layers [0]")):
        with pytest.raises(ValueError, match=re.escape(word)):
            architecture_for(_saved_model(args))


def test_import_streams_one_tensor_at_a_time_in_the_checkpoint_format(tmp_path):
    """A 12-layer llama: the import's peak of torch allocations stays far below the model's bytes (it
    never holds the model), and what it wrote is what save_checkpoint writes of the same model: the
    checkpoint loaded into a built model and saved again has the same metadata and bit-identical tensors."""
    from megatron_ted.model.builder import build_model
    from megatron_ted.parallel.groups import ParallelGroups
    from megatron_ted.training.checkpoint import load_checkpoint, saved_model_config, save_checkpoint
    from megatron_ted.training.measured_memory import allocation_levels

    model = _hf_model("llama", num_hidden_layers=12)
    model.save_pretrained(tmp_path / "hf")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    # safe_open maps each file as one torch storage (file-backed pages, read lazily): the profiler counts
    # the mapping as allocated; those bytes are the file's, not the import's working memory
    mapped = sum(os.path.getsize(p) for p in (tmp_path / "hf").glob("*.safetensors"))
    _, _, peak = allocation_levels(lambda: hf_io.import_hf(str(tmp_path / "hf"), str(tmp_path / "ours")))
    assert peak - mapped < total / 3, (peak, mapped, total)

    directory = find_checkpoint(str(tmp_path / "ours"))
    meta = read_metadata(directory)
    built = build_model(saved_model_config(meta, directory), ParallelGroups.single()).double()
    load_checkpoint(directory, built, None, ParallelGroups.single(), load_rng=False, restore_rng=False)
    save_checkpoint(str(tmp_path / "resaved"), 0, built, None, ParallelGroups.single(), meta["args"], rng=False,
                    extra=meta["extra"])
    again = read_metadata(find_checkpoint(str(tmp_path / "resaved")))
    for key in set(meta) - {"saved_at", "tensors"}:
        assert meta[key] == again[key], key
    assert {k: (v["shape"], v["dtype"]) for k, v in meta["tensors"].items()} == \
        {k: (v["shape"], v["dtype"]) for k, v in again["tensors"].items()}
    ours, resaved = _read_all(str(tmp_path / "ours")), _read_all(str(tmp_path / "resaved"))
    assert ours.keys() == resaved.keys() and all(torch.equal(ours[k], resaved[k]) for k in ours)


# ---- real config.json files, every field kept, sizes shrunk --------------------------------------
# Each entry mirrors the config.json of a public model: its fields and values as published, except
# the sizes (hidden 32, 3 layers, 4 heads, vocabulary VOCAB, 64 positions, few experts), and the RoPE
# context lengths scaled with them. Old-style keys stay as the files have them (rope_scaling with
# "type", torch_dtype, pretraining_tp); None: imports and computes transformers' logits.
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=64)
_HF = dict(hidden_act="silu", initializer_range=0.02, use_cache=True, tie_word_embeddings=False,
           torch_dtype="bfloat16")
LLAMA2 = dict(_HF, model_type="llama", architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2,
              num_key_value_heads=4, pretraining_tp=1, rms_norm_eps=1e-5, rope_scaling=None, torch_dtype="float16")
LLAMA31 = dict(_HF, model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False,
               attention_dropout=0.0, bos_token_id=128000, eos_token_id=[128001, 128008, 128009], mlp_bias=False,
               num_key_value_heads=2, pretraining_tp=1, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192, rope_type="llama3"))
MISTRAL = dict(_HF, model_type="mistral", architectures=["MistralForCausalLM"], bos_token_id=1, eos_token_id=2,
               num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=8)
MIXTRAL = dict(_HF, model_type="mixtral", architectures=["MixtralForCausalLM"], attention_dropout=0.0,
               bos_token_id=1, eos_token_id=2, num_experts_per_tok=2, num_key_value_heads=2, num_local_experts=4,
               output_router_logits=False, rms_norm_eps=1e-5, rope_theta=1e6, router_aux_loss_coef=0.02,
               sliding_window=None)
QWEN2 = dict(_HF, model_type="qwen2", architectures=["Qwen2ForCausalLM"], attention_dropout=0.0,
             bos_token_id=151643, eos_token_id=151643, max_window_layers=28, num_key_value_heads=2,
             rms_norm_eps=1e-6, rope_theta=1e6, sliding_window=131072, use_sliding_window=False)
QWEN2_MOE = dict(QWEN2, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], max_window_layers=21,
                 num_key_value_heads=4, sliding_window=32768, decoder_sparse_step=1, moe_intermediate_size=16,
                 shared_expert_intermediate_size=48, num_experts_per_tok=4, num_experts=6, norm_topk_prob=False,
                 output_router_logits=False, router_aux_loss_coef=0.001)
QWEN3_MOE = dict(_HF, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], attention_bias=False,
                 attention_dropout=0.0, bos_token_id=151643, decoder_sparse_step=1, eos_token_id=151645, head_dim=12,
                 max_window_layers=48, mlp_only_layers=[], moe_intermediate_size=16, norm_topk_prob=True,
                 num_experts=8, num_experts_per_tok=4, num_key_value_heads=2, output_router_logits=False,
                 rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1e6, router_aux_loss_coef=0.001,
                 sliding_window=None, use_sliding_window=False)
QWEN3 = dict(_HF, model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False, attention_dropout=0.0,
             bos_token_id=151643, eos_token_id=151645, head_dim=12, max_window_layers=28, num_key_value_heads=2,
             rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1e6, sliding_window=None, tie_word_embeddings=True,
             use_sliding_window=False)
DEEPSEEK_V2_LITE = dict(
    _HF, model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], attention_bias=False,
    attention_dropout=0.0, aux_loss_alpha=0.001, bos_token_id=100000, eos_token_id=100001, first_k_dense_replace=1,
    kv_lora_rank=12, moe_intermediate_size=16, moe_layer_freq=1, n_group=1, n_routed_experts=8, n_shared_experts=2,
    norm_topk_prob=False, num_experts_per_tok=3, num_key_value_heads=4, pretraining_tp=1, q_lora_rank=None,
    qk_nope_head_dim=8, qk_rope_head_dim=6, rms_norm_eps=1e-6, rope_theta=10000, routed_scaling_factor=1.0,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=0.707, mscale_all_dim=0.707,
                      original_max_position_embeddings=16, type="yarn"),
    scoring_func="softmax", seq_aux=True, topk_group=1, topk_method="greedy", v_head_dim=10)
DEEPSEEK_V3 = dict(
    DEEPSEEK_V2_LITE, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], bos_token_id=0,
    eos_token_id=1, ep_size=1, n_group=4, n_routed_experts=16, n_shared_experts=1, norm_topk_prob=True,
    num_experts_per_tok=4, num_nextn_predict_layers=1, q_lora_rank=16, routed_scaling_factor=2.5,
    rope_scaling=dict(DEEPSEEK_V2_LITE["rope_scaling"], mscale=1.0, mscale_all_dim=1.0), scoring_func="sigmoid",
    topk_group=2, topk_method="noaux_tc")
GLM45_AIR = dict(   # pad_token_id 151329 as published is no row of a 100-token vocabulary: transformers'
    _HF, model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"],   # nn.Embedding refuses it; 99 here
    attention_bias=True, attention_dropout=0.0, pad_token_id=99, eos_token_id=[151329, 151336, 151338], head_dim=12,
    partial_rotary_factor=0.5, moe_intermediate_size=16, norm_topk_prob=True, n_group=1, topk_group=1,
    n_routed_experts=8, n_shared_experts=1, routed_scaling_factor=1.0, num_experts_per_tok=4, first_k_dense_replace=1,
    num_key_value_heads=2, rms_norm_eps=1e-5, rope_scaling=None, rope_theta=1e6, num_nextn_predict_layers=1,
    use_qk_norm=False)
REAL = {
    "Llama-2-7b-hf": (LLAMA2, None),
    "Llama-3.1-8B": (LLAMA31, None),
    "Llama-3.2-1B": (dict(LLAMA31, head_dim=8, tie_word_embeddings=True,
                          rope_scaling=dict(LLAMA31["rope_scaling"], factor=32.0)), None),
    "Mistral-7B-v0.1": (MISTRAL, None),   # 4096 of 32768 positions: the window (8 < IDS' 12) binds
    "Mistral-7B-v0.1, window = context": (dict(MISTRAL, sliding_window=64), None),   # can never bind
    "Mistral-7B-v0.3": (dict(MISTRAL, rope_theta=1e6, sliding_window=None), None),
    "Mistral-Nemo-Base-2407": (dict(MISTRAL, rope_theta=1e6, sliding_window=None, head_dim=12), None),
    "Mixtral-8x7B-v0.1": (MIXTRAL, None),
    "Qwen2-7B": (QWEN2, None),
    "Qwen2-7B, use_sliding_window": (dict(QWEN2, use_sliding_window=True, sliding_window=5, max_window_layers=1), None),
    "Qwen2.5-0.5B": (dict(QWEN2, tie_word_embeddings=True, max_window_layers=21, sliding_window=32768), None),
    "Qwen2.5-7B-Instruct + YaRN": (dict(QWEN2, rope_scaling=dict(factor=4.0, original_max_position_embeddings=16,
                                                                 type="yarn")), None),   # its model card's rope
    "Qwen1.5-MoE-A2.7B": (QWEN2_MOE, None),
    "Qwen2-57B-A14B": (dict(QWEN2_MOE, num_key_value_heads=2, shared_expert_intermediate_size=40, num_experts=8,
                            max_window_layers=28, sliding_window=131072), None),
    "Qwen3-0.6B": (QWEN3, None),
    "Qwen3-8B": (dict(QWEN3, max_window_layers=36, tie_word_embeddings=False), None),
    "Qwen3-8B, use_sliding_window": (dict(QWEN3, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                          tie_word_embeddings=False), None),   # layers 1, 2 windowed
    "Qwen3-0.6B, head_dim omitted": ({k: v for k, v in QWEN3.items() if k != "head_dim"}, None),   # 128 (its default)
    "Qwen3-30B-A3B": (QWEN3_MOE, None),
    "GLM-4.5-Air": (GLM45_AIR, None),
    "GLM-4.5": (dict(GLM45_AIR, n_routed_experts=10, routed_scaling_factor=2.5, use_qk_norm=True,
                     first_k_dense_replace=2), None),   # 160 experts, 3 of 92 layers dense
    "GLM-4.5-Air, partial_rotary_factor omitted": ({k: v for k, v in GLM45_AIR.items()
                                                   if k != "partial_rotary_factor"}, None),   # 0.5 (its default)
    "OLMoE-1B-7B-0924": (dict(_HF, model_type="olmoe", architectures=["OlmoeForCausalLM"], attention_bias=False,
                              attention_dropout=0.0, clip_qkv=None, eos_token_id=50279, pad_token_id=1,
                              norm_topk_prob=False, num_experts=8, num_experts_per_tok=4, num_key_value_heads=4,
                              output_router_logits=False, rms_norm_eps=1e-5, rope_scaling=None, rope_theta=10000.0,
                              router_aux_loss_coef=0.01, torch_dtype="float32"), None),
    "DeepSeek-V2-Lite": (DEEPSEEK_V2_LITE, None),
    "DeepSeek-V2, k // topk_group = 1": (dict(DEEPSEEK_V2_LITE, q_lora_rank=16, n_group=4, topk_group=2,
                                              topk_method="group_limited_greedy", routed_scaling_factor=16.0), None),
    "DeepSeek-V2": (dict(DEEPSEEK_V2_LITE, q_lora_rank=16, n_group=4, topk_group=3, num_experts_per_tok=6,
                         topk_method="group_limited_greedy", routed_scaling_factor=16.0), None),   # k 6 of 3 groups
    "DeepSeek-V3": (DEEPSEEK_V3, None),
    "DeepSeek-V3 fp8": (dict(DEEPSEEK_V3, quantization_config=dict(activation_scheme="dynamic", fmt="e4m3",
                                                                   quant_method="fp8", weight_block_size=[128, 128])),
                        "quantization_config (fp8"),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_json_imports_with_hugging_face_logits_or_is_refused_by_name(tmp_path, name):
    """A config.json as published (fields, old-style keys, token ids outside the tiny vocabulary) in a
    directory with transformers' random weights of it: the import computes transformers' logits, or
    refuses in one line naming the field and writes nothing."""
    raw, refused = REAL[name]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({**raw, **TINY}))
    if refused:
        with pytest.raises(ValueError, match=re.escape(refused)) as err:
            hf_io.import_hf(str(hf_dir), str(tmp_path / "ours"))
        assert "\n" not in str(err.value) and not (tmp_path / "ours").exists()
        return
    torch.manual_seed(0)
    model = _away_from_init(transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(str(hf_dir)), experts_implementation="eager").double().eval(),
        biases=False)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "saved")   # its weights beside the config.json as published
    for f in (tmp_path / "saved").glob("model*.safetensors*"):
        os.link(f, hf_dir / f.name)
    hf_io.import_hf(str(hf_dir), str(tmp_path / "ours"))
    with torch.no_grad():
        assert _rel(expected, load_model(str(tmp_path / "ours"), dtype=torch.float64)(IDS)) < 1e-6


@pytest.mark.parametrize("config_class", ["MixtralConfig", "Glm4MoeConfig", "LlamaConfig", "Qwen3Config"])
def test_an_omitted_rms_norm_eps_takes_transformers_default(config_class):
    """config.json may leave rms_norm_eps out; transformers then uses its config class's default
    (1e-5 for Mixtral and GLM-4.5, 1e-6 for Llama and Qwen3), and so must the import."""
    from megatron_ted.interop.hf_config import flags_from_hf
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128)
    default = getattr(transformers, config_class)(**small)
    cfg = {k: v for k, v in default.to_dict().items() if k != "rms_norm_eps"}
    flags = flags_from_hf(cfg)
    assert float(flags[flags.index("--layernorm-epsilon") + 1]) == default.rms_norm_eps
