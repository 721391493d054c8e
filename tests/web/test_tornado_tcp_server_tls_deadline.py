"""``ProxyTCPServerMixin`` with ``ssl_options``: a TLS handshake that stalls after the header is closed at
``header_timeout``, as ``ProxyHTTPServer`` closes it, and counts toward ``max_pending`` until it ends.
A real Tornado TCPServer on loopback in the test's loop; blocking clients in a thread.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path

import pytest
from support import async_test, require_module
from web_kit import self_signed

require_module("tornado")

from tornado.iostream import StreamClosedError  # noqa: E402
from tornado.netutil import bind_sockets  # noqa: E402
from tornado.tcpserver import TCPServer  # noqa: E402

from proxyproto.tornado import ProxyTCPServerMixin  # noqa: E402

HEADER = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n"
CEILING = 20.0


class Echo(ProxyTCPServerMixin, TCPServer):  # type: ignore[misc]
    async def handle_stream(self, stream, address):  # type: ignore[no-untyped-def]
        try:
            await stream.write(await stream.read_until(b"\n"))
        except StreamClosedError:
            pass


def closed_by_the_server_within(port: int, seconds: float) -> bool:
    """Send the header, never start TLS; whether the server closes the connection within ``seconds``."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(HEADER)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if sock.recv(1) == b"":
                    return True
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
        return False


@async_test
async def test_tcp_server_closes_a_handshake_stalled_after_the_header_at_header_timeout(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    if cert is None:
        pytest.skip("openssl is not installed")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)
    server = Echo(ssl_options=context, header_timeout=0.5)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    try:
        closed = await asyncio.to_thread(closed_by_the_server_within, sockets[0].getsockname()[1], 5.0)
    finally:
        server.stop()
    assert closed, "a TLS handshake stalled after the header was still open 10 x header_timeout later"


@async_test
async def test_tcp_server_counts_stalled_handshakes_in_max_pending_and_still_serves(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    if cert is None:
        pytest.skip("openssl is not installed")
    server = Echo(ssl_options=cert.server_context(), header_timeout=CEILING, max_pending=2)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]

    def closed(sock: socket.socket) -> bool:
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def stall_three_then_talk() -> tuple[list[bool], bytes]:
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=CEILING) for _ in range(3)]
        try:
            for sock in stalled:
                sock.sendall(HEADER)
                time.sleep(0.2)  # accepted in this order: the first is the oldest
            with socket.create_connection(("127.0.0.1", port), timeout=CEILING) as raw:
                raw.sendall(HEADER)
                with cert.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"hello\n")
                    answer = tls.recv(100)
            return [closed(sock) for sock in stalled[:2]], answer
        finally:
            for sock in stalled:
                sock.close()

    try:
        oldest_closed, answer = await asyncio.to_thread(stall_three_then_talk)
    finally:
        server.stop()
    assert answer == b"hello\n"
    assert oldest_closed == [True, True]  # the two oldest made room (max_pending 2); the newest waits on
