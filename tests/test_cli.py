"""The entry point: bad input stops with one line naming the flag; a real CPU run trains."""
import math
import os
import re
import subprocess
import sys

import pytest

from multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--mock-data", "--vocab-size", "200"]


def run_entry(args, world_size=1):
    env = dict(os.environ, WORLD_SIZE=str(world_size), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("world,args,flag", [
    (8, ["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size"),
    (4, ["--tensor-model-parallel-size", "4", "--num-attention-heads", "6", "--hidden-size", "48"],
     "--num-attention-heads"),
    (2, ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "3"], "--make-vocab-size-divisible-by"),
    (4, ["--num-experts", "3", "--expert-model-parallel-size", "2"], "--num-experts"),
    (4, ["--num-experts", "4", "--expert-model-parallel-size", "4", "--tensor-model-parallel-size", "2"],
     "--expert-model-parallel-size"),
    (1, ["--num-experts", "2", "--moe-router-topk", "3"], "--moe-router-topk"),
    (1, ["--expert-model-parallel-size", "2"], "--expert-model-parallel-size"),
    (2, ["--global-batch-size", "3"], "--global-batch-size"),
    (1, ["--num-experts", "2", "--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor"),
    (1, ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "missing.model"], "--tokenizer-model"),
    (1, ["--data-path", "no/such/prefix", "--vocab-size", "200"], "--data-path"),
    # argparse's own mistakes, one line too: an unknown flag with the closest known one, a bad value
    (1, ["--hiden-size", "32"], "unrecognized argument --hiden-size (did you mean --hidden-size?)"),
    (1, ["--hidden-size", "abc"], "--hidden-size: invalid int value: 'abc'"),
    (1, ["--lr-decay-style", "step"], "--lr-decay-style: invalid choice: 'step'"),
    # range checks that escaped as tracebacks (a ZeroDivisionError when padding the vocabulary)
    (1, ["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by 0 must be >= 1"),
    (1, ["--log-interval", "0"], "--log-interval 0 must be >= 1"),
])
def test_bad_input_is_one_line_naming_the_flag(world, args, flag):
    argv = TINY + args
    if "--vocab-size" in args or "--tokenizer-model" in args:
        argv = argv[:-2]
    if "--data-path" in args:
        argv.remove("--mock-data")
    r = run_entry(argv, world)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert flag in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


# Every numeric flag with a value out of its range, and the range the message must give (by hand:
# sizes and counts >= 1, >= 0 where 0 means off, probabilities and betas in [0, 1), eps and scales > 0).
OUT_OF_RANGE = [
    ("--num-layers", "0", ">= 1"), ("--hidden-size", "-32", ">= 1"), ("--num-attention-heads", "0", ">= 1"),
    ("--ffn-hidden-size", "-128", ">= 1"), ("--ffn-hidden-size", "0", ">= 1"), ("--seq-length", "0", ">= 1"),
    ("--max-position-embeddings", "0", ">= 1"), ("--layernorm-epsilon", "0", "> 0"),
    ("--hidden-dropout", "2", "in [0, 1)"), ("--hidden-dropout", "1", "in [0, 1)"),
    ("--attention-dropout", "-0.1", "in [0, 1)"), ("--init-method-std", "0", "> 0"),
    ("--make-vocab-size-divisible-by", "0", ">= 1"), ("--num-experts", "0", ">= 1"),
    ("--moe-shared-expert-intermediate-size", "0", ">= 1"), ("--moe-layer-freq", "0", "at least 1"),
    ("--moe-ffn-hidden-size", "0", ">= 1"), ("--moe-router-topk", "0", ">= 1"),
    ("--moe-aux-loss-coeff", "-0.01", ">= 0"), ("--moe-z-loss-coeff", "-1", ">= 0"),
    ("--moe-expert-capacity-factor", "0", "> 0"), ("--moe-input-jitter-eps", "1", "in (0, 1)"),
    ("--moe-router-bias-update-rate", "-0.001", ">= 0"), ("--moe-min-capacity", "-1", ">= 0"),
    ("--moe-a2a-node-size", "0", ">= 1"), ("--tensor-model-parallel-size", "0", ">= 1"),
    ("--expert-model-parallel-size", "-2", ">= 1"), ("--world-size", "0", ">= 1"), ("--gpus-per-node", "0", ">= 1"),
    ("--optimizer-tile-size", "-1", ">= 0"), ("--micro-batch-size", "0", ">= 1"),
    ("--global-batch-size", "0", ">= 1"), ("--train-iters", "0", ">= 1"), ("--lr", "-0.0001", ">= 0"),
    ("--lr", "nan", "a finite number >= 0"), ("--min-lr", "-1", ">= 0"), ("--lr-warmup-iters", "-5", ">= 0"),
    ("--lr-decay-iters", "0", ">= 1"), ("--weight-decay", "-0.1", ">= 0"), ("--adam-beta1", "1", "in [0, 1)"),
    ("--adam-beta2", "1.5", "in [0, 1)"), ("--adam-eps", "0", "> 0"), ("--clip-grad", "-1", ">= 0"),
    ("--seed", "-1", "in [0, 4294967296)"), ("--initial-loss-scale", "0", "> 0"),
    ("--initial-loss-scale", "inf", "a finite number > 0"), ("--min-loss-scale", "-1", "> 0"),
    ("--loss-scale-window", "0", ">= 1"), ("--hysteresis", "0", ">= 1"), ("--loss-scale", "0", "> 0"),
    ("--manual-gc-interval", "-1", ">= 0"), ("--cuda-graph-warmup-steps", "0", ">= 1"),
    ("--recompute-num-layers", "0", ">= 1"), ("--vocab-size", "0", ">= 1"), ("--log-interval", "0", ">= 1"),
    ("--eval-interval", "-1", ">= 0"), ("--eval-iters", "-1", ">= 0"), ("--save-interval", "0", ">= 1"),
    ("--exit-interval", "0", ">= 1"), ("--profile-step-start", "0", ">= 1"), ("--profile-step-end", "0", ">= 1"),
    ("--profile-ranks", "-1", ">= 0"),
    ("--num-query-groups", "0", ">= 1"), ("--kv-channels", "0", ">= 1"), ("--q-lora-rank", "0", ">= 1"),
    ("--kv-lora-rank", "0", ">= 1"), ("--qk-head-dim", "0", ">= 1"), ("--qk-pos-emb-head-dim", "0", ">= 1"),
    ("--v-head-dim", "0", ">= 1"), ("--rotary-base", "0", "> 0"), ("--rotary-percent", "0", "in (0, 1]"),
    ("--rotary-percent", "1.5", "in (0, 1]"), ("--rotary-scaling-factor", "0", "> 0"),
    ("--rope-scaling-factor", "-8", "> 0"), ("--original-max-position-embeddings", "0", ">= 1"),
    ("--beta-fast", "0", "> 0"), ("--beta-slow", "-1", "> 0"), ("--mscale", "-1", ">= 0"),
    ("--mscale-all-dim", "-0.5", ">= 0"), ("--moe-router-num-groups", "0", ">= 1"),
    ("--moe-router-group-topk", "0", ">= 1"), ("--moe-router-topk-scaling-factor", "0", "> 0"),
    ("--moe-eval-capacity-factor", "0", "> 0"), ("--moe-upcycling-granularity", "0", ">= 1"),
    ("--topk", "0", ">= 1"), ("--expert-interval", "0", ">= 1"),
    ("--pipeline-model-parallel-size", "0", ">= 1"), ("--virtual-pipeline-model-parallel-size", "0", ">= 1"),
    ("--num-layers-per-virtual-pipeline-stage", "0", ">= 1"), ("--decoder-first-pipeline-num-layers", "0", ">= 1"),
    ("--decoder-last-pipeline-num-layers", "0", ">= 1"),
    ("--context-parallel-size", "0", ">= 1"), ("--expert-tensor-parallel-size", "0", ">= 1"),
    ("--train-samples", "0", ">= 1"), ("--train-tokens", "0", ">= 1"), ("--lr-decay-samples", "0", ">= 1"),
    ("--lr-decay-tokens", "0", ">= 1"), ("--lr-warmup-samples", "-1", ">= 0"),
    ("--lr-warmup-tokens", "-1", ">= 0"), ("--lr-warmup-fraction", "1.5", "in [0, 1)"),
    ("--exit-duration-in-mins", "0", "> 0"), ("--distributed-timeout-minutes", "0", "> 0"),
    ("--optimizer-offload-fraction", "1.5", "in [0, 1]"), ("--host-memory-per-node-gib", "0", "> 0"),
    ("--num-workers", "-1", ">= 0"), ("--tensorboard-queue-size", "0", ">= 1"),
    ("--zero-stage", "4", "in [0, 3]"), ("--num-key-value-heads", "0", ">= 1"),
    ("--num-layers-teacher", "0", ">= 1"), ("--hidden-size-teacher", "0", ">= 1"),
    ("--num-attention-heads-teacher", "0", ">= 1"), ("--num-experts-teacher", "0", ">= 1"),
    ("--kd-alpha-ce", "-1", ">= 0"), ("--kd-beta-ce", "-1", ">= 0"), ("--kd-temp", "0", "> 0"),
    ("--kd-stop-iter", "-1", ">= 0"), ("--window-size", "-2", ">= -1"), ("--window-attn-skip-freq", "0", "at least 1"),
]


@pytest.mark.parametrize("flag,value,valid", OUT_OF_RANGE)
def test_every_numeric_flag_out_of_range_is_one_line_naming_it(flag, value, valid):
    from megatron_ted.training.arguments import parse_args
    with pytest.raises(ValueError) as err:
        parse_args(TINY + [flag, value], world_size=1)   # a repeated flag (--vocab-size): the last wins
    message = str(err.value)
    assert message.startswith(f"{flag} ") and message.endswith(f"must be {valid}") and "\n" not in message, message
    shown = float(message.split()[1])
    assert shown == float(value) or math.isnan(shown) and value == "nan"


def test_the_range_table_covers_every_numeric_flag_and_takes_0_where_0_is_valid():
    from megatron_ted.training.arguments import NUMERIC_FLAGS, build_parser, parse_args
    numeric = {a.dest for a in build_parser()._actions if a.type in (int, float)}
    assert numeric == set(NUMERIC_FLAGS)
    # an int or a layer pattern, and left,right: checked by their parsers, in the matrix too
    pattern_flags = {"moe_layer_freq", "window_attn_skip_freq", "window_size"}
    assert {f for f, _, _ in OUT_OF_RANGE} == {"--" + d.replace("_", "-") for d in numeric | pattern_flags}
    zero_ok = ["--optimizer-tile-size", "--lr-warmup-iters", "--eval-interval", "--eval-iters", "--manual-gc-interval",
           "--moe-min-capacity", "--clip-grad", "--hidden-dropout", "--seed", "--moe-aux-loss-coeff"]
    parse_args(TINY + [a for f in zero_ok for a in (f, "0")], world_size=1)


def test_an_unknown_flag_under_torchrun_is_one_line_from_rank_0_and_in_the_launchers_summary():
    """World size 2: our line comes once, first, from rank 0; the launcher's failure summary shows
    it as rank 0's root cause (from its error file) instead of a link; no usage block."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            os.path.join(ROOT, "pretrain_gpt_moe.py"), *TINY, "--hiden-size", "32"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    ours = "error: unrecognized argument --hiden-size (did you mean --hidden-size?)"
    lines = r.stderr.splitlines()
    assert lines[0] == ours, r.stderr[-3000:]
    assert [l for l in lines if "error: " in l and "traceback" not in l] == [ours], r.stderr[-3000:]
    assert re.search(r"Root Cause \(first observed failure\):\n\[0\]:\n(?:  .*\n)*  rank +: 0 .*\n(?:  .*\n)*"
                     r"  traceback : " + re.escape(ours), r.stderr), r.stderr[-3000:]
    assert "usage:" not in r.stderr + r.stdout


def test_torchrun_tp2_ep2_trains_and_reports_expert_load():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", str(free_port()),
            os.path.join(ROOT, "pretrain_gpt_moe.py"), "--tensor-model-parallel-size", "2",
            "--expert-model-parallel-size", "2", "--num-experts", "4", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--mock-data", "--vocab-size", "250", "--train-iters", "30", "--lr", "3e-3", "--log-interval", "1",
            "--hidden-dropout", "0", "--attention-dropout", "0"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"lm loss: ([0-9.E+-]+)", r.stdout)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert re.search(r"iteration +30/ +30", r.stdout)
    loads = re.findall(r"expert load min/max: (\d+)/(\d+)", r.stdout)
    # 8 samples x 32 tokens x top-2 over 2 DP ranks = 256 assignments per rank and MoE layer, 4 experts
    assert loads and all(int(lo) <= 64 <= int(hi) for lo, hi in loads)


def test_a_corpus_of_another_vocabulary_is_one_line_before_training(tmp_path):
    """Token ids >= the tokenizer's vocabulary (a corpus made with another tokenizer) would index
    past the embedding mid-run; they stop the run at start-up, naming the file and the flags."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "other_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in range(20):
        builder.add_document(torch.arange(1, 40) + 5 * d, [39])   # ids up to 39 + 95 = 134
    builder.finalize(prefix + ".idx")
    argv = [a for a in TINY if a != "--mock-data"][:-2] + ["--data-path", prefix, "--train-iters", "1"]
    r = run_entry(argv + ["--vocab-size", "100"])
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "token id 134" in lines[0] and prefix in lines[0] and "--vocab-size" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    # the same corpus with a vocabulary that holds its ids passes the check (NullTokenizer: 200 + EOD)
    from megatron_ted.data.gpt_data import check_token_ids
    check_token_ids([prefix], 135)
    with pytest.raises(ValueError, match="token id 134"):
        check_token_ids([prefix], 134)


def test_ids_past_the_start_up_check_stop_the_run_at_their_batch(tmp_path):
    """An id outside the vocabulary beyond what the start-up check reads stops the run at the batch
    that holds it: one line naming the iteration, the micro-batch and the rank, exit code 2, before
    the batch reaches the model (at TP 1 the loss would not notice a label in the padded vocabulary)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "late_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in range(20):                         # ids 1..59, and 150 in the last document only
        doc = torch.arange(1, 40) + d % 3 * 10
        builder.add_document(torch.cat([doc, torch.tensor([150])]) if d == 19 else doc, [40 if d == 19 else 39])
    builder.finalize(prefix + ".idx")
    argv = [a for a in TINY if a != "--mock-data"][:-2] + [
        "--data-path", prefix, "--vocab-size", "100", "--split", "1,0,0", "--global-batch-size", "2",
        "--train-iters", "60", "--log-interval", "1", "--eval-iters", "0"]
    # the start-up check reads the first 40 ids here (16M in a run), so only the batch check can see it
    code = ("import sys; from megatron_ted.data import gpt_data; gpt_data.check_token_ids.__defaults__ = (40,); "
            "from megatron_ted.launch.pretrain import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, WORLD_SIZE="1", PYTHONPATH=ROOT)
    # first with the default split 969,30,1, which leaves 20 sequences' test split empty (sequences
    # [round(19.98), 20)): found once the process group is up, on every rank alike, still one line
    split = argv.index("--split")
    r = subprocess.run([sys.executable, "-c", code, *argv[:split], *argv[split + 2:]], env=env,
                       capture_output=True, text=True, timeout=120)
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --split 969,30,1: the test split")
    r = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120)
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert re.match(r"error: iteration (\d+), micro-batch 1 of 1, rank 0: (tokens|labels) id 150 is outside "
                    r"the tokenizer's vocabulary of 101", lines[0]), lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert re.search(r"iteration +1/ +60", r.stdout)         # it trained until the batch with the id came
    # over 2 data-parallel ranks only the rank that read the id raises; the launcher stops the other,
    # which waits in a collective, rather than leaving it hung
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    script = tmp_path / "entry.py"
    script.write_text(code.replace("; ", "\n"))
    argv[argv.index("--global-batch-size") + 1] = "4"
    r = subprocess.run([*launcher, str(script), *argv], env=dict(env, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode != 0
    errors = re.findall(r"error: iteration \d+, micro-batch 1 of 1, rank [01]: (?:tokens|labels) id 150 ", r.stderr)
    assert len(errors) == 1, r.stderr[-3000:]


def test_batch_check_takes_in_range_ids_and_names_the_bad_one():
    from megatron_ted.data.gpt_data import TokenIdError, check_batch_token_ids
    import torch
    batch = {"tokens": torch.tensor([[0, 5, 9]]), "labels": torch.tensor([[5, 9, 9]])}
    check_batch_token_ids(batch, 10, "here")
    with pytest.raises(TokenIdError, match="here: labels id 10 "):
        check_batch_token_ids(dict(batch, labels=torch.tensor([[5, 9, 10]])), 10, "here")
    with pytest.raises(TokenIdError, match="here: tokens id -1 "):
        check_batch_token_ids(dict(batch, tokens=torch.tensor([[0, -1, 9]])), 10, "here")
