"""What the multi-host tests share: skipping (with the reason) where network namespaces cannot be
made, starting one command per namespace host with a deadline and killing whatever is left, and
the check that a job spread over the hosts repeated the single-process loss curve.

The loss-curve comparison is the loopback launcher tests' own (``_single_process_losses`` of
``test_cli_launchers``): the same tiny job, unsharded, in this process.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netns_hosts
from test_cli_launchers import _single_process_losses


def require_namespaces() -> None:
    """Skip, saying why, where namespaces cannot be made; under CI (``CI=true``) fail instead."""
    reason = netns_hosts.available()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but network namespaces cannot be made: {reason}")
        pytest.skip(reason)


def resolved_hostname(host: netns_hosts.Host) -> str:
    """What ``host``'s own hostname resolves to there (the tests' premise: loopback)."""
    probe = "import socket; print(socket.gethostbyname(socket.gethostname()))"
    return subprocess.run(host.command([sys.executable, "-c", probe]), capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def wait_until_reachable(client: netns_hosts.Host, address: str, port: int, process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    """Until ``address:port`` accepts a TCP connection from ``client`` (or ``process`` exits):
    an agent started before the rendezvous store listens backs off for long."""
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1).close()"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if subprocess.run(client.command([sys.executable, "-c", probe]), capture_output=True).returncode == 0:
            return
        time.sleep(0.3)


def run_on_hosts(
    hosts: list[netns_hosts.Host], command: list[str], env: dict[str, str], cwd: Path, timeout_s: float, store_port: int | None = None
) -> list[subprocess.CompletedProcess]:
    """``command`` on every host, the first one first (it holds the store on ``store_port``, if
    given: the others start once it listens). Each host's output (stdout and stderr together);
    anything still running at the deadline is killed, and the test then fails with its output.
    The native kernels are built first, here, as the local launchers do: ranks that find no
    build start compiling at once, on both hosts, inside the job's deadline."""
    from dist_cautious.kernels import prebuild

    prebuild("cpu")
    processes: list[subprocess.Popen] = []
    try:
        for index, host in enumerate(hosts):
            processes.append(subprocess.Popen(host.command(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            if index == 0 and store_port is not None:
                wait_until_reachable(hosts[1], host.address, store_port, processes[0])
        deadline = time.monotonic() + timeout_s
        results = []
        for process in processes:
            try:
                output = process.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
            except subprocess.TimeoutExpired:
                for other in processes:
                    other.kill()
                tails = [other.communicate()[0][-3000:] for other in processes]
                raise AssertionError(f"the job ran past {timeout_s:.0f}s; each host's output tail:\n" + "\n----\n".join(tails)) from None
            results.append(subprocess.CompletedProcess(process.args, process.returncode, output))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def check_curve(metrics_path: Path, optimizer: str, backend: str, world_size: int) -> dict:
    """The metrics a job spread over the hosts wrote: its loss curve is the single-process one,
    to fp32 rounding of the reductions (losses are O(5); 1e-4 relative is far above fp32 noise and
    far below the change one wrongly reduced statistic makes), over ``world_size`` ranks."""
    metrics = json.loads(metrics_path.read_text())
    assert metrics["optimizer"] == optimizer and metrics["backend"] == backend
    assert metrics["world_size"] == world_size and len(metrics["memory"]) == world_size
    assert len(metrics["losses"]) == metrics["steps"] and all(math.isfinite(v) for v in metrics["losses"])
    assert metrics["losses"] == pytest.approx(_single_process_losses(optimizer), rel=1e-4)
    assert math.isfinite(metrics["val_loss"])
    return metrics


def write_rsh_agent(path: Path, hosts: list[netns_hosts.Host]) -> Path:
    """An executable rsh agent for ``mpirun`` (``--mca plm_rsh_agent PATH``): Open MPI starts its
    daemon on a remote node as ``AGENT [options] NODE COMMAND...``, as it would with ssh; this one
    runs COMMAND with ``sh -c`` on the host whose address is NODE (``Host.command``)."""
    cases = "\n".join(f"    {host.address}) exec {shlex.join(host.command(['/bin/sh', '-c']))} \"$*\" ;;" for host in hosts)
    path.write_text(
        "#!/bin/sh\n"
        "# mpirun's rsh agent on network-namespace hosts (written by the tests)\n"
        'while [ "${1#-}" != "$1" ]; do shift; done  # options an ssh would take\n'
        'node="$1"; shift\n'
        'case "$node" in\n'
        f"{cases}\n"
        '    *) echo "rsh agent: no namespace host $node" >&2; exit 255 ;;\n'
        "esac\n"
    )
    path.chmod(0o755)
    return path
