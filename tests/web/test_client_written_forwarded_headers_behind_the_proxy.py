"""A client behind a TCP-mode proxy writes its own X-Forwarded-* lines: they must not override what the
trusted proxy's PROXY header says (the address) nor the scheme, in any adapter.

Daphne with ``--proxy-headers``, gunicorn's WSGI workers (whose default ``--forwarded-allow-ips`` holds
the proxy's own address) and Tornado with ``xheaders=True`` each once believed such lines.  Real servers
on loopback, stopped by PID; every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import async_test, free_port, require_module
from web_kit import command

CEILING = 20.0
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
SPOOF = "X-Forwarded-For: 198.51.100.66\r\nX-Real-Ip: 198.51.100.66\r\nX-Forwarded-Proto: https\r\n"


def exchange(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    """``data`` on a fresh connection from 127.0.0.1 (a trusted proxy); the status and the JSON report."""
    with socket.create_connection(("127.0.0.1", port), timeout=CEILING) as sock:
        sock.sendall(data)
        response = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def get(extra: str = "") -> bytes:
    return f"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n".encode()


# -- Daphne ----------------------------------------------------------------------------------------


def test_daphne_proxy_headers_never_replace_a_trusted_headers_client(tmp_path: Path) -> None:
    require_module("daphne")
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "daphne",
        "--proxy-headers",
        "-e",
        f"proxyproto:tcp:{port}:interface=127.0.0.1",
        "gunicorn_kit:asgi_app",
    ]
    with command(args, port, workdir=tmp_path):
        status, report = exchange(port, V1 + get(SPOOF + "X-Forwarded-Port: 1\r\n"))
    assert status == 200
    assert report["client"] == ["203.0.113.7", 5555]
    assert report["scheme"] == "http"
    # The endpoint turned Daphne's --proxy-headers off, and said so once.
    said = (tmp_path / f"server-{port}.out").read_text()
    assert said.count("--proxy-headers") == 1 and "WARNING" in said, said


# -- gunicorn's WSGI workers -----------------------------------------------------------------------


V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


@pytest.mark.parametrize("worker", ["sync", "gthread"])
@pytest.mark.parametrize("header", [V1_UNKNOWN, V2_LOCAL], ids=["v1-unknown", "v2-local"])
def test_gunicorn_scheme_is_never_set_by_a_client_behind_the_trusted_proxy(
    worker: str, header: bytes, tmp_path: Path
) -> None:
    require_module("gunicorn")
    import gunicorn_kit

    with gunicorn_kit.gunicorn(worker, tmp_path, workers=1) as server:
        status, report = exchange(server.port, header + get(SPOOF))
    assert status == 200
    assert report["scheme"] == "http", "a client-written X-Forwarded-Proto set the scheme"


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_scheme_is_never_set_by_a_client_of_the_trusted_proxy_without_a_header(
    worker: str, tmp_path: Path
) -> None:
    require_module("gunicorn")
    import gunicorn_kit

    with gunicorn_kit.gunicorn(worker, tmp_path, "--proxy-protocol", "auto", workers=1) as server:
        status, report = exchange(server.port, get(SPOOF))
        log = server.log()
    assert status == 200
    assert report["scheme"] == "http", "a client-written X-Forwarded-Proto set the scheme"
    assert "secure_scheme_headers and forwarder_headers are off for peers trusted" in log, log


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_forwarded_allow_ips_chosen_by_the_operator_keeps_gunicorns_meaning(
    worker: str, tmp_path: Path
) -> None:
    require_module("gunicorn")
    import gunicorn_kit

    env = {"FORWARDED_ALLOW_IPS": "127.0.0.1"}
    with gunicorn_kit.gunicorn(worker, tmp_path, env=env, workers=1) as server:
        status, report = exchange(server.port, V1_UNKNOWN + get(SPOOF))
    assert status == 200
    assert report["scheme"] == "https"


# -- Tornado ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tornado_serving(**kw: Any) -> AsyncIterator[int]:
    require_module("tornado")
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler

    from proxyproto.tornado import ProxyHTTPServer

    class Report(RequestHandler):
        def get(self) -> None:
            self.finish({"client": self.request.remote_ip, "scheme": self.request.protocol})

    server = ProxyHTTPServer(Application([(r"/.*", Report)]), **kw)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    try:
        yield sockets[0].getsockname()[1]
    finally:
        server.stop()
        await asyncio.wait_for(server.close_all_connections(), CEILING)


@async_test
async def test_tornado_xheaders_never_take_the_client_from_a_client_behind_the_trusted_proxy() -> None:
    async with tornado_serving(xheaders=True) as port:
        status, report = await asyncio.to_thread(exchange, port, V1_UNKNOWN + get(SPOOF))
    assert status == 200
    assert report["client"] == "127.0.0.1"


@async_test
async def test_tornado_xheaders_never_take_the_scheme_from_a_client_behind_the_trusted_proxy() -> None:
    async with tornado_serving(xheaders=True) as port:
        status, report = await asyncio.to_thread(exchange, port, V1 + get(SPOOF))
    assert status == 200
    assert report == {"client": "203.0.113.7", "scheme": "http"}
