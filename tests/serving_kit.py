"""Every adapter serving on loopback with the knobs a test gives, and a handler that keeps its log records.

``ADAPTERS`` maps a name to ``(serving, loop, transport)``: ``serving(**knobs)`` is an async
context manager yielding the listening address (the mixins take the knobs as ``proxy_*``
attributes, the others as keywords), ``loop`` the event loop to run it on ("asyncio" or
"uvloop"), ``transport`` "tcp" or "udp".  asyncio-based adapters run in the test's own loop, the
others in a thread; adapters whose server is not installed skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socketserver
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

from support import free_port, listening, require_module, uvicorn_server

import proxyproto
from proxyproto import aio, udp
from proxyproto.aio_protocol import wrap_protocol_factory

Address = tuple[str, int]
#: ``serving(**knobs)``: an adapter listening on loopback until the block ends.
Serving = Callable[..., contextlib.AbstractAsyncContextManager[Address]]


class Records(logging.Handler):
    """Every record of the ``proxyproto`` logger, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append(record)

    def snapshot(self) -> list[logging.LogRecord]:
        with self.lock_:
            return list(self.records)


# -- the servers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def in_thread(serve: Callable[[], None], stop: Callable[[], None]) -> AsyncIterator[None]:
    """Run ``serve`` in a thread until the block ends, then ``stop`` it and join it."""
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        await asyncio.to_thread(stop)
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()


class Closer(socketserver.BaseRequestHandler):
    """Reads what the client sent first (as any real handler does), then closes."""

    def handle(self) -> None:
        self.request.settimeout(5)
        self.request.recv(4096)


class Echo(udp.ProxyDatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"ok")


@contextlib.asynccontextmanager
async def socketserver_serving(server: Any, knobs: dict[str, Any]) -> AsyncIterator[Address]:
    """A socketserver server with ``knobs`` as its ``proxy_*`` attributes, served in a thread until the block ends."""
    for knob, value in knobs.items():
        setattr(server, f"proxy_{knob}", value)

    def stop() -> None:
        server.shutdown()
        server.server_close()

    # A short poll interval: ``shutdown()`` waits for the loop's next pass, which would cost up to
    # socketserver's default 0.5 s per test; the tests here never depend on the interval.
    async with in_thread(lambda: server.serve_forever(poll_interval=0.05), stop):
        yield server.server_address[:2]


def mixin(**knobs: Any) -> contextlib.AbstractAsyncContextManager[Address]:
    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), Closer)
    server.daemon_threads = True
    return socketserver_serving(server, knobs)


def udp_server(**knobs: Any) -> contextlib.AbstractAsyncContextManager[Address]:
    return socketserver_serving(udp.ProxyUDPServer(("127.0.0.1", 0), Echo), knobs)


@contextlib.asynccontextmanager
async def waitress_server(**knobs: Any) -> AsyncIterator[Address]:
    require_module("waitress")
    from waitress import wasyncore

    from proxyproto.waitress import create_server

    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b""]

    server = create_server(app, listen="127.0.0.1:0", threads=1, **knobs)

    def stop() -> None:
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))

    def run() -> None:
        server.run()
        server.task_dispatcher.shutdown()

    async with in_thread(run, stop):
        yield server.socket.getsockname()[:2]


@contextlib.asynccontextmanager
async def aio_streams(**knobs: Any) -> AsyncIterator[Address]:
    async def served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await asyncio.wait_for(reader.read(4096), 5)  # what the client sent first, as any real app reads
        writer.close()

    server = await aio.start_server(served, "127.0.0.1", 0, **knobs)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await server.wait_closed()


class FirstDataCloser(asyncio.Protocol):
    """Closes once it has what the client sent first, as :class:`Closer` and ``aio_streams``' app do."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.close()


@contextlib.asynccontextmanager
async def protocol_factory(**knobs: Any) -> AsyncIterator[Address]:
    factory = wrap_protocol_factory(FirstDataCloser, **knobs)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        factory.close()
        await server.wait_closed()


async def _asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _uvicorn(http: str) -> Serving:
    @contextlib.asynccontextmanager
    async def serving(**knobs: Any) -> AsyncIterator[Address]:
        require_module("uvicorn")
        if http == "httptools":
            require_module("httptools")
        import proxyproto.uvicorn as ppu

        wrapped = ppu.wrap(http, **knobs)
        async with uvicorn_server(_asgi, wrapped, log_config=None, log_level=None) as (_, address):
            yield address

    return serving


@contextlib.asynccontextmanager
async def aiohttp_site(**knobs: Any) -> AsyncIterator[Address]:
    require_module("aiohttp")
    from aiohttp import web

    from proxyproto.aiohttp import ProxyTCPSite

    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = ProxyTCPSite(runner, "127.0.0.1", free_port(), **knobs)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[:2]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def hypercorn_server(**knobs: Any) -> AsyncIterator[Address]:
    require_module("hypercorn")
    from hypercorn.config import Config

    from proxyproto.hypercorn import serve

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(_asgi, config, shutdown_trigger=stop.wait, **knobs))
    deadline = time.monotonic() + 10
    while not listening(port):
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "hypercorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield ("127.0.0.1", port)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


#: adapter -> (server, event loop, transport)
ADAPTERS: dict[str, tuple[Serving, str, str]] = {
    "socketserver-mixin": (mixin, "asyncio", "tcp"),
    "udp-datagram-server": (udp_server, "asyncio", "udp"),
    "aio-start_server": (aio_streams, "asyncio", "tcp"),
    "wrap_protocol_factory": (protocol_factory, "asyncio", "tcp"),
    "uvicorn-h11-asyncio": (_uvicorn("h11"), "asyncio", "tcp"),
    "uvicorn-httptools-asyncio": (_uvicorn("httptools"), "asyncio", "tcp"),
    "uvicorn-h11-uvloop": (_uvicorn("h11"), "uvloop", "tcp"),
    "uvicorn-httptools-uvloop": (_uvicorn("httptools"), "uvloop", "tcp"),
    "aiohttp": (aiohttp_site, "asyncio", "tcp"),
    "hypercorn": (hypercorn_server, "asyncio", "tcp"),
    "waitress": (waitress_server, "asyncio", "tcp"),
}
