"""TLS after the header is bounded like the header: ``wrap_protocol_factory(..., ssl=ctx)``.

The handshake that follows the header (or, for an untrusted peer under SKIP,
starts at once) gets ``header_timeout`` unless ``ssl_handshake_timeout`` is
given, not asyncio's 60 s; and the connection counts toward ``max_pending``
until the handshake is done.  Real sockets on loopback, asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import pytest
from aio_kit import DEST_V4, REAL_V4, run_on
from support import self_signed_files

import proxyproto
from proxyproto.aio_protocol import wrap_protocol_factory

V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)
LOOPS = ["asyncio", "uvloop"]


class Echo(asyncio.Protocol):
    """Echoes every byte."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for a self-signed localhost certificate."""
    cert, key = self_signed_files(tmp_path_factory.mktemp("tls"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=cert)


async def closed_after(reader: asyncio.StreamReader, bound: float) -> float:
    """Seconds until the server closes the connection (EOF or reset), waiting at most ``bound``."""
    began = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), bound):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return time.monotonic() - began


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("client", ["trusted-header-then-nothing", "untrusted-skip-nothing-at-all"], ids=lambda c: c)
def test_stalled_tls_handshake_is_closed_at_the_header_timeout(
    loop: str, client: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    """header_timeout=0.5 and no ssl_handshake_timeout: closed within a few seconds, not 60."""
    caplog.set_level(logging.INFO, logger="proxyproto")
    server_ctx, _ = contexts
    held: list[float] = []

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        factory = wrap_protocol_factory(Echo, ssl=server_ctx, trusted="127.0.0.1", header_timeout=0.5)
        assert factory.ssl_handshake_timeout == 0.5
        server = await running.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        async with server:
            if client == "trusted-header-then-nothing":
                reader, writer = await asyncio.open_connection(*address, local_addr=("127.0.0.1", 0))
                writer.write(V2)
            else:  # 127.0.0.2 is not trusted: SKIP, the handshake starts at once
                reader, writer = await asyncio.open_connection(*address, local_addr=("127.0.0.2", 0))
            await asyncio.sleep(0.1)
            assert factory.pending == 1  # counted while the handshake waits
            held.append(await closed_after(reader, 10.0))
            writer.close()
            assert factory.pending == 0

    run_on(loop, scenario)
    assert 0.3 < held[0] < 5.0, f"held {held[0]:.2f} s"
    lines = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("127.0.0."), lines


@pytest.mark.parametrize("loop", LOOPS)
def test_explicit_ssl_handshake_timeout_is_used_as_given(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, _ = contexts
    held: list[float] = []

    async def scenario() -> None:
        factory = wrap_protocol_factory(Echo, ssl=server_ctx, header_timeout=30.0, ssl_handshake_timeout=0.3)
        assert factory.ssl_handshake_timeout == 0.3
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        async with server:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            writer.write(V2)
            held.append(await closed_after(reader, 10.0))
            writer.close()

    run_on(loop, scenario)
    assert 0.2 < held[0] < 5.0, f"held {held[0]:.2f} s"


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "5", True])
def test_invalid_ssl_handshake_timeout_is_refused_naming_it(
    bad: Any, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    with pytest.raises(ValueError, match=r"^ssl_handshake_timeout: "):
        wrap_protocol_factory(Echo, ssl=contexts[0], ssl_handshake_timeout=bad)


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_client_after_the_header_is_served_with_the_short_default(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """header_timeout=0.5 bounds the handshake, and a normal client's handshake fits in it."""
    server_ctx, client_ctx = contexts

    async def scenario() -> None:
        factory = wrap_protocol_factory(Echo, ssl=server_ctx, header_timeout=0.5)
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        async with server:
            for _ in range(3):
                reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
                writer.write(V2)
                await writer.start_tls(client_ctx, server_hostname="localhost")
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
                writer.close()
                await writer.wait_closed()
            assert factory.pending == 0

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_max_pending_counts_connections_mid_handshake(
    loop: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    """max_pending=2: two clients stuck in their handshake, a third evicts the oldest of them."""
    caplog.set_level(logging.WARNING, logger="proxyproto")
    server_ctx, _ = contexts

    async def scenario() -> None:
        factory = wrap_protocol_factory(Echo, ssl=server_ctx, header_timeout=30.0, max_pending=2)
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        async with server:
            stuck = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection(*address)
                writer.write(V2)  # the header, then no ClientHello
                stuck.append((reader, writer))
                await asyncio.sleep(0.1)
            assert factory.pending == 2
            third_reader, third = await asyncio.open_connection(*address)
            third.write(V2)
            assert await closed_after(stuck[0][0], 5.0) < 5.0  # the oldest is closed at once
            await asyncio.sleep(0.1)
            assert factory.pending == 2
            assert not stuck[1][0].at_eof() and not third_reader.at_eof()
            for _, writer in [*stuck, (third_reader, third)]:
                writer.close()

    run_on(loop, scenario)
    lines = [r.getMessage() for r in caplog.records if "(max_pending)" in r.getMessage()]
    assert len(lines) == 1 and "2 connections already wait for their header (max_pending)" in lines[0], lines
