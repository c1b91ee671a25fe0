"""Shared helpers of the CLI tests: a free port, the environment a launched `dist-cautious`
needs (the checkout on PYTHONPATH, one thread per rank), a tiny `train` argument list, and
`run_cli`, which runs the real entry point with a deadline and kills all it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from dist_cautious.local_ranks import free_port  # noqa: F401  (re-exported for the launcher tests)

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
    process = subprocess.Popen(
        [PYTHON, "-m", "dist_cautious.cli", *args], cwd=cwd, env=env or launch_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_session(process.pid)
        out, err = process.communicate()
        raise AssertionError(f"dist-cautious {' '.join(args)} ran past {timeout_s:.0f}s; stderr tail:\n{err[-3000:]}") from None
    finally:
        _kill_session(process.pid)  # ranks the CLI left behind, if any
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _kill_session(session_id: int) -> None:
    try:
        os.killpg(session_id, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        env.pop(name, None)
    return env
