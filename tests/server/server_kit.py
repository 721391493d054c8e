"""Helpers for the server-layer tests: header bytes built by hand, servers run in a thread, clients.

The headers are assembled here from the spec's byte layout rather than with ``proxyproto.encode_*``
so that a bug in the encoder cannot hide the same bug in the server (both would agree with each
other and both would be wrong).  Handlers report what they saw back *through the connection* as
one JSON line, because under the Forking classes the handler runs in a child process and shared
memory would not reach the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import socketserver
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import proxyproto

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

# Anyes carried *inside* headers are data, never dialled: documentation ranges are used.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)

CLASS_NAMES = (
    "ProxyTCPServer",
    "ThreadingProxyTCPServer",
    "ForkingProxyTCPServer",
    "ProxyUnixStreamServer",
    "ThreadingProxyUnixStreamServer",
    "ForkingProxyUnixStreamServer",
)
TCP_CLASS_NAMES = CLASS_NAMES[:3]

# What each prebuilt class would be without the mixin: the baseline for "as without the mixin".
PLAIN_BASES = {
    "ProxyTCPServer": socketserver.TCPServer,
    "ThreadingProxyTCPServer": socketserver.ThreadingTCPServer,
    "ForkingProxyTCPServer": socketserver.ForkingTCPServer,
    "ProxyUnixStreamServer": socketserver.UnixStreamServer,
    "ThreadingProxyUnixStreamServer": socketserver.ThreadingUnixStreamServer,
    # socketserver.ForkingUnixStreamServer exists only from Python 3.12 on.
    "ForkingProxyUnixStreamServer": getattr(
        socketserver,
        "ForkingUnixStreamServer",
        type(
            "ForkingUnixStreamServer",
            (socketserver.ForkingMixIn, socketserver.UnixStreamServer),
            {},
        ),
    ),
}


def server_class(name: str) -> type:
    """The prebuilt class ``proxyproto.<name>``."""
    return getattr(proxyproto, name)


def is_unix(name_or_cls: str | type) -> bool:
    """True for the UNIX-socket classes."""
    cls = server_class(name_or_cls) if isinstance(name_or_cls, str) else name_or_cls
    return getattr(cls, "address_family", None) == socket.AF_UNIX


# --------------------------------------------------------------------------- header bytes


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 line for two INET or two INET6 endpoints, as real senders write it."""
    proto = "TCP6" if ":" in source[0] else "TCP4"
    line = f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


def crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected 0x82F63B78): slow, obviously right, test-only."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def tlv(kind: int, value: bytes) -> bytes:
    """One TLV: type, 16-bit big-endian length, value."""
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v2_header(
    source: tuple[str, int] | str | None = None,
    destination: tuple[str, int] | str | None = None,
    *,
    local: bool = False,
    tlvs: bytes = b"",
    crc: str | None = None,
) -> bytes:
    """A v2 header.

    ``source``/``destination``: (host, port) for INET/INET6, a str path for UNIX, None for no
    addresses (family byte 0x00).  ``local``: the LOCAL command.  ``crc``: None for no CRC TLV,
    "good" to append a correct CRC-32C TLV, "bad" for a wrong one.
    """
    command = 0x20 if local else 0x21
    if source is None:
        family, body = 0x00, b""
    elif isinstance(source, str):
        assert isinstance(destination, str)
        family = 0x31
        body = source.encode().ljust(108, b"\0") + destination.encode().ljust(108, b"\0")
    else:
        assert isinstance(destination, tuple)
        inet = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
        family = 0x21 if inet == socket.AF_INET6 else 0x11
        body = (
            socket.inet_pton(inet, source[0])
            + socket.inet_pton(inet, destination[0])
            + struct.pack("!HH", source[1], destination[1])
        )
    body += tlvs
    if crc is not None:
        body += tlv(0x03, b"\0\0\0\0")
    raw = bytearray(V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body)
    if crc is not None:
        value = crc32c(bytes(raw))
        if crc == "bad":
            value ^= 0x00010000
        raw[-4:] = struct.pack("!I", value)
    return bytes(raw)


# --------------------------------------------------------------------------- handlers


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def header_summary(header: Any) -> dict | None:
    """The fields of a ProxyHeader a test compares, in JSON form."""
    if header is None:
        return None
    return {
        "version": int(header.version),
        "command": int(header.command),
        "family": int(header.family),
        "source": _jsonable(header.source),
        "destination": _jsonable(header.destination),
    }


class ReportHandler(socketserver.StreamRequestHandler):
    """Reports what the handler saw as one JSON line, then closes.

    ``mode`` says how much to read first: "eof" reads ``rfile`` to EOF (the client shuts its
    write side), "line" reads one line, "none" reads nothing (a server that speaks first).
    """

    mode = "eof"

    def setup(self) -> None:
        # Before StreamRequestHandler.setup, which could change the timeout itself.
        self.seen_timeout = self.request.gettimeout()
        super().setup()

    def handle(self) -> None:
        if self.mode == "eof":
            payload: bytes | None = self.rfile.read()
        elif self.mode == "line":
            payload = self.rfile.readline()
        else:
            payload = None
        report = {
            "client_address": _jsonable(self.client_address),
            "header": header_summary(getattr(self.request, "proxy_header", None)),
            "has_proxy_header_attr": hasattr(self.request, "proxy_header"),
            "is_socket": isinstance(self.request, socket.socket),
            "timeout": self.seen_timeout,
            "payload": None if payload is None else payload.hex(),
            "pid": os.getpid(),
        }
        reports = getattr(self.server, "reports", None)
        if reports is not None:
            reports.append(report)
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(report).encode() + b"\n")

    def finish(self) -> None:
        # A peer that already left must not turn into a traceback on stderr.
        with contextlib.suppress(OSError):
            super().finish()


class LineReportHandler(ReportHandler):
    mode = "line"


class BannerReportHandler(ReportHandler):
    mode = "none"


class ReplyHandler(socketserver.BaseRequestHandler):
    """Answers ``served <client_address>``: a handler written for plain socketserver."""

    def handle(self) -> None:
        self.request.sendall(b"served " + repr(self.client_address).encode())


def as_address(value: Any) -> Any:
    """A JSON-decoded address back in the socket module's shape (tuple, or str for UNIX)."""
    if isinstance(value, list):
        return tuple(value)
    return value


# --------------------------------------------------------------------------- servers


class _Recording:
    """Records every ``verify_request`` call (it runs in the serving process, also when forking)."""

    verified: list
    reports: list

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.verified.append(client_address)
        return super().verify_request(request, client_address)  # type: ignore[misc]


def make_class(base: type, **attrs: Any) -> type:
    """A test subclass of ``base`` with class attributes ``attrs`` and recorded verify_request."""
    return type(f"Test{base.__name__}", (_Recording, base), dict(attrs))


class Running:
    """A server serving in a background thread; ``stop()`` is idempotent."""

    def __init__(self, server: Any, tmpdir: str | None = None, poll_interval: float = 0.05) -> None:
        self.server = server
        self.poll_interval = poll_interval
        self.tmpdir = tmpdir
        self.error: BaseException | None = None
        self.stopped = False
        self._client_count = 0
        if not hasattr(server, "verified"):
            server.verified = []
        server.reports = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve_forever(poll_interval=self.poll_interval)
        except BaseException as exc:
            self.error = exc  # stop() raises it again in the test's thread
            raise

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.poll_interval > 0.5:
            self._shutdown_now()
        else:
            self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.error is not None:
            raise self.error

    def _shutdown_now(self) -> None:
        """``shutdown()`` without waiting out a long ``poll_interval``: it returns once the loop's
        select does, so connections wake it (one may come before the loop sees the request: the
        next one wakes it again)."""
        stopping = threading.Thread(target=self.server.shutdown, daemon=True)
        stopping.start()
        while stopping.is_alive():
            with contextlib.suppress(OSError):
                self.connect(timeout=1.0).close()
            stopping.join(0.05)

    # clients ---------------------------------------------------------------------------

    def connect(self, *, source_host: str | None = None, timeout: float = 5.0) -> socket.socket:
        """A connected client socket.  UNIX clients are bound to a path of their own so that the
        socket's own peer address (what LOCAL must give) is distinguishable."""
        family = self.server.address_family
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        if family == socket.AF_UNIX:
            assert self.tmpdir is not None
            self._client_count += 1
            sock.bind(os.path.join(self.tmpdir, f"c{self._client_count}"))
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source_host is not None:
                sock.bind((source_host, 0))
        sock.connect(self.server.server_address)
        return sock

    @property
    def family(self) -> int:
        return self.server.address_family


def new_unix_dir() -> str:
    """A short temporary directory (sun_path is 108 bytes; pytest's tmp_path can be long)."""
    return tempfile.mkdtemp(prefix="ppsrv")


@contextlib.contextmanager
def serve(
    base: str | type,
    handler: type = ReportHandler,
    *,
    ipv6: bool = False,
    host: str | None = None,
    prepare: Callable[[Any], None] | None = None,
    poll_interval: float = 0.05,
    **attrs: Any,
) -> Iterator[Running]:
    """Start ``base`` (a class or a prebuilt class name) on a free loopback port or a fresh
    UNIX path, serving in a thread (``poll_interval`` 0.05 s); shut down, close and join at exit.
    ``attrs`` become class attributes of a test subclass; ``prepare(server)`` runs before serving.
    """
    cls = server_class(base) if isinstance(base, str) else base
    if ipv6:
        attrs.setdefault("address_family", socket.AF_INET6)
    tcls = make_class(cls, **attrs)
    tmpdir = None
    if tcls.address_family == socket.AF_UNIX:
        tmpdir = new_unix_dir()
        address: Any = os.path.join(tmpdir, "srv")
    elif tcls.address_family == socket.AF_INET6:
        address = (host or "::1", 0)
    else:
        address = (host or "127.0.0.1", 0)
    server = tcls(address, handler)
    server.verified = []
    if prepare is not None:
        prepare(server)
    running = Running(server, tmpdir, poll_interval)
    try:
        yield running
    finally:
        running.stop()


# --------------------------------------------------------------------------- client side


def read_all(sock: socket.socket, limit: float = 5.0) -> bytes:
    """Everything until EOF.  A reset counts as EOF (a server that closes with unread bytes in
    its buffer resets); a stall longer than ``limit`` fails the test through socket.timeout."""
    sock.settimeout(limit)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def parse_report(data: bytes) -> dict | None:
    """The handler's JSON report, or None when the server closed without serving."""
    if not data:
        return None
    return json.loads(data.split(b"\n", 1)[0])


def exchange(
    running: Running,
    chunks: Sequence[bytes],
    *,
    delay: float = 0.0,
    source_host: str | None = None,
) -> tuple[dict | None, Any]:
    """Connect, send ``chunks`` (``delay`` seconds apart), shut the write side, read the report.

    Returns (report or None, the client's own address as the server's socket sees it).
    """
    with running.connect(source_host=source_host) as sock:
        own = sock.getsockname()
        try:
            for i, chunk in enumerate(chunks):
                if i and delay:
                    time.sleep(delay)
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            # A server that refuses the connection may reset it before the client is done
            # writing; what it sent before that (nothing, if it refused) is still read below.
            pass
        return parse_report(read_all(sock)), own


def bytewise(data: bytes) -> list:
    """``data`` split into one-byte chunks."""
    return [data[i:i + 1] for i in range(len(data))]


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0, step: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


def proxyproto_records(caplog: Any) -> list:
    """Records of logger ``proxyproto`` (and its children)."""
    return [
        r for r in caplog.records if r.name == "proxyproto" or r.name.startswith("proxyproto.")
    ]
