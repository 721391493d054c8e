"""Receiving: hitch 1.7 ``write-proxy-v2 = on`` and ``write-proxy-v1 = on`` behind TLS.

hitch terminates TLS and writes the header before any client byte.  v2
carries what the TLS handshake settled: ALPN (when the client offered it),
AUTHORITY (the SNI), and an SSL TLV whose client field is 0x01 (TLS, no
client certificate), verify 1 (nothing was verified), and VERSION and CIPHER
sub-TLVs.  Every one of them is checked against what the client's own
``ssl`` socket reports.  hitch forks its worker; senders_support stops it
and the worker by PID.  One hitch per PROXY version, each started once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from interop_support import require_ipv6, require_program
from senders_support import (
    Backend,
    Program,
    SelfSigned,
    TLSResult,
    free_ports,
    hitch_config,
    line_backend,
    module_workdir,
    self_signed,
    start_program,
    tls_exchange,
)

from proxyproto import Command, Family, SSLClient

PAYLOAD = b"through hitch\n"


@dataclass
class Hitch:
    proc: Program
    cert: SelfSigned
    backend: Backend
    v4_port: int
    v6_port: int


def _hitch(version: int) -> Iterator[Hitch]:
    exe = require_program("hitch")
    require_ipv6()
    backend = line_backend()
    v4_port, v6_port = free_ports(2)
    try:
        with module_workdir(f"hitch{version}") as d:
            cert = self_signed(d)
            conf = d / "hitch.conf"
            frontends = [f"[127.0.0.1]:{v4_port}", f"[::1]:{v6_port}"]
            conf.write_text(hitch_config(frontends, backend.address, cert.pem, version))
            argv = [exe, f"--config={conf}", "--user=nobody", "--group=nogroup"]
            proc = start_program("hitch", argv, d, tcp=[v4_port, v6_port])
            try:
                yield Hitch(proc, cert, backend, v4_port, v6_port)
            finally:
                proc.stop()
    finally:
        backend.close()


@pytest.fixture(scope="module")
def hitch_v2() -> Iterator[Hitch]:
    yield from _hitch(2)


@pytest.fixture(scope="module")
def hitch_v1() -> Iterator[Hitch]:
    yield from _hitch(1)


def _exchange(h: Hitch, client: str, alpn: Sequence[str] = (), tls12: bool = False) -> TLSResult:
    """One TLS client from 127.0.0.2 or ::1, after clearing the backend's records."""
    h.backend.clear()
    if client == "ipv6":
        return tls_exchange(("::1", h.v6_port), PAYLOAD, cert=h.cert, alpn=alpn, tls12=tls12)
    address = ("127.0.0.1", h.v4_port)
    return tls_exchange(address, PAYLOAD, cert=h.cert, alpn=alpn, tls12=tls12, source=("127.0.0.2", 0))


CASES = [
    pytest.param("ipv4", ["h2", "http/1.1"], False, id="ipv4-h2-tls13"),
    pytest.param("ipv6", ["http/1.1"], True, id="ipv6-http11-tls12"),
    pytest.param("ipv4", [], False, id="ipv4-no-alpn"),
]


@pytest.mark.parametrize(("client", "alpn", "tls12"), CASES)
def test_hitch_v2_tlvs_match_the_tls_client_V2_TLV(hitch_v2: Hitch, client: str, alpn: list, tls12: bool) -> None:
    """ALPN, SNI as AUTHORITY, SSL version and cipher decode to what the client negotiated; not verified."""
    result = _exchange(hitch_v2, client, alpn=alpn, tls12=tls12)
    (seen,) = hitch_v2.backend.wait(1)
    assert hitch_v2.backend.errors == []
    assert seen.payload == PAYLOAD
    assert seen.client_address == result.own
    assert result.reply == b"client_address=" + repr(result.own).encode() + b"\n"
    h = seen.header
    assert h is not None and (h.version, h.command) == (2, Command.PROXY)
    assert h.family == (Family.INET6 if client == "ipv6" else Family.INET)
    assert h.source == result.own[:2]
    assert h.destination == (("::1", hitch_v2.v6_port) if client == "ipv6" else ("127.0.0.1", hitch_v2.v4_port))
    # What the client's own TLS stack says, independently of the header.
    assert result.alpn == (alpn[0] if alpn else None)
    assert result.version == ("TLSv1.2" if tls12 else "TLSv1.3")
    assert h.alpn == (result.alpn.encode() if result.alpn else None)
    assert h.authority == hitch_v2.cert.name
    ssl = h.ssl
    assert ssl is not None
    assert ssl.client == SSLClient.SSL
    assert ssl.verify == 1
    assert ssl.verified is False
    assert ssl.version == result.version
    assert ssl.cipher == result.cipher
    assert ssl.cn is None and ssl.client_cert is None


@pytest.mark.parametrize("client", ["ipv4", "ipv6"])
def test_hitch_v1_client_address_is_the_tls_client(hitch_v1: Hitch, client: str) -> None:
    """``write-proxy-v1``: TCP4 or TCP6, the handler sees the TLS client's own address."""
    result = _exchange(hitch_v1, client)
    (seen,) = hitch_v1.backend.wait(1)
    assert seen.payload == PAYLOAD
    assert seen.client_address == result.own
    h = seen.header
    assert h is not None and h.version == 1
    assert h.family == (Family.INET6 if client == "ipv6" else Family.INET)
    assert h.source == result.own[:2]
