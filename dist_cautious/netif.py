"""Which network interface the ranks of a multi-host job talk over.

Gloo (and NCCL's bootstrap) pick the address they advertise by resolving the hostname. On many
clusters, and on cloned images, the hostname resolves to loopback (Debian's /etc/hosts maps it
to 127.0.1.1), so each host advertises 127.0.0.1 to the others and the job dies in
``connectFullMesh`` after a successful rendezvous. ``choose_socket_interface`` sets
``GLOO_SOCKET_IFNAME`` (and ``NCCL_SOCKET_IFNAME`` for NCCL) to the interface that routes to the
job's master address, when the job spans more than one host and the user set neither; when no
such interface can be found it raises, naming the variable to set. Linux only (IPv4, ioctl).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from typing import Optional

_SIOCGIFADDR = 0x8915


def interface_addresses() -> dict[str, str]:
    """IPv4 address of each interface that has one: ``{"eth0": "10.0.0.2", "lo": "127.0.0.1"}``."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            out[name] = socket.inet_ntoa(packed[20:24])
    return out


def interface_routing_to(host: str) -> Optional[str]:
    """The interface whose address the kernel would send from to reach ``host`` (a UDP
    ``connect`` sends nothing; it only chooses the route), or ``None`` if none is found."""
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            source = sock.getsockname()[0]
    except OSError:
        return None
    for name, address in interface_addresses().items():
        if address == source:
            return name
    return None


def spans_hosts(environ: "os._Environ[str] | dict[str, str]") -> bool:
    """Whether the job (as a launcher describes it) has ranks on more than one host."""
    world = int(environ.get("WORLD_SIZE", 1))
    local = int(environ.get("LOCAL_WORLD_SIZE", world))
    return world > local


def choose_socket_interface(nccl: bool = False, environ: Optional[dict[str, str]] = None) -> Optional[str]:
    """Set ``GLOO_SOCKET_IFNAME`` (and, with ``nccl``, ``NCCL_SOCKET_IFNAME``) to the interface
    routing to ``MASTER_ADDR`` when the job spans hosts and the user set neither; returns the
    interface chosen, or ``None`` when nothing was needed. Raises ``RuntimeError`` naming the
    variable when the master is only reachable over loopback or not at all."""
    env = os.environ if environ is None else environ
    names = ["GLOO_SOCKET_IFNAME"] + (["NCCL_SOCKET_IFNAME"] if nccl else [])
    if not spans_hosts(env) or all(name in env for name in names):
        return None
    master = env.get("MASTER_ADDR", "")
    try:
        if master and ipaddress.ip_address(socket.gethostbyname(master)).is_loopback:
            return None  # a loopback master: every agent is on this machine (several agents, one host)
    except OSError:
        pass
    interface = interface_routing_to(master) if master else None
    if interface is None or ipaddress.ip_address(interface_addresses()[interface]).is_loopback:
        raise RuntimeError(
            f"dist_cautious: this job spans several hosts, but no interface of this host routes to the master address "
            f"{master!r}, so the ranks cannot tell the others where to connect. Set {' and '.join(names)} to the interface "
            "the hosts share (e.g. eth0), and MASTER_ADDR / the rendezvous endpoint to an address on it"
        )
    for name in names:
        env.setdefault(name, interface)
    return interface


def launcher_settings(rendezvous_host: str) -> dict[str, str]:
    """What ``launch/torchrun_multi_node.sh`` passes torchrun when the user did not: whether this
    host is the rendezvous endpoint (one of its interfaces has that address: torchrun decides it
    by the hostname, which fails when the hostname resolves to loopback), and the address this
    host is reached at (that of the interface routing to the endpoint)."""
    target = socket.gethostbyname(rendezvous_host)
    mine = interface_addresses()
    interface = interface_routing_to(target)
    if ipaddress.ip_address(target).is_loopback:
        return {}  # one machine: torchrun's own choice is right
    settings = {"IS_HOST": "true" if target in mine.values() else "false"}
    if interface is not None and not ipaddress.ip_address(mine[interface]).is_loopback:
        settings["LOCAL_ADDR"] = mine[interface]
    return settings


if __name__ == "__main__":
    import sys

    # shell assignments for the launcher scripts: python -m dist_cautious.netif RENDEZVOUS_HOST
    for key, value in launcher_settings(sys.argv[1]).items():
        print(f"NETIF_{key}={value}")
