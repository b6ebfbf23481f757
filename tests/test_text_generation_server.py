"""tools/run_text_generation_server.py: Megatron-LM's PUT /api. The request checks (each bad field a
400 naming it), the answer's shape, and real servers (1 process, and TP 2 under torchrun) answering
what generate_batch computes in one process, with logprobs from an uncached forward."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from megatron_ted.config.from_flags import configs_from_args
from megatron_ted.data.tokenizer import build_tokenizer
from megatron_ted.inference.engine import generate_batch
from megatron_ted.inference.model import load_parallel
from megatron_ted.inference.sampling import SamplingConfig
from megatron_ted.inference.server import (RequestError, Work, build_response, make_work, parse_request,
                                           stop_length)
from megatron_ted.model.builder import build_gpt
from megatron_ted.parallel.groups import ParallelGroups
from megatron_ted.training.arguments import padded_vocab_size, parse_args
from megatron_ted.training.checkpoint import save_checkpoint
from multiproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 96
MODEL_ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
              "--max-position-embeddings", "32", "--num-experts", "4", "--moe-router-topk", "2",
              "--moe-layer-freq", "1", "--micro-batch-size", "2", "--hidden-dropout", "0", "--attention-dropout", "0",
              "--mock-data", "--vocab-size", str(V), "--init-method-std", "0.5", "--swiglu"]
PROMPTS = ["5 17 3 40 2 9 33", "8", "70 1 1 64"]


@pytest.mark.parametrize("body, field", [
    ({}, "prompts"),
    ({"prompts": "5 6"}, "prompts"),
    ({"prompts": []}, "prompts"),
    ({"prompts": ["1"] * 129}, "prompts"),
    ({"prompts": [3]}, "prompts"),
    ({"prompts": ["1"], "sentences": ["1"]}, "sentences"),
    ({"prompts": ["1"], "max_len": 3}, "max_len"),
    ({"prompts": ["1"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ({"prompts": ["1"], "tokens_to_generate": 2.5}, "tokens_to_generate"),
    ({"prompts": ["1"], "tokens_to_generate": 0}, "tokens_to_generate"),   # 0 new tokens: scoring, logprobs true
    ({"prompts": ["1"], "logprobs": "yes"}, "logprobs"),
    ({"prompts": ["1"], "temperature": -0.5}, "temperature"),
    ({"prompts": ["1"], "temperature": 101}, "temperature"),
    ({"prompts": ["1"], "top_k": 1001}, "top_k"),
    ({"prompts": ["1"], "top_k": True}, "top_k"),
    ({"prompts": ["1"], "top_p": 1.5}, "top_p"),
    ({"prompts": ["1"], "add_BOS": 1}, "add_BOS"),
    ({"prompts": ["1", ""]}, "prompts[1]"),                           # empty needs add_BOS
    ({"prompts": ["1"], "stop_on_eol": "no"}, "stop_on_eol"),
    ({"prompts": ["1"], "stop_on_double_eol": 0}, "stop_on_double_eol"),
    ({"prompts": ["1"], "random_seed": -2}, "random_seed"),
    ({"prompts": ["1"], "random_seed": "7"}, "random_seed"),
    ({"prompts": ["1"], "beam_width": 2}, "beam_width"),
    ({"prompts": ["1"], "top_p_decay": 0.5}, "top_p_decay"),
    ({"prompts": ["1"], "prevent_newline_after_colon": True}, "prevent_newline_after_colon"),
    ({"prompts": ["1"], "temprature": 0.5}, "temprature"),
])
def test_each_bad_field_is_refused_by_name(body, field):
    with pytest.raises(RequestError) as e:
        parse_request(json.dumps(body).encode())
    assert str(e.value).split()[0].startswith(field) and "\n" not in str(e.value), str(e.value)


def test_defaults_are_megatrons_and_sampling_maps_onto_ours():
    r = parse_request(b'{"prompts": ["1 2"]}')
    # Megatron-LM's defaults: 64 tokens, temperature 1, no top-k / top-p cut, no logprobs, no BOS, no seed
    assert (r.tokens_to_generate, r.temperature, r.top_k, r.top_p, r.logprobs, r.add_BOS, r.random_seed) == \
        (64, 1.0, 0, 0.0, False, False, -1)
    with pytest.raises(RequestError, match="not JSON"):
        parse_request(b"prompts=1")
    tok = build_tokenizer("NullTokenizer", vocab_size=V)
    w = make_work(parse_request({"prompts": ["", "4 5"], "add_BOS": True, "top_p": 0.0, "temperature": 0,
                                 "tokens_to_generate": 3}), tok, 32, random.Random(0))
    assert w.prompt_ids == [[V], [V, 4, 5]] and w.cfg.top_p == 1.0 and w.cfg.greedy and w.cfg.eod == V
    seeds = {make_work(parse_request({"prompts": ["1"]}), tok, 99, random.Random(s)).cfg.seed for s in range(3)}
    assert len(seeds) == 3 and make_work(parse_request({"prompts": ["1"], "random_seed": 7}), tok, 99,
                                         random.Random(0)).cfg.seed == 7
    for body, needle in (({"prompts": ["1", "1 2 3"], "tokens_to_generate": 30}, "prompts[1]: 3 prompt tokens"),
                         ({"prompts": ["1 500"]}, "prompts[0]: token id 500"),
                         ({"prompts": ["a b"]}, "prompts[0]: this checkpoint has no text tokenizer")):
        with pytest.raises(RequestError) as e:
            make_work(parse_request(body), tok, 32 if "30" in str(body) else 99, random.Random(0))
        assert str(e.value).startswith(needle), str(e.value)


class Chars:
    """A tokenizer of one character per id (id = code point); eod is 0."""
    vocab_size, eod, pad = 200, 0, -1

    def tokenize(self, text):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(chr(i) for i in ids if i)


def test_eol_stops_cut_after_the_token_that_ends_the_line():
    tok, prompt = Chars(), [ord("Q")]
    new = [ord(c) for c in "ab\ncd\n\nef"]
    assert stop_length(tok, prompt, new, "\n") == 3 and stop_length(tok, prompt, new, "\n\n") == 7
    assert stop_length(tok, prompt, new[:2], "\n") == 2
    request = parse_request({"prompts": ["Q"], "stop_on_double_eol": True, "logprobs": True})
    work = Work([prompt], SamplingConfig(vocab_size=200, max_new_tokens=9), True)
    out = build_response(request, work, tok, [new + [0]], [[-0.5] * 10])
    assert out["text"] == ["Qab\ncd\n\n"] and out["tokens"] == [prompt + new[:7]]
    assert out["segments"] == [list("Qab\ncd\n\n")] and out["logprobs"] == [[-0.5] * 7]
    out = build_response(parse_request({"prompts": ["Q"]}), work, tok, [[ord("x"), 0]], None)
    assert out["text"] == ["Qx"] and out["tokens"] == [prompt + [ord("x"), 0]] and out["logprobs"] is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("srv") / "ck")
    args = parse_args(MODEL_ARGV, world_size=1)
    args.padded_vocab_size = padded_vocab_size(V + 1, args.make_vocab_size_divisible_by, 1)
    m = configs_from_args(args).model
    save_checkpoint(path, 1, build_gpt(m.gpt, m.moe, ParallelGroups.single(), args.seed), None,
                    ParallelGroups.single(), vars(args))
    return path


def _start(launcher, checkpoint, log, *flags):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*launcher, os.path.join(ROOT, "tools", "run_text_generation_server.py"),
                             "--load", checkpoint, "--host", "127.0.0.1", "--port", "0", "--dtype", "fp64", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            start_new_session=True)   # its own group: torchrun's workers die with it
    return proc


def _url(proc, log) -> str:
    for line in proc.stdout:
        if line.startswith("serving"):
            return line.split(" on ")[1].strip()
    raise AssertionError(f"the server ended: {open(log).read()[-3000:]}")


def _put(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="PUT", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _full_forward_logprobs(model, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), torch.arange(len(tokens))[None]).logits[0, :-1, :V + 1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()


def test_servers_at_1_and_2_processes_answer_what_one_process_generates(checkpoint, tmp_path):
    """Greedy tokens equal generate_batch's in one process, logprobs equal the log-softmax of an
    uncached forward over prompt + completion; bad requests get 400 and the server goes on; SIGTERM
    stops the 1-process server cleanly, --max-requests the TP 2 one; TP 2 answers what 1 process does."""
    one = _start([sys.executable], checkpoint, tmp_path / "one.log")
    two = _start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(free_port())], checkpoint, tmp_path / "two.log", "--tensor-model-parallel-size", "2",
                 "--max-requests", "1")
    try:
        request = {"prompts": PROMPTS, "tokens_to_generate": 6, "top_k": 1, "logprobs": True, "no_log": True}
        url_one, url_two = _url(one, tmp_path / "one.log"), _url(two, tmp_path / "two.log")
        code, got = _put(url_one, request)
        assert code == 200, got
        code, got_two = _put(url_two, request)
        assert code == 200, got_two
        assert two.wait(timeout=120) == 0

        model, _ = load_parallel(checkpoint, dtype=torch.float64)
        prompt_ids = [[int(t) for t in p.split()] for p in PROMPTS]
        ref = generate_batch(model, prompt_ids, SamplingConfig(vocab_size=V + 1, max_new_tokens=6, temperature=0,
                                                               eod=V)).ids
        assert got["tokens"] == [p + r for p, r in zip(prompt_ids, ref)] and len(set(ref[0])) > 1
        assert got["text"] == [" ".join(str(t) for t in p + [i for i in r if i != V]) for p, r in zip(prompt_ids, ref)]
        assert got["segments"] == [[str(t) for t in toks] for toks in got["tokens"]]
        for row, tokens in zip(got["logprobs"], got["tokens"]):
            assert len(row) == len(tokens) - 1
            torch.testing.assert_close(torch.tensor(row), torch.tensor(_full_forward_logprobs(model, tokens)),
                                       rtol=0, atol=1e-9)
        assert got_two["tokens"] == got["tokens"] and got_two["text"] == got["text"]
        for a, b in zip(got_two["logprobs"], got["logprobs"]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-9)

        for body, field in (({"prompts": PROMPTS, "top_k": "1"}, "top_k"), (b"{not json", "the request body"),
                            ({"prompts": ["1 2"], "tokens_to_generate": 40}, "prompts[0]")):
            code, message = _put(url_one, body, raw=isinstance(body, bytes))
            assert code == 400 and message.startswith(field), message
        code, again = _put(url_one, {**request, "prompts": PROMPTS[:1]})
        assert code == 200 and again["tokens"] == got["tokens"][:1]          # still serving, batch-invariant
        one.send_signal(signal.SIGTERM)
        assert one.wait(timeout=60) == 0 and "stopped after 5 requests" in one.stdout.read()
    finally:
        for proc in (one, two):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_bad_flags_are_one_line(checkpoint):
    """A port in use and a layout the world does not fit: one `error:` line naming the flag, exit 2."""
    import socket
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flags, needle in ((["--port", port], f"--port {port}"), (["--port", "0", "--tensor-model-parallel-size", "2"],
                                                                    "--tensor-model-parallel-size 2")):
            r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_text_generation_server.py"),
                                "--load", checkpoint, "--host", "127.0.0.1", *flags],
                               env=env, capture_output=True, text=True, timeout=120)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
                r.stderr[-2000:]


# Megatron-LM's examples/inference/run_text_generation_server_345M.sh, its shape scaled to the test checkpoint
# (its tokenizer: NullTokenizer, as GPT-2's 50257 ids exceed the tiny vocabulary)
MEGATRON_SCRIPT = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--num-layers", "2",
                   "--hidden-size", "32", "--num-attention-heads", "4", "--max-position-embeddings", "32",
                   "--tokenizer-type", "NullTokenizer", "--vocab-size", str(V), "--micro-batch-size", "1",
                   "--seq-length", "32", "--seed", "42", "--num-experts", "4", "--swiglu", "--use-checkpoint-args",
                   "--normalization", "layernorm", "--position-embedding-type", "learned_absolute", "--top_k", "1"]


def test_a_megatron_launch_script_serves_as_written(checkpoint, tmp_path):
    """Its pretraining flags are accepted (the unused ones named once) and the greedy answer is
    generate_batch's in one process."""
    server = _start([sys.executable], checkpoint, tmp_path / "m.log", *MEGATRON_SCRIPT, "--max-requests", "1")
    try:
        startup = server.stdout.readline()
        assert startup.startswith("accepted, no effect on serving:") and "--micro-batch-size 1" in startup \
            and "--top_k (the request's field decides)" in startup and "--num-layers" not in startup, startup
        code, got = _put(_url(server, tmp_path / "m.log"), {"prompts": PROMPTS, "tokens_to_generate": 6, "top_k": 1})
        assert code == 200 and server.wait(timeout=60) == 0, got
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    model, _ = load_parallel(checkpoint, dtype=torch.float64)
    prompt_ids = [[int(t) for t in p.split()] for p in PROMPTS]
    ref = generate_batch(model, prompt_ids, SamplingConfig(vocab_size=V + 1, max_new_tokens=6, temperature=0,
                                                           eod=V)).ids
    assert got["tokens"] == [p + r for p, r in zip(prompt_ids, ref)]


@pytest.mark.parametrize("flags, needle", [
    (["--hidden-size", "64"], "--hidden-size 64 disagrees with checkpoint"),
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size 2: generation is not pipelined"),
    (["--fp16", "--dtype", "fp64"], "--dtype fp64 and --fp16 disagree"),
    (["--max-request", "1"], "unrecognized argument --max-request (did you mean --max-requests?)"),
])
def test_megatron_flags_that_do_not_fit_are_one_line(checkpoint, capsys, flags, needle):
    """In-process main(): one `error:` line naming the flag, exit 2, before any port is taken."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("serve_tool", os.path.join(ROOT, "tools",
                                                                             "run_text_generation_server.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    try:
        code = tool.main(["--load", checkpoint, "--port", "0", *MEGATRON_SCRIPT, *flags])
    except SystemExit as e:   # an unknown flag: the parser's own one-line error, as every tool's
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0] and needle in err[0], err
    if "--hidden-size" in needle:   # the checkpoint's value, as saved
        assert err[0].endswith("'s 32; drop the flag or give the checkpoint's value (the checkpoint is the model)")
