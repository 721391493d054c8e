"""Receiving: h2o 2.2 ``proxy.proxy-protocol: ON`` (PROXY v1) in front of a retrofitted ``http.server``.

h2o refuses ``proxy.proxy-protocol`` unless upstream keep-alive is off
(``proxy.timeout.keepalive: 0``), so every request reaches the backend on a
new connection with its own v1 line.  Run as root, h2o switches to
``nobody`` and could not write a PID file in the test's directory, so the
configuration has none; it is stopped by PID like every other program.
"""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from interop_support import require_ipv6, require_program
from senders_support import (
    Backend,
    Program,
    free_ports,
    h2o_config,
    http_backend,
    module_workdir,
    start_program,
)

from proxyproto import Command, Family


@dataclass
class H2O:
    proc: Program
    backend: Backend
    v4_port: int
    v6_port: int


@pytest.fixture(scope="module")
def h2o() -> Iterator[H2O]:
    """One h2o listening on 127.0.0.1 and ::1, reverse-proxying to the retrofitted server."""
    exe = require_program("h2o")
    require_ipv6()
    backend = http_backend()
    v4_port, v6_port = free_ports(2)
    try:
        with module_workdir("h2o") as d:
            conf = d / "h2o.conf"
            error_log = d / "error.log"
            conf.write_text(h2o_config([("127.0.0.1", v4_port), ("::1", v6_port)], backend.address, error_log))
            check = subprocess.run(
                [exe, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30, check=False
            )
            assert check.returncode == 0, check.stdout + check.stderr
            proc = start_program("h2o", [exe, "-c", str(conf)], d, tcp=[v4_port, v6_port], logs=[error_log])
            try:
                yield H2O(proc, backend, v4_port, v6_port)
            finally:
                proc.stop()
    finally:
        backend.close()


@pytest.mark.parametrize("client", ["ipv4", "ipv6"])
def test_h2o_v1_client_address_on_every_request(h2o: H2O, client: str) -> None:
    """Two requests on one client connection: each arrives with a v1 line naming that client."""
    h2o.backend.clear()
    if client == "ipv6":
        conn = http.client.HTTPConnection("::1", h2o.v6_port, timeout=10)
        listen = ("::1", h2o.v6_port)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", h2o.v4_port, timeout=10, source_address=("127.0.0.2", 0))
        listen = ("127.0.0.1", h2o.v4_port)
    paths = ["/one", "/two"]
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
    finally:
        conn.close()
    seen = h2o.backend.wait(len(paths))
    assert h2o.backend.errors == []
    assert [s.payload.decode() for s in seen] == paths
    assert len({s.peer for s in seen}) == len(paths)  # a new upstream connection per request
    for s in seen:
        h = s.header
        assert h is not None and (h.version, h.command) == (1, Command.PROXY)
        assert h.family == (Family.INET6 if client == "ipv6" else Family.INET)
        assert h.source == own[:2]
        assert h.destination == listen
        assert s.client_address == own
