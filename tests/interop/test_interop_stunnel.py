"""Receiving: stunnel 5.68 ``protocol = proxy`` (PROXY v1) behind a TLS server service.

stunnel terminates TLS and writes a v1 line to its ``connect`` target: TCP4
for an IPv4 accept, TCP6 for an IPv6 accept, and, on a socket that accepts
both, ``TCP6 ::ffff:a.b.c.d`` for IPv4 clients.  In that last case the
handler's ``client_address`` is the mapped IPv6 tuple
``('::ffff:127.0.0.2', port, 0, 0)``: the library keeps a header's source
as sent.  ``proxy_trusted`` is about the *peer* (stunnel itself), and a
backend on a dual-stack socket sees stunnel's IPv4 connection as
``::ffff:127.0.0.1``, which matches ``127.0.0.0/8``.

The dual-stack accept is bound to ``::ffff:127.0.0.1`` rather than ``::`` so
the test stays on loopback; the kernel treats both the same way for IPv4
clients.  One stunnel serves every case of the module.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from interop_support import require_ipv6, require_program
from senders_support import (
    Backend,
    Program,
    SelfSigned,
    free_ports,
    line_backend,
    module_workdir,
    self_signed,
    start_program,
    stunnel_config,
    tls_exchange,
)

from proxyproto import Command, Family, Policy

PAYLOAD = b"through stunnel\n"


@dataclass
class Stunnel:
    proc: Program
    cert: SelfSigned
    backend: Backend  # IPv4 listener, every proxy trusted
    trusting: Backend  # dual-stack (IPv4-mapped) listener, proxy_trusted = 127.0.0.0/8
    distrusting: Backend  # dual-stack listener, proxy_trusted = 10.0.0.0/8: stunnel is not trusted
    ports: dict[str, int]


@pytest.fixture(scope="module")
def stunnel() -> Iterator[Stunnel]:
    """One stunnel with five services, each ``protocol = proxy``, in front of the library's servers."""
    exe = require_program("stunnel")
    require_ipv6()
    backend = line_backend()
    trusting = line_backend("::ffff:127.0.0.1", proxy_trusted="127.0.0.0/8")
    distrusting = line_backend("::ffff:127.0.0.1", proxy_trusted="10.0.0.0/8")
    names = ("v4", "v6", "dual", "trusting", "distrusting")
    ports = dict(zip(names, free_ports(len(names))))
    try:
        with module_workdir("stunnel") as d:
            cert = self_signed(d)
            to_backend = backend.address
            # The dual-stack backends listen on ::ffff:127.0.0.1; stunnel dials them over IPv4.
            services = {
                "v4": (f"127.0.0.1:{ports['v4']}", to_backend),
                "v6": (f"::1:{ports['v6']}", to_backend),
                "dual": (f"::ffff:127.0.0.1:{ports['dual']}", to_backend),
                "trusting": (f"::ffff:127.0.0.1:{ports['trusting']}", ("127.0.0.1", trusting.address[1])),
                "distrusting": (f"::ffff:127.0.0.1:{ports['distrusting']}", ("127.0.0.1", distrusting.address[1])),
            }
            conf = stunnel_config(services, cert.pem)
            (d / "stunnel.conf").write_text(conf)
            proc = start_program("stunnel", [exe, str(d / "stunnel.conf")], d, tcp=list(ports.values()))
            try:
                yield Stunnel(proc, cert, backend, trusting, distrusting, ports)
            finally:
                proc.stop()
    finally:
        for b in (backend, trusting, distrusting):
            b.close()


@pytest.fixture
def st(stunnel: Stunnel) -> Stunnel:
    for b in (stunnel.backend, stunnel.trusting, stunnel.distrusting):
        b.clear()
    return stunnel


@pytest.mark.parametrize("client", ["ipv4", "ipv6"])
def test_stunnel_v1_client_address_is_the_tls_client(st: Stunnel, client: str) -> None:
    """An IPv4 accept sends TCP4, an IPv6 accept TCP6: the handler sees the TLS client's own address."""
    if client == "ipv6":
        result = tls_exchange(("::1", st.ports["v6"]), PAYLOAD, cert=st.cert)
    else:
        result = tls_exchange(("127.0.0.1", st.ports["v4"]), PAYLOAD, cert=st.cert, source=("127.0.0.2", 0))
    (seen,) = st.backend.wait(1)
    assert st.backend.errors == []
    assert seen.payload == PAYLOAD
    assert seen.client_address == result.own
    assert result.reply == b"client_address=" + repr(result.own).encode() + b"\n"
    h = seen.header
    assert h is not None and (h.version, h.command) == (1, Command.PROXY)
    if client == "ipv6":
        assert h.family == Family.INET6
        assert h.source == ("::1", result.own[1]) and h.destination == ("::1", st.ports["v6"])
    else:
        assert h.family == Family.INET
        assert h.source == ("127.0.0.2", result.own[1]) and h.destination == ("127.0.0.1", st.ports["v4"])
    assert seen.peer[0] == "127.0.0.1" and seen.peer[1] != result.own[1]  # the socket's peer is stunnel


def test_stunnel_dual_stack_accept_sends_mapped_tcp6_for_ipv4_clients(st: Stunnel) -> None:
    """A dual-stack accept sends ``TCP6 ::ffff:127.0.0.2``: ``client_address`` keeps the mapped form, as sent."""
    result = tls_exchange(("127.0.0.1", st.ports["dual"]), PAYLOAD, cert=st.cert, source=("127.0.0.2", 0))
    assert result.own == ("127.0.0.2", result.own[1])  # the client itself spoke IPv4
    (seen,) = st.backend.wait(1)
    h = seen.header
    assert h is not None and h.family == Family.INET6
    line = h.to_bytes()
    assert line == f"PROXY TCP6 ::ffff:127.0.0.2 ::ffff:127.0.0.1 {result.own[1]} {st.ports['dual']}\r\n".encode()
    assert h.source == ("::ffff:127.0.0.2", result.own[1])
    assert seen.client_address == ("::ffff:127.0.0.2", result.own[1], 0, 0)
    assert result.reply == b"client_address=" + repr(("::ffff:127.0.0.2", result.own[1], 0, 0)).encode() + b"\n"


def test_stunnel_on_dual_stack_backend_mapped_peer_matches_ipv4_trust(st: Stunnel) -> None:
    """Backend on a dual-stack socket: stunnel's peer is ``::ffff:127.0.0.1``, trusted by ``127.0.0.0/8``."""
    result = tls_exchange(("127.0.0.1", st.ports["trusting"]), PAYLOAD, cert=st.cert, source=("127.0.0.2", 0))
    (seen,) = st.trusting.wait(1)
    assert seen.peer[0] == "::ffff:127.0.0.1"
    assert seen.header is not None and seen.header.source == ("::ffff:127.0.0.2", result.own[1])
    assert seen.client_address == ("::ffff:127.0.0.2", result.own[1], 0, 0)
    assert seen.payload == PAYLOAD


def test_stunnel_untrusted_mapped_peer_gets_skip_header_is_payload_G10(st: Stunnel) -> None:
    """``proxy_trusted = 10.0.0.0/8``: stunnel (``::ffff:127.0.0.1``) is untrusted, SKIP: the line stays payload."""
    assert st.distrusting.server.proxy_untrusted_policy == Policy.SKIP
    result = tls_exchange(("127.0.0.1", st.ports["distrusting"]), PAYLOAD, cert=st.cert, source=("127.0.0.2", 0))
    (seen,) = st.distrusting.wait(1)
    assert seen.header is None
    assert seen.client_address == seen.peer and seen.peer[0] == "::ffff:127.0.0.1"
    line = f"PROXY TCP6 ::ffff:127.0.0.2 ::ffff:127.0.0.1 {result.own[1]} {st.ports['distrusting']}\r\n"
    # The handler reads up to the first LF: the line, and the client's bytes if they came in the same segment.
    assert seen.payload.startswith(line.encode())


def test_stunnel_refuses_protocol_proxy_in_client_mode(tmp_path: Path) -> None:
    """stunnel sends PROXY only as a TLS server: ``client = yes`` with ``protocol = proxy`` is a config error."""
    exe = require_program("stunnel")
    conf = tmp_path / "client.conf"
    conf.write_text(
        "foreground = yes\npid =\n[c]\nclient = yes\naccept = 127.0.0.1:1\nconnect = 127.0.0.1:2\nprotocol = proxy\n"
    )
    out = subprocess.run([exe, str(conf)], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode != 0
    assert "'proxy' protocol is not supported in the client mode" in out.stdout + out.stderr
