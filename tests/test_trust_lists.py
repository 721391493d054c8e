"""Trust lists (G10): the forms users write them in, and the per-peer memory of verdicts.

``proxy_trusted`` and every adapter's ``trusted=`` go through ``TrustedNetworks``; the
comma-separated and ``"*"`` forms are gunicorn's ``proxy_allow_ips`` and uvicorn's
``--forwarded-allow-ips`` conventions.
"""

from __future__ import annotations

import ipaddress
import socketserver
from typing import Any

import pytest

from proxyproto import Settings, ThreadingProxyTCPServer
from proxyproto.policy import Policy, TrustedNetworks, pins_the_client


@pytest.mark.parametrize(
    "spec",
    ["10.0.0.0/8,127.0.0.1", " 10.0.0.0/8 , 127.0.0.1 ", ["10.0.0.0/8", "127.0.0.1"], b"10.0.0.0/8,127.0.0.1"],
)
def test_comma_separated_and_listed_forms_agree_G10(spec: object) -> None:
    trusted = TrustedNetworks(spec)  # type: ignore[arg-type]
    assert "10.1.2.3" in trusted and "127.0.0.1" in trusted
    assert "127.0.0.2" not in trusted and "192.0.2.1" not in trusted


def test_star_trusts_every_ip_peer_G10() -> None:
    trusted = TrustedNetworks("*")
    assert "192.0.2.1" in trusted and "2001:db8::1" in trusted and "::ffff:10.0.0.1" in trusted
    assert "not-an-address" not in trusted


def test_empty_string_trusts_no_one_G10() -> None:
    trusted = TrustedNetworks("")
    assert trusted.networks == ()
    assert "127.0.0.1" not in trusted


def test_ipv4_mapped_peer_matches_its_ipv4_network_G10() -> None:
    trusted = TrustedNetworks([ipaddress.ip_network("127.0.0.0/8")])
    assert "::ffff:127.0.0.1" in trusted
    assert "fe80::1%eth0" not in trusted


@pytest.mark.parametrize("spec", ["10.0.0.0/33", "10.0.0.0/8,nonsense", [object()]])
def test_unreadable_entry_is_a_value_error_naming_the_entry_and_the_knob_as_spelled_G10(spec: object) -> None:
    with pytest.raises(ValueError, match=r"cannot read .* as an IP network"):
        TrustedNetworks(spec)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^trusted: cannot read"):
        Settings(trusted=spec)
    server = ThreadingProxyTCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    try:
        with pytest.raises(ValueError, match=r"^proxy_trusted: cannot read"):
            server.proxy_trusted = spec
    finally:
        server.server_close()


def test_verdicts_are_remembered_per_peer_and_the_memory_is_bounded() -> None:
    trusted = TrustedNetworks("10.0.0.0/8")
    for i in range(5000):
        host = f"192.0.{i // 256 % 256}.{i % 256}"
        assert host not in trusted
        assert len(trusted.verdicts) <= 1024
    assert "10.9.8.7" in trusted and trusted.verdicts["10.9.8.7"] is True
    assert "10.9.8.7" in trusted  # answered from memory, same verdict


@pytest.mark.parametrize(
    "trusted",
    [ipaddress.ip_network("10.0.0.0/16"), ipaddress.ip_address("10.0.0.9"), "10.0.0.0/16"],
    ids=["ip_network", "ip_address", "str"],
)
def test_a_single_network_object_is_one_network_G10(trusted: Any) -> None:
    networks = TrustedNetworks(trusted)
    assert len(networks.networks) == 1
    assert "10.0.0.9" in networks
    assert "::ffff:10.0.0.9" in networks
    assert "10.1.0.9" not in networks


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("trusted", [True, False])
def test_the_header_pins_the_client_only_for_a_trusted_peer_whose_header_is_read(policy: Policy, trusted: bool) -> None:
    """Forwarded-header lines are turned off exactly where a trusted proxy's PROXY header is read."""
    expected = trusted and policy in (Policy.REQUIRE, Policy.USE, Policy.IGNORE)
    assert pins_the_client(policy, trusted) is expected
