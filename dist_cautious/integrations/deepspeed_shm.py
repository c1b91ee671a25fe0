"""Unlink the shared-memory segment DeepSpeed's CPU all-reduce leaves behind.

When DeepSpeed's communication backend starts on CPU with all ranks on one host (deepspeed
0.19.8, ``deepspeed/ops/csrc/cpu/comm/shm.cpp``), every rank creates a ~69 MB POSIX shared-memory
segment ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` and
nothing ever unlinks it. Each job then leaks ``world_size`` segments in ``/dev/shm`` (a tmpfs,
so RAM) until the machine runs out of memory: on this project's CI box 333 of them had taken
22 GB of its 24, and compiles and tests crawled or died. Our launchers call
``release_cpu_allreduce_buffer`` when a rank's job is over; unlinking only removes the name, the
mappings of ranks still running stay valid.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def buffer_path(rank: int, addr: str, port: str) -> Path:
    """Where DeepSpeed puts ``rank``'s segment for a job that rendezvoused at ``addr:port``."""
    return SHM_DIR / f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_cpu_allreduce_buffer(rank: int | None = None) -> bool:
    """Unlink this rank's segment of the job in ``MASTER_ADDR`` / ``MASTER_PORT``, if there is one
    (``rank`` defaults to ``RANK``). Returns whether a segment was removed."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if addr is None or port is None:
        return False
    path = buffer_path(rank, addr, port)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
