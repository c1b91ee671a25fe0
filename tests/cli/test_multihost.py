"""Multi-node across real (namespaced) hosts, not loopback: ``launch/torchrun_multi_node.sh`` on
two network-namespace hosts joined by a bridge (``netns_hosts``), each running the README's
command with nothing else set. Their shared hostname resolves to 127.0.0.1, as on cloned
cluster images: torchrun cannot tell from it which host holds the rendezvous, and Gloo would
advertise loopback to the other host (``connectFullMesh ... Connection refused,
remote=[127.0.0.1]``). The launcher and the ranks find the host's own address and interface
instead. The 2-host FSDP2 run must repeat the single-process loss curve, like the loopback test.
Skipped, with the reason, only where namespaces cannot be made (not root); CI runs as root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import netns_hosts
from cli_helpers import REPO, TINY_TRAIN, free_port, launch_env
from test_cli_launchers import _check_metrics

TIMEOUT_S = 150


def _wait_until_reachable(client: netns_hosts.Host, address: str, port: int, process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1).close()"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if subprocess.run(client.command([sys.executable, "-c", probe]), capture_output=True).returncode == 0:
            return
        time.sleep(0.5)


def _require_namespaces() -> None:
    reason = netns_hosts.available()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but network namespaces cannot be made: {reason}")
        pytest.skip(reason)


def test_a_master_no_interface_routes_to_is_a_clear_error(tmp_path) -> None:
    """On a host with no route to the master (a namespace with no default route), the ranks
    stop before the process group forms, naming the variable to set."""
    _require_namespaces()
    script = (
        "from dist_cautious.netif import choose_socket_interface\n"
        "choose_socket_interface(environ={'WORLD_SIZE': '4', 'LOCAL_WORLD_SIZE': '2', 'MASTER_ADDR': '10.231.99.1'})"
    )
    with netns_hosts.hosts(1, net=8) as (host,):
        result = subprocess.run(host.command([sys.executable, "-c", script]), cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "no interface of this host routes to the master address '10.231.99.1'" in result.stderr, result.stderr[-2000:]
    assert "Set GLOO_SOCKET_IFNAME" in result.stderr


def test_torchrun_multi_node_script_across_two_hosts(tmp_path) -> None:
    _require_namespaces()
    metrics = tmp_path / "metrics.json"
    port = free_port()
    with netns_hosts.hosts(2) as (first, second):
        env = dict(launch_env(), NNODES="2", NPROC="1", RDZV_ENDPOINT=f"{first.address}:{port}", PYTHON=sys.executable)
        for name in ("GLOO_SOCKET_IFNAME", "RDZV_CONF", "LOCAL_ADDR"):
            env.pop(name, None)
        train_args = [*TINY_TRAIN[1:], "--optimizer", "c-came", "--metrics", str(metrics)]
        command = ["bash", str(REPO / "launch" / "torchrun_multi_node.sh"), *train_args]
        processes = [subprocess.Popen(first.command(command), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
        _wait_until_reachable(second, first.address, port, processes[0])
        processes.append(subprocess.Popen(second.command(command), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = []
        try:
            for process in processes:
                outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    joined = "".join(outputs)
    assert any(f"ranks talk over {host.interface}" in joined for host in (first, second)), joined[-3000:]  # said by rank 0
    assert "c-came / fsdp2 / 2 rank(s): 3 steps" in joined
    _check_metrics(metrics, "c-came")
