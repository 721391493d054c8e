"""IPv4 and IPv6 in one header: ``send`` writes only what was asked; ``relay`` says what its socket saw.

``send --source`` and ``--destination`` of two families are refused (test_cli_exit_status.py);
an IPv4 address written as ``[::ffff:a.b.c.d]`` is IPv6, and goes out exactly so.  A relay
listening on ``[::]`` is dual-stack: an IPv4 client reaches it as ``::ffff:a.b.c.d``, and the
listening address it reached is mapped too, so the header is TCP6 with both sides mapped,
as haproxy sends it from a ``v4v6`` bind (docs/udp-asyncio-cli.rst says so).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from cli_kit import capture_send, cli_background, require_ipv6, tcp_header_server

import proxyproto

MAPPED = ["--source", "[::ffff:192.0.2.10]:51234", "--destination", "[2001:db8::1]:443"]


def test_send_v2_writes_an_explicit_v4_mapped_source_as_given() -> None:
    status, received = capture_send(*MAPPED, stdin=b"x")
    assert status == 0
    assert received == proxyproto.encode_v2(("::ffff:192.0.2.10", 51234), ("2001:db8::1", 443)) + b"x"
    assert received[13] == 0x21  # TCP over IPv6
    header = proxyproto.parse(received)
    assert header.source == ("::ffff:192.0.2.10", 51234) and header.destination == ("2001:db8::1", 443)


def test_send_v1_writes_an_explicit_v4_mapped_source_as_given() -> None:
    status, received = capture_send("--v1", *MAPPED, stdin=b"x")
    assert status == 0
    assert received == b"PROXY TCP6 ::ffff:192.0.2.10 2001:db8::1 51234 443\r\nx"


def _through_relay(port: int, client_host: str, bind: str) -> tuple[tuple[str, int], dict[str, object]]:
    family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.bind((bind, 0))
        sock.connect((client_host, port))
        own = sock.getsockname()[:2]
        line = sock.makefile("rb").readline()
    return own, json.loads(line)


@pytest.mark.parametrize("version", ["--v1", "--v2"])
def test_relay_on_a_dual_stack_listener_maps_ipv4_clients_on_both_sides(version: str, tmp_path: Path) -> None:
    require_ipv6()
    with tcp_header_server() as upstream:
        args = ["relay", "--listen", "[::]:0", "--upstream", f"127.0.0.1:{upstream.server_address[1]}", version]
        with cli_background(tmp_path, *args) as (_, port):
            own, seen = _through_relay(port, "127.0.0.1", "127.0.0.2")
            assert seen == {
                "client_address": [f"::ffff:{own[0]}", own[1]],
                "family": "INET6",
                "source": [f"::ffff:{own[0]}", own[1]],
                "destination": ["::ffff:127.0.0.1", port],
            }
            own6, seen6 = _through_relay(port, "::1", "::1")
            assert seen6["family"] == "INET6"
            assert seen6["source"] == [own6[0], own6[1]] and seen6["destination"] == ["::1", port]


def test_relay_on_an_ipv4_listener_sends_tcp4(tmp_path: Path) -> None:
    with tcp_header_server() as upstream:
        args = ["relay", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream.server_address[1]}"]
        with cli_background(tmp_path, *args) as (_, port):
            own, seen = _through_relay(port, "127.0.0.1", "127.0.0.2")
    assert seen["family"] == "INET" and seen["source"] == [own[0], own[1]]
    assert seen["destination"] == ["127.0.0.1", port]
