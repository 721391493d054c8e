"""Receiving: varnish 7.1 backends with ``.proxy_header = 1`` and ``= 2``, in front of a retrofitted ``http.server``.

varnishd opens a new backend connection, header first, for each request it
passes (``return (pass)``), and never reuses a connection that carried a
PROXY header for another client.  The backend is ``http.server``'s
``ThreadingHTTPServer`` with ``ProxyProtocolMixin`` added, HTTP/1.1
keep-alive on both sides: several requests on one client connection, each
served with that client's own address.  One varnishd for the module; the
path picks the PROXY version (``/v1/...`` or ``/v2/...``).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from interop_support import require_ipv6, require_program
from senders_support import (
    Backend,
    Program,
    free_ports,
    http_backend,
    module_workdir,
    start_program,
    varnish_vcl,
)

from proxyproto import Command, Family


@dataclass
class Varnish:
    proc: Program
    backend: Backend
    v4_port: int
    v6_port: int


@pytest.fixture(scope="module")
def varnish() -> Iterator[Varnish]:
    """``varnishd -F`` listening on 127.0.0.1 and ::1, both backends pointing at one retrofitted server."""
    exe = require_program("varnishd")
    require_ipv6()
    backend = http_backend()
    v4_port, v6_port = free_ports(2)
    try:
        with module_workdir("varnish") as d:
            vcl = d / "default.vcl"
            vcl.write_text(varnish_vcl(backend.address))
            argv = [exe, "-F", "-n", str(d / "varnish"), "-T", "none", "-f", str(vcl), "-s", "malloc,32m"]
            argv += ["-a", f"127.0.0.1:{v4_port}", "-a", f"[::1]:{v6_port}"]
            proc = start_program("varnishd", argv, d, tcp=[v4_port, v6_port])
            try:
                yield Varnish(proc, backend, v4_port, v6_port)
            finally:
                proc.stop()
    finally:
        backend.close()


@pytest.mark.parametrize("client", ["ipv4", "ipv6"])
def test_varnish_keep_alive_requests_each_carry_the_client_address(varnish: Varnish, client: str) -> None:
    """Three requests on one client connection (v1, v2, v1): each handler sees the client's own address."""
    varnish.backend.clear()
    if client == "ipv6":
        conn = http.client.HTTPConnection("::1", varnish.v6_port, timeout=10)
        listen = ("::1", varnish.v6_port)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", varnish.v4_port, timeout=10, source_address=("127.0.0.2", 0))
        listen = ("127.0.0.1", varnish.v4_port)
    paths = ["/v1/first", "/v2/second", "/v1/third"]
    try:
        conn.connect()
        assert conn.sock is not None
        own = conn.sock.getsockname()
        for path in paths:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, body
            assert json.loads(body) == {"client_address": list(own), "path": path}
            assert conn.sock is not None and conn.sock.getsockname() == own  # still the same connection
    finally:
        conn.close()
    seen = varnish.backend.wait(len(paths))
    assert varnish.backend.errors == []
    assert [s.payload.decode() for s in seen] == paths
    assert len({s.peer for s in seen}) == len(paths)  # a backend connection (and header) per request
    for s in seen:
        h = s.header
        assert h is not None and h.command == Command.PROXY
        assert h.version == int(s.payload.decode()[2])
        assert h.family == (Family.INET6 if client == "ipv6" else Family.INET)
        assert h.source == own[:2]
        assert h.destination == listen
        assert s.client_address == own
        assert s.peer[0] == "127.0.0.1" and s.peer[1] != own[1]  # the socket's peer is varnishd
