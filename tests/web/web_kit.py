"""Helpers for the web-server tests: an ASGI app that reports what it saw, raw HTTP/1.1 and
WebSocket clients that send a PROXY header first, a throw-away certificate, and a runner for
a server's real command line stopped by PID.

Stdlib only at import time, so ``uvicorn web_kit:app --app-dir tests/web`` can serve the app
in a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)


# -- the application ----------------------------------------------------------------------


async def serve_lifespan(receive: Any, send: Any) -> None:
    """An ASGI lifespan scope: start-up and shutdown complete at once."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def reporting_app(report: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[..., Awaitable[None]]:
    """An ASGI 3 application answering ``report(scope)`` in JSON.

    HTTP: the response body, with the SHA-256 of the request's body as ``"body"``.  A WebSocket:
    its first message, then every message echoed.
    """

    async def reporting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await serve_lifespan(receive, send)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps(report(scope))})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})
        messages = [await receive()]
        while messages[-1].get("more_body"):
            messages.append(await receive())
        body = b"".join(message.get("body", b"") for message in messages)
        answer = json.dumps({**report(scope), "body": hashlib.sha256(body).hexdigest()}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return reporting


def report(scope: dict[str, Any]) -> dict[str, Any]:
    return {
        "client": list(scope["client"]) if scope.get("client") else None,
        "server": list(scope["server"]) if scope.get("server") else None,
        "scheme": scope.get("scheme"),
    }


#: ASGI 3: HTTP answers a JSON report of the scope; a WebSocket echoes every message.
app = reporting_app(report)


# -- clients ------------------------------------------------------------------------------


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self, path: str = "/", body: bytes = b"", close: bool = False) -> tuple[int, dict[str, Any]]:
        """One HTTP/1.1 request; the status and the JSON report."""
        head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
        if close:
            head += "Connection: close\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await asyncio.wait_for(self.reader.readline(), 10)
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        data = await asyncio.wait_for(self.reader.readexactly(length), 10)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, {"raw": data.decode("latin1")}

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


async def connect(
    address: tuple[str, int], header: bytes = b"", tls: ssl.SSLContext | None = None, local: str | None = None
) -> Connection:
    """Open a connection, send ``header`` first, then (with ``tls``) handshake over it."""
    kwargs: dict[str, Any] = {"local_addr": (local, 0)} if local else {}
    reader, writer = await asyncio.open_connection(*address, **kwargs)
    if header:
        writer.write(header)
    if tls is not None:
        await writer.start_tls(tls, server_hostname="localhost")
    return Connection(reader, writer)


async def get(address: tuple[str, int], header: bytes = b"", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """One request on its own connection."""
    conn = await connect(address, header, **kwargs)
    try:
        return await conn.request(close=True)
    finally:
        await conn.close()


async def websocket(conn: Connection, path: str = "/ws", headers: str = "") -> dict[str, Any]:
    """Upgrade ``conn`` to a WebSocket (RFC 6455, by hand); the app's first message (its report).

    ``headers``: more header lines for the upgrade request, each ending in CRLF.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    conn.writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
    )
    status = await asyncio.wait_for(conn.reader.readline(), 10)
    assert b" 101 " in status, status
    while (await asyncio.wait_for(conn.reader.readline(), 10)) not in (b"\r\n", b""):
        pass
    return json.loads(await ws_receive(conn))


def ws_send(conn: Connection, text: str) -> None:
    """A masked text frame (client to server)."""
    data = text.encode()
    mask = os.urandom(4)
    assert len(data) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    conn.writer.write(bytes([0x81, 0x80 | len(data)]) + mask + masked)


async def ws_receive(conn: Connection) -> str:
    """One unmasked text frame (server to client)."""
    first, second = await asyncio.wait_for(conn.reader.readexactly(2), 10)
    assert first & 0x0F == 1, f"opcode {first & 0x0F}"
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await conn.reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await conn.reader.readexactly(8), "big")
    return (await asyncio.wait_for(conn.reader.readexactly(length), 10)).decode()


async def http2_bodies(conn: Connection, streams: tuple[int, ...] = (1, 3), scheme: str = "http") -> list[bytes]:
    """HTTP/2 on ``conn`` (the h2 package as the client): one GET per stream id, all sent at once; their bodies."""
    import h2.config
    import h2.connection
    import h2.events

    client = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for stream in streams:
        request = [(":method", "GET"), (":path", "/"), (":scheme", scheme), (":authority", "test")]
        client.send_headers(stream, request, end_stream=True)
    conn.writer.write(client.data_to_send())
    bodies = {stream: b"" for stream in streams}
    ended: set[int] = set()
    while ended != set(streams):
        data = await asyncio.wait_for(conn.reader.read(65536), 10)
        assert data, "the server closed the connection"
        for event in client.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                bodies[event.stream_id] += event.data
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
        conn.writer.write(client.data_to_send())
    return list(bodies.values())


# -- TLS ----------------------------------------------------------------------------------


@dataclass
class Certificate:
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        return context

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


def self_signed(directory: Path) -> Certificate | None:
    """A certificate for localhost and the loopbacks, made with the openssl CLI; None without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "server.crt", directory / "server.key"
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
    res = subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            san,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, f"openssl req failed:\n{res.stderr}"
    return Certificate(cert, key)


# -- a server's command line, stopped by PID --------------------------------------------------


def tcp_listening(port: int) -> bool:
    """Whether a TCP port is in LISTEN state (the kernel's table; no probe connection)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


@contextlib.contextmanager
def command(
    args: list[str], port: int, env: dict[str, str] | None = None, workdir: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` (``sys.executable -m ...`` style) until the block ends; wait for ``port`` to listen.

    Stopped with SIGINT (a server's graceful shutdown), then SIGKILL after 10 s, by PID.
    The output is in ``workdir/server.out`` and shown when start-up fails.
    """
    workdir = workdir or Path(os.environ.get("TMPDIR", "/tmp"))
    out_path = workdir / f"server-{port}.out"
    out = open(out_path, "wb")
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), **(env or {})}
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=full_env)
    try:
        deadline = time.monotonic() + 20
        while not tcp_listening(port):
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, "the server did not start listening:\n" + out_path.read_text()
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        out.close()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


# -- in-process uvicorn ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def uvicorn_serving(http: Any, **config: Any) -> AsyncIterator[tuple[str, int]]:
    """uvicorn serving ``web_kit.app`` on 127.0.0.1 in this loop, with ``http`` as its ``--http``."""
    from support import uvicorn_server

    async with uvicorn_server(app, http, **config) as (_, address):
        yield address


def _require(name: str) -> Any:
    from support import require_module

    return require_module(name)
