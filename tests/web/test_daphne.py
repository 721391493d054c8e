"""Daphne (Django Channels' server) through the real ``daphne -e proxyproto:...`` command.

Daphne builds its listeners with Twisted's ``serverFromString``, so the
``proxyproto:`` endpoint plugin reaches it with no change to Daphne: the ASGI
application's ``scope["client"]`` is the header's source.  The application is a
Channels ``ProtocolTypeRouter`` in front of ``web_kit.app``, a minimal ASGI
application that answers a JSON report of its scope.  Each server is the real command,
stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port, require_haproxy, require_module, run_on
from web_kit import (
    DEST_V4,
    DEST_V6,
    REAL_V4,
    REAL_V6,
    ROOT,
    Certificate,
    command,
    connect,
    get,
    self_signed,
    websocket,
    ws_receive,
    ws_send,
)

import proxyproto

require_module("daphne")
require_module("channels")
require_module("twisted.internet")


#: A Channels application: its protocol router in front of web_kit's ASGI app (no Django project needed).
CHANNELS_APP = """
from channels.routing import ProtocolTypeRouter
from web_kit import app

application = ProtocolTypeRouter({"http": app, "websocket": app})
"""


@contextlib.contextmanager
def daphne(
    tmp_path: Path, endpoint: str, port: int, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()
) -> Iterator[Path]:
    """``daphne [flags] -e <endpoint> channels_app:application`` until the block ends; its output file."""
    (tmp_path / "channels_app.py").write_text(CHANNELS_APP)
    args = [sys.executable, "-m", "daphne", *flags, "-e", endpoint, "channels_app:application"]
    paths = os.pathsep.join([str(tmp_path), str(ROOT), str(ROOT / "tests" / "web")])
    with command(args, port, env={"PYTHONPATH": paths, **(env or {})}, workdir=tmp_path):
        yield tmp_path / f"server-{port}.out"


@pytest.mark.parametrize(
    "header, source",
    [
        (proxyproto.encode_v1(REAL_V4, DEST_V4), REAL_V4),
        (proxyproto.encode_v1(REAL_V6, DEST_V6), REAL_V6),
        (proxyproto.encode_v2(REAL_V4, DEST_V4), REAL_V4),
        (proxyproto.encode_v2(REAL_V6, DEST_V6), REAL_V6),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-inet", "v2-inet6"],
)
def test_scope_client_is_the_headers_source(tmp_path: Path, header: bytes, source: tuple[str, int]) -> None:
    port = free_port()
    with daphne(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), header)
            try:
                for _ in range(2):  # keep-alive: every request of the connection
                    status, seen = await conn.request()
                    assert status == 200 and seen["client"] == list(source), seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_a_websockets_scope_client_is_the_headers_source(tmp_path: Path) -> None:
    port = free_port()
    with daphne(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), proxyproto.encode_v1(REAL_V4, DEST_V4))
            try:
                seen = await websocket(conn)
                assert seen["client"] == list(REAL_V4), seen
                ws_send(conn, "echo")
                assert await ws_receive(conn) == "echo"
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_proxy_headers_never_replace_a_websockets_client_from_the_header(tmp_path: Path) -> None:
    """``--proxy-headers`` behind the endpoint: the client's own X-Forwarded-For is not its address."""
    port = free_port()
    endpoint = f"proxyproto:tcp:{port}:interface=127.0.0.1"
    with daphne(tmp_path, endpoint, port, flags=("--proxy-headers",)) as out:

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), proxyproto.encode_v1(REAL_V4, DEST_V4))
            try:
                seen = await websocket(conn, headers="X-Forwarded-For: 198.51.100.66\r\nX-Forwarded-Port: 1\r\n")
                assert seen["client"] == list(REAL_V4), seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)
    assert "--proxy-headers" in out.read_text()


def test_an_untrusted_peers_header_is_not_believed(tmp_path: Path) -> None:
    port = free_port()
    with daphne(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1:untrusted_policy=IGNORE", port) as out:

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), proxyproto.encode_v2(REAL_V4, DEST_V4), local="127.0.0.2")
            own = conn.writer.get_extra_info("sockname")
            try:
                status, seen = await conn.request()
                assert status == 200 and seen["client"] == [own[0], own[1]], seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)
    assert "127.0.0.2" in out.read_text() and "not trusted" in out.read_text()


def test_behind_real_haproxy_send_proxy_v2(tmp_path: Path) -> None:
    exe = require_haproxy()
    backend, front = free_port(), free_port()
    config = (
        "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 5s\n    timeout server 5s\n\n"
        f"listen fe\n    bind 127.0.0.1:{front}\n    server app 127.0.0.1:{backend} send-proxy-v2\n"
    )
    (tmp_path / "haproxy.cfg").write_text(config)
    with (
        daphne(tmp_path, f"proxyproto:tcp:{backend}:interface=127.0.0.1", backend),
        command([exe, "-f", str(tmp_path / "haproxy.cfg"), "-db"], front, workdir=tmp_path),
    ):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", front), local="127.0.0.2")
            own = conn.writer.get_extra_info("sockname")
            try:
                for _ in range(2):
                    status, seen = await conn.request()
                    assert status == 200 and seen["client"] == [own[0], own[1]], seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_an_ipv6_listener_and_tls_after_the_header(tmp_path: Path) -> None:
    made = self_signed(tmp_path)
    if made is None:
        pytest.skip("openssl is not installed")
    cert: Certificate = made
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
    port, tls_port = free_port(), free_port()
    tls = f"proxyproto:ssl:{tls_port}:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}"
    with daphne(tmp_path, rf"proxyproto:tcp6:{port}:interface=\:\:1", port), daphne(tmp_path, tls, tls_port):

        async def scenario() -> None:
            status, seen = await get(("::1", port), proxyproto.encode_v2(REAL_V6, DEST_V6))
            assert status == 200 and seen["client"] == list(REAL_V6), seen
            status, seen = await get(
                ("127.0.0.1", tls_port), proxyproto.encode_v2(REAL_V4, DEST_V4), tls=cert.client_context()
            )
            assert status == 200 and seen["client"] == list(REAL_V4) and seen["scheme"] == "https", seen

        run_on("asyncio", scenario)


def test_sigterm_with_connections_waiting_for_their_header_returns_promptly(tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "daphne", "-e", f"proxyproto:tcp:{port}:interface=127.0.0.1", "web_kit:app"]
    with command(args, port, workdir=tmp_path) as proc:
        parked = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        try:
            parked[0].sendall(proxyproto.encode_v2(REAL_V4, DEST_V4)[:10])  # one with half a header
            time.sleep(0.3)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            took = time.monotonic() - start
        finally:
            for sock in parked:
                sock.close()
    assert took < 5, f"daphne took {took:.1f} s to stop with 5 connections waiting for their header"
