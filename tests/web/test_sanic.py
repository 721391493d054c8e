"""proxyproto.sanic: Sanic's own protocol classes after the PROXY header, and docs/sanic.rst.

In-process tests run Sanic's real server (``app.create_server`` with the
class as ``protocol=``) on a real loop and talk to it over loopback
sockets.  The page's examples run as written (only the port, and the
certificate's path, changed) as scripts, through Sanic's real ``app.run``
with its worker processes, stopped by PID; one runs behind a real haproxy
``send-proxy-v2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from doc_examples import missing_link_targets, rendering_warnings
from support import free_port, python_script, require_haproxy, require_module, run_on
from web_kit import (
    DEST_V4,
    DEST_V6,
    REAL_V4,
    REAL_V6,
    Certificate,
    command,
    connect,
    self_signed,
    websocket,
    ws_receive,
    ws_send,
)

require_module("sanic")

import sanic  # noqa: E402  (after the skip: Sanic is an optional extra)
from sanic.server.protocols.http_protocol import HttpProtocol as SanicHttpProtocol  # noqa: E402
from sanic.server.protocols.websocket_protocol import WebSocketProtocol as SanicWebSocketProtocol  # noqa: E402

import proxyproto  # noqa: E402
import proxyproto.sanic  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "sanic.rst"
_APP_NAMES = itertools.count()


# -- an app that reports what Sanic saw, served in this loop -------------------------------------------


def seen(request: Any) -> dict[str, Any]:
    header = proxyproto.sanic.header(request)
    return {
        "client": [request.ip, request.port],
        "client_ip": request.client_ip,
        "remote_addr": request.remote_addr,
        "server": [request.conn_info.server, request.conn_info.server_port],
        "scheme": request.scheme,
        "header": None if header is None else [header.command.name, header.source and list(header.source)],
    }


@pytest.fixture(autouse=True, scope="module")
def sanic_test_mode() -> Any:
    """Several Sanic apps start in this process: Sanic's own test mode lets each touch its classes up again."""
    before = sanic.Sanic.test_mode
    sanic.Sanic.test_mode = True
    yield
    sanic.Sanic.test_mode = before


def reporting_app(websockets: bool = False, **config: Any) -> sanic.Sanic:
    app = sanic.Sanic(f"proxyproto_sanic_test_{next(_APP_NAMES)}")
    app.config.update({"MOTD": False, "ACCESS_LOG": False, **config})

    @app.route("/", methods=["GET", "POST"])
    async def report(request: Any) -> Any:
        return sanic.json(seen(request))

    if websockets:

        @app.websocket("/ws")
        async def echo(request: Any, ws: Any) -> None:
            await ws.send(json.dumps(seen(request)))
            async for message in ws:
                await ws.send(message)

    return app


@contextlib.asynccontextmanager
async def serving(protocol: Any, app: sanic.Sanic | None = None, **kwargs: Any) -> AsyncIterator[tuple[str, int]]:
    """Sanic's server for ``app`` on 127.0.0.1 in this loop, ``protocol`` making its connections."""
    app = app or reporting_app()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # Sanic's create_server takes port 0 to mean its default, 8000
    listener.listen(100)
    server = await app.create_server(sock=listener, protocol=protocol, return_asyncio_server=True, **kwargs)
    assert server is not None
    await server.startup()
    try:
        yield listener.getsockname()[:2]
    finally:
        closed = server.close()  # stops listening; a task waiting for asyncio's Server.wait_closed
        for connection in list(server.connections):  # what Sanic's own shutdown does
            connection.close_if_idle()
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await closed


async def raw_exchange(address: tuple[str, int], data: bytes, local: str | None = None) -> bytes:
    """Send ``data``, then read until the server closes (bounded)."""
    conn = await connect(address, local=local)
    conn.writer.write(data)
    try:
        return await asyncio.wait_for(conn.reader.read(), 10)
    except ConnectionResetError:  # closed with bytes it did not read
        return b""
    finally:
        with contextlib.suppress(ConnectionResetError):
            await conn.close()


def request_bytes(headers: str = "") -> bytes:
    return f"GET / HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n".encode()


def body_of(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    return json.loads(body)


# -- the real client ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("encode", [proxyproto.encode_v1, proxyproto.encode_v2], ids=["v1", "v2"])
@pytest.mark.parametrize("source,destination", [(REAL_V4, DEST_V4), (REAL_V6, DEST_V6)], ids=["ipv4", "ipv6"])
def test_request_ip_and_port_are_the_header_source(loop: str, encode: Any, source: Any, destination: Any) -> None:
    async def scenario() -> None:
        async with serving(proxyproto.sanic.HttpProtocol) as address:
            conn = await connect(address, encode(source, destination))
            try:
                status, report = await conn.request()
            finally:
                await conn.close()
        assert status == 200
        assert report["client"] == list(source) and report["client_ip"] == source[0]
        host = destination[0] if ":" not in destination[0] else f"[{destination[0]}]"
        assert report["server"] == [f"{host}:{destination[1]}", destination[1]]
        assert report["header"] == ["PROXY", list(source)]

    run_on(loop, scenario)


def test_keep_alive_connection_carries_the_header_once_and_every_request_sees_it() -> None:
    async def scenario() -> None:
        async with serving(proxyproto.sanic.HttpProtocol) as address:
            conn = await connect(address, proxyproto.encode_v2(REAL_V4, DEST_V4))
            try:
                for _ in range(3):
                    status, report = await conn.request(body=b"x" * 100)
                    assert status == 200 and report["client"] == list(REAL_V4)
            finally:
                await conn.close()

    run_on("asyncio", scenario)


def test_local_header_serves_the_connection_with_its_own_address() -> None:
    async def scenario() -> None:
        async with serving(proxyproto.sanic.HttpProtocol) as address:
            conn = await connect(address, proxyproto.encode_v2(command=proxyproto.Command.LOCAL))
            own = conn.writer.get_extra_info("sockname")
            try:
                status, report = await conn.request()
            finally:
                await conn.close()
        assert status == 200 and report["client"] == [own[0], own[1]]
        assert report["header"] == ["LOCAL", None]

    run_on("asyncio", scenario)


def test_unix_socket_listener_trusted_with_the_unix_token() -> None:
    """``app.create_server(unix=...)`` (a world-writable file): trusted only when told ``unix``."""
    directory = tempfile.mkdtemp(prefix="ppsanic")  # short: sun_path holds 108 bytes, with Sanic's temporary name
    path = os.path.join(directory, "s")
    header = proxyproto.encode_v2(REAL_V4, DEST_V4)

    async def exchange(protocol: Any) -> bytes:
        app = reporting_app()
        server = await app.create_server(unix=path, protocol=protocol, return_asyncio_server=True)
        assert server is not None
        await server.startup()
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(header + request_bytes())
            try:
                return await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
        finally:
            await server.close()

    async def scenario() -> None:
        served = body_of(await exchange(proxyproto.sanic.wrap(trusted="127.0.0.1,::1,unix")))
        assert served["client"] == list(REAL_V4) and served["header"] == ["PROXY", list(REAL_V4)]
        assert (await exchange(proxyproto.sanic.HttpProtocol)).startswith(b"HTTP/1.1 400")  # SKIP: not trusted

    try:
        run_on("asyncio", scenario)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- peers that are not trusted, forwarded headers -----------------------------------------------------


def test_header_from_a_peer_that_is_not_trusted_never_becomes_the_client(caplog: pytest.LogCaptureFixture) -> None:
    protocol = proxyproto.sanic.wrap(trusted="127.0.0.1")  # the client below is 127.0.0.2
    header = proxyproto.encode_v1(REAL_V4, DEST_V4)

    async def scenario() -> None:
        async with serving(protocol) as address:
            plain = body_of(await raw_exchange(address, request_bytes(), local="127.0.0.2"))
            assert plain["client"][0] == "127.0.0.2" and plain["header"] is None
            spoofed = await raw_exchange(address, header + request_bytes(), local="127.0.0.2")
            assert spoofed.startswith(b"HTTP/1.1 400"), spoofed  # SKIP: its bytes are Sanic's, and no request
            assert REAL_V4[0].encode() not in spoofed

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        run_on("asyncio", scenario)
    warnings = [r.getMessage() for r in caplog.records if r.name == "proxyproto" and r.levelno == logging.WARNING]
    assert any("127.0.0.2" in line and "not trusted" in line for line in warnings), warnings


def test_header_from_a_peer_that_is_not_trusted_is_removed_under_ignore() -> None:
    protocol = proxyproto.sanic.wrap(trusted="127.0.0.1", untrusted_policy="IGNORE")

    async def scenario() -> None:
        async with serving(protocol) as address:
            header = proxyproto.encode_v2(REAL_V4, DEST_V4)
            report = body_of(await raw_exchange(address, header + request_bytes(), local="127.0.0.2"))
        assert report["client"][0] == "127.0.0.2" and report["header"] is None

    run_on("asyncio", scenario)


def test_client_written_forwarded_headers_do_not_override_the_proxy_header() -> None:
    forged = "X-Forwarded-For: 203.0.113.66\r\nX-Real-IP: 203.0.113.67\r\nForwarded: for=203.0.113.68\r\n"

    async def scenario() -> None:
        header = proxyproto.encode_v2(REAL_V4, DEST_V4)
        async with serving(proxyproto.sanic.HttpProtocol) as address:  # Sanic's defaults: no forwarded headers
            report = body_of(await raw_exchange(address, header + request_bytes(forged)))
        assert report["client"] == list(REAL_V4) and report["client_ip"] == REAL_V4[0]
        assert report["remote_addr"] == ""
        # Told to trust one proxy's X-Forwarded-For, Sanic's remote_addr and client_ip follow it;
        # request.ip stays the PROXY header's.
        async with serving(proxyproto.sanic.HttpProtocol, reporting_app(PROXIES_COUNT=1)) as address:
            report = body_of(await raw_exchange(address, header + request_bytes(forged)))
        assert report["client"] == list(REAL_V4)
        assert report["remote_addr"] == report["client_ip"] == "203.0.113.66"

    run_on("asyncio", scenario)


# -- refusals, deadlines ----------------------------------------------------------------------------------


def test_malformed_header_closes_the_connection_with_one_refusal_line(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serving(proxyproto.sanic.HttpProtocol) as address:
            answer = await raw_exchange(address, b"PROXY TCP4 192.0.2.1 nonsense\r\n" + request_bytes())
            assert answer == b""

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        run_on("asyncio", scenario)
    refusals = [r for r in caplog.records if r.name == "proxyproto" and "closed" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING, [r.getMessage() for r in refusals]
    assert refusals[0].exc_info is None


def test_request_without_a_header_from_a_trusted_peer_is_closed_unserved() -> None:
    async def scenario() -> None:
        async with serving(proxyproto.sanic.HttpProtocol) as address:
            assert await raw_exchange(address, request_bytes()) == b""

    run_on("asyncio", scenario)


def test_silent_client_is_closed_at_the_header_deadline(caplog: pytest.LogCaptureFixture) -> None:
    protocol = proxyproto.sanic.wrap(header_timeout=0.5)

    async def scenario() -> None:
        async with serving(protocol) as address:
            conn = await connect(address)
            try:
                assert await asyncio.wait_for(conn.reader.read(), 10) == b""  # closed, long before 10 s
            finally:
                await conn.close()

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        run_on("asyncio", scenario)
    assert any("closed" in r.getMessage() for r in caplog.records if r.name == "proxyproto")


def test_sanic_shutdown_closes_connections_waiting_for_their_header() -> None:
    """Listed in Sanic's connections, a connection waiting for its header (60 s) closes when Sanic stops."""
    protocol = proxyproto.sanic.wrap(header_timeout=60)

    async def scenario() -> None:
        waiting = []
        async with serving(protocol) as address:
            for _ in range(3):
                conn = await connect(address, proxyproto.encode_v2(REAL_V4, DEST_V4)[:10])
                waiting.append(conn)
            served = await connect(address, proxyproto.encode_v1(REAL_V4, DEST_V4))
            assert (await served.request(close=True))[0] == 200  # the server has accepted the three before it
            await served.close()
        for conn in waiting:  # serving() ends as Sanic's own shutdown does: close_if_idle, then wait
            assert await asyncio.wait_for(conn.reader.read(), 10) == b""
            await conn.close()

    run_on("asyncio", scenario)


def test_invalid_environment_closes_every_connection_with_one_error_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PROXYPROTO_MAX_PENDING", "0")
    header = proxyproto.encode_v2(REAL_V4, DEST_V4)

    async def scenario() -> None:
        async with serving(proxyproto.sanic.HttpProtocol) as address:
            for _ in range(2):
                assert await raw_exchange(address, header + request_bytes()) == b""

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        run_on("asyncio", scenario)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "PROXYPROTO_MAX_PENDING" in errors[0], errors


# -- TLS -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    made = self_signed(tmp_path_factory.mktemp("sanic-cert"))
    if made is None:
        pytest.skip("openssl is not installed")
    return made


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_is_negotiated_after_the_header(loop: str, cert: Certificate) -> None:
    protocol = proxyproto.sanic.wrap(ssl=cert.server_context())

    async def scenario() -> None:
        async with serving(protocol) as address:
            conn = await connect(address, proxyproto.encode_v2(REAL_V6, DEST_V6), tls=cert.client_context())
            try:
                for _ in range(2):  # keep-alive over TLS
                    status, report = await conn.request()
                    assert status == 200 and report["client"] == list(REAL_V6) and report["scheme"] == "https"
            finally:
                await conn.close()

    run_on(loop, scenario)


def test_tls_given_to_sanic_itself_is_reported_once(cert: Certificate, caplog: pytest.LogCaptureFixture) -> None:
    """Sanic's ssl= handshakes before anyone reads: the header's bytes fail it; one ERROR line says what to do."""

    async def scenario() -> None:
        async with serving(proxyproto.sanic.HttpProtocol, ssl=cert.server_context()) as address:
            for _ in range(2):
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    conn = await connect(address, proxyproto.encode_v2(REAL_V4, DEST_V4), tls=cert.client_context())
                    await conn.close()
            await asyncio.sleep(0.1)
            gc.collect()

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        run_on("asyncio", scenario)
    errors = [r.getMessage() for r in caplog.records if r.name == "proxyproto" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "Sanic's ssl=" in errors[0] and "wrap(ssl=" in errors[0], errors


# -- WebSockets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_websocket_protocol_serves_websockets_with_the_real_client(loop: str) -> None:
    async def scenario() -> None:
        async with serving(proxyproto.sanic.WebSocketProtocol, reporting_app(websockets=True)) as address:
            conn = await connect(address, proxyproto.encode_v1(REAL_V4, DEST_V4))
            try:
                status, report = await conn.request()  # plain HTTP on the same class, keep-alive
                assert status == 200 and report["client"] == list(REAL_V4)
                first = await websocket(conn)
                assert first["client"] == list(REAL_V4) and first["header"] == ["PROXY", list(REAL_V4)]
                ws_send(conn, "ping")
                assert await ws_receive(conn) == "ping"
            finally:
                await conn.close()

    run_on(loop, scenario)


def test_http_protocol_for_an_app_with_websocket_routes_says_which_class_to_use(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with serving(proxyproto.sanic.HttpProtocol, reporting_app(websockets=True)) as address:
            await raw_exchange(address, proxyproto.encode_v2(REAL_V4, DEST_V4) + request_bytes())

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        run_on("asyncio", scenario)
    assert any("proxyproto.sanic.WebSocketProtocol" in r.getMessage() for r in caplog.records if r.levelno >= 30)


# -- wrap --------------------------------------------------------------------------------------------------


def test_wrap_refuses_what_cannot_work(cert: Certificate) -> None:
    with pytest.raises(ValueError, match="policy=USE with ssl="):
        proxyproto.sanic.wrap(ssl=cert.server_context(), policy="USE")
    with pytest.raises(ValueError, match="header_timeout"):
        proxyproto.sanic.wrap(header_timeout=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'timeout'"):
        proxyproto.sanic.wrap(timeout=5)
    with pytest.raises(TypeError, match="Sanic's HttpProtocol"):
        proxyproto.sanic.wrap(asyncio.Protocol)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reads the PROXY header already"):
        proxyproto.sanic.wrap(proxyproto.sanic.HttpProtocol)


def test_wrap_classes_reach_worker_processes_by_pickle(cert: Certificate) -> None:
    """Sanic sends ``protocol=`` to its spawned workers by pickle: a wrap class is made again there."""
    ssl_files = {"cert": str(cert.cert), "key": str(cert.key)}
    made = proxyproto.sanic.wrap(SanicWebSocketProtocol, trusted="10.0.0.0/8", header_timeout=5, ssl=ssl_files)
    assert pickle.loads(pickle.dumps(made)) is made
    assert proxyproto.sanic.wrap(SanicWebSocketProtocol, trusted="10.0.0.0/8", header_timeout=5, ssl=ssl_files) is made
    code = (
        "import pickle, sys\n"
        "made = pickle.loads(sys.stdin.buffer.read())\n"
        "print(made.__mro__[2].__name__, made.proxy_settings.trusted.describe(), made.proxy_settings.header_timeout,"
        " made.proxy_ssl == {'cert': sys.argv[1], 'key': sys.argv[2]})\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(cert.cert), str(cert.key)],
        input=pickle.dumps(made),
        capture_output=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert out.stdout.decode().split() == ["WebSocketProtocol", "10.0.0.0/8", "5.0", "True"]
    assert issubclass(made, SanicWebSocketProtocol) and hasattr(made, "websocket_handshake")
    in_process = proxyproto.sanic.wrap(ssl=cert.server_context())  # an SSLContext does not pickle
    with pytest.raises(pickle.PicklingError, match="wrap's arguments cannot reach Sanic's worker processes"):
        pickle.dumps(in_process)
    assert issubclass(proxyproto.sanic.HttpProtocol, SanicHttpProtocol)


def trust_the_loopback(peer: Any, local: Any) -> str:
    return "REQUIRE" if peer[0] == "127.0.0.1" else "SKIP"


def test_wrap_class_is_made_again_from_its_name_with_a_policy_for_function() -> None:
    made = proxyproto.sanic.wrap(policy_for=trust_the_loopback, header_timeout=2)
    del proxyproto.sanic._WRAPPED[made.__qualname__]  # as in a worker process, which has not made it yet
    again = getattr(proxyproto.sanic, made.__qualname__)
    assert again is not made and again.proxy_settings == made.proxy_settings
    assert again.proxy_settings.policy_for is trust_the_loopback
    in_process = proxyproto.sanic.wrap(policy_for=lambda peer, local: "REQUIRE")
    assert "cannot reach Sanic's worker processes" in in_process.__qualname__
    with pytest.raises(AttributeError):
        proxyproto.sanic.wrapped_bm90IGpzb24  # noqa: B018  (a name that describes nothing)


# -- the page ---------------------------------------------------------------------------------------------


def block(name: str) -> str:
    """The ``.. code-block::`` with ``:name: <name>``, dedented."""
    match = re.search(
        r"^\.\. code-block:: \w+\n   :name: " + re.escape(name) + r"\n\n((?:(?:    .*)?\n)+)",
        PAGE.read_text(),
        re.MULTILINE,
    )
    assert match, f"no block named {name} in {PAGE}"
    return textwrap.dedent(match.group(1)).strip() + "\n"


MAIN = 'if __name__ == "__main__":\n'


def script(main: str | None = None, routes: str = "") -> str:
    """The page's app, with ``routes`` added and, when given, ``main`` as what it runs."""
    head, _, run = block("app").partition(MAIN)
    return head + routes + "\n\n" + MAIN + textwrap.indent(main or textwrap.dedent(run), "    ")


def with_port(text: str, port: int) -> str:
    changed = re.sub(r"port=8(000|443)", f"port={port}", text)
    assert changed != text, text
    return changed


@contextlib.contextmanager
def example(tmp_path: Path, source: str, port: int, env: dict[str, str] | None = None, workers: int = 1) -> Any:
    """The script ``source`` run by this Python on ``port`` (Sanic's ``app.run``), from its workers' start.

    Stopped at the end of the block (SIGINT, by PID) unless stopped in it; its output then holds
    no traceback and says that every worker completed.
    """
    path = tmp_path / f"example-{port}.py"
    path.write_text(with_port(source, port))
    out = tmp_path / f"server-{port}.out"
    with command(python_script(path), port, env=env, workdir=tmp_path) as proc:
        deadline = time.monotonic() + 30
        while out.read_text(errors="replace").count("Worker ready") < workers:
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the workers did not start:\n" + out.read_text()
            time.sleep(0.05)
        # Sanic's main process polls for its workers' acknowledgement every 0.1 s; a signal that
        # comes before it has seen them all leaves it waiting for its start-up threshold instead.
        time.sleep(1.0)
        yield proc
    output = out.read_text(errors="replace")
    assert "Traceback" not in output and output.count("Worker complete") == workers, output


def hello(port: int, header: bytes, tls: Any = None, path: str = "/") -> bytes:
    """One GET through a fresh connection that sends ``header`` first; the response's body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(header)
        sock = raw if tls is None else tls.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    return body


def test_page_renders_cleanly() -> None:
    assert rendering_warnings(PAGE) == ""
    assert missing_link_targets(PAGE) == []


def test_page_environment_line_runs_the_app_with_two_workers(tmp_path: Path) -> None:
    """The ``app`` example under the ``environment`` line: v1, v2, IPv4 and IPv6 headers, both workers."""
    port = free_port()
    words = shlex.split(block("environment"))
    env = dict(word.split("=", 1) for word in words[:-2])
    assert words[-2:] == ["python", "app.py"] and "PROXYPROTO_ALLOW_IPS" in env
    with example(tmp_path, script(), port, env=env, workers=2):
        for encode, source, destination in [
            (proxyproto.encode_v1, REAL_V4, DEST_V4),
            (proxyproto.encode_v2, REAL_V4, DEST_V4),
            (proxyproto.encode_v1, REAL_V6, DEST_V6),
            (proxyproto.encode_v2, REAL_V6, DEST_V6),
        ]:
            assert hello(port, encode(source, destination)) == f"Hello, {source[0]}\n".encode()


def test_page_wrap_example_serves_with_its_settings(tmp_path: Path) -> None:
    port = free_port()
    with example(tmp_path, script(block("wrap")), port):
        assert hello(port, proxyproto.encode_v2(REAL_V4, DEST_V4)) == f"Hello, {REAL_V4[0]}\n".encode()


def test_page_tls_example_negotiates_tls_after_the_header_in_two_workers(tmp_path: Path, cert: Certificate) -> None:
    port = free_port()
    main = block("tls").replace('"cert.pem"', repr(str(cert.cert))).replace('"key.pem"', repr(str(cert.key)))
    with example(tmp_path, script(main), port, workers=2):
        for _ in range(3):
            body = hello(port, proxyproto.encode_v1(REAL_V4, DEST_V4), tls=cert.client_context())
            assert body == f"Hello, {REAL_V4[0]}\n".encode()


def test_page_header_example_reads_the_header_tlvs(tmp_path: Path) -> None:
    port = free_port()
    authority = [(proxyproto.TLVType.AUTHORITY, b"example.com")]
    with example(tmp_path, script(routes="\n\n" + block("header")), port, workers=2):
        body = hello(port, proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=authority), path="/who")
    assert body == f"{REAL_V4[0]}:{REAL_V4[1]} asked for example.com\n".encode()


def test_page_websocket_example_greets_the_real_client(tmp_path: Path) -> None:
    port = free_port()
    with example(tmp_path, block("websocket"), port):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), proxyproto.encode_v2(REAL_V6, DEST_V6))
            try:
                key = "dGhlIHNhbXBsZSBub25jZQ=="
                conn.writer.write(
                    (
                        "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    ).encode()
                )
                assert b" 101 " in await asyncio.wait_for(conn.reader.readline(), 10)
                while (await asyncio.wait_for(conn.reader.readline(), 10)) not in (b"\r\n", b""):
                    pass
                assert await ws_receive(conn) == f"Hello, {REAL_V6[0]}"
                ws_send(conn, "echo me")
                assert await ws_receive(conn) == "echo me"
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_graceful_shutdown_with_parked_connections_returns_promptly(tmp_path: Path) -> None:
    """SIGTERM with connections waiting for their header (60 s): Sanic stops without its 15 s grace period."""
    port = free_port()
    with example(tmp_path, script(), port, env={"PROXYPROTO_HEADER_TIMEOUT": "60"}, workers=2) as proc:
        parked = []
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4)[:10])  # half a header
            parked.append(sock)
        for _ in range(4):  # served meanwhile: the workers are up and accepting
            assert hello(port, proxyproto.encode_v2(REAL_V4, DEST_V4)) == f"Hello, {REAL_V4[0]}\n".encode()
        time.sleep(0.2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        elapsed = time.monotonic() - started
        for sock in parked:
            with sock, contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""  # closed, never served
    assert elapsed < 10, f"shutdown took {elapsed:.1f} s"


def test_app_behind_real_haproxy_send_proxy_v2(tmp_path: Path) -> None:
    exe = require_haproxy()
    backend, front = free_port(), free_port()
    config = (
        "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 5s\n    timeout server 5s\n\n"
        f"listen fe\n    bind 127.0.0.1:{front}\n    server app 127.0.0.1:{backend} send-proxy-v2\n"
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    haproxy = [exe, "-f", str(cfg), "-db"]
    with example(tmp_path, script(), backend, workers=2), command(haproxy, front, workdir=tmp_path):
        with socket.socket() as sock:
            sock.settimeout(10)
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", front))
            reader = sock.makefile("rb")
            for _ in range(3):  # keep-alive through haproxy: one header, three requests
                sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                assert reader.readline().startswith(b"HTTP/1.1 200")
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                assert reader.read(length) == b"Hello, 127.0.0.2\n"
