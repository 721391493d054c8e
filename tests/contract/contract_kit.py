"""The adapter contract: DESIGN.md's policy table as data, the cases, and one small class per adapter.

Every adapter serves the same kind of application: it answers each connection (or datagram)
with a JSON report of what it saw (the client address, the header it can reach, the payload,
byte-exact), so one client and one expectation function check every adapter alike.  Servers
run in background threads (asyncio ones on a loop of their own), clients are blocking sockets
on loopback.  Headers are built here from the spec's byte layout, not with ``proxyproto.encode_*``,
so that an encoder bug cannot hide the same bug in a receiver.

Adding an adapter: one :class:`Adapter` subclass (or instance) at the end, listed in ``ADAPTERS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Union, cast

from support import free_port, listening, require_module

import proxyproto
import proxyproto.aio
import proxyproto.aio_protocol
import proxyproto.asgi
import proxyproto.udp
from proxyproto.settings import VARIABLES

CEILING = 20.0  # seconds any single wait may take before the test fails (never reached when healthy)
TRUSTED_HOST, UNTRUSTED_HOST = "127.0.0.1", "127.0.0.2"
#: The header timeout of the servers that see silent and slow clients, and how long those clients wait.
SHORT_TIMEOUT, PAST_THE_DEADLINE = 0.3, 0.8
#: The header timeout of every other server: far longer than any healthy delivery takes.
LONG_TIMEOUT = 5.0
#: How long a datagram that must be dropped is awaited (a sentinel datagram usually ends the wait earlier).
DATAGRAM_SILENCE = 2.0

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4, DEST_V4 = ("192.0.2.10", 51234), ("198.51.100.20", 443)
REAL_V6, DEST_V6 = ("2001:db8::7", 4242), ("2001:db8::1", 8443)
REAL_UNIX, DEST_UNIX = "/run/contract/real-client.sock", "/run/contract/listener.sock"

# -- header bytes, by hand ---------------------------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli): slow, obviously right, test-only."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def v2(
    source: Any = None,
    destination: Any = None,
    *,
    command: int = 1,
    dgram: bool = False,
    tlvs: bytes = b"",
    bad_crc: bool = False,
    version: int = 2,
) -> bytes:
    """A v2 header: INET/INET6 for (host, port) pairs, UNIX for str paths, UNSPEC for None."""
    if source is None:
        family, block = 0x0, b""
    elif isinstance(source, str):
        family, block = 0x3, source.encode().ljust(108, b"\0") + destination.encode().ljust(108, b"\0")
    else:
        af = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
        family = 0x2 if af == socket.AF_INET6 else 0x1
        block = socket.inet_pton(af, source[0]) + socket.inet_pton(af, destination[0])
        block += struct.pack("!HH", source[1], destination[1])
    fam = family << 4 | ((2 if dgram else 1) if family else 0)
    body = block + tlvs + (b"\x03\x00\x04\0\0\0\0" if bad_crc else b"")
    raw = bytearray(V2_SIGNATURE + bytes([version << 4 | command, fam]) + struct.pack("!H", len(body)) + body)
    if bad_crc:
        raw[-4:] = struct.pack("!I", crc32c(bytes(raw)) ^ 0x00010000)
    return bytes(raw)


# -- what arrives: the rows of DESIGN.md's table ---------------------------------------------------

#: DESIGN.md, "Policies, case by case", verbatim: what arrives -> policy -> what the server does.
TABLE: dict[str, dict[str, str]] = {
    "header": dict(REQUIRE="served, real address", USE="served, real address", IGNORE="served, socket address",
                   REJECT="closed", SKIP="untouched"),
    "header without addresses": dict(REQUIRE="served, socket address", USE="served, socket address",
                                     IGNORE="served, socket address", REJECT="closed", SKIP="untouched"),
    "no header": dict(REQUIRE="closed", USE="served, socket address", IGNORE="served, socket address",
                      REJECT="served, socket address", SKIP="untouched"),
    "malformed": dict(REQUIRE="closed", USE="closed", IGNORE="closed", REJECT="closed", SKIP="untouched"),
    "silent": dict(REQUIRE="closed", USE="served, no header", IGNORE="served, no header",
                   REJECT="served, no header", SKIP="untouched"),
    "partial by the deadline": dict(REQUIRE="closed", USE="closed", IGNORE="closed", REJECT="closed",
                                    SKIP="untouched"),
    "closed before its first byte": dict(REQUIRE="closed", USE="served", IGNORE="served", REJECT="served",
                                         SKIP="served"),
}


@dataclass(frozen=True)
class Kind:
    """One kind of start of stream (or datagram): its bytes, its row of the table, what it carries."""

    name: str
    row: str
    header: bytes  # the bytes in front of the payload ("" for none)
    source: Any = None  # the header's source: the real address when the policy uses it
    command: str | None = None  # "PROXY" or "LOCAL" for a valid header
    with_payload: bool = True  # False: the header (or its prefix) is all the client sends
    raw_only: bool = False  # only observable where the application reads raw bytes (no HTTP parser)


OVERSIZE_TLV = b"\x04" + struct.pack("!H", 5000) + b"\0" * 5000  # a NOOP TLV: 16 + len > max_header_size 4096

STREAM_KINDS = [
    Kind("v1", "header", v1(REAL_V4, DEST_V4), REAL_V4, "PROXY"),
    Kind("v1-tcp6", "header", v1(REAL_V6, DEST_V6), REAL_V6, "PROXY"),
    Kind("v2", "header", v2(REAL_V4, DEST_V4), REAL_V4, "PROXY"),
    Kind("v2-inet6", "header", v2(REAL_V6, DEST_V6), REAL_V6, "PROXY"),
    Kind("v2-unix-family", "header", v2(REAL_UNIX, DEST_UNIX), REAL_UNIX, "PROXY"),
    Kind("v2-local", "header without addresses", v2(REAL_V4, DEST_V4, command=0), None, "LOCAL"),
    Kind("v1-unknown", "header without addresses", b"PROXY UNKNOWN\r\n", None, "PROXY"),
    Kind("v2-unspec", "header without addresses", v2(), None, "PROXY"),
    Kind("garbage", "no header", b""),
    Kind("v1-malformed", "malformed", b"PROXY TCP4 192.0.2.10 198.51.100.20 51234\r\n"),
    Kind("v2-version-3", "malformed", v2(REAL_V4, DEST_V4, version=3)),
    Kind("v2-bad-checksum", "malformed", v2(REAL_V4, DEST_V4, bad_crc=True)),
    Kind("v2-oversize", "malformed", v2(REAL_V4, DEST_V4, tlvs=OVERSIZE_TLV)),
    Kind("v2-truncated-by-eof", "malformed", v2(REAL_V4, DEST_V4)[:20], with_payload=False, raw_only=True),
    Kind("eof-before-any-byte", "closed before its first byte", b"", with_payload=False, raw_only=True),
]
#: The kinds also delivered in two writes (split inside the header) and byte by byte.
SPLIT_KINDS = ("v1", "v2", "v2-local", "garbage")

#: G8: one header per datagram, v2 only, describing a datagram (DGRAM) or nothing (UNSPEC, LOCAL).
DATAGRAM_KINDS = [
    Kind("v2-udp4", "header", v2(REAL_V4, DEST_V4, dgram=True), REAL_V4, "PROXY"),
    Kind("v2-udp6", "header", v2(REAL_V6, DEST_V6, dgram=True), REAL_V6, "PROXY"),
    Kind("v2-local", "header without addresses", v2(REAL_V4, DEST_V4, command=0, dgram=True), None, "LOCAL"),
    Kind("v2-unspec", "header without addresses", v2(), None, "PROXY"),
    Kind("garbage", "no header", b""),
    Kind("v1-in-a-datagram", "malformed", v1(REAL_V4, DEST_V4)),
    Kind("v2-stream-family-in-a-datagram", "malformed", v2(REAL_V4, DEST_V4)),
    Kind("v2-bad-checksum", "malformed", v2(REAL_V4, DEST_V4, dgram=True, bad_crc=True)),
    Kind("v2-oversize", "malformed", v2(REAL_V4, DEST_V4, dgram=True, tlvs=OVERSIZE_TLV)),
]

#: Which server settings a cell runs on: the trusted peer's policy, paired with an untrusted policy so
#: that five servers cover the eight (peer, policy) columns, and no server has both policies equal
#: by accident where a mix-up between them would go unnoticed.
PAIRS = {"REQUIRE": "SKIP", "USE": "IGNORE", "IGNORE": "REJECT", "REJECT": "SKIP", "SKIP": "SKIP"}
UNTRUSTED_SERVER = {"SKIP": "REQUIRE", "IGNORE": "USE", "REJECT": "IGNORE"}  # untrusted policy -> server's policy
COLUMNS = [("trusted", p) for p in PAIRS] + [("untrusted", p) for p in UNTRUSTED_SERVER]


@dataclass(frozen=True)
class Settings:
    """One server's knobs (DESIGN.md's, without the ``proxy_`` prefix) and whether TLS follows the header."""

    policy: str
    untrusted_policy: str
    trusted: str
    header_timeout: float = LONG_TIMEOUT
    max_pending: int = 64
    max_header_size: int = 4096
    tls: bool = False

    def knobs(self) -> dict[str, Any]:
        return dict(policy=self.policy, untrusted_policy=self.untrusted_policy, trusted=self.trusted,
                    header_timeout=self.header_timeout, max_pending=self.max_pending,
                    max_header_size=self.max_header_size)


# -- what the application saw ------------------------------------------------------------------------


def address_json(address: Any) -> Any:
    """An address as the test compares it: [host, port] for IP (any tuple shape), the path for UNIX."""
    if isinstance(address, (tuple, list)):
        return [address[0], address[1]]
    if isinstance(address, bytes):
        return address.decode("latin-1")
    return address


def report(client: Any, header: Any, payload: bytes) -> bytes:
    """The application's answer: what it saw, as one JSON document."""
    seen = None
    if header is not None:
        source = header.source
        seen = {"command": header.command.name, "source": None if source is None else address_json(source)}
    return json.dumps({"client": address_json(client), "header": seen, "payload": payload.hex()}).encode()


@dataclass(frozen=True)
class Observation:
    """What the client saw: the app's report, an HTTP error from the server itself, or a plain close."""

    report: dict[str, Any] | None = None
    http_status: int | None = None  # a response that is not the app's report (e.g. 400 for non-HTTP bytes)

    @property
    def closed(self) -> bool:
        return self.report is None and self.http_status is None


class SocketserverApp(socketserver.StreamRequestHandler):
    """Reads to EOF (over TLS, which has no half-close, one line), then reports."""

    def handle(self) -> None:
        data = self.rfile.readline() if isinstance(self.request, ssl.SSLSocket) else self.rfile.read()
        with contextlib.suppress(OSError):
            self.wfile.write(report(self.client_address, getattr(self.request, "proxy_header", None), data))


class DatagramApp(proxyproto.udp.ProxyDatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(report(self.client_address, self.request.proxy_header, self.rfile.read()))


async def stream_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    tls = writer.get_extra_info("ssl_object") is not None
    data = await (reader.readline() if tls else reader.read())
    writer.write(report(writer.get_extra_info("peername"), writer.get_extra_info("proxy_header"), data))
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


class _Reporting:
    """The protocol apps' common part: collect bytes, report at EOF (over TLS, at the first newline)."""

    transport: Any
    data: bytearray

    def connection_made(self, transport: Any) -> None:
        self.transport, self.data = transport, bytearray()

    def received(self) -> None:
        if self.transport.get_extra_info("ssl_object") is not None and b"\n" in self.data:
            self.eof_received()

    def eof_received(self) -> bool:
        t = self.transport
        if not t.is_closing():
            t.write(report(t.get_extra_info("peername"), t.get_extra_info("proxy_header"), bytes(self.data)))
            t.close()
        return True


class PlainApp(_Reporting, asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        self.data += data
        self.received()


class BufferedApp(_Reporting, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> memoryview:
        self.buffer = bytearray(max(sizehint, 1) if sizehint > 0 else 65536)
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buffer[:nbytes]
        self.received()


def streams_app() -> asyncio.StreamReaderProtocol:
    return asyncio.StreamReaderProtocol(asyncio.StreamReader(), stream_app)


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: the report of an HTTP request; the scope is all an ASGI application is given."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    # Where proxyproto documents it; failing that, anywhere in the scope, so that a header put
    # where it must not be (an untrusted peer's) is still reported.
    header = proxyproto.asgi.header(scope)
    answer = report(scope.get("client"), header_in(scope) if header is None else header, body)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def header_in(value: Any) -> Any:
    """A ProxyHeader anywhere in an ASGI scope (its extensions included): all an ASGI app can reach."""
    if isinstance(value, proxyproto.ProxyHeader):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((found for found in map(header_in, items) if found is not None), None)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    client = (environ["REMOTE_ADDR"], int(environ["REMOTE_PORT"]))
    answer = report(client, environ.get("proxyproto.header"), body)
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]


async def aiohttp_handler(request: Any) -> Any:
    from aiohttp import web

    body, transport = await request.read(), request.transport
    answer = report(transport.get_extra_info("peername"), transport.get_extra_info("proxy_header"), body)
    return web.Response(body=answer, content_type="application/json")


# -- framing: how a payload travels and how the report comes back ---------------------------------------

RAW_PAYLOAD = b"PRI payload \x00\xff\r\n bytes"  # starts like "PROXY": the opt-in policies must look at 3 bytes
TLS_RAW_PAYLOAD = b"over TLS \x00\xff\r bytes\n"  # one line: TLS has no half-close to end a payload with
HTTP_BODY = b"body \x00\xff\r\n bytes"


def http_request(body: bytes) -> bytes:
    head = f"POST /contract HTTP/1.1\r\nHost: contract\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def read_all(sock: socket.socket) -> bytes:
    """Everything until EOF; a reset counts as EOF (a server closing with unread bytes resets)."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def read_http_response(sock: socket.socket) -> Observation:
    """One HTTP response, read up to its Content-Length (servers differ on closing after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            return Observation(http_status=int(data.split()[1])) if data else Observation()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    length = lengths[0] if lengths else None
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    if status != 200:
        return Observation(http_status=status)
    return Observation(report=json.loads(body))


# -- servers and the adapters ---------------------------------------------------------------------------


@dataclass
class Running:
    address: Any
    stop: Callable[[], None]


class LoopThread:
    """An event loop (asyncio's or uvloop's) running in a daemon thread."""

    def __init__(self, flavour: str = "asyncio") -> None:
        self.loop = require_module("uvloop").new_event_loop() if flavour == "uvloop" else asyncio.new_event_loop()  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(coro, CEILING)

        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result(CEILING + 1)

    def stop(self, shutdown: Awaitable[Any] | None = None) -> None:
        async def finish() -> None:
            if shutdown is not None:
                await shutdown
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:  # not through run(): wait_for's inner task would see the outer one among the tasks to cancel
            asyncio.run_coroutine_threadsafe(finish(), self.loop).result(CEILING)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CEILING)
            self.loop.close()


async def until(condition: Callable[[], bool], task: asyncio.Future[Any] | None = None) -> None:
    """Wait for ``condition`` (a server's start), failing early if ``task`` (the server) ended."""
    deadline = time.monotonic() + CEILING
    while not condition():
        assert task is None or not task.done(), task.exception() if task is not None else None
        assert time.monotonic() < deadline, "the server did not start"
        await asyncio.sleep(0.01)


@dataclass
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def self_signed(directory: Path) -> Certificate | None:
    """A certificate for localhost and 127.0.0.1, made with the openssl CLI; None without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True, timeout=60, check=True,
    )
    return Certificate(cert, key)


Framing = str  # "raw" or "http"


class Adapter:
    """One server under the contract: ``start(settings, cert)`` serves the reporting app and returns a Running."""

    name: ClassVar[str] = ""
    framing: Framing = "raw"
    datagram = False
    unix = False
    tls = False  # negotiates TLS after the header
    #: Whether several clients may talk to one server at once (a synchronous server serves one at a time).
    concurrent = True
    #: Optional packages it needs (skipped without them, see ``support.require_module``).
    requires: tuple[str, ...] = ()

    def __init__(self, name: str = "", **attributes: Any) -> None:
        self.name = name or type(self).name
        for key, value in attributes.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return self.name

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        raise NotImplementedError

    def trusted_setting(self, peer: str) -> str:
        """``trusted`` for a cell's peer: always explicit (never the adapter's default)."""
        if self.unix:  # UNIX peers have no address: the token "unix" trusts them all, "" none
            return "unix" if peer == "trusted" else ""
        return TRUSTED_HOST


def unix_path() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="ppct"), "srv")  # short: sun_path holds 108 bytes


# --- socketserver (sync, threading, forking, UNIX) ---


class SocketserverAdapter(Adapter):
    base: type = proxyproto.ThreadingProxyTCPServer

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        attrs = {f"proxy_{k}": v for k, v in settings.knobs().items()}
        cls = type(f"Contract{self.base.__name__}", (self.base,), {**attrs, "daemon_threads": True})
        server = cls(unix_path() if self.unix else (TRUSTED_HOST, 0), SocketserverApp)
        if settings.tls:
            assert cert is not None
            server.socket = cert.server_context().wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(CEILING)
            if self.unix:
                shutil.rmtree(os.path.dirname(server.server_address), ignore_errors=True)

        return Running(server.server_address, stop)


# --- UDP ---


class UdpAdapter(Adapter):
    name = "udp"
    datagram = True

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        attrs = {f"proxy_{k}": v for k, v in settings.knobs().items() if k not in ("header_timeout", "max_pending")}
        server = type("ContractUDPServer", (proxyproto.udp.ProxyUDPServer,), attrs)((TRUSTED_HOST, 0), DatagramApp)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(CEILING)

        return Running(server.server_address, stop)


# --- asyncio: aio.start_server and wrap_protocol_factory ---


class AioStartServer(Adapter):
    name = "aio-start_server"
    tls = True

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        lt = LoopThread()
        ssl_kw = {"ssl": cert.server_context()} if settings.tls and cert else {}
        server = lt.run(proxyproto.aio.start_server(stream_app, TRUSTED_HOST, 0, **settings.knobs(), **ssl_kw))

        async def down() -> None:
            server.close()

        return Running(server.sockets[0].getsockname()[:2], lambda: lt.stop(down()))


class ProtocolFactoryAdapter(Adapter):
    tls = True
    inner: Callable[[], asyncio.BaseProtocol] = PlainApp

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        lt = LoopThread()
        context = cert.server_context() if settings.tls and cert else None
        factory = proxyproto.aio_protocol.wrap_protocol_factory(self.inner, ssl=context, **settings.knobs())

        async def up() -> asyncio.AbstractServer:
            return await asyncio.get_running_loop().create_server(factory, TRUSTED_HOST, 0)

        server = lt.run(up())

        async def down() -> None:
            server.close()
            factory.close()

        return Running(server.sockets[0].getsockname()[:2], lambda: lt.stop(down()))


# --- the web servers ---


class UvicornAdapter(Adapter):
    framing, tls = "http", True
    http, loop = "h11", "asyncio"

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        import uvicorn

        import proxyproto.uvicorn

        lt = LoopThread(self.loop)
        tls = {"ssl_certfile": str(cert.cert), "ssl_keyfile": str(cert.key)} if settings.tls and cert else {}
        http = proxyproto.uvicorn.wrap(self.http, **settings.knobs())
        server = uvicorn.Server(uvicorn.Config(asgi_app, host=TRUSTED_HOST, port=0, lifespan="off",
                                              log_level="critical", http=http, **tls))

        async def up() -> asyncio.Future[Any]:
            task = asyncio.ensure_future(server.serve())
            await until(lambda: server.started, task)
            return task

        task = lt.run(up())

        async def down() -> None:
            server.should_exit = True
            await task

        return Running(server.servers[0].sockets[0].getsockname()[:2], lambda: lt.stop(down()))


class AiohttpAdapter(Adapter):
    name, framing, tls, requires = "aiohttp", "http", True, ("aiohttp",)

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        from aiohttp import web

        from proxyproto.aiohttp import ProxyTCPSite

        lt = LoopThread()
        context = cert.server_context() if settings.tls and cert else None

        async def up() -> Any:
            application = web.Application()
            application.router.add_route("*", "/{tail:.*}", aiohttp_handler)
            runner = web.AppRunner(application, access_log=None)
            await runner.setup()
            await ProxyTCPSite(runner, TRUSTED_HOST, 0, ssl_context=context, **settings.knobs()).start()
            return runner

        runner = lt.run(up())
        return Running(runner.addresses[0][:2], lambda: lt.stop(runner.cleanup()))


class HypercornAdapter(Adapter):
    name, framing, tls, requires = "hypercorn", "http", True, ("hypercorn",)

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        from hypercorn.config import Config

        from proxyproto.hypercorn import serve

        lt, port, config = LoopThread(), free_port(), Config()
        config.bind, config.accesslog, config.errorlog = [f"{TRUSTED_HOST}:{port}"], None, None
        if settings.tls and cert:
            config.certfile, config.keyfile = str(cert.cert), str(cert.key)
        stop = lt.run(_event())
        task = asyncio.run_coroutine_threadsafe(
            serve(asgi_app, config, shutdown_trigger=stop.wait, **settings.knobs()), lt.loop
        )
        lt.run(until(lambda: listening(port) or task.done()))
        assert not task.done(), task.exception()

        async def down() -> None:
            stop.set()
            await asyncio.wrap_future(task)

        return Running((TRUSTED_HOST, port), lambda: lt.stop(down()))


async def _event() -> asyncio.Event:
    return asyncio.Event()  # made on the loop that waits for it


class WaitressAdapter(Adapter):
    name, framing, requires = "waitress", "http", ("waitress",)

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        from waitress import wasyncore

        from proxyproto.waitress import create_server

        # The loop checks header deadlines on each pass: pass often, so a silent client is closed on time.
        server = create_server(wsgi_app, listen=f"{TRUSTED_HOST}:0", threads=4, asyncore_loop_timeout=0.02,
                               **settings.knobs())
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()

        def stop() -> None:
            server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
            thread.join(CEILING)
            server.task_dispatcher.shutdown()

        return Running(server.socket.getsockname()[:2], stop)


class TornadoAdapter(Adapter):
    name, framing, tls, requires = "tornado", "http", True, ("tornado",)

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        from tornado.httputil import HTTPHeaders, ResponseStartLine
        from tornado.netutil import bind_sockets

        from proxyproto.tornado import ProxyHTTPServer, header

        def app(request: Any) -> None:  # a plain request callback: what Tornado gives, reported
            answer = report((request.remote_ip, request.connection.context.address[1]), header(request), request.body)
            fields = HTTPHeaders({"Content-Type": "application/json", "Content-Length": str(len(answer))})
            request.connection.write_headers(ResponseStartLine("HTTP/1.1", 200, "OK"), fields, answer)
            request.connection.finish()

        async def up() -> Any:
            server = ProxyHTTPServer(app, ssl_options=cert.server_context() if settings.tls and cert else None,
                                     **settings.knobs())
            sockets = bind_sockets(0, TRUSTED_HOST)
            server.add_sockets(sockets)
            return server, sockets[0].getsockname()[:2]

        async def down() -> None:
            server.stop()
            await server.close_all_connections()

        lt = LoopThread()
        server, address = lt.run(up())
        return Running(address, lambda: lt.stop(down()))
class TwistedAdapter(Adapter):
    """``proxyproto.twisted.wrap_endpoint`` on Twisted's reactor, run once in a daemon thread for the session."""
    name, tls, requires, reactor_thread = "twisted", True, ("twisted.internet", "OpenSSL"), cast(Any, None)
    class App:  # made a twisted Protocol, half-closeable, in start(); reports at EOF (over TLS, at a newline)
        tls, data, transport = False, b"", cast(Any, None)
        def dataReceived(self, data: bytes) -> None:
            self.data += data
            if self.tls and b"\n" in data:
                self.readConnectionLost()
        def readConnectionLost(self) -> None:
            t, peer = self.transport, self.transport.getPeer()
            t.write(report((peer.host, peer.port), getattr(t, "proxy_header", None), self.data))
            t.loseConnection()
        def writeConnectionLost(self) -> None: ...
    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        from twisted.internet import endpoints, interfaces, protocol, reactor, ssl
        from twisted.internet.threads import blockingCallFromThread as call
        from zope.interface import implementer

        from proxyproto.twisted import wrap_endpoint
        if TwistedAdapter.reactor_thread is None:
            TwistedAdapter.reactor_thread = threading.Thread(target=reactor.run, args=(False,), daemon=True)
            TwistedAdapter.reactor_thread.start()
        context = ssl.DefaultOpenSSLContextFactory(str(cert.key), str(cert.cert)) if settings.tls and cert else None
        app = type("App", (self.App, protocol.Protocol), {"tls": settings.tls})
        factory = protocol.Factory.forProtocol(implementer(interfaces.IHalfCloseableProtocol)(app))
        inner = endpoints.TCP4ServerEndpoint(reactor, 0, interface=TRUSTED_HOST)
        port = call(reactor, wrap_endpoint(inner, ssl=context, **settings.knobs()).listen, factory)
        return Running((TRUSTED_HOST, port.getHost().port), lambda: call(reactor, port.stopListening))
class GunicornAdapter(Adapter):
    """The real ``gunicorn`` command, one worker, ``-k proxyproto.gunicorn.<worker>``; the knobs as PROXYPROTO_*."""

    framing, tls, worker, app, flags = "http", True, "Sync", "contract_kit:wsgi_app", ()

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        port, here = free_port(), Path(__file__).resolve().parent
        env = {**os.environ, **{VARIABLES[knob]: str(value) for knob, value in settings.knobs().items()},
               "PYTHONPATH": os.pathsep.join(map(str, (here.parents[1], here.parent, here)))}  # fmt: skip
        out = Path(tempfile.mkdtemp(prefix="ppgc")) / "gunicorn.out"
        with open(out, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--no-control-socket", "-k", f"proxyproto.gunicorn.{self.worker}",
                 "--workers", "1", "-b", f"{TRUSTED_HOST}:{port}", *self.flags, self.app,
                 *(["--certfile", str(cert.cert), "--keyfile", str(cert.key)] if settings.tls and cert else [])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)  # fmt: skip
        deadline = time.monotonic() + CEILING  # every worker accepts once it has written its policy line
        while "PROXY header policy" not in out.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.02)

        def stop() -> None:  # SIGTERM by PID: gunicorn's graceful shutdown (bounded; SIGKILL past it)
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(CEILING)
            proc.kill()  # (nothing when it has exited)
            proc.wait(CEILING)
            shutil.rmtree(out.parent, ignore_errors=True)

        return Running((TRUSTED_HOST, port), stop)
class SanicAdapter(Adapter):
    name, framing, tls, requires = "sanic", "http", True, ("sanic",)

    def start(self, settings: Settings, cert: Certificate | None) -> Running:
        import sanic

        import proxyproto.sanic

        sanic.Sanic.test_mode = True  # several apps in one process: each touches Sanic's classes up again
        app = sanic.Sanic(f"contract_{id(settings)}_{time.monotonic_ns()}")
        app.config.update(MOTD=False, ACCESS_LOG=False)

        @app.post("/contract")
        async def contract(request: Any) -> Any:
            answer = report((request.ip, request.port), proxyproto.sanic.header(request), request.body)
            return sanic.response.raw(answer, content_type="application/json")

        context = cert.server_context() if settings.tls and cert else None
        listener = socket.create_server((TRUSTED_HOST, 0))  # Sanic reads port=0 as its default, 8000
        protocol, lt = proxyproto.sanic.wrap(ssl=context, **settings.knobs()), LoopThread()
        server = lt.run(app.create_server(sock=listener, protocol=protocol))
        lt.run(server.startup())

        async def down() -> None:
            closed = server.close()
            for connection in list(server.connections):
                connection.close_if_idle()
            await closed

        return Running(listener.getsockname()[:2], lambda: lt.stop(down()))


ADAPTERS: list[Adapter] = [
    SocketserverAdapter("socketserver-sync", base=proxyproto.ProxyTCPServer, concurrent=False, tls=True),
    SocketserverAdapter("socketserver-threading", base=proxyproto.ThreadingProxyTCPServer, tls=True),
    SocketserverAdapter("socketserver-forking", base=proxyproto.ForkingProxyTCPServer, tls=True),
    SocketserverAdapter("socketserver-unix", base=proxyproto.ThreadingProxyUnixStreamServer, unix=True, tls=True),
    UdpAdapter(),
    AioStartServer(),
    ProtocolFactoryAdapter("protocol-plain", inner=PlainApp),
    ProtocolFactoryAdapter("protocol-buffered", inner=BufferedApp),
    ProtocolFactoryAdapter("protocol-streams", inner=streams_app),
    UvicornAdapter("uvicorn-h11", http="h11", requires=("uvicorn", "h11")),
    UvicornAdapter("uvicorn-httptools", http="httptools", requires=("uvicorn", "httptools")),
    UvicornAdapter(
        "uvicorn-httptools-uvloop", http="httptools", loop="uvloop", requires=("uvicorn", "httptools", "uvloop")
    ),
    AiohttpAdapter(),
    HypercornAdapter(),
    WaitressAdapter(),
    TornadoAdapter(),
    TwistedAdapter(),
    GunicornAdapter("gunicorn-sync", concurrent=False, requires=("gunicorn",)),
    GunicornAdapter("gunicorn-gthread", worker="GThread", flags=("--threads", "4"), requires=("gunicorn",)),
    GunicornAdapter("gunicorn-uvicorn", worker="UvicornWorker", app="contract_kit:asgi_app",
                    requires=("gunicorn", "uvicorn", "httptools")),
    SanicAdapter(),
]
BY_NAME = {adapter.name: adapter for adapter in ADAPTERS}


# -- the cases and their expectation ------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell: a peer (trusted or not), the policy that applies to it, what it sends and how."""

    peer: str
    policy: str
    kind: Kind
    delivery: str = "one write"

    @property
    def id(self) -> str:
        return f"{self.peer}-{self.policy}-{self.kind.name}-{self.delivery.replace(' ', '-')}"

    def expected(self, adapter: Adapter, stream: bytes) -> Expected:
        """What the table says for this cell, given every byte the client sends."""
        return expect(self.kind.row, self.policy, self.peer == "trusted", self.kind, stream, adapter.unix)

    def settings(self, adapter: Adapter, **overrides: Any) -> Settings:
        """The server this cell runs on (shared with the other cells of its column)."""
        if self.peer == "trusted":
            policy, untrusted = self.policy, PAIRS[self.policy]
        else:
            policy, untrusted = UNTRUSTED_SERVER[self.policy], self.policy
        return Settings(policy, untrusted, adapter.trusted_setting(self.peer), **overrides)


def cells_for(adapter: Adapter) -> list[Cell]:
    """Every (peer, policy) column times every kind of start (and delivery) this adapter can show."""
    if adapter.datagram:
        return [Cell(peer, policy, kind) for peer, policy in COLUMNS for kind in DATAGRAM_KINDS]
    cells = []
    for peer, policy in COLUMNS:
        for kind in STREAM_KINDS:
            if kind.raw_only and adapter.framing != "raw":
                continue
            deliveries = ["one write", "two writes", "byte by byte"] if kind.name in SPLIT_KINDS else ["one write"]
            cells += [Cell(peer, policy, kind, delivery) for delivery in deliveries]
    return cells


@dataclass(frozen=True)
class Expected:
    served: bool
    client: Any = None  # the address the app sees: SOCKET_ADDRESS for the socket's own peer
    header: dict[str, Any] | None = None  # what the app can reach
    payload: bytes = b""  # the bytes the app receives


SOCKET_ADDRESS = "the socket's own peer address"


def expect(row: str, policy: str, trusted: bool, kind: Kind, stream: bytes, unix_listener: bool) -> Expected:
    """What DESIGN.md's table says for ``kind`` arriving under ``policy`` (the one expectation of every adapter).

    ``stream``: every byte the client sends, header included.
    """
    cell = TABLE[row][policy]
    if cell == "closed":
        return Expected(False)
    header_bytes = len(kind.header) if row.startswith("header") else 0
    if cell in ("untouched", "served, no header", "served"):
        return Expected(True, SOCKET_ADDRESS, None, stream)
    header = None
    if row.startswith("header") and trusted:  # a trusted peer's header reaches the app; an untrusted one's never
        header = {"command": kind.command, "source": address_json(kind.source)}
    client: Any = SOCKET_ADDRESS
    if cell == "served, real address" and kind.source is not None:
        # An IP listener serves a UNIX-family header with the socket's own peer (the header stays reachable).
        if isinstance(kind.source, tuple) or unix_listener:
            client = address_json(kind.source)
    return Expected(True, client, header, stream[header_bytes:])


def chunks_of(kind: Kind, payload: bytes, delivery: str) -> list[bytes]:
    stream = kind.header + (payload if kind.with_payload else b"")
    if delivery == "two writes":
        cut = max(1, len(kind.header) // 2) if kind.header else len(stream) // 2
        return [stream[:cut], stream[cut:]]
    if delivery == "byte by byte":
        return [stream[i : i + 1] for i in range(len(stream))]
    return [stream]


# -- the client -------------------------------------------------------------------------------------------


@dataclass
class Client:
    """One connection to a server under test, from the trusted or the untrusted loopback address."""

    adapter: Adapter
    running: Running
    peer: str
    sock: socket.socket = field(init=False)
    own_address: Any = field(init=False)

    def __post_init__(self) -> None:
        if self.adapter.unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            directory = os.path.dirname(self.running.address)
            self.sock.bind(tempfile.mktemp(prefix="c", dir=directory))  # a path: the socket's own peer address
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.bind((TRUSTED_HOST if self.peer == "trusted" else UNTRUSTED_HOST, 0))
        self.sock.settimeout(CEILING)
        self.sock.connect(self.running.address)
        self.own_address = address_json(self.sock.getsockname())

    def send(self, chunks: list[bytes], pause_before_last: float = 0.0) -> None:
        """Send ``chunks`` one write each; a server that closed meanwhile is no error (it is observed)."""
        try:
            for i, chunk in enumerate(chunks):
                if pause_before_last and i == len(chunks) - 1:
                    time.sleep(pause_before_last)
                self.sock.sendall(chunk)
        except OSError:
            pass

    def observe(self, tls: bool = False) -> Observation:
        """Half-close (raw framing, no TLS), then read what comes back."""
        try:
            if self.adapter.framing == "http":
                return read_http_response(self.sock)
            if not tls:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
            data = read_all(self.sock)
            return Observation(report=json.loads(data)) if data else Observation()
        finally:
            self.sock.close()

    def closed_by_server(self, within: float) -> bool:
        """Whether the server closes this connection (EOF or reset) within ``within`` seconds; nothing is sent."""
        self.sock.settimeout(within)
        try:
            return read_all(self.sock) == b""
        except socket.timeout:
            return False
        finally:
            self.sock.close()

    def start_tls(self, cert: Certificate) -> None:
        self.sock = cert.client_context().wrap_socket(self.sock, server_hostname="localhost")


def datagram_exchange(running: Running, peer: str, policy: str, datagram: bytes) -> tuple[Observation, Any]:
    """Send ``datagram``, then a sentinel the policy serves; the reply before the sentinel's is the datagram's.

    The server handles datagrams in order, so a dropped datagram costs no waiting for a reply that
    never comes: the sentinel's reply arrives first.
    """
    sentinel = (v2(command=0) if policy in ("REQUIRE", "USE", "IGNORE") else b"") + b"sentinel"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((TRUSTED_HOST if peer == "trusted" else UNTRUSTED_HOST, 0))
        sock.settimeout(CEILING)
        sock.sendto(datagram, running.address)
        sock.sendto(sentinel, running.address)
        replies = []
        while True:
            seen = json.loads(sock.recv(65535))
            if bytes.fromhex(seen["payload"]).endswith(b"sentinel"):
                break
            replies.append(seen)
        assert len(replies) <= 1, replies
        return Observation(report=replies[0] if replies else None), address_json(sock.getsockname())


def payload_for(adapter: Adapter, tls: bool = False) -> bytes:
    """What the app is sent after the header: raw bytes, or an HTTP request carrying them."""
    if adapter.framing == "http":
        return http_request(HTTP_BODY)
    return TLS_RAW_PAYLOAD if tls else RAW_PAYLOAD


def app_payload(adapter: Adapter, stream_after_header: bytes) -> bytes:
    """The payload the app reports for a request: the body of the framed request, the bytes themselves raw."""
    if adapter.framing == "http":
        return HTTP_BODY if stream_after_header == http_request(HTTP_BODY) else b"<not an HTTP request>"
    return stream_after_header


def check(adapter: Adapter, expected: Expected, seen: Observation, own_address: Any) -> None:
    """The observation agrees with the expectation; ``own_address``: the client socket's, as the server sees it."""
    if not expected.served:
        assert seen.closed, f"expected the connection closed unserved, saw {seen}"
        return
    payload = app_payload(adapter, expected.payload)
    if payload == b"<not an HTTP request>":
        # Served untouched: the header's bytes reach the HTTP server, which answers them as a bad request.
        assert seen.http_status is not None and 400 <= seen.http_status < 500, f"expected a 4xx, saw {seen}"
        return
    assert seen.report is not None, f"expected the app to be served, saw {seen}"
    client = own_address if expected.client == SOCKET_ADDRESS else expected.client
    got = seen.report
    assert got["client"] == client, f"client address {got['client']}, expected {client}"
    assert bytes.fromhex(got["payload"]) == payload, f"payload {bytes.fromhex(got['payload'])!r}, expected {payload!r}"
    if expected.header is None:
        assert got["header"] is None, f"the app could reach a header it must not see: {got['header']}"


# -- silent and slow clients: every probe of an adapter at once, one wait for all ---------------------------

SILENT = Kind("silent", "silent", b"")
PARTIAL = Kind("half-a-v2-header", "partial by the deadline", v2(REAL_V4, DEST_V4))


def timed_cells(adapter: Adapter) -> list[Cell]:
    if adapter.datagram:
        return []
    return [Cell(peer, policy, kind, "past the deadline") for peer, policy in COLUMNS for kind in (SILENT, PARTIAL)]


def timed_settings(cell: Cell, adapter: Adapter) -> Settings:
    return cell.settings(adapter, header_timeout=SHORT_TIMEOUT)


def timed_stream(cell: Cell, adapter: Adapter) -> bytes:
    return cell.kind.header + payload_for(adapter)


def probe_timed(cell: Cell, adapter: Adapter, servers: Servers) -> tuple[Observation, Any]:
    """Send nothing (or half a header) until well past the deadline, then the rest and the payload."""
    client = Client(adapter, servers.get(timed_settings(cell, adapter)), cell.peer)
    stream = timed_stream(cell, adapter)
    half = len(cell.kind.header) // 2
    client.send([stream[:half], stream[half:]] if half else [stream], pause_before_last=PAST_THE_DEADLINE)
    return client.observe(), client.own_address


def run_timed(adapter: Adapter, servers: Servers) -> dict[str, tuple[Observation, Any]]:
    """Every timed probe of ``adapter``, concurrently (one server at a time where the server is synchronous)."""
    import concurrent.futures

    cells = timed_cells(adapter)
    if adapter.concurrent:
        batches = [[cell] for cell in cells]
    else:
        grouped: dict[Settings, list[Cell]] = {}
        for cell in cells:
            grouped.setdefault(timed_settings(cell, adapter), []).append(cell)
        batches = list(grouped.values())
    for cell in cells:
        servers.get(timed_settings(cell, adapter))  # every server up before any clock starts

    def run(batch: list[Cell]) -> list[tuple[str, tuple[Observation, Any]]]:
        return [(cell.id, probe_timed(cell, adapter, servers)) for cell in batch]

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(batches))) as pool:
        return dict(pair for batch in pool.map(run, batches) for pair in batch)


# -- servers, started once per (adapter, settings) ----------------------------------------------------------


class Servers:
    """The servers of one adapter, started on first use per settings and stopped together."""

    def __init__(self, adapter: Adapter, cert: Certificate | None) -> None:
        self.adapter, self.cert = adapter, cert
        self.running: dict[Settings, Running] = {}
        self.lock = threading.Lock()
        #: The timed probes' results, computed in the background (see test_contract's fixture).
        self.timed: Any = None

    @classmethod
    @contextlib.contextmanager
    def serving(cls, adapter: Adapter, cert: Certificate | None) -> Iterator[Servers]:
        servers = cls(adapter, cert)
        try:
            yield servers
        finally:
            servers.stop()

    def get(self, settings: Settings) -> Running:
        with self.lock:
            if settings not in self.running:
                self.running[settings] = self.adapter.start(settings, self.cert)
            return self.running[settings]

    def stop(self) -> None:
        """Stop every server, all at the same time, then report the first failure.

        Each server is independent (its own process, loop thread or serving thread), and a
        graceful shutdown takes a while (gunicorn's arbiter and worker, above all): one after
        the other, an adapter's dozen servers took seconds.
        """
        import concurrent.futures

        running = list(self.running.values())
        self.running.clear()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(running))) as pool:
            stopping = [pool.submit(server.stop) for server in running]
        errors = [future.exception() for future in stopping if future.exception() is not None]
        if errors:
            raise errors[0]


Address = Union[tuple[str, int], str]
