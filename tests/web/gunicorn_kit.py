"""Helpers for the gunicorn worker tests: a WSGI and an ASGI app that report what they saw, the real
``gunicorn`` command started on a free loopback port and stopped by PID, and a blocking HTTP client
that sends a PROXY header first.

Importable by gunicorn's workers (``gunicorn_kit:wsgi_app``, ``gunicorn_kit:asgi_app``): stdlib and
proxyproto only at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from web_kit import HERE, ROOT, command, python

import proxyproto.asgi

#: Each worker class of proxyproto.gunicorn, and the app it serves.
WORKERS = {
    "sync": ("Sync", "gunicorn_kit:wsgi_app"),
    "gthread": ("GThread", "gunicorn_kit:wsgi_app"),
    "uvicorn": ("UvicornWorker", "gunicorn_kit:asgi_app"),
    "uvicorn-h11": ("UvicornH11Worker", "gunicorn_kit:asgi_app"),
}
#: What each worker needs installed beyond gunicorn.
NEEDS = {"sync": (), "gthread": (), "uvicorn": ("uvicorn", "httptools"), "uvicorn-h11": ("uvicorn", "h11")}

#: A bound on every wait: a stall shows as seconds, a correct server answers in milliseconds.
CEILING = 20.0


def _header_json(header: Any) -> Any:
    if header is None:
        return None
    return {
        "command": header.command.name,
        "source": list(header.source) if isinstance(header.source, tuple) else header.source,
        "tlvs": [[tlv.type, tlv.value.hex()] for tlv in header.tlvs],
    }


def _answer(report: dict[str, Any]) -> bytes:
    return json.dumps(report).encode()


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """WSGI: a JSON report of REMOTE_ADDR/REMOTE_PORT, the scheme, the header and the body's length."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    port = environ.get("REMOTE_PORT")
    answer = _answer(
        {
            "client": [environ["REMOTE_ADDR"], int(port) if port else None],
            "scheme": environ["wsgi.url_scheme"],
            "header": _header_json(environ.get("proxyproto.header")),
            "gunicorn_proxy": environ.get("PROXY_PROTOCOL"),  # set by gunicorn's own PROXY parser only
            "body": len(body),
            "pid": os.getpid(),
        }
    )
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: the same report from the scope (the header where proxyproto.asgi documents it)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    client = scope.get("client")
    answer = _answer(
        {
            "client": list(client) if client else None,
            "scheme": scope.get("scheme"),
            "header": _header_json(proxyproto.asgi.header(scope)),
            "gunicorn_proxy": None,
            "body": size,
            "pid": os.getpid(),
        }
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


# -- the real command ------------------------------------------------------------------------------


@dataclass
class Gunicorn:
    proc: subprocess.Popen[bytes]
    port: int
    output: Path
    host: str = "127.0.0.1"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self, within: float = CEILING) -> float:
        """SIGTERM to the arbiter (gunicorn's graceful shutdown), by PID; the seconds until it exited."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(within)
        return time.monotonic() - start


def gunicorn_args(worker: str, port: int, *flags: str, host: str = "127.0.0.1", workers: int = 2) -> list[str]:
    name, app = WORKERS[worker]
    return python(
        "-m",
        "gunicorn",
        "--no-control-socket",
        "-k",
        f"proxyproto.gunicorn.{name}",
        "--workers",
        str(workers),
        "-b",
        f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
        *flags,
        app,
    )


@contextlib.contextmanager
def gunicorn(
    worker: str,
    tmp_path: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    workers: int = 2,
) -> Iterator[Gunicorn]:
    """The real ``gunicorn`` command serving ``worker``'s app until the block ends (SIGTERM, then SIGKILL)."""
    from support import free_port

    port = free_port()
    args = gunicorn_args(worker, port, *flags, host=host, workers=workers)
    with running_command(args, port, tmp_path, env=env, workers=workers, host=host) as server:
        yield server


@contextlib.contextmanager
def running_command(
    args: list[str],
    port: int,
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    workers: int = 1,
    host: str = "127.0.0.1",
) -> Iterator[Gunicorn]:
    """``args`` (a gunicorn command line) running until the block ends, each of its ``workers`` started."""
    full_env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), **(env or {})}
    with command(args, port, env=full_env, workdir=tmp_path) as proc:
        server = Gunicorn(proc, port, tmp_path / f"server-{port}.out", host)
        _wait_for_workers(server, workers)
        try:
            yield server
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.stop()


def _wait_for_workers(running: Gunicorn, workers: int) -> None:
    """Until every worker has written its start line (they accept from then on)."""
    deadline = time.monotonic() + CEILING
    while running.log().count("proxyproto: PROXY header policy") < workers:
        assert running.proc.poll() is None, running.log()
        assert time.monotonic() < deadline, "the workers did not start:\n" + running.log()
        time.sleep(0.05)


# -- a blocking client ------------------------------------------------------------------------------


def connect(address: tuple[str, int], header: bytes = b"", *, local: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(CEILING)
    if local is not None:
        sock.bind((local, 0))
    sock.connect(address)
    if header:
        sock.sendall(header)
    return sock


def request(sock: Any, *, keep_alive: bool = False, body: bytes = b"", headers: str = "") -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request on ``sock`` (``headers``: more lines, each ending in CRLF); the status and the report."""
    head = f"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{headers}"
    if not keep_alive:
        head += "Connection: close\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)
    return read_response(sock)


def read_response(sock: Any) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    try:
        return status, json.loads(rest[:length])
    except ValueError:
        return status, {}


def get(
    address: tuple[str, int], header: bytes = b"", *, local: str | None = None, tls: ssl.SSLContext | None = None
) -> tuple[int, dict[str, Any]]:
    """One request on its own connection: ``header`` first, then (with ``tls``) the handshake, then HTTP."""
    sock: Any = connect(address, header, local=local)
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        return request(sock)
    finally:
        sock.close()


def closed_unserved(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` without a response (EOF or reset)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()
