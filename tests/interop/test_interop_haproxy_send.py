"""Receiving: what haproxy ``send-proxy`` / ``send-proxy-v2`` really emits, read by proxyproto.

The independent truth is the client socket's own address (``getsockname()``):
haproxy copies it into the header, and the handler must see exactly it as
``client_address``, in the shape the socket module gives for the header's
family (a 2-tuple for INET, a 4-tuple for INET6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
from interop_support import (
    ProcessRunner,
    exchange,
    free_port,
    haproxy_config,
    require_ipv6,
    v2_crc_is_valid,
    v2_tlv_offsets,
)

from proxyproto import Command, Family

PAYLOAD = b"payload after the header\n"

SEND = {1: "send-proxy", 2: "send-proxy-v2"}


def relay_config(bind: str, server: str, send: str) -> str:
    """haproxy ``mode tcp`` from ``bind`` to ``server`` with a PROXY header."""
    return haproxy_config(
        f"""
frontend fe
    bind {bind}
    default_backend be

backend be
    server s1 {server} {send}
"""
    )


def reply_for(client_address: Any) -> bytes:
    return b"client_address=" + repr(client_address).encode() + b"\n"


def check_one_client(server: Any, wait_for_records: Callable[..., Any], own: Any, reply: bytes) -> Any:
    """Exactly one connection reached the handler; it saw our own address and our payload."""
    (rec,) = wait_for_records(server, 1)
    assert rec.error is None
    assert rec.payload == PAYLOAD
    assert reply == reply_for(rec.client_address)
    assert server.errors == []
    return rec


@pytest.mark.parametrize("version", [1, 2])
def test_haproxy_ipv4_client_address_is_real_client_G1(
    procs: ProcessRunner, proxy_server: Callable[..., Any], wait_for_records: Callable[..., Any], version: int
) -> None:
    """IPv4 client 127.0.0.2 through haproxy: the handler sees ("127.0.0.2", its port)."""
    server = proxy_server()
    port = free_port()
    procs.haproxy(relay_config(f"127.0.0.1:{port}", f"127.0.0.1:{server.address[1]}", SEND[version]), [port])
    own, reply = exchange(("127.0.0.1", port), PAYLOAD, source=("127.0.0.2", 0))
    rec = check_one_client(server, wait_for_records, own, reply)
    assert rec.client_address == own
    assert rec.header.version == version
    assert rec.header.command == Command.PROXY
    assert rec.header.family == Family.INET
    assert rec.header.source == own
    assert rec.header.destination == ("127.0.0.1", port)
    assert rec.peer[0] == "127.0.0.1" and rec.peer != own


@pytest.mark.parametrize("version", [1, 2])
def test_haproxy_ipv6_client_address_is_four_tuple(
    procs: ProcessRunner, proxy_server: Callable[..., Any], wait_for_records: Callable[..., Any], version: int
) -> None:
    """IPv6 client ::1 through haproxy to an IPv4 server: client_address is ("::1", port, 0, 0)."""
    require_ipv6()
    server = proxy_server()
    port = free_port("::1")
    procs.haproxy(relay_config(f"[::1]:{port}", f"127.0.0.1:{server.address[1]}", SEND[version]), [port])
    own, reply = exchange(("::1", port), PAYLOAD)
    rec = check_one_client(server, wait_for_records, own, reply)
    assert own[0] == "::1"
    assert rec.client_address == ("::1", own[1], 0, 0)
    assert rec.header.version == version
    assert rec.header.family == Family.INET6
    assert rec.header.source == ("::1", own[1])
    assert rec.header.destination == ("::1", port)


@pytest.mark.parametrize("version", [1, 2])
def test_haproxy_dual_stack_bind_maps_ipv4_client_to_ipv6(
    procs: ProcessRunner, proxy_server: Callable[..., Any], wait_for_records: Callable[..., Any], version: int
) -> None:
    """An IPv4 client of a ``v4v6`` bind arrives as ``::ffff:127.0.0.2``: no unmapping, 4-tuple shape.

    The bind is ``::ffff:127.0.0.1`` rather than ``::`` so that nothing listens
    beyond loopback; it is the same dual-stack (IPV6_V6ONLY off) socket.
    """
    require_ipv6()
    server = proxy_server()
    port = free_port()
    procs.haproxy(
        relay_config(f"::ffff:127.0.0.1:{port} v4v6", f"127.0.0.1:{server.address[1]}", SEND[version]),
        [port],
    )
    own, reply = exchange(("127.0.0.1", port), PAYLOAD, source=("127.0.0.2", 0))
    rec = check_one_client(server, wait_for_records, own, reply)
    assert own[0] == "127.0.0.2"
    assert rec.header.family == Family.INET6
    assert rec.header.source == ("::ffff:127.0.0.2", own[1])
    assert rec.header.destination == ("::ffff:127.0.0.1", port)
    assert rec.client_address == ("::ffff:127.0.0.2", own[1], 0, 0)


def test_haproxy_unix_frontend_v1_sends_unknown_V1(
    procs: ProcessRunner,
    proxy_server: Callable[..., Any],
    wait_for_records: Callable[..., Any],
    workdir: Path,
) -> None:
    """A client on a UNIX-socket frontend: haproxy v1 says ``PROXY UNKNOWN``; the socket peer is kept."""
    server = proxy_server()
    path = str(workdir / "fe.sock")
    procs.haproxy(relay_config(f"unix@{path}", f"127.0.0.1:{server.address[1]}", "send-proxy"), [path])
    own, reply = exchange(path, PAYLOAD)
    rec = check_one_client(server, wait_for_records, own, reply)
    assert rec.header.version == 1
    assert rec.header.to_bytes() == b"PROXY UNKNOWN\r\n"
    assert rec.header.source is None and rec.header.destination is None
    assert rec.client_address == rec.peer


@pytest.mark.parametrize("options", ["", "proxy-v2-options crc32c,unique-id,authority,ssl"])
def test_haproxy_unix_frontend_v2_sends_local_V2_R1(
    procs: ProcessRunner,
    proxy_server: Callable[..., Any],
    wait_for_records: Callable[..., Any],
    workdir: Path,
    options: str,
) -> None:
    """A client on a UNIX-socket frontend: haproxy v2 sends LOCAL (with TLVs if asked); the peer is kept."""
    server = proxy_server()
    path = str(workdir / "fe.sock")
    procs.haproxy(relay_config(f"unix@{path}", f"127.0.0.1:{server.address[1]}", f"send-proxy-v2 {options}"), [path])
    own, reply = exchange(path, PAYLOAD)
    rec = check_one_client(server, wait_for_records, own, reply)
    assert rec.header.version == 2
    assert rec.header.command == Command.LOCAL
    assert rec.header.source is None
    assert rec.client_address == rec.peer
    if options:
        assert rec.header.crc32c is not None
        assert rec.header.ssl is not None and not rec.header.ssl.client
    else:
        assert rec.header.tlvs == ()


@pytest.mark.parametrize("version", [1, 2])
def test_haproxy_unix_backend_reaches_unix_stream_server(
    procs: ProcessRunner,
    proxy_server: Callable[..., Any],
    wait_for_records: Callable[..., Any],
    workdir: Path,
    version: int,
) -> None:
    """haproxy ``server unix@path send-proxy[-v2]`` to a ThreadingProxyUnixStreamServer: TCP client seen."""
    path = str(workdir / "be.sock")
    server = proxy_server(unix_path=path)
    port = free_port()
    procs.haproxy(relay_config(f"127.0.0.1:{port}", f"unix@{path}", SEND[version]), [port])
    own, reply = exchange(("127.0.0.1", port), PAYLOAD, source=("127.0.0.2", 0))
    rec = check_one_client(server, wait_for_records, own, reply)
    assert rec.client_address == own
    assert rec.header.version == version
    assert rec.header.source == own
    assert rec.header.destination == ("127.0.0.1", port)


def test_haproxy_many_clients_each_see_their_own_address(
    procs: ProcessRunner, proxy_server: Callable[..., Any], wait_for_records: Callable[..., Any]
) -> None:
    """Twenty sequential clients from different loopback sources: no header is attributed to another."""
    server = proxy_server()
    port = free_port()
    procs.haproxy(relay_config(f"127.0.0.1:{port}", f"127.0.0.1:{server.address[1]}", "send-proxy-v2"), [port])
    owns = []
    for i in range(20):
        own, reply = exchange(("127.0.0.1", port), PAYLOAD, source=(f"127.0.0.{10 + i}", 0))
        assert reply == reply_for(own)
        owns.append(own)
    recs = wait_for_records(server, 20)
    assert sorted(r.client_address for r in recs) == sorted(owns)
    assert server.errors == []


def test_haproxy_v2_options_on_plain_tcp_send_empty_ssl_tlv_V2_TLV(
    procs: ProcessRunner, proxy_server: Callable[..., Any], wait_for_records: Callable[..., Any]
) -> None:
    """Without TLS, ``ssl`` still sends an SSL TLV (client 0, verify 0): not "verified"; CRC first and valid."""
    server = proxy_server()
    port = free_port()
    procs.haproxy(
        relay_config(
            f"127.0.0.1:{port}",
            f"127.0.0.1:{server.address[1]}",
            "send-proxy-v2 proxy-v2-options crc32c,unique-id,authority,ssl,ssl-cipher,cert-cn",
        ),
        [port],
    )
    own, reply = exchange(("127.0.0.1", port), PAYLOAD, source=("127.0.0.2", 0))
    rec = check_one_client(server, wait_for_records, own, reply)
    h = rec.header
    assert rec.client_address == own == h.source
    wire = h.to_bytes()
    assert v2_tlv_offsets(wire)[0][0] == 0x03
    assert v2_crc_is_valid(wire)
    assert h.crc32c is not None
    assert h.authority is None and h.alpn is None
    assert h.ssl is not None
    assert not h.ssl.client
    assert h.ssl.verify == 0
    assert h.ssl.verified is False
    assert h.ssl.version is None and h.ssl.cn is None and h.ssl.cipher is None
