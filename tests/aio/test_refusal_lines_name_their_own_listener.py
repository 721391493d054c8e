"""With several listeners on one asyncio factory, each refusal line names the listener of its own connection.

gunicorn's uvicorn workers with two ``-b``, Sanic with two ``app.prepare`` and
``aio.start_server`` on several hosts give one factory (or acceptor) several
listeners.  A line naming another listener than its connection's sends the operator
to the wrong port (the public one instead of the health-check one).  The listener is
asked of the connection's transport when a line is written, never per connection
served: the header-first inline path is unchanged.  Real listeners on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

from aio_kit import async_test
from serving_kit import Records

import proxyproto
from proxyproto import aio
from proxyproto.aio_protocol import ProxyProtocolFactory, wrap_protocol_factory

MALFORMED = b"PROXY TCP4 bogus\r\n"
V1 = proxyproto.encode_v1(("192.0.2.10", 51234), ("198.51.100.20", 443))


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def two_listeners(factory: ProxyProtocolFactory) -> AsyncIterator[tuple[tuple[str, int], tuple[str, int]]]:
    """``factory`` serving two loopback listeners, as one uvicorn config behind gunicorn's two ``-b``."""
    loop = asyncio.get_running_loop()
    first = await loop.create_server(factory, "127.0.0.1", 0)
    second = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield first.sockets[0].getsockname()[:2], second.sockets[0].getsockname()[:2]
    finally:
        for server in (first, second):
            server.close()
        factory.close()
        for server in (first, second):
            await server.wait_closed()


def exchange(address: tuple[str, int], data: bytes, source: str = "127.0.0.1") -> None:
    """One connection: ``data`` (nothing: connect and close, as a TCP health check), then read until closed."""
    with socket.create_connection(address, timeout=10, source_address=(source, 0)) as sock:
        if data:
            sock.sendall(data)
        else:
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass


async def lines_with(records: Records, text: str, count: int = 1) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        lines = [r.getMessage() for r in records.snapshot() if text in r.getMessage()]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.02)


def named(address: tuple[str, int]) -> str:
    return f"(listener {address[0]}:{address[1]})"


@async_test
async def test_a_malformed_header_is_named_with_its_own_listener_after_a_health_check_on_the_other(
    records: Records,
) -> None:
    async with two_listeners(wrap_protocol_factory(Echo)) as (first, second):
        await asyncio.to_thread(exchange, second, b"")  # the first connection the factory sees
        await asyncio.to_thread(exchange, first, MALFORMED)
        await asyncio.to_thread(exchange, second, MALFORMED)
        lines = await lines_with(records, "TCP4 needs", 2)
    assert len(lines) == 2, lines
    assert lines[0].endswith(named(first)) and lines[1].endswith(named(second)), lines


@async_test
async def test_an_untrusted_peers_header_is_named_with_its_own_listener(records: Records) -> None:
    factory = wrap_protocol_factory(Echo, trusted="127.0.0.1")
    async with two_listeners(factory) as (first, second):
        await asyncio.to_thread(exchange, first, b"")
        await asyncio.to_thread(exchange, second, V1 + b"x", "127.0.0.2")
        lines = await lines_with(records, "sent a PROXY header but is not trusted")
    assert len(lines) == 1 and lines[0].endswith(named(second)), lines


@async_test
async def test_an_eviction_is_named_with_the_evicted_connections_listener(records: Records) -> None:
    factory = wrap_protocol_factory(Echo, max_pending=1)
    async with two_listeners(factory) as (first, second):
        silent = socket.create_connection(first, timeout=10)
        try:
            deadline = time.monotonic() + 10
            while factory.pending < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            with socket.create_connection(second, timeout=10):
                lines = await lines_with(records, "connections already wait for their header")
        finally:
            silent.close()
    assert len(lines) == 1 and lines[0].endswith(named(first)), lines


@async_test
async def test_start_server_on_two_hosts_names_each_connections_own(records: Records) -> None:
    async def served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = await aio.start_server(served, ["127.0.0.1", "127.0.0.2"], port)
    try:
        await asyncio.to_thread(exchange, ("127.0.0.1", port), b"")
        await asyncio.to_thread(exchange, ("127.0.0.2", port), MALFORMED)
        lines = await lines_with(records, "TCP4 needs")
    finally:
        server.close()
        await server.wait_closed()
    assert len(lines) == 1 and lines[0].endswith(f"(listener 127.0.0.2:{port})"), lines
