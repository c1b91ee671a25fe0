"""Shared helpers of the CLI tests: a free port, the environment a launched `dist-cautious`
needs (the checkout on PYTHONPATH, one thread per rank), a tiny `train` argument list, and
`run_cli`, which runs the real entry point with a deadline and kills all it started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dist_cautious.local_ranks import free_port  # noqa: F401  (re-exported for the launcher tests)
from tests.sessions import run_in_session

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

#: a train job small enough to finish in seconds, still sharded (fsdp2) and stepping every tensor kind
TINY_TRAIN = [
    "train", "--backend", "fsdp2", "--steps", "3", "--global-batch", "4", "--context", "16",
    "--width", "32", "--layers", "1", "--corpus-bytes", "65536", "--quiet",
]


def run_cli(args: list[str], cwd: Path, timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m dist_cautious.cli ARGS`` in its own session; stdout and stderr apart. On
    timeout the whole session (the CLI and the ranks it spawned) is killed and the test fails."""
    return run_in_session([PYTHON, "-m", "dist_cautious.cli", *args], cwd, env or launch_env(), timeout_s, what=f"dist-cautious {' '.join(args)}")


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        env.pop(name, None)
    return env
