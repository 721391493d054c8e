"""aiohttp behind a proxy: ``request.remote`` is the real client, TLS is negotiated after the header.

Every test runs a real aiohttp application (``web.AppRunner`` and
:class:`proxyproto.aiohttp.ProxyTCPSite`) on loopback in a fresh event loop,
and talks raw HTTP/1.1 (or HTTPS) to it from a thread over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import async_test, free_port, listening, require_module, self_signed_files

import proxyproto

try:
    require_module("aiohttp")
except pytest.skip.Exception as missing:  # support.require_module skips without allow_module_level
    pytest.skip(str(missing), allow_module_level=True)

from aiohttp import web

from proxyproto.aiohttp import ProxyTCPSite

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "web-servers.rst"

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)

#: A body with every byte value, CRLFs and something that looks like a header.
BODY = (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + bytes(range(256))) * 64


class App:
    """An aiohttp app that reports what aiohttp told it, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.report)

    async def report(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.read()
        transport = request.transport
        assert transport is not None
        header = transport.get_extra_info("proxy_header")
        return web.json_response(
            {
                "remote": request.remote,
                "peername": list(transport.get_extra_info("peername")),
                "proxy_peername": list(transport.get_extra_info("proxy_peername")),
                "secure": request.secure,
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
                "header_version": None if header is None else header.version,
            }
        )


@contextlib.asynccontextmanager
async def running(app: App, host: str = "127.0.0.1", **knobs: Any) -> AsyncIterator[ProxyTCPSite]:
    runner = web.AppRunner(app.app, access_log=None)
    await runner.setup()
    site = ProxyTCPSite(runner, host, 0, **knobs)
    await site.start()
    try:
        yield site
    finally:
        await runner.cleanup()


def request(body: bytes = BODY) -> bytes:
    return (
        b"POST /echo HTTP/1.1\r\nHost: example\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body


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


def exchange_blocking(
    address: tuple[str, int], data: bytes, tls: ssl.SSLContext | None = None, head: bytes = b""
) -> bytes:
    """Send ``head`` in the clear, then ``data`` (over TLS when ``tls``), and read until the server closes."""
    with socket.create_connection(address, timeout=10) as raw:
        raw.sendall(head)
        if tls is None:
            raw.sendall(data)
            return read_all(raw)
        with tls.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(data)
            return read_all(sock)


async def exchange(site: ProxyTCPSite, data: bytes, **kw: Any) -> bytes:
    host = site._host
    assert isinstance(host, str)
    return await asyncio.to_thread(exchange_blocking, (host, site.port), data, **kw)


def report_of(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:300]
    return json.loads(body)  # type: ignore[no-any-return]


def header_bytes(version: int, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    if version == 1:
        return proxyproto.encode_v1(source, destination)
    return proxyproto.encode_v2(source, destination)


def proxy_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxyproto"]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost, made with the openssl CLI (an EC key: instant)."""
    return self_signed_files(tmp_path_factory.mktemp("tls"))


# -- the real client ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("source", "destination"), [(REAL_V4, DEST_V4), (REAL_V6, DEST_V6)], ids=["ipv4", "ipv6"])
@async_test
async def test_request_remote_is_the_headers_source(
    version: int, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    app = App()
    async with running(app) as site:
        report = report_of(await exchange(site, header_bytes(version, source, destination) + request()))
    assert report["remote"] == source[0]
    assert report["peername"][:2] == list(source)
    assert report["proxy_peername"][0] == "127.0.0.1"
    assert report["header_version"] == version


@async_test
async def test_post_body_after_the_header_is_byte_exact() -> None:
    app = App()
    async with running(app) as site:
        report = report_of(await exchange(site, proxyproto.encode_v2(REAL_V4, DEST_V4) + request(BODY)))
    assert report["body_length"] == len(BODY)
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


@async_test
async def test_ipv6_listener_serves_an_ipv4_source() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    app = App()
    async with running(app, host="::1") as site:
        report = report_of(await exchange(site, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
    assert report["remote"] == REAL_V4[0]
    assert report["proxy_peername"][0] == "::1"


@async_test
async def test_tls_is_negotiated_after_the_header(tls_files: tuple[str, str]) -> None:
    """haproxy's send-proxy in front of TLS passthrough: header in the clear, then the handshake."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(*tls_files)
    client_tls = ssl.create_default_context(cafile=tls_files[0])
    app = App()
    async with running(app, ssl_context=server_tls) as site:
        assert site.name.startswith("https://")
        head = proxyproto.encode_v2(REAL_V6, DEST_V6)
        report = report_of(await exchange(site, request(), tls=client_tls, head=head))
    assert report["remote"] == REAL_V6[0]
    assert report["secure"] is True
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


async def held_until_closed(host: str, port: int, head: bytes, bound: float = 10.0) -> float:
    """Connect, send ``head`` and nothing else; seconds until the server closes the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head)
    began = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), bound):
            pass
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return time.monotonic() - began


@async_test
async def test_stalled_tls_handshake_after_the_header_is_closed_at_the_header_timeout(
    tls_files: tuple[str, str],
) -> None:
    """ssl_context and header_timeout=0.5: the header, then no ClientHello, is closed in about
    half a second (the handshake gets header_timeout, not asyncio's 60 s)."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(*tls_files)
    app = App()
    async with running(app, ssl_context=server_tls, header_timeout=0.5) as site:
        held = await held_until_closed(site._host, site.port, proxyproto.encode_v2(REAL_V4, DEST_V4))
    assert 0.3 < held < 5.0, f"held {held:.2f} s"
    assert app.calls == 0


# -- trust ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("trusted", ["10.0.0.0/8,127.0.0.1", "*", ["127.0.0.0/8"]])
@async_test
async def test_trust_lists_in_every_spelling(trusted: Any) -> None:
    app = App()
    async with running(app, trusted=trusted) as site:
        report = report_of(await exchange(site, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
    assert report["remote"] == REAL_V4[0]


@async_test
async def test_untrusted_peers_header_never_reaches_the_app() -> None:
    """SKIP (the default for untrusted peers): the header is payload, aiohttp answers 400."""
    app = App()
    async with running(app, trusted="10.0.0.0/8") as site:
        response = await exchange(site, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
        served = report_of(await exchange(site, request()))
    assert re.match(rb"HTTP/1\.[01] 400 ", response), response[:100]
    assert app.calls == 1  # only the plain request
    assert served["remote"] == "127.0.0.1" and served["header_version"] is None


@async_test
async def test_untrusted_reject_closes_a_spoof_attempt(caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    async with running(app, trusted="10.0.0.0/8", untrusted_policy="REJECT") as site:
        response = await exchange(site, proxyproto.encode_v2(REAL_V4, DEST_V4) + request())
    assert response == b""
    assert app.calls == 0
    records = proxy_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING, caplog.text
    assert_no_tracebacks(caplog)


@async_test
async def test_policy_for_decides_per_connection_from_peer_and_local_address() -> None:
    """The hook replaces the three trust knobs (here ``trusted=""``, which alone trusts no one)."""
    calls: list[tuple[Any, Any]] = []

    def policy_for(peer: Any, local: Any) -> str:
        calls.append((peer, local))
        return "REQUIRE" if len(calls) == 1 else "SKIP"

    app = App()
    async with running(app, trusted="", policy_for=policy_for) as site:
        trusted = report_of(await exchange(site, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
        skipped = await exchange(site, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
    assert trusted["remote"] == REAL_V4[0] and trusted["header_version"] == 1
    assert re.match(rb"HTTP/1\.[01] 400 ", skipped), skipped[:100]  # SKIP: the header was payload
    assert [peer[0] for peer, _ in calls] == ["127.0.0.1", "127.0.0.1"]
    assert [tuple(local[:2]) for _, local in calls] == [("127.0.0.1", site.port)] * 2


@async_test
async def test_policy_for_that_raises_closes_that_connection_with_one_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def policy_for(peer: Any, local: Any) -> str:
        raise RuntimeError("no such proxy")

    app = App()
    async with running(app, policy_for=policy_for) as site:
        response = await exchange(site, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
    assert response == b"" and app.calls == 0
    records = proxy_records(caplog)
    assert [r.levelno for r in records] == [logging.ERROR], caplog.text
    assert "policy_for failed: RuntimeError: no such proxy" in records[0].getMessage()


def test_invalid_knobs_are_refused_before_binding() -> None:
    async def main() -> None:
        runner = web.AppRunner(App().app)
        await runner.setup()
        try:
            with pytest.raises(ValueError, match="untrusted"):
                ProxyTCPSite(runner, "127.0.0.1", 0, trusted="10.0.0.0/8", untrusted_policy="USE")
            with pytest.raises(ValueError):
                ProxyTCPSite(runner, "127.0.0.1", 0, trusted="not a network")
        finally:
            await runner.cleanup()

    asyncio.run(main())


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4\n",
        proxyproto.encode_v2(REAL_V4, DEST_V4)[:12] + b"\x31",
    ],
    ids=["v1-protocol", "v1-lone-lf", "v2-version"],
)
@async_test
async def test_malformed_header_is_closed_with_one_log_line(garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    async with running(app) as site:
        response = await exchange(site, garbage + b"\0" * 64 + request())
    assert response == b""
    assert app.calls == 0
    records = proxy_records(caplog)
    assert len(records) == 1, caplog.text
    assert records[0].levelno == logging.WARNING and records[0].getMessage().startswith("127.0.0.1:")
    assert_no_tracebacks(caplog)


@async_test
async def test_silent_client_is_closed_at_the_header_deadline(caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    async with running(app, header_timeout=0.3) as site:
        started = time.monotonic()
        response = await exchange(site, b"")
        elapsed = time.monotonic() - started
    assert response == b""
    assert 0.25 < elapsed < 2.0
    records = proxy_records(caplog)
    assert [r.levelno for r in records] == [logging.INFO], caplog.text
    assert_no_tracebacks(caplog)


@async_test
async def test_use_serves_a_plain_request_at_the_socket_address() -> None:
    app = App()
    async with running(app, policy="USE") as site:
        report = report_of(await exchange(site, request()))
    assert report["remote"] == "127.0.0.1" and report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


@async_test
async def test_stop_closes_connections_still_waiting_for_their_header() -> None:
    app = App()
    async with running(app) as site:
        reader, writer = await asyncio.open_connection(site._host, site.port)
        writer.write(b"PROXY TCP4 ")
        for _ in range(100):
            if site.proxy_factory.pending:
                break
            await asyncio.sleep(0.01)
        assert site.proxy_factory.pending == 1
    started = time.monotonic()
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        pass  # closed with a reset: nothing was served on it
    assert time.monotonic() - started < 2.0
    writer.close()


def test_core_does_not_import_aiohttp() -> None:
    """No new runtime dependency: ``import proxyproto`` (and its asyncio layers) never imports aiohttp."""
    code = (
        "import sys, proxyproto, proxyproto.aio, proxyproto.aio_protocol; "
        "assert 'aiohttp' not in sys.modules, sorted(m for m in sys.modules if m.startswith('aiohttp'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the documented example ----------------------------------------------------------------------


def docs_block(name: str) -> str:
    """The ``.. code-block:: python`` with ``:name: <name>`` in docs/web-servers.rst, dedented."""
    text = DOCS.read_text()
    match = re.search(
        r"^\.\. code-block:: python\n   :name: " + re.escape(name) + r"\n\n((?:(?:    .*)?\n)+)", text, re.MULTILINE
    )
    assert match, f"no block named {name} in {DOCS}"
    return "\n".join(line[4:] for line in match.group(1).splitlines()).strip() + "\n"


def example_environment() -> dict[str, str]:
    """This process's environment, with this checkout first on a documented script's import path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) if not path else f"{ROOT}{os.pathsep}{path}"}


def test_docs_aiohttp_run_app_example_serves_the_real_client_and_exits_on_sigterm(tmp_path: Path) -> None:
    """The documented run_app script, unchanged but for its port: the real client's address, the
    start line with the trust rule, and exit status 0 soon after SIGTERM."""
    port = free_port()
    script = tmp_path / "example.py"
    script.write_text(docs_block("aiohttp-run-app-example").replace("8080", str(port)))
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=example_environment()
    )
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            assert time.monotonic() < deadline and process.poll() is None, "the example did not start"
            time.sleep(0.05)
        get = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        response = exchange_blocking(("127.0.0.1", port), get, head=proxyproto.encode_v1(REAL_V6, DEST_V6))
        os.kill(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=10)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert response.endswith(b"Hello, 2001:db8::7\n")
    assert process.returncode == 0, output
    rule = "PROXY protocol: REQUIRE for 10.0.0.0/8, 127.0.0.1/32, SKIP for other peers"
    assert f"======== Running on http://127.0.0.1:{port} ({rule}) ========" in output, output


def test_docs_aiohttp_example_runs(tmp_path: Path) -> None:
    """The documented script, unchanged but for its port, serves the real client's address."""
    port = free_port()
    script = tmp_path / "example.py"
    script.write_text(docs_block("aiohttp-example").replace("8080", str(port)))
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=example_environment()
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and process.poll() is None, "the example did not start"
                time.sleep(0.05)
        with sock:
            get = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            sock.sendall(proxyproto.encode_v1(REAL_V6, DEST_V6) + get)
            response = read_all(sock)
    finally:
        process.terminate()
        process.wait(10)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert response.endswith(b"Hello, 2001:db8::7\n")
