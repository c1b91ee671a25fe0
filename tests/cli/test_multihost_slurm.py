"""``launch/slurm.sbatch`` submitted with ``sbatch`` to a real SLURM cluster: ``slurmctld`` and a
``slurmd`` per network-namespace host (``slurm_cluster``), CPU nodes without GPUs or cgroups.
Each host has its own name, resolving to 127.0.1.1 on itself (Debian's default) and to its
address on the other host (as a cluster's DNS would): the script must name the rendezvous by an
address the second node reaches, and the 2 nodes x 2 ranks FSDP2 job must repeat the
single-process loss curve.

SLURM and munge come from Debian's packages: installed here when missing (bounded time); the
test skips, saying why, only when they cannot be installed, or namespaces cannot be made.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

import netns_hosts
import slurm_cluster
from cli_helpers import REPO, TINY_TRAIN, launch_env
from multihost_helpers import check_curve, require_namespaces, resolved_hostname

TIMEOUT_S = 150
NPROC = 2


def _require_slurm() -> None:
    reason = slurm_cluster.ensure_installed()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but SLURM cannot be installed: {reason}")
        pytest.skip(reason)


def test_sbatch_script_two_cpu_nodes_two_ranks_each(tmp_path) -> None:
    require_namespaces()
    _require_slurm()
    metrics = tmp_path / "metrics.json"
    env = dict(launch_env(), PYTHON=sys.executable, NPROC=str(NPROC), DIST_CAUTIOUS_LAUNCH=str(REPO / "launch"))
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "RDZV_ENDPOINT", "RDZV_CONF", "LOCAL_ADDR", "NNODES"):
        env.pop(name, None)
    train_args = [*TINY_TRAIN[1:], "--optimizer", "came", "--metrics", str(metrics)]
    from dist_cautious.kernels import prebuild

    prebuild("cpu")  # not in the job's deadline, nor in every rank at once (see run_on_hosts)
    with netns_hosts.hosts(2, own_names=True) as two_hosts, slurm_cluster.cluster(two_hosts, tmp_path / "slurm") as cluster:
        assert [resolved_hostname(host) for host in two_hosts] == ["127.0.1.1"] * 2  # each node's name is loopback on itself
        submitted = cluster.run(
            ["sbatch", "--wait", "--nodes=2", "--output=job-%j.out", str(REPO / "launch" / "slurm.sbatch"), *train_args],
            env, TIMEOUT_S, cwd=tmp_path,
        )
        outputs = sorted(tmp_path.glob("job-*.out"))
        output = outputs[0].read_text() if outputs else ""
        assert submitted.returncode == 0, f"{submitted.stdout}{submitted.stderr}\n--- job output:\n{output[-4000:]}\n--- daemons:\n{cluster.log_tails()}"
    assert re.match(r"Submitted batch job \d+", submitted.stdout), submitted.stdout
    # named by the first node's address on the shared network, not by its name (loopback on itself)
    assert f"dist-cautious: 2 node(s) x {NPROC} rank(s), rendezvous at {two_hosts[0].address}:29500 (dc-host0)" in output, output[-3000:]
    assert "the job spans hosts; ranks talk over eth" in output, output[-3000:]
    assert output.count(f"came / fsdp2 / {2 * NPROC} rank(s): 3 steps") == 1, output[-3000:]
    check_curve(metrics, "came", "fsdp2", world_size=2 * NPROC)
