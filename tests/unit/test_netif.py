"""Choosing the interface a multi-host job talks over (``dist_cautious.netif``), on this host."""

from __future__ import annotations

from dist_cautious.netif import choose_socket_interface, interface_addresses, interface_routing_to


def test_loopback_is_found_and_routes_to_itself() -> None:
    assert interface_addresses()["lo"] == "127.0.0.1"
    assert interface_routing_to("127.0.0.1") == "lo"


def test_nothing_is_set_for_one_host_or_when_the_user_chose() -> None:
    single = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.231.9.1"}
    assert choose_socket_interface(environ=single) is None and "GLOO_SOCKET_IFNAME" not in single
    chosen = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "10.231.9.1", "GLOO_SOCKET_IFNAME": "eth7"}
    assert choose_socket_interface(environ=chosen) is None and chosen["GLOO_SOCKET_IFNAME"] == "eth7"
    agents_on_one_machine = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert choose_socket_interface(environ=agents_on_one_machine) is None
