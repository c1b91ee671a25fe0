"""Run a function on N local CPU ranks (gloo) and collect what each returns.

Used by the tests, the benchmarks and anything else that needs a few local ranks without a
launcher (``start_processes`` also starts the ranks of ``dist-cautious train`` without one).
Ranks are fresh processes on a random free loopback port, joined with a hard deadline; on timeout
or failure every child is killed and the error (with the failing rank's traceback) is raised in
the caller. Each launch should run many cases: process start-up, not math, dominates.

Ranks are forked from multiprocessing's fork server with torch already imported, not spawned:
on a 2-core machine a spawned rank spends about 3 s importing torch and 1.5 s tearing the
interpreter down, which made up half of a small launch (a 3-rank launch of two short cases:
11 s spawned, 5.6 s forked from the server). The server forks from a process that has only
imported torch (no thread pool started), as torch's DataLoader does. Its children inherit the
server's environment, which is that of its first use, so each rank is handed the caller's
``os.environ`` of the moment and takes it over before anything else.
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


def start_processes(entry: Callable[..., None], args: tuple, nprocs: int, join: bool) -> Any:
    """``torch.multiprocessing.start_processes`` from the fork server (see above): each process
    takes over the caller's environment of this moment, then runs ``entry(index, *args)``."""
    mp.set_forkserver_preload(["torch"])
    return mp.start_processes(
        _in_callers_environment, args=(dict(os.environ), entry, args), nprocs=nprocs, join=join, start_method="forkserver"
    )


def _in_callers_environment(index: int, environ: dict[str, str], entry: Callable[..., None], args: tuple) -> None:
    os.environ.clear()
    os.environ.update(environ)
    entry(index, *args)


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
    """``fn(rank, world_size, payload)`` on ``world_size`` local ranks; their return values.
    ``init(rank, world_size)`` sets up each rank's process group (gloo by default; DeepSpeed
    passes its own). ``fn`` and ``init`` must be importable by name: they are pickled to the
    ranks. The fork server imports torch when it starts, unless this process started it before."""
    from dist_cautious.kernels import prebuild

    prebuild("cpu")
    with tempfile.TemporaryDirectory() as out_dir:
        context = start_processes(_entry, (world_size, free_port(), fn, payload, out_dir, init), world_size, join=False)
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
