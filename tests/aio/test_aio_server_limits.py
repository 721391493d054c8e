"""``aio.start_server``: bounded resources under a flood of silent clients, and a consistent socket view.

Without a cap, 3,000 silent connections held 2,174 descriptors until the header timeout.
With ``max_pending`` the oldest waiting connection is closed (and logged) when a new one
arrives past the limit, so descriptors stay near ``max_pending`` while good clients are
served at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import pytest
from aio_kit import DEST_V4, DEST_V6, REAL_V4, REAL_V6, async_test

import proxyproto
from proxyproto import aio
from proxyproto.aio_transport import SocketView

V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def connect_silently(address: tuple[str, int], count: int) -> list[socket.socket]:
    """``count`` connections that never send a byte (non-blocking connects, so the loop keeps accepting)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []

    async def one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        socks.append(sock)
        await loop.sock_connect(sock, address)

    for start in range(0, count, 50):
        await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    return socks


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
@async_test
async def test_max_pending_evicts_oldest_silent_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="proxyproto")
    served: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(writer.get_extra_info("peername"))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    limit, flood = 50, 600
    server = await aio.start_server(
        handler, "127.0.0.1", 0, header_timeout=30.0, max_pending=limit, log_rate=None, backlog=1024
    )
    address = server.sockets[0].getsockname()[:2]
    baseline = open_fds()
    async with server:
        silent = await connect_silently(address, flood)
        try:
            # Let the server accept them all and evict the oldest.
            deadline = time.monotonic() + 10
            evictions: list[logging.LogRecord] = []
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                evictions = [r for r in caplog.records if "(max_pending)" in r.getMessage()]
                if len(evictions) >= flood - limit:
                    break
            assert len(evictions) == flood - limit
            message = evictions[0].getMessage()
            assert message.startswith("127.0.0.1:")
            assert f"closed: {limit} connections already wait for their header (max_pending)" in message
            await asyncio.sleep(0.1)
            server_side = open_fds() - baseline - flood
            assert server_side <= limit + 5, f"{server_side} server-side descriptors for max_pending={limit}"

            # Parked connections cost no CPU while they wait (under 10% of a core).
            cpu = time.process_time()
            await asyncio.sleep(1.0)
            assert time.process_time() - cpu < 0.1

            # A good client is served at once, and displaces the oldest silent one.
            start = time.monotonic()
            reader, writer = await asyncio.open_connection(*address)
            writer.write(V2)
            assert await asyncio.wait_for(reader.read(), 5) == b"ok"
            assert time.monotonic() - start < 1.0
            writer.close()
            assert served == [REAL_V4]
            # The evicted clients see their connection closed.
            closed = 0
            for sock in silent[:10]:
                try:
                    closed += sock.recv(1) == b""
                except ConnectionResetError:
                    closed += 1
            assert closed == 10
        finally:
            for sock in silent:
                sock.close()
        # The server side of every connection is closed once its peer is gone: back to baseline.
        deadline = time.monotonic() + 5
        while open_fds() > baseline and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert open_fds() <= baseline


@pytest.mark.parametrize("bad", [0, -1, 1.5])
@async_test
async def test_max_pending_below_one_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_pending"):
        await aio.start_server(lambda r, w: None, "127.0.0.1", 0, max_pending=bad)


@async_test
async def test_refusal_lines_are_rate_limited_by_log_rate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    server = await aio.start_server(lambda r, w: None, "127.0.0.1", 0, log_rate=3)
    address = server.sockets[0].getsockname()[:2]
    async with server:
        for _ in range(10):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await asyncio.wait_for(reader.read(), 5)
            writer.close()
    lines = [r for r in caplog.records if ": closed: " in r.getMessage()]
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("source", "destination", "peer", "local"),
    [
        (REAL_V4, DEST_V4, REAL_V4, DEST_V4),
        (REAL_V6, DEST_V6, (*REAL_V6, 0, 0), (*DEST_V6, 0, 0)),
    ],
)
@async_test
async def test_stream_writer_socket_and_sockname_agree_with_peername(
    source: Any, destination: Any, peer: Any, local: Any
) -> None:
    seen: dict[str, Any] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        seen.update(
            peername=writer.get_extra_info("peername"),
            sockname=writer.get_extra_info("sockname"),
            sock_peer=sock.getpeername(),
            sock_local=sock.getsockname(),
            fileno=sock.fileno(),
            family=sock.family,
            view=isinstance(sock, SocketView),
            proxy_peername=writer.get_extra_info("proxy_peername"),
        )
        writer.close()

    server = await aio.start_server(handler, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    async with server:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(proxyproto.encode_v2(source, destination))
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert seen["peername"] == seen["sock_peer"] == peer
    assert seen["sockname"] == seen["sock_local"] == local
    # The view's family is that of the addresses it reports (hypercorn shapes scope["client"]
    # by it), not the listener's: an IPv6 header on this IPv4 listener says AF_INET6.
    expected_family = socket.AF_INET6 if len(peer) == 4 else socket.AF_INET
    assert seen["view"] and seen["fileno"] > 0 and seen["family"] == expected_family
    assert seen["proxy_peername"][0] == "127.0.0.1"


@pytest.mark.parametrize("policy", ["IGNORE", "SKIP"])
@async_test
async def test_stream_writer_socket_is_the_real_one_when_addresses_are_not_used(policy: str) -> None:
    seen: dict[str, Any] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        seen.update(
            peername=writer.get_extra_info("peername"),
            sockname=writer.get_extra_info("sockname"),
            sock_peer=sock.getpeername(),
            sock_local=sock.getsockname(),
        )
        await reader.read()
        writer.close()

    server = await aio.start_server(handler, "127.0.0.1", 0, policy=policy)
    address = server.sockets[0].getsockname()[:2]
    async with server:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(V2)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert seen["peername"] == seen["sock_peer"] and seen["peername"][0] == "127.0.0.1"
    assert seen["sockname"] == seen["sock_local"] == address
