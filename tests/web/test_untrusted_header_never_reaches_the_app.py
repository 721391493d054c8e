"""A header from an untrusted peer never reaches the application, in any adapter, under any policy.

The forged header carries what an attacker would write: SSL (a verified client
certificate, CN ``admin``), AUTHORITY, UNIQUE_ID and the AWS, Azure and GCP
endpoint ids.  Each adapter serves on loopback with ``trusted`` set so that
127.0.0.1 is *not* trusted, and the application records everything it can
reach about its connection (the mixin's and UDP's ``proxy_header``,
``get_extra_info`` of aio, of ``wrap_protocol_factory`` and of aiohttp's
transport, every value of the transport's extra dict, uvicorn's scope and
transport, hypercorn's scope, waitress's environ).  None of it may hold the
header or any of its claims.  The same probe with 127.0.0.1 trusted under
``policy=IGNORE`` must see the header (for uvicorn and hypercorn, at the
scope's ``extensions["proxyproto"]``): it is a trusted peer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import struct
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

import pytest
from support import free_port, listening, require_module, run_on, uvicorn_server

import proxyproto
import proxyproto.aio
import proxyproto.aio_protocol
import proxyproto.asgi
import proxyproto.udp
from proxyproto import TLV, ProxyHeader
from proxyproto.aio_transport import ProxyTransport

SPOOFED = ("203.0.113.7", 4242)
DEST = ("198.51.100.20", 443)
_SSL = bytes([0x07]) + struct.pack("!I", 0) + bytes([0x21, 0, 7]) + b"TLSv1.3" + bytes([0x22, 0, 5]) + b"admin"
_TLVS = [
    TLV(0x20, _SSL),
    TLV(0x02, b"forged.example"),
    TLV(0x05, b"forged-unique-id"),
    TLV(0xEA, b"\x01vpce-0forged"),
    TLV(0xEE, b"\x01" + struct.pack("<I", 7)),
    TLV(0xE0, struct.pack("!Q", 99)),
]
FORGED = proxyproto.encode_v2(SPOOFED, DEST, tlvs=_TLVS)
FORGED_DGRAM = proxyproto.encode_v2(SPOOFED, DEST, protocol=proxyproto.Protocol.DGRAM, tlvs=_TLVS)
#: What the forged header claims, as text: none of it may appear in what the application sees.
CLAIMS = ("203.0.113.7", "198.51.100.20", "admin", "forged.example", "forged-unique-id", "vpce-0forged")
HTTP_REQUEST = b"GET /probe HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n"
LINE = b"hello\n"
CEILING = 20.0


def _check_forged_header_is_valid() -> None:
    header = proxyproto.parse(FORGED)
    assert header is not None and header.ssl is not None
    assert header.ssl.verified and header.ssl.cn == "admin" and header.authority == "forged.example"
    assert header.unique_id == b"forged-unique-id" and header.aws_vpce_id == "vpce-0forged"
    assert header.azure_linkid == 7 and header.gcp_psc_id == 99


_check_forged_header_is_valid()


def extra_of(transport: Any) -> dict[str, Any]:
    """What ``get_extra_info`` answers for the usual names, and every value a ProxyTransport holds."""
    names = ("proxy_header", "proxy_peername", "peername", "sockname", "sslcontext", "proxy_untrusted_header")
    seen = {name: transport.get_extra_info(name) for name in names}
    sock = transport.get_extra_info("socket")
    if sock is not None:
        seen["socket.getpeername"] = sock.getpeername()
    if isinstance(transport, ProxyTransport):
        seen["extra_values"] = list(transport._proxy_extra.values())
    return seen


class Seen:
    """What the application recorded, one entry per connection (or datagram) it was given."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, header: Any, client: Any, everything: Any) -> None:
        with self.lock:
            self.entries.append({"header": header, "client": client, "everything": everything})


# -- the adapters, each a context manager yielding (send, seen) ----------------------------------
# send(data) sends ``data`` (the header bytes first) on a new connection or as a datagram and
# returns once the server has answered or closed; plain traffic goes through ``send`` too.

Send = Callable[[bytes], Any]


async def _tcp_exchange(address: tuple[str, int], data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(reader.read(), 10)
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def mixin(**knobs: Any) -> AsyncIterator[tuple[Send, Seen, bytes]]:
    seen = Seen()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            header = getattr(self.request, "proxy_header", None)
            seen.add(header, self.client_address, (header, self.client_address))
            self.wfile.write(b"ok\n")

    cls = type("Server", (proxyproto.ThreadingProxyTCPServer,), {f"proxy_{k}": v for k, v in knobs.items()})
    server = cls(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield (lambda data: _tcp_exchange(server.server_address, data)), seen, LINE
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.asynccontextmanager
async def udp(**knobs: Any) -> AsyncIterator[tuple[Send, Seen, bytes]]:
    seen = Seen()

    class Handler(proxyproto.udp.ProxyDatagramRequestHandler):
        def handle(self) -> None:
            header = self.request.proxy_header
            seen.add(header, self.client_address, (header, self.client_address, self.request.proxy_address))
            self.wfile.write(b"ok")

    cls = type("Server", (proxyproto.udp.ProxyUDPServer,), {f"proxy_{k}": v for k, v in knobs.items()})
    server = cls(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def send_blocking(data: bytes) -> bytes:
        if data.startswith(FORGED):
            data = FORGED_DGRAM + data[len(FORGED) :]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.sendto(data, server.server_address)
            with contextlib.suppress(TimeoutError, socket.timeout):
                return sock.recv(100)
        return b""

    try:
        yield (lambda data: asyncio.to_thread(send_blocking, data)), seen, b"hello"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.asynccontextmanager
async def aio_streams(**knobs: Any) -> AsyncIterator[tuple[Send, Seen, bytes]]:
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        info = extra_of(writer)
        seen.add(info["proxy_header"], info["peername"], info)
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()

    server = await proxyproto.aio.start_server(handle, "127.0.0.1", 0, **knobs)
    address = server.sockets[0].getsockname()[:2]
    try:
        yield (lambda data: _tcp_exchange(address, data)), seen, LINE
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def protocol_factory(**knobs: Any) -> AsyncIterator[tuple[Send, Seen, bytes]]:
    seen = Seen()

    class Inner(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            info = extra_of(self.transport)
            seen.add(info["proxy_header"], info["peername"], info)
            self.transport.write(b"ok\n")
            self.transport.close()

    factory = proxyproto.aio_protocol.wrap_protocol_factory(Inner, **knobs)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    try:
        yield (lambda data: _tcp_exchange(address, data)), seen, LINE
    finally:
        server.close()
        factory.close()
        await server.wait_closed()


def _uvicorn(http: str) -> Callable[..., Any]:
    @contextlib.asynccontextmanager
    async def serving(**knobs: Any) -> AsyncIterator[tuple[Send, Seen, bytes]]:
        require_module("uvicorn")
        if http == "httptools":
            require_module("httptools")
        import proxyproto.uvicorn as ppu

        seen = Seen()
        holder: dict[str, Any] = {}

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            # Everything the application can reach: its scope, and (in this process) the
            # transport of every open connection, as uvicorn's own protocol holds it.
            transports = [extra_of(conn.transport) for conn in holder["server"].server_state.connections]
            seen.add(proxyproto.asgi.header(scope), scope.get("client"), (scope, transports))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        async with uvicorn_server(app, ppu.wrap(http, **knobs)) as (server, address):
            holder["server"] = server
            yield (lambda data: _tcp_exchange(address, data)), seen, HTTP_REQUEST

    return serving


@contextlib.asynccontextmanager
async def aiohttp(**knobs: Any) -> AsyncIterator[tuple[Send, Seen, bytes]]:
    require_module("aiohttp")
    from aiohttp import web

    from proxyproto.aiohttp import ProxyTCPSite

    seen = Seen()

    async def handler(request: web.Request) -> web.Response:
        info = extra_of(request.transport)
        seen.add(info["proxy_header"], request.remote, (info, request.remote, dict(request.headers)))
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    site = ProxyTCPSite(runner, "127.0.0.1", 0, **knobs)
    await site.start()
    address = runner.addresses[0][:2]
    try:
        yield (lambda data: _tcp_exchange(address, data)), seen, HTTP_REQUEST
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def hypercorn(**knobs: Any) -> AsyncIterator[tuple[Send, Seen, bytes]]:
    require_module("hypercorn")
    from hypercorn.config import Config

    from proxyproto.hypercorn import serve

    seen = Seen()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                if (await receive())["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        # hypercorn gives an application its scope only: no transport to ask.
        seen.add(proxyproto.asgi.header(scope), scope.get("client"), scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait, **knobs))
    deadline = time.monotonic() + 10
    while not listening(port):
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "hypercorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield (lambda data: _tcp_exchange(("127.0.0.1", port), data)), seen, HTTP_REQUEST
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def waitress(**knobs: Any) -> AsyncIterator[tuple[Send, Seen, bytes]]:
    require_module("waitress")
    from waitress import wasyncore

    from proxyproto.waitress import create_server

    seen = Seen()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        header = environ.get("proxyproto.header")
        everything = {k: v for k, v in environ.items() if k not in ("wsgi.input", "wsgi.errors", "wsgi.file_wrapper")}
        seen.add(header, (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]), everything)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server = create_server(app, listen="127.0.0.1:0", threads=1, **knobs)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    address = server.socket.getsockname()[:2]
    try:
        yield (lambda data: _tcp_exchange(address, data)), seen, HTTP_REQUEST
    finally:
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        thread.join(10)
        server.task_dispatcher.shutdown()


ADAPTERS: dict[str, Callable[..., Any]] = {
    "socketserver-mixin": mixin,
    "udp": udp,
    "aio-start_server": aio_streams,
    "wrap_protocol_factory": protocol_factory,
    "uvicorn-h11": _uvicorn("h11"),
    "uvicorn-httptools": _uvicorn("httptools"),
    "aiohttp": aiohttp,
    "hypercorn": hypercorn,
    "waitress": waitress,
}


def _leaks(entry: dict[str, Any]) -> list[str]:
    """The forged header's claims found in what the application saw (the payload itself aside)."""
    text = repr(entry["everything"])
    return [claim for claim in CLAIMS if claim in text]


def _holds_a_header(value: Any) -> bool:
    if isinstance(value, ProxyHeader):
        return True
    if isinstance(value, dict):
        return any(_holds_a_header(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_a_header(v) for v in value)
    return False


@pytest.mark.parametrize("untrusted_policy", ["IGNORE", "REJECT", "SKIP"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_untrusted_peers_forged_header_is_invisible_to_the_app(adapter: str, untrusted_policy: str) -> None:
    async def scenario() -> None:
        async with ADAPTERS[adapter](trusted="10.0.0.0/8", untrusted_policy=untrusted_policy) as (send, seen, payload):
            await send(FORGED + payload)
            await send(payload)  # a plain one after it: the forged one has been decided by now
            assert seen.entries, "the plain request was not served"
            for entry in seen.entries:
                assert entry["header"] is None, entry
                assert not _holds_a_header(entry["everything"]), entry
                assert _leaks(entry) == [], entry
                assert entry["client"] is None or "127.0.0.1" in repr(entry["client"]), entry
            if untrusted_policy == "IGNORE":
                assert len(seen.entries) == 2  # the forged connection was served, without its header
            if untrusted_policy == "REJECT":
                assert len(seen.entries) == 1  # the forged connection was closed

    run_on("asyncio", scenario, CEILING)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_trusted_peer_under_ignore_still_exposes_its_header(adapter: str) -> None:
    async def scenario() -> None:
        async with ADAPTERS[adapter](trusted="127.0.0.1", policy="IGNORE") as (send, seen, payload):
            await send(FORGED + payload)
            assert len(seen.entries) == 1
            entry = seen.entries[0]
            assert "203.0.113.7" not in repr(entry["client"])  # IGNORE: the socket's own address
            header = entry["header"]
            assert header is not None and header.ssl is not None and header.ssl.cn == "admin"

    run_on("asyncio", scenario, CEILING)


def test_hook_answering_ignore_exposes_nothing_and_require_exposes_the_header() -> None:
    """A ``policy_for`` hook answers only a Policy: REQUIRE or USE means trusted, IGNORE does not."""

    async def scenario() -> None:
        for answer, exposed in (("IGNORE", False), ("REQUIRE", True)):
            async with aio_streams(policy_for=lambda peer, local, answer=answer: answer) as (send, seen, payload):
                await send(FORGED + payload)
                assert len(seen.entries) == 1
                assert (seen.entries[0]["header"] is not None) is exposed

    run_on("asyncio", scenario, CEILING)
