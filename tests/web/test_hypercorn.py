"""hypercorn behind a proxy: ``scope["client"]`` is the real client, TLS is negotiated after the header.

Every test runs hypercorn's own ``serve`` through :func:`proxyproto.hypercorn.serve`
in a fresh event loop on loopback (or a UNIX socket), stopped by its
``shutdown_trigger``, and talks raw HTTP/1.1 (or HTTPS) to it from a thread
over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import async_test, free_port, listening, require_module, run_on, self_signed_files

import proxyproto

try:
    require_module("hypercorn")
except pytest.skip.Exception as missing:  # support.require_module skips without allow_module_level
    pytest.skip(str(missing), allow_module_level=True)

from hypercorn.config import Config

from proxyproto.hypercorn import serve

DOCS = Path(__file__).resolve().parents[2] / "docs" / "web-servers.rst"

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)

#: A body with every byte value, CRLFs and something that looks like a header.
BODY = (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + bytes(range(256))) * 64


class App:
    """An ASGI app that reports its scope, and counts its HTTP calls (lifespan supported)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        report = {
            "client": scope["client"],
            "server": scope["server"],
            "scheme": scope["scheme"],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        }
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(report).encode()})


@contextlib.asynccontextmanager
async def running(app: App, config: Config | None = None, **knobs: Any) -> AsyncIterator[tuple[str, int]]:
    """hypercorn serving ``app`` on a free loopback port until the block ends; yields the address."""
    if config is None:
        config = Config()
        config.bind = [f"127.0.0.1:{free_port()}"]
    config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait, **knobs))
    bind = config.bind[0]
    host, _, port = bind.rpartition(":")
    deadline = time.monotonic() + 10
    while not listening(int(port)):
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "hypercorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield host.strip("[]"), int(port)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


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
    address: Any, data: bytes, tls: ssl.SSLContext | None = None, head: bytes = b"", family: int = socket.AF_INET
) -> bytes:
    """Send ``head`` in the clear, then ``data`` (over TLS when ``tls``), and read until the server closes."""
    with socket.socket(family, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(address)
        raw.sendall(head)
        if tls is None:
            raw.sendall(data)
            return read_all(raw)
        with tls.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(data)
            return read_all(sock)


async def exchange(address: Any, data: bytes, **kw: Any) -> bytes:
    return await asyncio.to_thread(exchange_blocking, address, data, **kw)


def report_of(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:300]
    if b"transfer-encoding: chunked" in head.lower():
        decoded = b""
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, body = decoded + body[:size], body[size + 2 :]
        body = decoded
    return json.loads(body)  # type: ignore[no-any-return]


def header_bytes(version: int, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    if version == 1:
        return proxyproto.encode_v1(source, destination)
    return proxyproto.encode_v2(source, destination)


def proxy_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """proxyproto's lines about connections (the start-up policy line aside)."""
    said = [r for r in caplog.records if r.name == "proxyproto"]
    return [r for r in said if not r.getMessage().startswith("PROXY header policy ")]


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
async def test_scope_client_is_the_headers_source(
    version: int, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    app = App()
    async with running(app) as address:
        report = report_of(await exchange(address, header_bytes(version, source, destination) + request()))
    assert report["client"] == list(source)  # two items, as ASGI says, for IPv6 too
    assert report["server"] == list(destination)


@async_test
async def test_post_body_after_the_header_is_byte_exact() -> None:
    app = App()
    async with running(app) as address:
        report = report_of(await exchange(address, proxyproto.encode_v2(REAL_V4, DEST_V4) + request(BODY)))
    assert report["body_length"] == len(BODY)
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


@async_test
async def test_ipv6_listener_serves_an_ipv4_source() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    app = App()
    config = Config()
    config.bind = [f"[::1]:{free_port()}"]
    async with running(app, config) as address:
        data = proxyproto.encode_v1(REAL_V4, DEST_V4) + request()
        report = report_of(await exchange(address, data, family=socket.AF_INET6))
    assert report["client"] == list(REAL_V4)


@async_test
async def test_unix_listener_serves_the_headers_source(tmp_path: Path) -> None:
    """haproxy in front of a UNIX-socket backend: the client is the header's, not None."""
    path = tmp_path / "hypercorn.sock"
    app = App()
    config = Config()
    config.bind = [f"unix:{path}"]
    config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait))
    try:
        for _ in range(500):
            if path.exists() or task.done():
                break
            await asyncio.sleep(0.02)
        data = proxyproto.encode_v2(REAL_V6, DEST_V6) + request()
        report = report_of(await exchange(str(path), data, family=socket.AF_UNIX))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert report["client"] == list(REAL_V6)


@async_test
async def test_tls_is_negotiated_after_the_header(tls_files: tuple[str, str]) -> None:
    """config.certfile/keyfile: the header in the clear, then the handshake (TLS passthrough behind haproxy)."""
    config = Config()
    config.bind = [f"127.0.0.1:{free_port()}"]
    config.certfile, config.keyfile = tls_files
    client_tls = ssl.create_default_context(cafile=tls_files[0])
    app = App()
    async with running(app, config) as address:
        head = proxyproto.encode_v2(REAL_V4, DEST_V4)
        report = report_of(await exchange(address, request(), tls=client_tls, head=head))
    assert report["client"] == list(REAL_V4)
    assert report["scheme"] == "https"
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


async def held_until_closed(address: tuple[str, int], head: bytes, bound: float = 10.0) -> float:
    """Connect, send ``head`` and nothing else; seconds until the server closes the connection."""
    reader, writer = await asyncio.open_connection(*address)
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


@pytest.mark.parametrize("set_in_config", [False, True], ids=["default", "config.ssl_handshake_timeout"])
@async_test
async def test_stalled_tls_handshake_after_the_header_is_closed_promptly(
    set_in_config: bool, tls_files: tuple[str, str]
) -> None:
    """The header, then no ClientHello: closed within header_timeout (hypercorn's own 60 s default
    is not used), or within config.ssl_handshake_timeout when that was set."""
    config = Config()
    config.bind = [f"127.0.0.1:{free_port()}"]
    config.certfile, config.keyfile = tls_files
    header_timeout = 0.5
    if set_in_config:
        config.ssl_handshake_timeout = 0.5
        header_timeout = 30.0
    app = App()
    async with running(app, config, header_timeout=header_timeout) as address:
        held = await held_until_closed(address, proxyproto.encode_v2(REAL_V4, DEST_V4))
    assert 0.3 < held < 5.0, f"held {held:.2f} s"


@async_test
async def test_config_and_the_loop_are_not_modified() -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{free_port()}"]
    loop = asyncio.get_running_loop()
    async with running(App(), config):
        assert "create_server" not in vars(loop)
        assert asyncio.start_server is asyncio.streams.start_server
    assert "create_server" not in vars(loop)
    assert "create_sockets" not in vars(config)


@async_test
async def test_overlapping_serve_calls_on_one_loop_each_keep_their_own_settings() -> None:
    """Three serve() calls on one loop: one trusting loopback, one trusting only 10.0.0.0/8 (a
    loopback header is payload: 400), and a third started after the first stopped while the
    second still runs; each listener answers by its own settings, and none is left behind."""
    header = proxyproto.encode_v1(REAL_V4, DEST_V4)
    loop = asyncio.get_running_loop()
    trusting, distrusting, later = App(), App(), App()
    async with running(distrusting, trusted="10.0.0.0/8") as other:
        async with running(trusting, trusted="127.0.0.1") as first:
            assert report_of(await exchange(first, header + request()))["client"] == list(REAL_V4)
            response = await exchange(other, header + request())
            assert re.match(rb"HTTP/1\.[01] 400 ", response), response[:100]
        # The first has stopped; the second keeps its own wrapper, and a third gets its own.
        response = await exchange(other, header + request())
        assert re.match(rb"HTTP/1\.[01] 400 ", response), response[:100]
        assert report_of(await exchange(other, request()))["client"][0] == "127.0.0.1"
        async with running(later, trusted="127.0.0.1", policy="USE") as third:
            assert report_of(await exchange(third, header + request()))["client"] == list(REAL_V4)
            assert report_of(await exchange(third, request()))["client"][0] == "127.0.0.1"  # USE
        with pytest.raises(OSError):
            await exchange(first, header + request())  # the first's listener is closed
    assert trusting.calls == 1 and distrusting.calls == 1 and later.calls == 2
    assert "create_server" not in vars(loop)


def test_serves_on_uvloop() -> None:
    """No loop attribute is replaced, so uvloop's loop (whose attributes cannot be) works too."""

    async def scenario() -> None:
        async with running(App()) as address:
            report = report_of(await exchange(address, proxyproto.encode_v2(REAL_V4, DEST_V4) + request()))
        assert report["client"] == list(REAL_V4)

    run_on("uvloop", scenario)


# -- trust ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("trusted", ["10.0.0.0/8,127.0.0.1", "*"])
@async_test
async def test_trust_lists_in_every_spelling(trusted: Any) -> None:
    app = App()
    async with running(app, trusted=trusted) as address:
        report = report_of(await exchange(address, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
    assert report["client"] == list(REAL_V4)


@async_test
async def test_untrusted_peers_header_never_reaches_the_app() -> None:
    """SKIP (the default for untrusted peers): the header is payload, hypercorn answers 400."""
    app = App()
    async with running(app, trusted="10.0.0.0/8") as address:
        response = await exchange(address, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
        served = report_of(await exchange(address, request()))
    assert re.match(rb"HTTP/1\.[01] 400 ", response), response[:100]
    assert app.calls == 1  # only the plain request
    assert served["client"][0] == "127.0.0.1"


@async_test
async def test_policy_for_decides_per_connection_from_peer_and_local_address() -> None:
    """The hook replaces the three trust knobs (here ``trusted=""``, which alone trusts no one)."""
    calls: list[tuple[Any, Any]] = []

    def policy_for(peer: Any, local: Any) -> str:
        calls.append((peer, local))
        return "REQUIRE" if len(calls) == 1 else "SKIP"

    app = App()
    async with running(app, trusted="", policy_for=policy_for) as address:
        trusted = report_of(await exchange(address, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
        skipped = await exchange(address, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
    assert trusted["client"] == list(REAL_V4)
    assert re.match(rb"HTTP/1\.[01] 400 ", skipped), skipped[:100]  # SKIP: the header was payload
    assert [peer[0] for peer, _ in calls] == ["127.0.0.1", "127.0.0.1"]
    assert [tuple(local[:2]) for _, local in calls] == [address] * 2


@async_test
async def test_policy_for_that_raises_closes_that_connection_with_one_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def policy_for(peer: Any, local: Any) -> str:
        raise RuntimeError("no such proxy")

    app = App()
    async with running(app, policy_for=policy_for) as address:
        response = await exchange(address, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
    assert response == b"" and app.calls == 0
    records = proxy_records(caplog)
    assert [r.levelno for r in records] == [logging.ERROR], caplog.text
    assert "policy_for failed: RuntimeError: no such proxy" in records[0].getMessage()


@async_test
async def test_invalid_knobs_are_refused_before_binding() -> None:
    config = Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    with pytest.raises(ValueError, match="untrusted"):
        await serve(App(), config, trusted="10.0.0.0/8", untrusted_policy="USE")
    assert not listening(port)


# -- hypercorn's ProxyFixMiddleware ---------------------------------------------------------------

#: What a client behind a proxy in ``mode tcp`` may write: the proxy relays it untouched.
SPOOFED_LINES = {
    "legacy": b"X-Forwarded-For: 198.51.100.66\r\nX-Forwarded-Proto: https\r\n",
    "modern": b"Forwarded: for=198.51.100.66;proto=https\r\n",
}
V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def spoofed(mode: str) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: example\r\nConnection: close\r\n" + SPOOFED_LINES[mode] + b"\r\n"


@pytest.mark.parametrize("mode", ["legacy", "modern"])
@pytest.mark.parametrize(
    ("policy", "head", "client"),
    [
        ("REQUIRE", proxyproto.encode_v1(REAL_V4, DEST_V4), REAL_V4[0]),
        ("REQUIRE", V2_LOCAL, "127.0.0.1"),
        ("IGNORE", proxyproto.encode_v1(REAL_V4, DEST_V4), "127.0.0.1"),
        ("USE", b"", "127.0.0.1"),
    ],
    ids=["require-v1", "require-v2-local", "ignore-v1", "use-no-header"],
)
@async_test
async def test_proxy_fix_middleware_never_replaces_a_pinned_connections_client_or_scheme(
    mode: str, policy: str, head: bytes, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator kept hypercorn's ProxyFixMiddleware (from a ``mode http`` past): it trusts the last hop
    whatever the peer, so on connections from the PROXY-protocol proxy it is bypassed."""
    from hypercorn.middleware import ProxyFixMiddleware

    app = App()
    with caplog.at_level(logging.INFO, logger="proxyproto"):
        async with running(ProxyFixMiddleware(app, mode=mode, trusted_hops=1), policy=policy) as address:
            report = report_of(await exchange(address, head + spoofed(mode)))
            again = report_of(await exchange(address, head + spoofed(mode)))
    assert (report["client"][0], report["scheme"]) == (again["client"][0], again["scheme"]) == (client, "http")
    said = [r.getMessage() for r in proxy_records(caplog)]
    assert sum("ProxyFixMiddleware is bypassed" in line for line in said) == 1, said


@async_test
async def test_proxy_fix_middleware_is_bypassed_on_a_pinned_connection_over_tls(tls_files: tuple[str, str]) -> None:
    from hypercorn.middleware import ProxyFixMiddleware

    config = Config()
    config.bind = [f"127.0.0.1:{free_port()}"]
    config.certfile, config.keyfile = tls_files
    client_tls = ssl.create_default_context(cafile=tls_files[0])
    fix = ProxyFixMiddleware(App(), mode="legacy", trusted_hops=1)
    async with running(fix, config) as address:
        head = proxyproto.encode_v2(REAL_V4, DEST_V4)
        report = report_of(await exchange(address, spoofed("legacy"), tls=client_tls, head=head))
    assert (report["client"], report["scheme"]) == (list(REAL_V4), "https")


@async_test
async def test_proxy_fix_middleware_still_serves_peers_not_trusted_to_send_the_header() -> None:
    """No PROXY-protocol peer (``trusted=""``: SKIP for everyone): the middleware acts, as without this library."""
    from hypercorn.middleware import ProxyFixMiddleware

    async with running(ProxyFixMiddleware(App(), mode="legacy", trusted_hops=1), trusted="") as address:
        report = report_of(await exchange(address, spoofed("legacy")))
    assert (report["client"][0], report["scheme"]) == ("198.51.100.66", "https")


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", proxyproto.encode_v2(REAL_V4, DEST_V4)[:12] + b"\x31"],
    ids=["v1-protocol", "v2-version"],
)
@async_test
async def test_malformed_header_is_closed_with_one_log_line(garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    async with running(app) as address:
        response = await exchange(address, garbage + b"\0" * 64 + request())
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
    async with running(app, header_timeout=0.3) as address:
        started = time.monotonic()
        response = await exchange(address, b"")
        elapsed = time.monotonic() - started
    assert response == b""
    assert 0.25 < elapsed < 2.0
    assert [r.levelno for r in proxy_records(caplog)] == [logging.INFO], caplog.text
    assert_no_tracebacks(caplog)


@async_test
async def test_shutdown_does_not_wait_for_a_silent_client() -> None:
    app = App()
    async with running(app) as address:
        reader, writer = await asyncio.open_connection(*address)
        await asyncio.sleep(0.1)
        started = time.monotonic()
    assert time.monotonic() - started < 2.0  # far below the 10 s header deadline
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def test_core_does_not_import_hypercorn() -> None:
    """No new runtime dependency: neither ``import proxyproto`` nor ``proxyproto.hypercorn`` imports hypercorn."""
    code = (
        "import sys, proxyproto, proxyproto.aio, proxyproto.aio_protocol, proxyproto.hypercorn; "
        "assert 'hypercorn' not in sys.modules, sorted(m for m in sys.modules if m.startswith('hypercorn'))"
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


def test_docs_hypercorn_example_runs(tmp_path: Path) -> None:
    """The documented script, unchanged but for its port, serves the real client's address."""
    port = free_port()
    script = tmp_path / "example.py"
    script.write_text(docs_block("hypercorn-example").replace("8080", str(port)))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            assert time.monotonic() < deadline and process.poll() is None, "the example did not start"
            time.sleep(0.05)
        get = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        response = exchange_blocking(("127.0.0.1", port), proxyproto.encode_v2(REAL_V6, DEST_V6) + get)
    finally:
        process.terminate()
        process.wait(10)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert b"Hello, 2001:db8::7\n" in response


def test_docs_hypercorn_scope_header_example_trusts_only_a_trusted_proxys_ssl_tlv(tmp_path: Path) -> None:
    """The documented script, unchanged but for its port: a verified client certificate's CN in a
    trusted proxy's header is the user.  The same header from a peer it does not trust (127.0.0.1
    left out of ``trusted``, served under IGNORE) is not: the user is anonymous."""
    source = docs_block("hypercorn-scope-header")
    cn = b"alice"
    ssl_tlv = bytes([0x07]) + b"\0\0\0\0" + bytes([0x22]) + len(cn).to_bytes(2, "big") + cn  # verified, CN
    header = proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=[proxyproto.TLV(proxyproto.TLVType.SSL, ssl_tlv)])
    get = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    untrusting = source.replace('trusted="10.0.0.0/8,127.0.0.1"', 'trusted="10.0.0.0/8", untrusted_policy="IGNORE"')
    assert untrusting != source
    for text, expected in ((source, b"Hello, alice\n"), (untrusting, b"Hello, anonymous\n")):
        port = free_port()
        script = tmp_path / "example.py"
        script.write_text(text.replace("8080", str(port)))
        env = {**os.environ, "PYTHONPATH": str(DOCS.parents[1])}  # this checkout's proxyproto
        process = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        try:
            deadline = time.monotonic() + 20
            while not listening(port):
                assert time.monotonic() < deadline and process.poll() is None, "the example did not start"
                time.sleep(0.05)
            response = exchange_blocking(("127.0.0.1", port), header + get)
        finally:
            process.terminate()
            process.wait(10)
        assert response.startswith(b"HTTP/1.1 200"), response
        assert expected in response, response


def test_proxyprotos_lines_show_with_their_level_through_hypercorns_logging(tmp_path: Path) -> None:
    """The documented script trusting every peer: its WARNING and INFO lines come out in hypercorn's format."""
    port = free_port()
    script = tmp_path / "example.py"
    source = docs_block("hypercorn-example").replace("8080", str(port))
    every_peer = source.replace('trusted="10.0.0.0/8,127.0.0.1"', 'trusted="*"')
    assert every_peer != source
    script.write_text(every_peer)
    env = {**os.environ, "PYTHONPATH": str(DOCS.parents[1])}  # this checkout's proxyproto
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            assert time.monotonic() < deadline and process.poll() is None, "the example did not start"
            time.sleep(0.05)
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0].decode()
    assert "[WARNING] proxyproto:" in output, output
    assert "[INFO] proxyproto: PROXY header policy" in output, output
