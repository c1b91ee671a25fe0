"""Which network interface the ranks of a multi-host job talk over.

Gloo (and NCCL's bootstrap) pick the address they advertise by resolving the hostname. On many
clusters, and on cloned images, the hostname resolves to loopback (Debian's /etc/hosts maps it
to 127.0.1.1), so each host advertises 127.0.0.1 to the others and the job dies in
``connectFullMesh`` after a successful rendezvous. ``choose_socket_interface`` sets
``GLOO_SOCKET_IFNAME`` (and ``NCCL_SOCKET_IFNAME`` for NCCL) to the interface that routes to the
job's master address, when the job spans more than one host and the user set neither; when no
such interface can be found it raises, naming the variable to set. Linux only (IPv4, ioctl).

Under ``mpirun`` nothing names a master: rank 0 must offer an address of its own host that the
other hosts reach, and its hostname is no guide (it may resolve to loopback). Every rank sends
rank 0 its host's addresses (``host_networks``) and ``master_address`` picks rank 0's address on
a network every other host has an address on (not docker0's 172.17.0.1, which each host has
alike), else the address the kernel routes to the others from.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Optional

_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B


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


def interface_networks() -> dict[str, ipaddress.IPv4Interface]:
    """Each interface's IPv4 address with its netmask: ``{"eth0": IPv4Interface("10.0.0.2/24")}``."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name, address in interface_addresses().items():
            try:
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFNETMASK, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            out[name] = ipaddress.IPv4Interface(f"{address}/{socket.inet_ntoa(packed[20:24])}")
    return out


def source_address_to(host: str) -> Optional[str]:
    """The address the kernel would send from to reach ``host`` (a UDP ``connect`` sends
    nothing; it only chooses the route), or ``None`` when there is no route."""
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            return sock.getsockname()[0]
    except OSError:
        return None


def interface_routing_to(host: str) -> Optional[str]:
    """The interface whose address the kernel would send from to reach ``host``, or ``None``."""
    source = source_address_to(host)
    if source is None:
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


def host_networks() -> list[str]:
    """This host's non-loopback IPv4 addresses with their prefix (``"10.0.0.2/24"``), in
    interface order: what each rank sends rank 0 under ``mpirun`` (``master_address``)."""
    return [str(net) for net in interface_networks().values() if not net.ip.is_loopback]


def master_address(
    everyone: Sequence[Sequence[str]], route: Callable[[str], Optional[str]] = source_address_to, interface: Optional[str] = None
) -> str:
    """On rank 0 of a job that spans hosts: the address of rank 0's host the other ranks can
    reach. ``everyone`` is each rank's ``host_networks()``, in rank order (rank 0's first).

    ``interface`` (the user's ``GLOO_SOCKET_IFNAME``) wins if given. Otherwise: rank 0's first
    address whose network holds an address of every other host that is not also rank 0's own
    (an address every host has alike, such as docker0's, tells nothing); else the one address
    the kernel routes to all the other hosts from (``route``). Raises ``RuntimeError`` naming
    ``MASTER_ADDR`` when neither exists."""
    if interface is not None:
        address = interface_addresses().get(interface)
        if address is None:
            raise RuntimeError(f"dist_cautious: GLOO_SOCKET_IFNAME={interface!r} names no interface with an IPv4 address on rank 0's host")
        return address
    own = [ipaddress.IPv4Interface(net) for net in everyone[0]]
    own_ips = {net.ip for net in own}
    others = {frozenset(ipaddress.IPv4Interface(net).ip for net in nets) - own_ips for nets in everyone[1:]} - {frozenset()}
    if others:  # none: the other hosts' addresses are all rank 0's too, which tells nothing
        for candidate in own:
            if all(any(ip in candidate.network for ip in host) for host in others):
                return str(candidate.ip)
        sources = {route(str(min(host))) for host in others}
        if len(sources) == 1 and None not in sources and not ipaddress.ip_address(next(iter(sources))).is_loopback:
            return next(iter(sources))
    raise RuntimeError(
        "dist_cautious: launched by mpirun across several hosts, but rank 0's host has no address that every other host "
        f"is known to reach (its addresses: {', '.join(everyone[0]) or 'none but loopback'}). Set MASTER_ADDR to an address "
        "of rank 0's host on the network the hosts share (mpirun -x MASTER_ADDR=...), or GLOO_SOCKET_IFNAME to its interface"
    )


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


def address_towards(host: str) -> str:
    """This host's address that the kernel sends from to reach ``host``: what ``host`` reaches
    this one at (``launch/slurm.sbatch`` asks it on the first node about the second, to name the
    rendezvous by address). Raises ``RuntimeError`` when there is no route, or only loopback."""
    source = source_address_to(host)
    if source is None or ipaddress.ip_address(source).is_loopback:
        raise RuntimeError(f"dist_cautious: no route from this host to {host!r} but over loopback; name the rendezvous host yourself")
    return source


def _main(argv: list[str]) -> int:
    """``python -m dist_cautious.netif RENDEZVOUS_HOST``: shell assignments for the launcher
    scripts (``NETIF_IS_HOST=...``); ``--address-towards HOST``: ``address_towards(HOST)``."""
    if len(argv) == 2 and argv[0] == "--address-towards":
        try:
            print(address_towards(argv[1]))
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
        return 0
    if len(argv) != 1:
        print("usage: python -m dist_cautious.netif RENDEZVOUS_HOST | --address-towards HOST", file=sys.stderr)
        return 2
    for key, value in launcher_settings(argv[0]).items():
        print(f"NETIF_{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
