"""Run a function in N gloo processes on CPU and collect what each rank returns.

    results = run_distributed(fn, world_size, *args)   # fn(rank, world_size, *args) -> picklable

Each call gets a free port; a child that raises fails the test with its traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, outdir, fn, args, backend="gloo"):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo"):
    """fn must be a module-level function (it is pickled into spawned processes).
    backend="nccl" puts rank r on cuda:r (GPU tests)."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world_size, free_port(), outdir, fn, args, backend), nprocs=world_size, join=True)
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
