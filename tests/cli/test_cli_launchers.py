"""Real launches of the `train` job with a sharded optimizer (FSDP2 DTensor params, CAME's
replicated factors, the cautious mask's reduced counts) on CPU ranks over gloo:

- two `torchrun --nnodes 2` agents on loopback, meeting through a c10d rendezvous on a free port
  (one agent hosts the store, as the first node of a real job would);
- `mpirun -n 2`, where the ranks are discovered through mpi4py.

Each must run to completion and report, per rank, the sharded bytes FSDP2 really holds: half of
the model's fp32 params per rank (the tiny model's row counts are all even).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest

from cli_helpers import PYTHON, TINY_TRAIN, free_port, launch_env

TIMEOUT_S = 150


def _check_metrics(path, optimizer: str) -> None:
    metrics = json.loads(path.read_text())
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


def _run_all(commands: list[list[str]], cwd) -> list[subprocess.CompletedProcess]:
    processes = [subprocess.Popen(cmd, cwd=cwd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in commands]
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


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_torchrun_nodes_c10d(tmp_path) -> None:
    port = free_port()
    metrics = tmp_path / "metrics.json"
    commands = []
    for node, is_host in enumerate(("true", "false")):
        commands.append([
            "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"cli-test-{port}", "--rdzv-conf", f"is_host={is_host}",
            "--local-addr", "127.0.0.1", "--max-restarts", "0",
            "-m", "dist_cautious.cli", *TINY_TRAIN, "--optimizer", "c-came", "--metrics", str(metrics),
        ])
    results = _run_all(commands, tmp_path)
    for result in results:
        assert result.returncode == 0, result.stdout[-4000:]
    assert "c-came / fsdp2 / 2 rank(s): 3 steps" in "".join(r.stdout for r in results)
    _check_metrics(metrics, "c-came")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH")
def test_mpirun_two_ranks(tmp_path) -> None:
    pytest.importorskip("mpi4py")
    metrics = tmp_path / "metrics.json"
    command = [
        "mpirun", "-n", "2", "--allow-run-as-root", "--oversubscribe",
        PYTHON, "-m", "dist_cautious.cli", *TINY_TRAIN, "--optimizer", "cautious-adamw", "--metrics", str(metrics),
    ]
    (result,) = _run_all([command], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "cautious-adamw / fsdp2 / 2 rank(s): 3 steps" in result.stdout
    _check_metrics(metrics, "cautious-adamw")
