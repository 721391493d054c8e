"""``proxyproto.aio.start_server(ssl=...)``: TLS is negotiated after the PROXY header, as everywhere.

``ssl_before_header=`` is asyncio's own ``ssl=`` (the handshake first, the header inside TLS).
Real sockets on loopback, a throw-away certificate made with the openssl command line tool.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from aio_kit import async_test
from support import self_signed_files

import proxyproto
from proxyproto import aio

REAL_V4 = ("192.0.2.10", 51234)  # data inside headers, never dialled
DEST_V4 = ("198.51.100.20", 443)
WAIT = 10.0


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for a self-signed localhost certificate (an EC key: instant)."""
    cert, key = self_signed_files(tmp_path_factory.mktemp("tls"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=cert)


def report_handler(seen: list[dict[str, Any]]) -> Any:
    """A streams callback that records what its writer tells, then echoes one line."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = writer.get_extra_info("proxy_header")
        seen.append(
            {
                "writer": type(writer),
                "peername": writer.get_extra_info("peername"),
                "proxy_peername": writer.get_extra_info("proxy_peername"),
                "header_source": None if header is None else header.source,
                "tls": writer.get_extra_info("ssl_object") is not None,
            }
        )
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    return handle


def exchange(
    connect: Any, head: bytes, client: ssl.SSLContext, *, tls_first: bool = False, inside: bytes = b""
) -> bytes:
    """Connect, send ``head`` in the clear (or, ``tls_first``, inside TLS), then ``inside`` + a line over TLS."""
    with connect() as raw:
        raw.settimeout(WAIT)
        if not tls_first:
            raw.sendall(head)
        with client.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall((head if tls_first else b"") + inside + b"ping\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return answer


async def tcp_exchange(server: asyncio.Server, *args: Any, **kwargs: Any) -> bytes:
    address = server.sockets[0].getsockname()[:2]
    return await asyncio.to_thread(exchange, lambda: socket.create_connection(address, timeout=WAIT), *args, **kwargs)


@async_test
async def test_ssl_is_negotiated_after_the_header(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    seen: list[dict[str, Any]] = []
    server = await aio.start_server(report_handler(seen), "127.0.0.1", 0, ssl=server_ctx)
    async with server:
        answer = await tcp_exchange(server, proxyproto.encode_v2(REAL_V4, DEST_V4), client_ctx)
    assert answer == b"ping\n"
    [report] = seen
    assert report["writer"] is aio.ProxyStreamWriter
    assert report["tls"] is True
    assert report["peername"] == REAL_V4 and report["header_source"] == REAL_V4
    assert report["proxy_peername"][0] == "127.0.0.1"


@async_test
async def test_ssl_after_the_header_from_an_untrusted_peer_is_tls_at_once_and_its_header_unused(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """SKIP for strangers: no header is looked for, the handshake starts at the first byte."""
    server_ctx, client_ctx = contexts
    seen: list[dict[str, Any]] = []
    server = await aio.start_server(report_handler(seen), "127.0.0.1", 0, ssl=server_ctx, trusted="10.0.0.0/8")
    async with server:
        answer = await tcp_exchange(server, b"", client_ctx)
    assert answer == b"ping\n"
    [report] = seen
    assert report["tls"] is True and report["header_source"] is None
    assert report["peername"] == report["proxy_peername"] and report["peername"][0] == "127.0.0.1"


@async_test
async def test_ssl_after_the_header_on_a_unix_socket(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    server_ctx, client_ctx = contexts
    seen: list[dict[str, Any]] = []
    path = str(tmp_path / "s.sock")
    server = await aio.start_unix_server(report_handler(seen), path, ssl=server_ctx)
    os.chmod(path, 0o600)  # its permissions restrict who can connect: its peers are trusted by default

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock

    async with server:
        answer = await asyncio.to_thread(exchange, connect, proxyproto.encode_v2(REAL_V4, DEST_V4), client_ctx)
    assert answer == b"ping\n"
    [report] = seen
    assert report["tls"] is True and report["peername"] == REAL_V4


@async_test
async def test_ssl_before_header_is_asyncios_tls_with_the_header_inside(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = contexts
    seen: list[dict[str, Any]] = []
    server = await aio.start_server(report_handler(seen), "127.0.0.1", 0, ssl_before_header=server_ctx)
    async with server:
        answer = await tcp_exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4), client_ctx, tls_first=True)
    assert answer == b"ping\n"
    [report] = seen
    assert report["writer"] is aio.ProxyStreamWriter
    assert report["tls"] is True and report["peername"] == REAL_V4


def test_ssl_and_ssl_before_header_together_are_refused() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    async def main() -> None:
        with pytest.raises(ValueError, match=r"^ssl= \(TLS negotiated after the PROXY header\) and ssl_before_header="):
            await aio.start_server(report_handler([]), "127.0.0.1", 0, ssl=context, ssl_before_header=context)

    asyncio.run(main())


@pytest.mark.parametrize("policy", ["USE", "IGNORE", "REJECT"])
def test_ssl_refuses_the_policies_that_look_at_the_first_bytes(policy: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    async def main() -> None:
        with pytest.raises(ValueError, match=rf"^policy={policy} with ssl=: "):
            await aio.start_server(report_handler([]), "127.0.0.1", 0, ssl=context, policy=policy)

    asyncio.run(main())


@async_test
async def test_closing_the_server_closes_connections_still_waiting_for_their_header(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, _ = contexts
    server = await aio.start_server(report_handler([]), "127.0.0.1", 0, ssl=server_ctx, header_timeout=WAIT)
    address = server.sockets[0].getsockname()[:2]

    def silent_client(connected: Any) -> float:
        with socket.create_connection(address, timeout=WAIT) as sock:
            connected.set()
            started = time.monotonic()
            assert sock.recv(1) == b""
            return time.monotonic() - started

    loop = asyncio.get_running_loop()
    connected = asyncio.Event()

    class Flag:
        def set(self) -> None:
            loop.call_soon_threadsafe(connected.set)

    waited = asyncio.ensure_future(asyncio.to_thread(silent_client, Flag()))
    await connected.wait()
    await asyncio.sleep(0.1)  # accepted, and waiting for its header
    server.close()
    assert await waited < WAIT / 2
    await server.wait_closed()
