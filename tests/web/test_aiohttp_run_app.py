"""``proxyproto.aiohttp.run_app``: ``web.run_app`` behind a proxy, stopped by a signal as aiohttp's is.

The serving tests run a real script that calls ``run_app`` in a child
process (this checkout's ``proxyproto``, through ``PYTHONPATH``), talk raw
HTTP/1.1 to it over loopback, and stop it with a signal sent to its PID.  The
script appends what its hooks see to a file: ``startup``, ``shutdown``,
``cleanup``, then ``returned`` once ``run_app`` has returned.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import free_port, listening, require_module, self_signed_files

import proxyproto

try:
    require_module("aiohttp")
except pytest.skip.Exception as missing:  # support.require_module skips without allow_module_level
    pytest.skip(str(missing), allow_module_level=True)

from aiohttp import web

from proxyproto.aiohttp import run_app

ROOT = Path(__file__).resolve().parents[2]

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)

#: Seconds a stopped server may take to exit: generous for a loaded machine, far below the
#: header timeout (30 s in the script) and aiohttp's 60 s default shutdown timeout.
PROMPT = 10.0

SCRIPT = """\
import asyncio, json, ssl, sys

from aiohttp import web

import proxyproto
from proxyproto.aiohttp import run_app

options = json.loads(sys.argv[1])


def mark(text):
    with open(options["marks"], "a") as marks:
        marks.write(text + "\\n")


async def report(request):
    header = request.transport.get_extra_info("proxy_header")
    return web.json_response(
        {
            "remote": request.remote,
            "secure": request.secure,
            "header_version": None if header is None else header.version,
        }
    )


async def slow(request):
    mark("slow request")
    await asyncio.sleep(1.0)
    return web.Response(text="slow done")


async def on_startup(app):
    mark("startup")


async def on_shutdown(app):
    mark("shutdown")


async def on_cleanup(app):
    mark("cleanup")


app = web.Application()
app.router.add_get("/slow", slow)
app.router.add_get("/", report)
app.on_startup.append(on_startup)
app.on_shutdown.append(on_shutdown)
app.on_cleanup.append(on_cleanup)
print("proxyproto from", proxyproto.__file__, flush=True)
extra = {}
if options.get("cert"):
    extra["ssl_context"] = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    extra["ssl_context"].load_cert_chain(*options["cert"])
run_app(
    app,
    host="127.0.0.1",
    port=options["port"],
    trusted=options["trusted"],
    header_timeout=30.0,
    shutdown_timeout=5.0,
    access_log=None,
    print=lambda text: print(text, flush=True),
    **extra,
)
mark("returned")
"""


@dataclass
class Server:
    """A child process serving the script's application with ``run_app``."""

    process: subprocess.Popen[bytes]
    port: int
    marks: Path

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def seen(self) -> list[str]:
        return self.marks.read_text().splitlines() if self.marks.exists() else []

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float, str]:
        """Send ``signum`` to the process; its exit status, the seconds it took to exit, and its output."""
        os.kill(self.process.pid, signum)
        began = time.monotonic()
        try:
            output, _ = self.process.communicate(timeout=PROMPT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {PROMPT} s of signal {signum}")
        return self.process.returncode, time.monotonic() - began, output.decode(errors="replace")


def environment() -> dict[str, str]:
    """This process's environment, with this checkout first on the child's import path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) if not path else f"{ROOT}{os.pathsep}{path}"}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """``serve(trusted=..., cert=...)`` starts the script and returns its :class:`Server` once it listens."""
    started: list[Server] = []

    def start(trusted: str = "127.0.0.1,::1", cert: tuple[str, str] | None = None) -> Server:
        script = tmp_path / "serve.py"
        script.write_text(SCRIPT)
        port = free_port()
        marks = tmp_path / f"marks-{port}.txt"
        options = {"port": port, "trusted": trusted, "marks": str(marks), "cert": cert}
        process = subprocess.Popen(
            [sys.executable, str(script), json.dumps(options)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment(),
        )
        server = Server(process, port, marks)
        started.append(server)
        deadline = time.monotonic() + 20
        while not listening(port):
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}: {process.communicate()[0]!r}")
            assert time.monotonic() < deadline, "the server did not start listening"
            time.sleep(0.05)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
        server.process.communicate(timeout=10)


def get(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n".encode()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(
    address: tuple[str, int],
    data: bytes,
    *,
    head: bytes = b"",
    source: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> bytes:
    """From ``source`` (default: the kernel's choice), send ``head`` in the clear, then ``data``
    (over TLS when ``tls``), and read until the server closes."""
    with socket.create_connection(address, timeout=10, source_address=None if source is None else (source, 0)) as raw:
        raw.sendall(head)
        if tls is None:
            raw.sendall(data)
            return read_all(raw)
        with tls.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(data)
            return read_all(sock)


def report_of(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:300]
    return json.loads(body)  # type: ignore[no-any-return]


def header_bytes(version: int, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    if version == 1:
        return proxyproto.encode_v1(source, destination)
    return proxyproto.encode_v2(source, destination)


# -- serving, and stopping on a signal ----------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serves_the_headers_source_then_a_signal_runs_the_hooks_and_exits_with_status_0(
    serve: Any, signum: int
) -> None:
    server = serve()
    reports = [
        report_of(exchange(server.address, header_bytes(version, source, destination) + get()))
        for version in (1, 2)
        for source, destination in ((REAL_V4, DEST_V4), (REAL_V6, DEST_V6))
    ]
    assert [r["remote"] for r in reports] == [REAL_V4[0], REAL_V6[0]] * 2
    assert [r["header_version"] for r in reports] == [1, 1, 2, 2]
    assert server.seen() == ["startup"]

    status, _, output = server.stop(signum)
    assert status == 0, output
    assert server.seen() == ["startup", "shutdown", "cleanup", "returned"]
    assert f"proxyproto from {ROOT / 'proxyproto' / '__init__.py'}" in output
    start_line = f"======== Running on http://127.0.0.1:{server.port} (PROXY protocol: REQUIRE for "
    assert start_line in output, output
    assert "Traceback" not in output, output


def test_a_connection_waiting_for_its_header_does_not_delay_shutdown(serve: Any) -> None:
    """A client that connected and sent nothing (header_timeout is 30 s) is closed at SIGTERM."""
    server = serve()
    parked = socket.create_connection(server.address, timeout=PROMPT)
    partial = socket.create_connection(server.address, timeout=PROMPT)
    partial.sendall(b"PROXY TCP4 ")
    try:
        time.sleep(0.2)  # both accepted and waiting for their header
        status, took, output = server.stop()
        assert status == 0, output
        assert took < PROMPT
        assert server.seen() == ["startup", "shutdown", "cleanup", "returned"]
        for sock in (parked, partial):
            assert read_all(sock) == b""  # closed, with nothing served
    finally:
        parked.close()
        partial.close()


def test_a_request_in_progress_at_sigterm_is_answered_before_exit(serve: Any) -> None:
    """Graceful shutdown: the handler (1 s) finishes within shutdown_timeout (5 s), then cleanup runs."""
    server = serve()
    with socket.create_connection(server.address, timeout=PROMPT) as sock:
        sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4) + get("/slow"))
        deadline = time.monotonic() + PROMPT
        while "slow request" not in server.seen():
            assert time.monotonic() < deadline, "the slow handler did not start"
            time.sleep(0.02)
        os.kill(server.process.pid, signal.SIGTERM)
        response = read_all(sock)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"slow done"), response
    output, _ = server.process.communicate(timeout=PROMPT)
    assert server.process.returncode == 0, output
    assert server.seen() == ["startup", "slow request", "shutdown", "cleanup", "returned"]


# -- trust ---------------------------------------------------------------------------------------


def test_an_untrusted_peers_header_never_becomes_request_remote(serve: Any) -> None:
    """trusted="127.0.0.1": from 127.0.0.2 the header is payload (aiohttp answers 400), and a plain
    request is served at the socket's address; from 127.0.0.1 the header is used."""
    server = serve(trusted="127.0.0.1")
    spoof = exchange(server.address, get(), head=proxyproto.encode_v1(REAL_V4, DEST_V4), source="127.0.0.2")
    plain = report_of(exchange(server.address, get(), source="127.0.0.2"))
    trusted = report_of(
        exchange(server.address, get(), head=proxyproto.encode_v2(REAL_V4, DEST_V4), source="127.0.0.1")
    )
    assert re.match(rb"HTTP/1\.[01] 400 ", spoof), spoof[:100]
    assert plain["remote"] == "127.0.0.2" and plain["header_version"] is None
    assert trusted["remote"] == REAL_V4[0] and trusted["header_version"] == 2
    status, _, output = server.stop()
    assert status == 0, output


# -- TLS after the header ------------------------------------------------------------------------


def test_tls_is_negotiated_after_the_header(serve: Any, tmp_path: Path) -> None:
    cert, key = self_signed_files(tmp_path)
    server = serve(cert=(cert, key))
    client_tls = ssl.create_default_context(cafile=cert)
    report = report_of(exchange(server.address, get(), head=proxyproto.encode_v2(REAL_V6, DEST_V6), tls=client_tls))
    assert report["remote"] == REAL_V6[0] and report["secure"] is True
    status, _, output = server.stop()
    assert status == 0, output
    assert f"Running on https://127.0.0.1:{server.port} " in output, output


# -- refusals, before the application starts -----------------------------------------------------


def app_that_must_not_start() -> web.Application:
    async def on_startup(app: web.Application) -> None:
        raise AssertionError("on_startup ran although run_app refused its arguments")

    app = web.Application()
    app.on_startup.append(on_startup)
    return app


@pytest.mark.parametrize(
    ("keywords", "error", "message"),
    [
        ({"trusted": "not a network"}, ValueError, r"^trusted: "),
        ({"trusted": None}, ValueError, r"^trusted="),
        ({"untrusted_policy": "USE"}, ValueError, r"^untrusted_policy: "),
        ({"header_timeout": 0}, ValueError, r"^header_timeout: "),
        ({"settings": proxyproto.Settings(), "max_pending": 0}, ValueError, r"^max_pending: "),
        ({"policy": "USE", "ssl_context": ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)}, ValueError, "ssl="),
        ({"ssl_handshake_timeout": -1}, ValueError, r"^ssl_handshake_timeout: "),
        ({"host": []}, ValueError, r"^host: "),
        ({"trused": "10.0.0.0/8"}, TypeError, r"'trused': neither a knob"),
        ({"path": "/tmp/socket"}, TypeError, "TCP only: no path="),
        ({"sock": socket.socket}, TypeError, "TCP only: no sock="),
    ],
    ids=[
        "trusted-not-a-network",
        "trusted-None",
        "untrusted_policy-USE",
        "header_timeout-0",
        "settings-and-max_pending-0",
        "USE-with-ssl_context",
        "ssl_handshake_timeout-negative",
        "no-hosts",
        "misspelt-knob",
        "path",
        "sock",
    ],
)
def test_invalid_arguments_are_refused_before_startup_and_binding(
    keywords: dict[str, Any], error: type[Exception], message: str
) -> None:
    port = free_port()
    with pytest.raises(error, match=message):
        run_app(app_that_must_not_start(), port=port, print=None, **{"host": "127.0.0.1", **keywords})
    assert not listening(port)


def test_aiohttp_keywords_reach_the_runner_and_graceful_exit_returns() -> None:
    """access_log, handler_cancellation and the request handler's own keywords are taken as
    web.run_app takes them; GracefulExit (what aiohttp's signal handlers raise) stops the
    application, runs its cleanup, and run_app returns."""
    seen: list[str] = []
    lines: list[str] = []
    run_app(
        recording_app(seen),
        host=["127.0.0.1"],
        port=0,
        print=stop_once_started(lines),
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        max_line_size=16384,
        settings=proxyproto.Settings(trusted="10.0.0.0/8"),
        header_timeout=2.0,
    )
    assert seen == ["startup", "cleanup"]
    assert len(lines) == 1, lines
    assert re.match(
        r"======== Running on http://127\.0\.0\.1:\d+ \(PROXY protocol: REQUIRE for 10\.0\.0\.0/8, "
        r"SKIP for other peers\) ========\n\(Press CTRL\+C to quit\)$",
        lines[0],
    ), lines


def recording_app(seen: list[str]) -> web.Application:
    """An application that records its startup and cleanup hooks in ``seen``."""

    async def on_startup(app: web.Application) -> None:
        seen.append("startup")

    async def on_cleanup(app: web.Application) -> None:
        seen.append("cleanup")

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def stop_once_started(lines: list[str]) -> Callable[[str], None]:
    """A ``print=`` for run_app that keeps the start line, then raises GracefulExit as a signal would."""

    def graceful_exit() -> None:
        raise web.GracefulExit()

    def started(text: str) -> None:
        lines.append(text)
        asyncio.get_running_loop().call_soon(graceful_exit)

    return started


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_run_app_runs_on_the_given_loop_and_closes_it(kind: str) -> None:
    if kind == "uvloop":
        uvloop: Any = require_module("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    seen: list[str] = []
    lines: list[str] = []
    run_app(
        recording_app(seen), host="127.0.0.1", port=0, print=stop_once_started(lines), handle_signals=False, loop=loop
    )
    assert seen == ["startup", "cleanup"] and len(lines) == 1
    assert loop.is_closed()


def test_an_awaitable_that_returns_the_application_is_awaited_first() -> None:
    seen: list[str] = []

    async def make_app() -> web.Application:
        seen.append("made")
        return recording_app(seen)

    run_app(make_app(), host="127.0.0.1", port=0, print=stop_once_started([]), handle_signals=False)
    assert seen == ["made", "startup", "cleanup"]


def test_a_refused_coroutine_application_is_closed_without_a_never_awaited_warning() -> None:
    async def make_app() -> web.Application:
        raise AssertionError("not to be awaited")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "coroutine ... was never awaited" RuntimeWarning fails here
        coroutine = make_app()
        with pytest.raises(ValueError, match=r"^trusted: "):
            run_app(coroutine, host="127.0.0.1", port=0, print=None, trusted="not a network")
        assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED


def test_an_exception_from_on_startup_propagates_and_nothing_listens() -> None:
    async def on_startup(app: web.Application) -> None:
        raise RuntimeError("no database")

    app = web.Application()
    app.on_startup.append(on_startup)
    port = free_port()
    with pytest.raises(RuntimeError, match="no database"):
        run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=False)
    assert not listening(port)


def test_a_port_in_use_raises_oserror_after_the_application_is_cleaned_up() -> None:
    seen: list[str] = []
    lines: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            run_app(
                recording_app(seen), host="127.0.0.1", port=port, print=stop_once_started(lines), handle_signals=False
            )
    assert seen == ["startup", "cleanup"] and lines == []


def test_several_hosts_each_get_a_listener_named_in_the_start_line() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    seen: list[str] = []
    lines: list[str] = []
    port = free_port()
    run_app(
        recording_app(seen), host=["127.0.0.1", "::1"], port=port, print=stop_once_started(lines), handle_signals=False
    )
    assert seen == ["startup", "cleanup"]
    assert lines[0].startswith(f"======== Running on http://127.0.0.1:{port}, http://[::1]:{port} (PROXY protocol: ")
