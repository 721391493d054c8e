"""Receiving: dnsdist ``useProxyProtocol=true``, the one real sender of PROXY v2 over UDP.

dnsdist 1.7 puts a v2 header (protocol DGRAM) in front of every UDP datagram
it forwards, and one (protocol STREAM) at the start of each TCP connection to
its backend; its UDP health checks carry a 16-byte LOCAL header.  The backend
here is the library's own ``ThreadingProxyUDPServer`` and
``ThreadingProxyTCPServer`` on one port, answering each TXT query with the
``client_address`` its handler saw; the client checks that answer against its
own socket, so the path is proved end to end, replies included (they go back
to ``proxy_address``, i.e. through dnsdist).  A second dnsdist, in front of a handler
written for plain ``socketserver`` (its answer addressed to ``client_address``), shows that
answer relayed by dnsdist too.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from interop_support import require_ipv6, require_program
from senders_support import (
    DNSBackend,
    PlainDNSDatagramHandler,
    Program,
    Seen,
    dns_query,
    dns_txt,
    dnsdist_config,
    free_ports,
    module_workdir,
    start_program,
    udp_dns,
)

from proxyproto import Command, Family, Protocol

_ids = itertools.count(1)


@contextlib.contextmanager
def _dnsdist_in_front_of(backend: DNSBackend) -> Iterator[tuple[Program, DNSBackend, int]]:
    """dnsdist listening on 127.0.0.1 and ::1 (UDP and TCP), in front of ``backend``; both stopped at exit."""
    exe = require_program("dnsdist")
    require_ipv6()
    port = free_ports(1)[0]
    with module_workdir("dnsdist") as d:
        conf = d / "dnsdist.conf"
        conf.write_text(dnsdist_config([f"127.0.0.1:{port}", f"[::1]:{port}"], backend.address))
        proc = start_program(
            "dnsdist", [exe, "--supervised", "--disable-syslog", "-C", str(conf)], d, tcp=[port], udp_ports=[port]
        )
        try:
            # dnsdist forwards nothing to a backend it holds down: see one health check answered first.
            backend.wait(1, lambda s: s.header is not None and s.header.command == Command.LOCAL)
            yield proc, backend, port
        finally:
            proc.stop()
            backend.close()


@pytest.fixture(scope="module")
def dnsdist() -> Iterator[tuple[Program, DNSBackend, int]]:
    """One dnsdist for the module, in front of the library's servers and its ``ProxyDatagramRequestHandler``."""
    with _dnsdist_in_front_of(DNSBackend()) as running:
        yield running


@pytest.fixture
def dd(dnsdist: tuple[Program, DNSBackend, int]) -> tuple[Program, DNSBackend, int]:
    """The module's dnsdist with the backend's records cleared."""
    dnsdist[1].clear()
    return dnsdist


def _name(label: str) -> str:
    return f"{label}-{next(_ids)}.interop.example"


def _mine(qname: str) -> Any:
    return lambda s: s.extra["qname"] == qname


@pytest.mark.parametrize("client", ["ipv4", "ipv6"])
def test_dnsdist_udp_client_address_end_to_end_G8(dd: tuple[Program, DNSBackend, int], client: str) -> None:
    """UDP through dnsdist: the handler sees the client's own address; the reply returns through dnsdist."""
    _proc, backend, port = dd
    host, source = ("::1", None) if client == "ipv6" else ("127.0.0.1", ("127.0.0.2", 0))
    qname = _name(f"udp{client}")
    own, response = udp_dns((host, port), dns_query(qname, ident=0x1234), source=source)
    assert dns_txt(response) == (0x1234, 0, [repr(own)])
    (seen,) = backend.wait(1, _mine(qname))
    assert backend.errors == []
    assert seen.client_address == own
    h = seen.header
    assert h is not None
    assert (h.version, h.command, h.protocol) == (2, Command.PROXY, Protocol.DGRAM)
    assert h.family == (Family.INET6 if client == "ipv6" else Family.INET)
    assert h.source == own[:2]
    assert h.destination == (host, port)
    assert h.tlvs == ()
    # The datagram came from dnsdist, not from the client: that is where the reply went.
    assert seen.peer[0] == "127.0.0.1" and seen.peer != own


def test_dnsdist_relays_the_answer_of_a_plain_socketserver_datagram_handler_G8() -> None:
    """socketserver's own ``DatagramRequestHandler`` answers ``client_address``: the answer still goes to dnsdist.

    dnsdist relays an answer only when it comes back from the backend on the address pair the
    query went out on; one sent to the header's source (the client) would bypass it.
    """
    with _dnsdist_in_front_of(DNSBackend(PlainDNSDatagramHandler)) as (_proc, backend, port):
        qname = _name("plain")
        own, response = udp_dns(("127.0.0.1", port), dns_query(qname, ident=0x4321), source=("127.0.0.2", 0))
        assert dns_txt(response) == (0x4321, 0, [repr(own)])  # through dnsdist: it restored the client's id
        (seen,) = backend.wait(1, _mine(qname))
        assert backend.errors == []
        assert seen.client_address == own and seen.peer[0] == "127.0.0.1" and seen.peer != own


def test_dnsdist_udp_custom_tlvs_decode_V2_TLV(dd: tuple[Program, DNSBackend, int]) -> None:
    """``SetProxyProtocolValuesAction``: a custom-range TLV and AUTHORITY arrive as set, in one datagram's header."""
    _proc, backend, port = dd
    qname = _name("tlv")
    own, response = udp_dns(("127.0.0.1", port), dns_query(qname, ident=7))
    assert dns_txt(response) == (7, 0, [repr(own)])
    (seen,) = backend.wait(1, _mine(qname))
    h = seen.header
    assert h is not None and h.source == own
    assert h.tlv(0xE0) == b"hello"
    assert h.authority == "authority.example"
    assert [t.type for t in h.tlvs] == [0xE0, 0x02]  # as dnsdist lays them out, never re-sorted
    # 0xE0 is also GCP's PSC id (8 bytes): five bytes there are no id, and no reason to refuse the header.
    assert h.gcp_psc_id is None


def test_dnsdist_local_health_checks_are_answered_G8(dnsdist: tuple[Program, DNSBackend, int]) -> None:
    """dnsdist's UDP health checks carry LOCAL (16 bytes): served with the datagram's source, answered, backend up."""
    proc, backend, _port = dnsdist
    backend.clear()
    checks = backend.wait(2, lambda s: s.header is not None and s.header.command == Command.LOCAL)
    for seen in checks:
        h = seen.header
        assert h is not None
        assert (h.version, h.family, h.protocol, h.length) == (2, Family.UNSPEC, Protocol.UNSPEC, 16)
        assert h.source is None and h.tlvs == ()
        assert seen.client_address == seen.peer  # no addresses: the socket's own peer, dnsdist
        assert seen.extra["transport"] == "udp"
        assert seen.extra["qname"] == "a.root-servers.net"
    assert "as 'down'" not in proc.output(), proc.output()


def _tcp_dns(sock: socket.socket, query: bytes) -> bytes:
    sock.sendall(struct.pack("!H", len(query)) + query)
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack_from("!H", data)[0]:
        chunk = sock.recv(4096)
        assert chunk, "dnsdist closed the connection"
        data += chunk
    return data[2:]


@pytest.mark.parametrize("client", ["ipv4", "ipv6"])
def test_dnsdist_tcp_several_queries_on_one_connection(dd: tuple[Program, DNSBackend, int], client: str) -> None:
    """DNS over TCP through dnsdist: three queries on one client connection, each answered with the client's address."""
    _proc, backend, port = dd
    host = "::1" if client == "ipv6" else "127.0.0.1"
    names = [_name(f"tcp{client}") for _ in range(3)]
    with socket.create_connection((host, port), timeout=10) as sock:
        own = sock.getsockname()
        for i, qname in enumerate(names):
            assert dns_txt(_tcp_dns(sock, dns_query(qname, ident=100 + i))) == (100 + i, 0, [repr(own)])
    seen: list[Seen] = []
    for qname in names:
        seen += backend.wait(1, _mine(qname))
    assert backend.errors == []
    for s in seen:
        assert s.extra["transport"] == "tcp"
        assert s.client_address == own
        h = s.header
        assert h is not None
        assert (h.version, h.command, h.protocol) == (2, Command.PROXY, Protocol.STREAM)
        assert h.source == own[:2] and h.destination == (host, port)


def test_dnsdist_tcp_custom_tlvs_decode_V2_TLV(dd: tuple[Program, DNSBackend, int]) -> None:
    """Over TCP the TLVs set by the action are in the header at the start of the backend connection."""
    _proc, backend, port = dd
    qname = _name("tlv-tcp")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        own = sock.getsockname()
        assert dns_txt(_tcp_dns(sock, dns_query(qname, ident=9))) == (9, 0, [repr(own)])
    (seen,) = backend.wait(1, _mine(qname))
    h = seen.header
    assert h is not None and h.protocol == Protocol.STREAM and h.source == own
    assert h.tlv(0xE0) == b"hello"
    assert h.authority == "authority.example"
