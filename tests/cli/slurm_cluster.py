"""A real SLURM cluster on network-namespace hosts (``netns_hosts``), for the SLURM launcher test.

``cluster(hosts, workdir)`` starts ``munged`` and ``slurmctld`` on the first host (munge's socket
is a file every namespace sees) and a ``slurmd`` on each, from a minimal ``slurm.conf`` written
here (CPU nodes, no cgroup enforcement, no accounting, root as SlurmUser), waits
until every node is idle, and stops every daemon on exit whatever happens. ``ensure_installed``
installs Debian's packages when they are missing (bounded time), and otherwise says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import netns_hosts

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "munged"]


def _missing_programs() -> list[str]:
    return [name for name in PROGRAMS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def ensure_installed(timeout_s: float = 240.0) -> str | None:
    """``None`` when SLURM and munge are here (installing Debian's packages if need be, within
    ``timeout_s``), else the reason they are not."""
    if not _missing_programs():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"SLURM is not installed ({', '.join(_missing_programs())} missing) and cannot be installed here (needs root and apt-get)"
    deadline = time.monotonic() + timeout_s
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    log = []
    for attempt in (install, ["apt-get", "update"], install):  # a fresh machine may have no package lists
        try:
            done = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return f"installing {' '.join(PACKAGES)} took longer than {timeout_s:.0f}s"
        log.append(f"$ {' '.join(attempt)} -> {done.returncode}\n{done.stderr[-800:]}")
        if attempt is install and done.returncode == 0:
            break
    missing = _missing_programs()
    return None if not missing else f"{', '.join(missing)} still missing after apt-get:\n" + "\n".join(log)


@dataclass
class Cluster:
    """The running cluster: its config file, where the daemons log, and the host clients run on."""

    conf: Path
    logs: Path
    client: netns_hosts.Host

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with ``SLURM_CONF`` pointing at this cluster."""
        return dict(base, SLURM_CONF=str(self.conf))

    def run(self, argv: list[str], env: dict[str, str], timeout_s: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """A client command (``sbatch``, ``sinfo`` ...) on the first host."""
        return subprocess.run(self.client.command(argv), env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout_s)

    def log_tails(self) -> str:
        """The last lines of every daemon's log, for a failure message."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"== {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


#: the machine's cgroup mounts as pid 1 sees them (a namespace's fresh /sys has none)
_CGROUP_ROOT = Path("/proc/1/root/sys/fs/cgroup")


def cgroup_conf() -> str:
    """slurmd 22.05 loads a cgroup plugin even with proctrack/linuxproc and task/none (23.02
    added ``CgroupPlugin=disabled``): point it at the machine's cgroups. Exercised here with
    cgroup v1 (this machine's); a v2-only machine gets cgroup/v2 without systemd (untested)."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # this process sees the machine's /sys
        return f"CgroupPlugin=cgroup/v2\nIgnoreSystemd=yes\nCgroupMountpoint={_CGROUP_ROOT}\n"
    return f"CgroupPlugin=cgroup/v1\nCgroupMountpoint={_CGROUP_ROOT}\nCgroupAutomount=no\n"


def _slurm_conf(workdir: Path, hosts: list[netns_hosts.Host], munge_socket: Path) -> str:
    cpus = os.cpu_count() or 1
    nodes = "\n".join(f"NodeName={host.hostname} NodeAddr={host.address} CPUs={cpus} State=UNKNOWN" for host in hosts)
    names = ",".join(host.hostname for host in hosts)  # type: ignore[misc]
    return f"""\
ClusterName=dctest
SlurmctldHost={hosts[0].hostname}({hosts[0].address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool-%n
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd-%n.pid
SlurmctldLogFile={workdir}/logs/slurmctld.log
SlurmdLogFile={workdir}/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/linear
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=60
{nodes}
PartitionName=cpu Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def cluster(hosts: list[netns_hosts.Host], workdir: Path, ready_timeout_s: float = 60.0) -> Iterator[Cluster]:
    """slurmctld on ``hosts[0]``, slurmd on every host (each needs its own ``hostname``: the
    node's name), munged for all; yields once every node is idle; stops them all on exit."""
    if any(host.hostname is None for host in hosts):
        raise ValueError("SLURM nodes need hosts with their own names (netns_hosts.hosts(..., own_names=True))")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("state", "logs", "munge"):
        (workdir / name).mkdir(exist_ok=True)
    (workdir / "munge").chmod(0o700)
    key = workdir / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = workdir / "munge" / "munge.socket"
    conf = workdir / "slurm.conf"
    conf.write_text(_slurm_conf(workdir, hosts, socket_path))
    (workdir / "cgroup.conf").write_text(cgroup_conf())
    for host in hosts:
        (workdir / f"spool-{host.hostname}").mkdir(exist_ok=True)
    made = Cluster(conf, workdir / "logs", hosts[0])
    daemons: list[subprocess.Popen] = []
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        daemons.append(subprocess.Popen(hosts[0].command([  # in a namespace: gone with it, whatever happens
            "munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
            f"--log-file={workdir / 'logs' / 'munged.log'}", f"--pid-file={workdir / 'munge' / 'munged.pid'}",
            f"--seed-file={workdir / 'munge' / 'munged.seed'}",
        ]), **quiet))
        _wait_for(lambda: socket_path.exists(), 20.0, "munged did not create its socket", made, daemons)
        daemons.append(subprocess.Popen(hosts[0].command(["slurmctld", "-D", "-c", "-f", str(conf)]), **quiet))
        for host in hosts:
            daemons.append(subprocess.Popen(host.command(["slurmd", "-D", "-f", str(conf), "-N", str(host.hostname)]), **quiet))

        def all_idle() -> bool:
            states = made.run(["sinfo", "-h", "-N", "-o", "%N %T"], dict(os.environ), 10.0).stdout.split()
            return states.count("idle") == len(hosts)

        _wait_for(all_idle, ready_timeout_s, "the nodes did not come up idle", made, daemons)
        yield made
    finally:
        for process in reversed(daemons):
            _stop(process)


def _wait_for(ready, timeout_s: float, what: str, made: Cluster, daemons: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        exited = [" ".join(map(str, d.args[-6:])) + f" -> {d.returncode}" for d in daemons if d.poll() is not None]
        if exited:
            raise RuntimeError(f"{what}: a daemon exited ({'; '.join(exited)})\n{made.log_tails()}")
        time.sleep(0.5)
    raise RuntimeError(f"{what} within {timeout_s:.0f}s\n{made.log_tails()}")
