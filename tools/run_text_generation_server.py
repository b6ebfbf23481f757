#!/usr/bin/env python
"""Serve a checkpoint over Megatron-LM's text generation REST API (PUT /api), at any TP x EP layout.

    python tools/run_text_generation_server.py --load runs/quickstart/checkpoints --port 5000
    torchrun --nproc-per-node 4 tools/run_text_generation_server.py --load ... \\
        --tensor-model-parallel-size 2 --expert-model-parallel-size 2 --port 5000
    curl -X PUT http://localhost:5000/api -H 'Content-Type: application/json' \\
        -d '{"prompts": ["def parse("], "tokens_to_generate": 32, "top_k": 1}'

Rank 0 answers HTTP (Python's http.server, one request at a time) and broadcasts each valid request
to every rank; all ranks then run the same batched generation (megatron_ted/inference/engine.py).
The fields and the answer are Megatron's (megatron_ted/inference/server.py; docs/CHECKPOINTS.md);
a bad request is answered 400 with one line naming the field and the server keeps serving.
SIGINT or SIGTERM (Ctrl-C; torchrun forwards them) stops it after the request in flight;
--max-requests N stops it after N answers. Bad flags print one `error:` line and exit with 2.

A Megatron-LM launch script runs as written: its pretraining flags (--num-layers, --fp16,
--tokenizer-type, --vocab-file, --micro-batch-size, ...) are read by megatron_ted/inference/launch_flags.py
(the model's must match the checkpoint) and its server's sampling defaults are accepted; what changes
nothing is named once at start-up.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.cli import OneLineErrorParser  # noqa: E402

DTYPES = ("fp32", "bf16", "fp16", "fp64")
# flags of Megatron-LM's text generation server (and its older versions) that only set defaults
MEGATRON_SERVING_FLAGS = {"--temperature": float, "--top_k": int, "--top_p": float, "--return-log-probs": bool,
                          "--num-tokens-to-generate": int, "--out-seq-length": int, "--prompts": str,
                          "--max-batch-size": int, "--inference-max-requests": int,
                          "--inference-max-batch-size": int, "--inference-max-seq-length": int}
KEEPALIVE_S = 60     # an idle rank 0 pings the others well within the process group's timeout


def build_parser():
    p = OneLineErrorParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="a --save directory (its latest checkpoint) or an iter_* directory")
    p.add_argument("--port", type=int, default=5000, help="the HTTP port of rank 0 (0: any free port)")
    p.add_argument("--host", default="0.0.0.0", help="the address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--tokenizer-model", default=None, help="override the tokenizer saved with the checkpoint")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32, or what --fp16 / --bf16 say")
    p.add_argument("--seed", type=int, default=1234, help="draws the seed of requests without random_seed")
    p.add_argument("--max-requests", type=int, default=0, help="stop after answering this many requests (0: never)")
    g = p.add_argument_group("Megatron-LM's server defaults: accepted, named at start-up; each request's fields decide")
    for flag, kind in MEGATRON_SERVING_FLAGS.items():
        g.add_argument(flag, **({"action": "store_true"} if kind is bool else {"type": kind, "nargs": "+"}
                               if flag == "--prompts" else {"type": kind}))
    return p


def main(argv=None) -> int:
    from megatron_ted.inference.launch_flags import tool_main
    return tool_main(build_parser(), run, argv)


def megatron_serving_flags(args) -> list[str]:
    """The Megatron-LM server flags given (they set defaults that each request's fields override here)."""
    return [flag for flag in MEGATRON_SERVING_FLAGS if getattr(args, flag.lstrip("-").replace("-", "_")) not in
            (None, False)]


def run(args, rank: int, rest: list[str] = ()) -> int:
    from megatron_ted.inference.launch_flags import read_launch_flags, resolve_dtype

    launch = read_launch_flags(list(rest), args.load, build_parser())   # before the port and the heavy work
    args.dtype = resolve_dtype(args.dtype, launch.dtype)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in [0, 65535]")
    if args.max_requests < 0:
        raise ValueError(f"--max-requests {args.max_requests} must be >= 0 (0: never stop)")
    import torch
    import torch.distributed as dist

    from megatron_ted.inference.generate import load_tokenizer
    from megatron_ted.inference.model import load_parallel
    from megatron_ted.parallel.groups import init_process_group

    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))   # load_parallel refuses one TP x EP does not divide
    torch.set_num_threads(min(4, torch.get_num_threads()))
    tokenizer = load_tokenizer(args.load, args.tokenizer_model, launch.tokenizer_flags)
    unused = launch.unused + [f"{f} (the request's field decides)" for f in megatron_serving_flags(args)]
    if unused and rank == 0:
        print(f"accepted, no effect on serving: {', '.join(unused)}", flush=True)
    httpd = _bind(args.host, args.port) if rank == 0 else None   # a taken port fails before the heavy work
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    use_cuda = torch.cuda.is_available()
    device = init_process_group(use_cuda) if world > 1 else torch.device("cuda" if use_cuda else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[args.dtype]
    try:
        model, _ = load_parallel(args.load, tp, ep, device, dtype)
        if rank == 0:
            serve(httpd, model, tokenizer, args, stop, world, f"TP {tp} x EP {ep}")
        else:
            follow(model, world)
        return 0
    finally:
        if httpd is not None:
            httpd.server_close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _bind(host: str, port: int):
    from http.server import HTTPServer
    try:
        return HTTPServer((host, port), None)
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                         f"choose another --port (0: any free one)") from None


def _broadcast(item, world: int):
    """Rank 0's item on every rank (None: stop; "idle": keep-alive)."""
    if world == 1:
        return item
    import torch.distributed as dist
    box = [item]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow(model, world: int) -> None:
    """Ranks > 0: run each request rank 0 broadcasts, until it says stop."""
    from megatron_ted.inference.server import run_work

    while (work := _broadcast(None, world)) is not None:
        if work != "idle":
            run_work(model, work)


def serve(httpd, model, tokenizer, args, stop: list, world: int, layout: str) -> None:
    """Rank 0: answer PUT /api until a signal or --max-requests, then tell the other ranks to stop."""
    import random
    from http.server import BaseHTTPRequestHandler

    from megatron_ted.inference.server import RequestError, build_response, make_work, parse_request, run_work

    rng = random.Random(args.seed)
    max_positions = model.config.max_position_embeddings
    state = {"answered": 0, "last": time.monotonic()}

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            if self.path.rstrip("/") != "/api":
                return self._reply(404, f"no such path {self.path}; the API is PUT /api")
            state["answered"] += 1
            start = time.monotonic()
            try:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = parse_request(body)
                work = make_work(request, tokenizer, max_positions, rng)
            except RequestError as e:
                return self._reply(400, str(e))
            try:
                _broadcast(work, world)
                state["last"] = time.monotonic()
                reply = build_response(request, work, tokenizer, *run_work(model, work))
            except Exception as e:   # the ranks may be out of step now: answer, then stop with the traceback
                state["fatal"] = e
                return self._reply(500, f"generation failed: {type(e).__name__}: {e}; the server stops")
            self._reply(200, reply)
            if not request.no_log:
                print(f"request {state['answered']} from {self.client_address[0]}: {len(request.prompts)} prompts, "
                      f"tokens_to_generate {request.tokens_to_generate}, {time.monotonic() - start:.2f} s", flush=True)

        def _reply(self, code: int, payload):
            data = json.dumps(payload).encode()   # an error is a JSON string, as Megatron's
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_):   # one line per request above instead of http.server's
            pass

    httpd.RequestHandlerClass = Handler
    httpd.timeout = 0.5              # wake up to notice a signal and to keep the other ranks alive
    host, port = httpd.server_address[:2]
    print(f"serving {layout} ({world} processes) on http://{host}:{port}/api", flush=True)
    while not stop and not (args.max_requests and state["answered"] >= args.max_requests):
        if "fatal" in state:
            raise state["fatal"]
        httpd.handle_request()
        if time.monotonic() - state["last"] > KEEPALIVE_S:
            _broadcast("idle", world)
            state["last"] = time.monotonic()
    _broadcast(None, world)
    print(f"stopped after {state['answered']} requests", flush=True)


if __name__ == "__main__":
    sys.exit(main())
