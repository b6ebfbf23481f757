"""Megatron-LM and Megatron-DeepSpeed launch flags: aliases, layer patterns, run lengths in samples
and tokens, tokenizers, the no-effect / refused tables, and two scaled-down launch scripts."""
import json
import os
import re
import subprocess
import sys

import pytest

from megatron_ted.data.tokenizer import build_tokenizer
from megatron_ted.model.builder import moe_layer_indices
from megatron_ted.model.layer_pattern import moe_layer_freq, parse_layer_pattern
from megatron_ted.training.arguments import parse_args
from megatron_ted.training.lr_schedule import learning_rate
from multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--mock-data", "--vocab-size", "100", "--num-layers", "4", "--hidden-size", "16", "--num-attention-heads", "2",
        "--seq-length", "16", "--micro-batch-size", "2"]


def parse(*extra, world_size=1):
    return parse_args(BASE + [str(x) for x in extra], world_size=world_size)


@pytest.mark.parametrize("extra,dest,value", [
    (["--moe-expert-parallel-size", "2"], "expert_model_parallel_size", 2),
    (["--moe-loss-coeff", "0.03"], "moe_aux_loss_coeff", 0.03),
    (["--moe-train-capacity-factor", "1.25"], "moe_expert_capacity_factor", 1.25),
    (["--moe-train-capacity-factor", "1.25", "--disable-moe-token-dropping"], "moe_expert_capacity_factor", None),
    (["--moe-eval-capacity-factor", "2.0"], "moe_eval_capacity_factor", 2.0),
    (["--moe-min-capacity", "7"], "moe_min_capacity", 7),
    (["--checkpoint-activations"], "recompute_granularity", "full"),
    (["--num-workers", "3"], "num_workers", 3),
    (["--tensorboard-queue-size", "5"], "tensorboard_queue_size", 5),
    (["--distributed-timeout-minutes", "3"], "distributed_timeout_minutes", 3),
    (["--exit-duration-in-mins", "1.5"], "exit_duration_in_mins", 1.5),
    (["--num-experts", "2", "4"], "num_experts", [2, 4]),        # Megatron-DeepSpeed: one count per MoE layer
    # DeepSpeed's drop_tokens=False: no capacity at evaluation either
    (["--moe-eval-capacity-factor", "1.0", "--disable-moe-token-dropping"], "moe_eval_capacity_factor", None),
    (["--recompute-activations"], "recompute_granularity", "selective"),          # Megatron-LM's older name
    (["--use-rotary-position-embeddings"], "position_embedding_type", "rope"),
    (["--normalization", "rmsnorm"], "normalization", "RMSNorm"),
    (["--normalization", "layernorm"], "normalization", "LayerNorm"),
    (["--num-key-value-heads", "1"], "num_query_groups", 1),                     # GQA, Megatron-DeepSpeed's name
    (["--zero-stage", "1"], "use_distributed_optimizer", True),                  # ZeRO-1: optimizer states partitioned
    (["--zero-stage", "0"], "use_distributed_optimizer", False),
    # megatron-core ignores pre-softmax with sigmoid scores (it renormalises the chosen scores)
    (["--moe-router-score-function", "sigmoid", "--moe-router-pre-softmax"], "moe_router_pre_softmax", False),
])
def test_megatron_deepspeed_aliases_set_our_flags(extra, dest, value):
    args = parse("--num-experts", "4", *extra, world_size=2)
    assert getattr(args, dest) == value


def test_alias_defaults_do_not_clobber_ours():
    args = parse("--expert-model-parallel-size", "2", "--num-experts", "2", world_size=2)
    assert args.expert_model_parallel_size == 2 and args.recompute_granularity is None


@pytest.mark.parametrize("spelling,learned,positions", [
    ("learned_absolute", "learned", True), ("none", "learned", False), ("rope", "rope", True)])
def test_megatron_lm_position_embedding_spellings(spelling, learned, positions):
    """Megatron-LM writes learned_absolute (our learned) and none (no position embedding at all)."""
    args = parse("--position-embedding-type", spelling)
    assert (args.position_embedding_type, args.add_position_embedding) == (learned, positions)


# Megatron-DeepSpeed's ParallelTransformer: layer number n (1-based) has experts when
# n % expert_interval == 0; --topk defaults to 1 and --expert-interval to 2 there.
@pytest.mark.parametrize("extra,topk,moe_layers", [
    ([], 2, (0, 2)),                                           # our defaults: top-2, --moe-layer-freq 2
    (["--moe-loss-coeff", "0.01"], 1, (1, 3)),                 # a Megatron-DeepSpeed script: its defaults
    (["--moe-expert-parallel-size", "1"], 1, (1, 3)),
    (["--deepspeed"], 1, (1, 3)),
    (["--topk", "2", "--expert-interval", "3"], 2, (2,)),      # layer numbers 3 (of 4)
    (["--expert-interval", "1"], 1, (0, 1, 2, 3)),
    (["--moe-loss-coeff", "0.01", "--moe-router-topk", "2", "--moe-layer-freq", "2"], 2, (0, 2)),  # given wins
])
def test_megatron_deepspeed_topk_and_expert_interval(extra, topk, moe_layers):
    args = parse("--num-experts", "2", *extra)
    assert args.moe_router_topk == topk
    assert moe_layer_indices(args.num_layers, args.moe_layer_freq) == moe_layers


# Megatron-DeepSpeed's argument defaults (its megatron/arguments.py): --moe-train-capacity-factor 1.0,
# --moe-eval-capacity-factor 1.0, --moe-loss-coeff 0.1; Megatron-LM's: --moe-expert-capacity-factor
# None (dropless), --moe-aux-loss-coeff 0.0.
@pytest.mark.parametrize("extra,train_cf,eval_cf,aux", [
    ([], None, None, 0.0),                                                    # a Megatron-LM script
    (["--deepspeed"], 1.0, 1.0, 0.1),                                         # a Megatron-DeepSpeed one
    (["--deepspeed", "--disable-moe-token-dropping"], None, None, 0.1),
    (["--deepspeed", "--moe-train-capacity-factor", "2", "--moe-loss-coeff", "0.01"], 2.0, 1.0, 0.01),
    (["--deepspeed", "--moe-router-type", "expert_choice"], None, None, 0.0),  # not its gate: not its defaults
])
def test_megatron_deepspeed_scripts_get_its_capacity_and_aux_loss_defaults(extra, train_cf, eval_cf, aux):
    args = parse("--num-experts", "2", *extra)
    assert (args.moe_expert_capacity_factor, args.moe_eval_capacity_factor, args.moe_aux_loss_coeff) == \
        (train_cf, eval_cf, aux)
    if extra == ["--deepspeed"]:   # the start-up line says so
        assert "--moe-loss-coeff 0.1, --moe-train-capacity-factor 1, --moe-eval-capacity-factor 1" in \
            args.moe_defaults_from


@pytest.mark.parametrize("extra,needle", [
    (["--topk", "1", "--moe-router-topk", "2"], "--topk 1 and --moe-router-topk 2 disagree"),
    (["--expert-interval", "2", "--moe-layer-freq", "2"], "--expert-interval 2 and --moe-layer-freq 2 both"),
    (["--expert-interval", "5"], "--expert-interval 5 is more than --num-layers 4"),
    (["--expert-interval", "0"], "--expert-interval 0 must be >= 1"),
])
def test_megatron_deepspeed_layout_conflicts_are_one_line(extra, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        parse("--num-experts", "2", *extra)


@pytest.mark.parametrize("text,layers,expected", [
    ("([0]+[1]*3)", 4, (1, 2, 3)),
    ("[0,1,1,1]", 4, (1, 2, 3)),
    ("[1,0]*2", 4, (0, 2)),
    ("2*[0,1]", 4, (1, 3)),
    ("([1]*2+[0]*1)+[1]", 4, (0, 1, 3)),
    ("2", 5, (0, 2, 4)),        # Megatron's int: layer i is MoE when i % N == 0
    ("1", 3, (0, 1, 2)),
])
def test_layer_patterns(text, layers, expected):
    assert moe_layer_indices(layers, moe_layer_freq(text, layers)) == expected


@pytest.mark.parametrize("text", ["[0,2,1,1]", "eval('x')", "[0,1,1]", "[0,1]+1", "[0,1,1,1", "__import__('os')",
                                  "[0,1]*[2]", "[0]*4", "0", "[0,1,1,1];1"])
def test_bad_layer_patterns_are_one_line(text):
    with pytest.raises(ValueError) as err:
        parse("--num-experts", "2", "--moe-layer-freq", text)
    assert "--moe-layer-freq" in str(err.value) and "\n" not in str(err.value)


def test_parser_handles_nesting_without_eval():
    assert parse_layer_pattern("(([0]+[1])*2)") == [0, 1, 0, 1]


def test_a_pattern_reaches_the_counts_and_flops():
    """Dense first layer: one MoE MLP (2 experts of FFN 4 plus the router) becomes a dense MLP of
    FFN 16 in layer 0. Hidden 8, no biases: dense 2*8*16, experts 2*(2*8*4), router 2*8."""
    from megatron_ted.planning.param_count import count_parameters
    from megatron_ted.config.from_flags import configs_from_args
    from megatron_ted.planning.flops import flops_per_token_of_model
    flags = ["--num-experts", "2", "--hidden-size", "8", "--ffn-hidden-size", "16", "--moe-ffn-hidden-size", "4",
             "--disable-bias-linear"]
    every = parse(*flags, "--moe-layer-freq", "1")
    first_dense = parse(*flags, "--moe-layer-freq", "([0]+[1]*3)")
    for a in (every, first_dense):
        a.padded_vocab_size = 128
    models = [configs_from_args(a).model for a in (every, first_dense)]
    n = [count_parameters(m.gpt, m.moe).total for m in models]
    assert n[1] - n[0] == 2 * 8 * 16 - (2 * (2 * 8 * 4) + 2 * 8)
    f = [flops_per_token_of_model(m, every.seq_length) for m in models]
    # forward x3: the dense MLP 2*2*8*16 replaces top-2 experts 2*(2*2*8*4) and the router 2*8*2
    assert f[1] - f[0] == 3 * (2 * 2 * 8 * 16 - 2 * (2 * 2 * 8 * 4) - 2 * 8 * 2)


@pytest.mark.parametrize("extra,iters,warmup,decay", [
    (["--train-samples", "64", "--global-batch-size", "8"], 8, 0, 8),
    (["--train-samples", "68", "--global-batch-size", "8"], 8, 0, 8),            # floor, as Megatron-LM
    (["--train-samples", "64", "--global-batch-size", "8", "--lr-warmup-samples", "16",
      "--lr-decay-samples", "48"], 8, 2, 6),
    (["--train-samples", "64", "--global-batch-size", "8", "--lr-warmup-samples", "12"], 8, 1.5, 8),
    (["--train-iters", "8", "--lr-warmup-fraction", "0.25"], 8, 2, 8),
    (["--train-iters", "10", "--lr-decay-iters", "8", "--lr-warmup-fraction", "0.5"], 10, 4, 8),
    # tokens: 8 samples x 16 tokens = 128 per iteration
    (["--global-batch-size", "8", "--train-tokens", "1000"], 8, 0, 8),            # ceil(7.8)
    (["--global-batch-size", "8", "--train-tokens", "1000", "--train-iters", "5"], 5, 0, 5),
    (["--global-batch-size", "8", "--train-samples", "1024", "--train-tokens", "1024",
      "--lr-decay-tokens", "512", "--lr-warmup-tokens", "192"], 8, 1.5, 4),
    ([], 100, 0, 100),
])
def test_run_length_in_samples_and_tokens(extra, iters, warmup, decay):
    args = parse(*extra)
    assert (args.train_iters, args.lr_warmup_iters, args.lr_decay_iters) == (iters, warmup, decay)


def test_fractional_warmup_never_exceeds_the_peak():
    # 12 warm-up samples at 8 per iteration: 8/12 of the peak after the first step, the peak after the second
    assert learning_rate(0, 1.0, 0.0, 1.5, 8) == pytest.approx(8 / 12)
    assert learning_rate(1, 1.0, 0.0, 1.5, 8) == pytest.approx(1.0)


@pytest.mark.parametrize("extra,flag", [
    (["--train-iters", "4", "--train-samples", "64"], "--train-samples"),
    (["--train-samples", "64", "--lr-decay-iters", "4"], "--lr-decay-iters"),
    (["--train-samples", "64", "--lr-warmup-iters", "2"], "--lr-warmup-iters"),
    (["--lr-warmup-samples", "16"], "--lr-warmup-samples"),
    (["--lr-decay-samples", "16"], "--lr-decay-samples"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "--lr-warmup-fraction"),
    (["--lr-decay-tokens", "100", "--lr-decay-iters", "2"], "--lr-decay-tokens"),
    (["--train-samples", "1", "--global-batch-size", "2"], "--train-samples"),
])
def test_exclusive_run_lengths_are_one_line(extra, flag):
    with pytest.raises(ValueError) as err:
        parse(*extra)
    assert flag in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("extra,flag", [
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size"),
    (["--context-parallel-size", "2"], "--context-parallel-size"),
    (["--fp8", "hybrid"], "--fp8"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], "--num-layers-per-virtual-pipeline-stage"),
    (["--moe-token-dispatcher-type", "flex"], "--moe-token-dispatcher-type"),
    (["--transformer-impl", "inference_optimized"], "--transformer-impl"),
    (["--data-impl", "lazy"], "--data-impl"),
    (["--expert-tensor-parallel-size", "2"], "--expert-tensor-parallel-size"),
])
def test_features_we_lack_stop_with_one_line(extra, flag, capsys):
    from megatron_ted.launch.pretrain import main
    assert main(BASE + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + flag), err


def test_size_one_is_accepted_and_no_effect_flags_are_listed():
    args = parse("--pipeline-model-parallel-size", "1", "--context-parallel-size", "1", "--use-mcore-models",
                 "--transformer-impl", "local", "--moe-token-dispatcher-type", "alltoall", "--no-rope-fusion")
    listed = [n.split()[0] for n in args.accepted_no_effect]
    assert listed == ["--use-mcore-models", "--transformer-impl", "--moe-token-dispatcher-type", "--no-rope-fusion"]
    assert parse().accepted_no_effect == []


# ---- tokenizers ---------------------------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog"


def _sentencepiece_model(tmp_path) -> str:
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([TEXT, "a lazy dog sleeps", "quick foxes jump high", "brown dogs and red foxes"] * 5))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    return str(tmp_path / "sp.model")


def _gpt2_files(tmp_path) -> tuple[str, str]:
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([TEXT] * 3, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok.save_model(str(tmp_path))
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def _hf_dir(tmp_path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "hf"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return str(d)


def test_llama2_tokenizer_prepends_bos_and_round_trips(tmp_path):
    tok = build_tokenizer("Llama2Tokenizer", _sentencepiece_model(tmp_path))
    ids = tok.tokenize(TEXT)
    assert ids[0] == 1 and tok.eod == 2 and tok.vocab_size == 40
    assert tok.detokenize(ids[1:]) == TEXT


def test_gpt2_bpe_tokenizer_round_trips_and_is_the_default_with_a_vocab_file(tmp_path):
    vocab, merges = _gpt2_files(tmp_path)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    with open(vocab) as f:
        table = json.load(f)
    assert tok.eod == table["<|endoftext|>"] and tok.vocab_size == len(table)
    ids = tok.tokenize(TEXT)
    assert len(ids) < len(TEXT.split()) * 2 and tok.detokenize(ids) == TEXT   # merged words, exact text back
    args = parse_args(["--mock-data", "--vocab-file", vocab, "--merge-file", merges], world_size=1)
    assert args.tokenizer_type == "GPT2BPETokenizer"
    with pytest.raises(ValueError, match="--merge-file"):
        parse_args(["--mock-data", "--vocab-file", vocab], world_size=1)


def test_huggingface_tokenizer_directory_round_trips(tmp_path):
    tok = build_tokenizer("HuggingFaceTokenizer", _hf_dir(tmp_path))
    ids = tok.tokenize(TEXT)
    assert ids[0] == 1 and tok.eod == 2   # BOS from the tokenizer's own post-processor; EOS from its config
    assert tok.detokenize(ids[1:]) == TEXT


def test_preprocess_data_takes_the_gpt2_bpe_files(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ted.data.preprocess import get_args, preprocess
    vocab, merges = _gpt2_files(tmp_path)
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": TEXT}) + "\n")
    preprocess(get_args(["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
                         "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges, "--append-eod"]))
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))   # kept alive: its items view the mmap
    assert ds[0].tolist() == tok.tokenize(TEXT) + [tok.eod]


# ---- scaled-down launch scripts through the entry point -----------------------------------------

def _losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", stdout)]


def test_megatron_lm_mixtral_script(tmp_path):
    """Megatron-LM's examples/mixtral flag set, sizes scaled down to one CPU process."""
    argv = ["--use-mcore-models", "--disable-bias-linear", "--seq-length", "16", "--max-position-embeddings", "32",
            "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
            "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
            "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
            "--untie-embeddings-and-output-weights", "--no-masked-softmax-fusion",
            "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
            "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
            "--overlap-param-gather", "--overlap-grad-reduce",
            "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", _sentencepiece_model(tmp_path),
            "--mock-data", "--split", "99990,8,2",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-4", "--train-samples", "12",
            "--lr-decay-samples", "12", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5", "--weight-decay", "0.1",
            "--lr-warmup-samples", "4", "--clip-grad", "1.0",
            "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
            "--expert-model-parallel-size", "1", "--use-distributed-optimizer",
            "--log-interval", "1", "--eval-iters", "1", "--no-load-optim", "--no-load-rng", "--log-throughput"]
    env = dict(os.environ, WORLD_SIZE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *argv], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(r.stdout)) == 3 and re.search(r"iteration +3/ +3 \|", r.stdout)
    noted = [l for l in r.stdout.splitlines() if l.startswith("accepted with no effect here: ")]
    assert len(noted) == 1
    for flag in ("--use-mcore-models", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "--overlap-grad-reduce",
                 "--overlap-param-gather", "--no-masked-softmax-fusion", "--log-throughput"):
        assert flag + " (" in noted[0]


def test_megatron_deepspeed_moe_script(tmp_path):
    """The dialect of Megatron-DeepSpeed's MoE scripts (the TED paper's), two ranks with EP 2: the
    no-effect line is printed once, evaluation runs at its own capacity factor."""
    vocab, merges = _gpt2_files(tmp_path)
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-samples", "1000", "--train-tokens", "192", "--lr", "1e-3", "--min-lr", "1e-5",
            "--lr-decay-style", "cosine", "--lr-decay-tokens", "192", "--lr-warmup-tokens", "64",
            "--num-experts", "2", "--moe-expert-parallel-size", "2", "--moe-loss-coeff", "0.01",
            "--moe-train-capacity-factor", "1.0", "--moe-eval-capacity-factor", "2.0", "--moe-min-capacity", "4",
            "--mlp-type", "standard", "--create-moe-param-group", "--checkpoint-activations", "--data-impl", "mmap",
            "--num-workers", "0", "--vocab-file", vocab, "--merge-file", merges, "--mock-data", "--split", "98,2,0",
            "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--tensorboard-queue-size", "1",
            "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
            "--distributed-timeout-minutes", "5", "--deepspeed", "--hidden-dropout", "0", "--attention-dropout", "0"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "pretrain_gpt_moe.py"), *argv], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # 192 tokens / (4 samples x 16 tokens) = 3 iterations
    assert len(_losses(r.stdout)) == 3 and re.search(r"iteration +3/ +3 \|", r.stdout)
    assert "validation loss at iteration 3" in r.stdout
    assert "all-to-alls per MoE layer per micro-batch: 6" in r.stdout     # --checkpoint-activations: full recompute
    assert r.stdout.count("accepted with no effect here: ") == 1
    assert "--create-moe-param-group (" in r.stdout and "--deepspeed (" in r.stdout
    # no --topk / --expert-interval in the script: Megatron-DeepSpeed's defaults, stated at start-up
    assert " > MoE: top-1 routing, MoE layers [1] (0-based) of 2; defaults top-1, --expert-interval 2 " \
           "(Megatron-DeepSpeed's" in r.stdout, r.stdout[:3000]


# ---- --moe-eval-capacity-factor, --use-checkpoint-args, --exit-duration-in-mins -------------------

def test_eval_capacity_factor_changes_the_capacity_at_evaluation_only():
    """A tiny eval capacity drops tokens (another loss); an ample one routes as dropless; the routers
    keep their training capacity (None: dropless) after the evaluation."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from parity import global_batches, micro_batches, tiny_config, tiny_moe
    from megatron_ted.model.builder import build_gpt
    from megatron_ted.parallel.groups import ParallelGroups
    from megatron_ted.training.train import evaluate

    groups = ParallelGroups.single()
    model = build_gpt(tiny_config(), tiny_moe(min_capacity=0), groups, 3).double()
    batch = global_batches(1, 4)[0]

    def eval_loss(factor):
        mbs = [{k: v for k, v in mb.items() if k != "routing_seed"} for mb in micro_batches(batch, 0, 1, 2)]
        return evaluate(model, iter(mbs), groups, torch.device("cpu"), eval_iters=1, num_micro_batches=2,
                        eval_capacity_factor=factor)

    dropless = eval_loss(None)
    assert eval_loss(0.05) != dropless
    assert abs(eval_loss(100.0) - dropless) < 1e-12
    assert all(m.config.capacity_factor is None for m in model.modules() if hasattr(m, "config")
               and hasattr(m.config, "capacity_factor"))


def test_an_eval_capacity_factor_on_a_gate_without_capacity_stops_at_start_up():
    with pytest.raises(ValueError, match=r"--moe-eval-capacity-factor 1\.0: --moe-router-type base"):
        parse("--num-experts", "2", "--moe-router-type", "base", "--moe-router-topk", "1",
              "--moe-eval-capacity-factor", "1.0")


def _entry(argv, nproc=1):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WORLD_SIZE="1")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
         os.path.join(ROOT, "pretrain_gpt_moe.py")]
    return subprocess.run(cmd + [str(a) for a in argv], env=env, capture_output=True, text=True, timeout=300)


def test_use_checkpoint_args_takes_the_checkpoints_model_flags_and_says_so(tmp_path):
    ck = tmp_path / "ck"
    common = ["--mock-data", "--vocab-size", "100", "--num-layers", "2", "--num-attention-heads", "2",
              "--seq-length", "16", "--micro-batch-size", "2", "--eval-iters", "0", "--log-interval", "1"]
    r = _entry(common + ["--hidden-size", "16", "--num-experts", "2", "--train-iters", "1", "--save", ck])
    assert r.returncode == 0, r.stderr[-3000:]
    resume = common + ["--hidden-size", "32", "--num-experts", "4", "--train-iters", "2", "--load", ck]
    r = _entry(resume)                                  # the command line's shapes do not fit the checkpoint
    assert r.returncode != 0
    r = _entry(resume + ["--use-checkpoint-args"])
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("--use-checkpoint-args: ")]
    assert len(line) == 1 and "--hidden-size 16 (not 32)" in line[0] and "--num-experts 2 (not [4])" in line[0], \
        r.stdout[-3000:]
    assert re.search(r"iteration +2/ +2 \|", r.stdout)


def test_exit_duration_stops_every_rank_at_the_same_iteration_after_saving(tmp_path):
    argv = ["--mock-data", "--vocab-size", "100", "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads",
            "2", "--seq-length", "16", "--micro-batch-size", "2", "--num-experts", "2", "--expert-model-parallel-size",
            "2", "--train-iters", "50", "--eval-iters", "0", "--log-interval", "1", "--save", tmp_path / "ck",
            "--save-interval", "1000", "--exit-duration-in-mins", "1e-6"]
    r = _entry(argv, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"exiting program after [0-9.]+ minutes at iteration 1 \(--exit-duration-in-mins", r.stdout)
    assert not re.search(r"iteration +2/", r.stdout)
    assert (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
