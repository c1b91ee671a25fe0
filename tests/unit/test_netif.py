"""Choosing the interface a multi-host job talks over, and the master address rank 0 offers
under mpirun (``dist_cautious.netif``): on this host, and on address lists made up here."""

from __future__ import annotations

import pytest

from dist_cautious.netif import choose_socket_interface, host_networks, interface_addresses, interface_routing_to, master_address


def test_loopback_is_found_and_routes_to_itself() -> None:
    assert interface_addresses()["lo"] == "127.0.0.1"
    assert interface_routing_to("127.0.0.1") == "lo"
    assert all(not net.startswith("127.") for net in host_networks())


def test_nothing_is_set_for_one_host_or_when_the_user_chose() -> None:
    single = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.231.9.1"}
    assert choose_socket_interface(environ=single) is None and "GLOO_SOCKET_IFNAME" not in single
    chosen = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "10.231.9.1", "GLOO_SOCKET_IFNAME": "eth7"}
    assert choose_socket_interface(environ=chosen) is None and chosen["GLOO_SOCKET_IFNAME"] == "eth7"
    agents_on_one_machine = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert choose_socket_interface(environ=agents_on_one_machine) is None


def _no_route(host: str) -> None:
    raise AssertionError(f"the shared network should have decided, not a route to {host}")


def test_master_address_is_on_the_network_the_hosts_share_not_an_address_every_host_has() -> None:
    docker, fabric = "172.17.0.1/16", "10.0.0.{}/24"
    # rank 0's host lists docker0 first; every host has the same docker0 address
    everyone = [[docker, fabric.format(1)], [docker, fabric.format(1)], [docker, fabric.format(2)], [fabric.format(3), docker]]
    assert master_address(everyone, route=_no_route) == "10.0.0.1"
    # a second network only some hosts share loses to the one all of them share
    everyone = [["192.168.5.1/24", fabric.format(1)], ["192.168.5.2/24", fabric.format(2)], [fabric.format(3)]]
    assert master_address(everyone, route=_no_route) == "10.0.0.1"


def test_master_address_falls_back_to_the_routed_source_and_else_says_what_to_set() -> None:
    routed = {"10.1.0.7": "10.0.0.1", "10.2.0.9": "10.0.0.1"}
    everyone = [["10.0.0.1/24"], ["10.1.0.7/24"], ["10.2.0.9/24"]]
    assert master_address(everyone, route=routed.get) == "10.0.0.1"
    for route in ({"10.1.0.7": "10.0.0.1", "10.2.0.9": "10.0.5.1"}.get, {}.get, {"10.1.0.7": "127.0.0.1", "10.2.0.9": "127.0.0.1"}.get):
        with pytest.raises(RuntimeError, match="Set MASTER_ADDR"):
            master_address(everyone, route=route)
    with pytest.raises(RuntimeError, match="Set MASTER_ADDR"):  # the other host has no address rank 0 lacks
        master_address([["172.17.0.1/16"], ["172.17.0.1/16"]], route=_no_route)


def test_master_address_takes_the_users_interface() -> None:
    assert master_address([["10.0.0.1/24"], ["10.9.0.1/24"]], route=_no_route, interface="lo") == "127.0.0.1"
    with pytest.raises(RuntimeError, match="GLOO_SOCKET_IFNAME='nonesuch0'"):
        master_address([["10.0.0.1/24"], ["10.9.0.1/24"]], route=_no_route, interface="nonesuch0")
