"""Run a function on N local CPU ranks (gloo) and collect what each returns.

Used by the tests, the benchmarks and anything else that needs a few local ranks without a
launcher. Ranks are spawned processes on a random free loopback port, joined with a hard
deadline; on timeout or failure every child is killed and the error (with the failing rank's
traceback) is raised in the caller. Each launch should run many cases: process start-up, not
math, dominates.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_cautious.integrations.deepspeed_shm import release_cpu_allreduce_buffer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int) -> None:
    """The default rank set-up: a gloo process group over the environment's rendezvous."""
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _entry(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], payload: Any, out_dir: str, init: Callable[[int, int], None]
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    init(rank, world_size)
    try:
        result = fn(rank, world_size, payload)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
        release_cpu_allreduce_buffer(rank)


def run_ranks(
    fn: Callable[[int, int, Any], Any],
    world_size: int,
    payload: Any = None,
    timeout: float = 240.0,
    init: Callable[[int, int], None] = init_gloo,
) -> list[Any]:
    """``fn(rank, world_size, payload)`` on ``world_size`` spawned ranks; their return values.
    ``init(rank, world_size)`` sets up each rank's process group (gloo by default; DeepSpeed
    passes its own). ``fn`` and ``init`` must be importable by name: spawn pickles them."""
    from dist_cautious.kernels import prebuild

    prebuild("cpu")
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _entry, args=(world_size, free_port(), fn, payload, out_dir, init), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f}s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
