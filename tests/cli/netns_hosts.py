"""Test "hosts": Linux network namespaces joined by a bridge, each with its own address.

``hosts(2)`` builds namespaces ``dc<id>-h0``, ``dc<id>-h1`` ... whose only link is a veth into
a bridge in another namespace (the "switch"), with addresses ``10.231.<net>.<1 + index>/24``
chosen here, and loopback up in each. They share this machine's hostname, which resolves to
127.0.0.1 in each (their own ``/etc/hosts``, see below), as cloned cluster images often do: a process that advertises the address its
hostname resolves to is unreachable from the other hosts, as on a real cluster. Everything is
torn down on exit, whatever happens; the hosts of an earlier run killed before it could clean
up (its pid recorded under /run/dist-cautious-netns is gone) are removed by the next.
``available()`` says why namespaces cannot be made here (not root, no ``ip``), for a test to
skip with that reason.

``hosts(n, own_names=True)`` goes one step further, for launchers that tell nodes apart by name
(Open MPI, SLURM): each host gets its own hostname ``dc-hostN`` (a UTS namespace), its own
``/etc/hosts`` mapping that name to 127.0.1.1 as Debian's default does, and the other hosts'
names to their addresses, as a cluster's DNS would (``ip netns exec`` bind-mounts
``/etc/netns/NS/hosts``), and its own ``/dev/shm`` (machines do not share shared
memory; Open MPI's shared-memory transport would otherwise mix the two hosts' segments).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address on the test network, and its interface's name."""

    namespace: str
    address: str
    interface: str
    hostname: str | None = None  # None: this machine's own, shared by every host

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's network namespace (and, with a ``hostname``, under that
        name with a private ``/dev/shm``)."""
        if self.hostname is None:
            return ["ip", "netns", "exec", self.namespace, *argv]
        setup = 'hostname "$0" && mount -t tmpfs -o size=1g,mode=1777 dc-shm /dev/shm && exec "$@"'
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "sh", "-c", setup, self.hostname, *argv]


def available() -> str | None:
    """``None`` when network namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "no `ip` command (Debian package iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"dcprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


#: one ``<tag>.pid`` per live ``hosts()`` call: the pid that owns the ``<tag>-*`` namespaces
_OWNERS = Path("/run/dist-cautious-netns")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def hosts(count: int, net: int = 7, own_names: bool = False) -> Iterator[list[Host]]:
    """``count`` hosts on one bridged /24; removed on exit (processes still inside are killed).
    ``own_names``: each host has its own hostname, resolving to 127.0.1.1 (see the module doc)."""
    _sweep_stale()
    tag = f"dc{uuid.uuid4().hex[:5]}"
    switch = f"{tag}-sw"
    made: list[str] = []
    _OWNERS.mkdir(parents=True, exist_ok=True)
    owner = _OWNERS / f"{tag}.pid"
    owner.write_text(str(os.getpid()))
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        result = []
        for index in range(count):
            namespace, interface = f"{tag}-h{index}", f"eth{index}"
            _ip("netns", "add", namespace)
            made.append(namespace)
            _ip("link", "add", interface, "netns", namespace, "type", "veth", "peer", "name", f"p{index}", "netns", switch)
            address = f"10.231.{net}.{1 + index}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", namespace, "link", "set", interface, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", switch, "link", "set", f"p{index}", "master", "br0")
            _ip("-n", switch, "link", "set", f"p{index}", "up")
            result.append(Host(namespace, address, interface, f"dc-host{index}" if own_names else None))
        others = "".join(f"{host.address} {host.hostname}\n" for host in result) if own_names else ""
        for host in result:
            # own names: each resolves to loopback on its host, the others' to their addresses;
            # else the machine's one hostname resolves to loopback on every host, whatever the
            # machine's own /etc/hosts or DNS says
            etc = Path("/etc/netns") / host.namespace
            etc.mkdir(parents=True, exist_ok=True)
            mine = f"127.0.1.1 {host.hostname}\n" if own_names else f"127.0.0.1 {socket.gethostname()}\n"
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{mine}{others}")
        yield result
    finally:
        for namespace in reversed(made):
            _remove(namespace)
        owner.unlink(missing_ok=True)


def _remove(namespace: str) -> None:
    """Kill what runs in ``namespace``, delete it and its ``/etc/netns`` files."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)


def _sweep_stale() -> None:
    """Remove the hosts of earlier runs whose owner died without its ``finally`` (SIGKILL, or
    SIGTERM, which Python does not turn into an exception); a live owner's are left alone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for marker in _OWNERS.glob("dc*.pid"):
        try:
            os.kill(int(marker.read_text()), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        for namespace in listed:
            if namespace.startswith(f"{marker.stem}-"):
                _remove(namespace)
        marker.unlink(missing_ok=True)
