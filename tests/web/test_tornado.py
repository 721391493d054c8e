"""Tornado behind a proxy: ``request.remote_ip`` is the real client, TLS follows the header, refusals are closed once.

Every test runs a real :class:`proxyproto.tornado.ProxyHTTPServer` (or a real
``TCPServer`` with :class:`proxyproto.tornado.ProxyTCPServerMixin`) on the
test's own asyncio loop, and talks to it over real loopback sockets from
blocking clients in a worker thread (so the server's loop keeps running);
the haproxy tests start the real ``haproxy`` and stop it by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import async_test, free_port, require_haproxy, require_module
from web_kit import DEST_V4, DEST_V6, REAL_V4, REAL_V6, Certificate, command, self_signed

import proxyproto

require_module("tornado")

from tornado.iostream import SSLIOStream, StreamClosedError  # noqa: E402
from tornado.netutil import bind_sockets  # noqa: E402
from tornado.tcpserver import TCPServer  # noqa: E402
from tornado.web import Application, RequestHandler  # noqa: E402

from proxyproto.tornado import ProxyHTTPServer, ProxyTCPServerMixin, header  # noqa: E402

#: A body with every byte value, CRLFs and something that looks like a header.
BODY = (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + bytes(range(256))) * 64
#: Any wait in these tests: never reached when the server is healthy.
CEILING = 20.0


class Report(RequestHandler):
    """What Tornado told the application about the request, as JSON."""

    def prepare(self) -> None:
        found = header(self.request)
        self.finish(
            {
                "remote_ip": self.request.remote_ip,
                "port": self.request.connection.context.address[1],
                "protocol": self.request.protocol,
                "header_version": None if found is None else found.version,
                "header_source": None if found is None or found.source is None else list(found.source),
                "body_sha256": hashlib.sha256(self.request.body).hexdigest(),
            }
        )


def application() -> Application:
    return Application([(r"/.*", Report)])


@contextlib.asynccontextmanager
async def serving(host: str = "127.0.0.1", **kw: Any) -> AsyncIterator[tuple[ProxyHTTPServer, int]]:
    """A ProxyHTTPServer on ``host``, a free port, in this loop; stopped as Tornado's docs say when the block ends."""
    server = ProxyHTTPServer(application(), **kw)
    sockets = bind_sockets(0, host)
    server.add_sockets(sockets)
    try:
        yield server, sockets[0].getsockname()[1]
    finally:
        server.stop()
        await asyncio.wait_for(server.close_all_connections(), CEILING)


def request(body: bytes = BODY, close: bool = True, extra: str = "") -> bytes:
    connection = "Connection: close\r\n" if close else ""
    head = f"POST /report HTTP/1.1\r\nHost: backend\r\nContent-Length: {len(body)}\r\n{connection}{extra}\r\n"
    return head.encode() + body


def connect(port: int, host: str = "127.0.0.1", local: str | None = None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=CEILING, source_address=(local, 0) if local else None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until EOF; a reset counts as EOF (a server closing with unread bytes resets)."""
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


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP response (status, body), read up to its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return int(head.split()[1]), body


def report_of(response: bytes) -> dict[str, Any]:
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    return json.loads(response.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


def exchange_blocking(port: int, data: bytes, host: str = "127.0.0.1", local: str | None = None) -> bytes:
    with connect(port, host, local) as sock:
        sock.sendall(data)
        return read_all(sock)


async def exchange(port: int, data: bytes, host: str = "127.0.0.1", local: str | None = None) -> bytes:
    return await asyncio.to_thread(exchange_blocking, port, data, host, local)


def proxy_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxyproto"]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    made = self_signed(Path(tmp_path_factory.mktemp("tornado-tls")))
    if made is None:
        pytest.skip("the openssl command is not installed (it makes the test certificate)")
    return made


def ipv6_loopback() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")


# -- the real client --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "source", "destination"),
    [(1, REAL_V4, DEST_V4), (2, REAL_V4, DEST_V4), (1, REAL_V6, DEST_V6), (2, REAL_V6, DEST_V6)],
    ids=["v1-ipv4", "v2-ipv4", "v1-ipv6", "v2-ipv6"],
)
@async_test
async def test_remote_ip_and_port_are_the_headers_source_and_the_body_is_byte_exact(
    version: int, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    encode = proxyproto.encode_v1 if version == 1 else proxyproto.encode_v2
    async with serving() as (_, port):
        report = report_of(await exchange(port, encode(source, destination) + request()))
    assert (report["remote_ip"], report["port"]) == source
    assert report["header_version"] == version and report["header_source"] == list(source)
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


@async_test
async def test_ipv6_listener_serves_an_ipv4_source() -> None:
    ipv6_loopback()
    async with serving(host="::1") as (_, port):
        report = report_of(await exchange(port, proxyproto.encode_v1(REAL_V4, DEST_V4) + request(), host="::1"))
    assert (report["remote_ip"], report["port"]) == REAL_V4


@async_test
async def test_unix_listener_serves_the_headers_source(tmp_path: Path) -> None:
    """haproxy in front of a UNIX-socket backend: remote_ip is the header's, not Tornado's "0.0.0.0"."""
    from tornado.netutil import bind_unix_socket

    server = ProxyHTTPServer(application())
    server.add_socket(bind_unix_socket(str(tmp_path / "tornado.sock")))  # mode 0600: its peers are trusted

    def over_unix() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(CEILING)
            sock.connect(str(tmp_path / "tornado.sock"))
            sock.sendall(proxyproto.encode_v2(REAL_V6, DEST_V6) + request())
            return read_all(sock)

    try:
        report = report_of(await asyncio.to_thread(over_unix))
    finally:
        server.stop()
        await server.close_all_connections()
    assert (report["remote_ip"], report["port"]) == REAL_V6


@async_test
async def test_header_and_request_in_separate_writes_are_both_read() -> None:
    """A header still on its way waits on the IOLoop; the request after it reaches Tornado intact."""
    data = proxyproto.encode_v2(REAL_V4, DEST_V4) + request()

    def slow() -> bytes:
        with connect(port) as sock:
            for piece in (data[:5], data[5:17], data[17:30], data[30:]):
                sock.sendall(piece)
                time.sleep(0.05)
            return read_all(sock)

    async with serving() as (_, port):
        report = report_of(await asyncio.to_thread(slow))
    assert report["remote_ip"] == REAL_V4[0]
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


@async_test
async def test_keep_alive_reads_the_header_once_and_serves_every_request_with_the_real_client() -> None:
    def three_requests() -> list[dict[str, Any]]:
        with connect(port) as sock:
            sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4))
            seen = []
            for _ in range(3):
                sock.sendall(request(close=False))
                status, body = read_response(sock)
                assert status == 200
                seen.append(json.loads(body))
            return seen

    async with serving() as (_, port):
        reports = await asyncio.to_thread(three_requests)
    assert [(r["remote_ip"], r["port"]) for r in reports] == [REAL_V4] * 3
    assert all(r["header_version"] == 2 for r in reports)


@async_test
async def test_local_header_keeps_the_socket_address_and_stays_reachable() -> None:
    async with serving() as (_, port):
        report = report_of(await exchange(port, proxyproto.encode_v2(command=proxyproto.Command.LOCAL) + request()))
    assert report["remote_ip"] == "127.0.0.1"
    assert report["header_version"] == 2 and report["header_source"] is None


# -- TLS after the header ---------------------------------------------------------------------------


@async_test
async def test_tls_is_negotiated_after_the_header(cert: Certificate) -> None:
    """ssl_options: the header in the clear, then the handshake (haproxy's send-proxy in front of TLS passthrough)."""

    def over_tls() -> bytes:
        with connect(port) as raw:
            raw.sendall(proxyproto.encode_v2(REAL_V6, DEST_V6))
            with cert.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request())
                return read_all(tls)

    async with serving(ssl_options=cert.server_context()) as (_, port):
        report = report_of(await asyncio.to_thread(over_tls))
    assert (report["remote_ip"], report["port"]) == REAL_V6
    assert report["protocol"] == "https"
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


@async_test
async def test_stalled_tls_handshake_after_the_header_is_closed_at_the_header_timeout(
    cert: Certificate, caplog: pytest.LogCaptureFixture
) -> None:
    def stall() -> float:
        with connect(port) as sock:
            sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4))  # and never a ClientHello
            start = time.monotonic()
            assert read_all(sock) == b""
            return time.monotonic() - start

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        async with serving(ssl_options=cert.server_context(), header_timeout=0.5) as (_, port):
            held = await asyncio.to_thread(stall)
    assert 0.3 < held < 10.0, held
    assert any("TLS handshake not done within 0.5 s" in r.getMessage() for r in proxy_records(caplog))


# -- trust ------------------------------------------------------------------------------------------


@async_test
async def test_untrusted_peers_header_never_becomes_the_client(caplog: pytest.LogCaptureFixture) -> None:
    """From 127.0.0.2 with only 127.0.0.1 trusted (SKIP): the header is payload, Tornado answers 400."""

    def spoof() -> tuple[bytes, dict[str, Any], int]:
        with connect(port, local="127.0.0.2") as sock:
            sock.sendall(proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
            refused = read_all(sock)
        with connect(port, local="127.0.0.2") as sock:
            own = sock.getsockname()[1]
            sock.sendall(request())
            return refused, report_of(read_all(sock)), own

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        async with serving(trusted="127.0.0.1") as (_, port):
            refused, served, own = await asyncio.to_thread(spoof)
    assert re.match(rb"HTTP/1\.1 400 ", refused), refused[:100]
    assert (served["remote_ip"], served["port"]) == ("127.0.0.2", own)
    assert served["header_version"] is None
    assert_no_tracebacks(caplog)


@async_test
async def test_untrusted_peers_header_under_ignore_is_removed_and_not_believed() -> None:
    async with serving(trusted="127.0.0.1", untrusted_policy="IGNORE") as (_, port):
        report = report_of(await exchange(port, proxyproto.encode_v2(REAL_V4, DEST_V4) + request(), local="127.0.0.2"))
    assert report["remote_ip"] == "127.0.0.2" and report["header_version"] is None


SPOOFED = "X-Forwarded-For: 203.0.113.66\r\nX-Real-Ip: 203.0.113.66\r\nX-Forwarded-Proto: https\r\n"


@pytest.mark.parametrize(
    "policy, start, client",
    [
        ("USE", proxyproto.encode_v2(REAL_V4, DEST_V4), REAL_V4[0]),
        ("USE", b"", "127.0.0.1"),
        ("REQUIRE", b"PROXY UNKNOWN\r\n", "127.0.0.1"),
        ("REQUIRE", proxyproto.encode_v2(command=proxyproto.Command.LOCAL), "127.0.0.1"),
        ("IGNORE", proxyproto.encode_v2(REAL_V4, DEST_V4), "127.0.0.1"),
    ],
    ids=["use-header", "use-no-header", "unknown", "local", "ignore"],
)
@async_test
async def test_xheaders_never_change_the_client_or_the_scheme_on_a_trusted_proxys_connection(
    policy: str, start: bytes, client: str
) -> None:
    async with serving(xheaders=True, policy=policy) as (_, port):
        report = report_of(await exchange(port, start + request(extra=SPOOFED)))
    assert (report["remote_ip"], report["protocol"]) == (client, "http")


@pytest.mark.parametrize(
    "knobs, local",
    [({"trusted": "127.0.0.1"}, "127.0.0.2"), ({"policy": "SKIP"}, None), ({"policy": "REJECT"}, None)],
    ids=["untrusted", "trusted-skip", "trusted-reject"],
)
@async_test
async def test_xheaders_work_as_in_tornado_for_a_peer_that_sends_no_trusted_header(
    knobs: dict[str, str], local: str | None
) -> None:
    async with serving(xheaders=True, **knobs) as (_, port):
        report = report_of(await exchange(port, request(extra=SPOOFED), local=local))
    assert (report["remote_ip"], report["protocol"]) == ("203.0.113.66", "https")


@async_test
async def test_xheaders_over_header_lets_an_http_proxy_in_front_name_the_client_and_the_scheme() -> None:
    async with serving(xheaders=True, xheaders_over_header=True) as (_, port):
        report = report_of(await exchange(port, proxyproto.encode_v2(REAL_V4, DEST_V4) + request(extra=SPOOFED)))
    assert (report["remote_ip"], report["protocol"], report["header_version"]) == ("203.0.113.66", "https", 2)


@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["with-the-connection", "after-it"])
@async_test
async def test_untrusted_peers_header_under_skip_is_noted_whenever_it_arrives_and_served_as_payload(
    delay: float, caplog: pytest.LogCaptureFixture
) -> None:
    def late() -> bytes:
        with connect(port, local="127.0.0.2") as sock:
            time.sleep(delay)
            sock.sendall(proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
            return read_all(sock)

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        async with serving(trusted="127.0.0.1") as (_, port):
            answer = await asyncio.to_thread(late)
    assert re.match(rb"HTTP/1\.1 400 ", answer), answer[:100]  # the header is payload: not HTTP
    warnings = [r.getMessage() for r in proxy_records(caplog) if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not trusted" in warnings[0], warnings


@async_test
async def test_untrusted_peer_under_skip_is_served_before_it_sends_anything() -> None:
    def answer_to_a_silent_start() -> bytes:
        with connect(port, local="127.0.0.2") as sock:
            time.sleep(0.2)  # served meanwhile: the request is read as soon as it comes
            sock.sendall(request())
            return read_all(sock)

    async with serving(trusted="127.0.0.1") as (server, port):
        answer = await asyncio.to_thread(answer_to_a_silent_start)
        assert len(server._proxy_parking) == 0
    assert report_of(answer)["remote_ip"] == "127.0.0.2"


@async_test
async def test_policy_for_that_raises_closes_that_connection_with_one_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def policy_for(peer: Any, local: Any) -> str:
        raise RuntimeError("directory unavailable")

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        async with serving(policy_for=policy_for) as (_, port):
            response = await exchange(port, proxyproto.encode_v2(REAL_V4, DEST_V4) + request())
    assert response == b""
    records = proxy_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert "policy_for failed: RuntimeError: directory unavailable" in records[0].getMessage()


def test_tornado_still_has_the_private_names_the_adapter_overrides() -> None:
    import proxyproto.tornado as adapter

    adapter._check_tornado()  # what the import ran: Tornado's _handle_connection and _apply_xheaders are there
    assert ProxyTCPServerMixin._handle_connection.__name__ == TCPServer._handle_connection.__name__


def test_a_tornado_without_those_names_fails_the_import_loudly() -> None:
    import proxyproto.tornado as adapter

    class Renamed:
        def _handle_connection(self, connection: Any, address: Any, extra: Any) -> None: ...

    class Missing:
        pass

    with pytest.raises(ImportError, match=r"TCPServer\._handle_connection\(self, connection, address\)"):
        adapter._check_tornado(tcp_server=type("TCPServer", (Renamed,), {}))
    with pytest.raises(ImportError, match=r"_apply_xheaders\(self, headers\)"):
        adapter._check_tornado(context=Missing)


def test_invalid_knobs_are_refused_before_anything_listens() -> None:
    with pytest.raises(ValueError, match="untrusted_policy"):
        ProxyHTTPServer(application(), untrusted_policy="USE")
    with pytest.raises(ValueError, match="trusted"):
        ProxyHTTPServer(application(), trusted=None)
    with pytest.raises(TypeError, match="policyy"):
        ProxyHTTPServer(application(), policyy="USE")


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"PROXY TCP4 192.0.2.10\r\n", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    ids=["v1-malformed", "v1-unknown-protocol", "no-header"],
)
@async_test
async def test_malformed_header_is_closed_with_one_refusal_line(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="proxyproto"):
        async with serving() as (_, port):
            response = await exchange(port, garbage + request())
            served = report_of(await exchange(port, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
    assert response == b""
    assert served["remote_ip"] == REAL_V4[0]  # the server goes on serving
    records = proxy_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert message.startswith("127.0.0.1:") and ": closed: " in message
    assert f"(listener 127.0.0.1:{port})" in message
    assert_no_tracebacks(caplog)


@async_test
async def test_silent_client_is_closed_at_its_deadline_while_another_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def silent() -> float:
        with connect(port) as sock:
            start = time.monotonic()
            assert read_all(sock) == b""
            return time.monotonic() - start

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        async with serving(header_timeout=2.0) as (_, port):
            waiting = asyncio.ensure_future(asyncio.to_thread(silent))
            await asyncio.sleep(0.1)
            served = report_of(await exchange(port, proxyproto.encode_v2(REAL_V4, DEST_V4) + request()))
            assert not waiting.done(), "the other client waited for the silent one's deadline"
            held = await asyncio.wait_for(waiting, CEILING)
    assert served["remote_ip"] == REAL_V4[0]
    assert 1.5 < held < 15.0, held
    lines = [r.getMessage() for r in proxy_records(caplog)]
    assert any("no PROXY header within 2 s" in line for line in lines), lines


@async_test
async def test_past_max_pending_the_oldest_waiting_connection_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    head = proxyproto.encode_v2(REAL_V4, DEST_V4)

    def three() -> tuple[bytes, list[dict[str, Any]]]:
        socks = [connect(port) for _ in range(3)]
        try:
            for sock in socks:
                sock.sendall(head[:7])
                time.sleep(0.05)
            evicted = read_all(socks[0])
            reports = []
            for sock in socks[1:]:
                sock.sendall(head[7:] + request())
                reports.append(report_of(read_all(sock)))
            return evicted, reports
        finally:
            for sock in socks:
                sock.close()

    with caplog.at_level(logging.INFO, logger="proxyproto"):
        async with serving(max_pending=2, header_timeout=3600) as (_, port):
            evicted, reports = await asyncio.to_thread(three)
    assert evicted == b""
    assert [r["remote_ip"] for r in reports] == [REAL_V4[0]] * 2
    assert any("2 connections already wait for their header (max_pending)" in r.getMessage() for r in caplog.records)


@async_test
async def test_graceful_shutdown_with_parked_connections_returns_promptly() -> None:
    """stop() and close_all_connections() close connections still waiting for their header, at once."""
    server = ProxyHTTPServer(application(), header_timeout=3600)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    socks = [connect(port) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4)[:9])
        deadline = time.monotonic() + CEILING
        while len(server._proxy_parking) < 3:
            assert time.monotonic() < deadline, "the connections were not parked"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        server.stop()
        await asyncio.wait_for(server.close_all_connections(), CEILING)
        took = time.monotonic() - started
        assert len(server._proxy_parking) == 0
        assert [await asyncio.to_thread(read_all, sock) for sock in socks] == [b""] * 3
    finally:
        for sock in socks:
            sock.close()
    assert took < 5.0, took  # generous: the header timeout is an hour


# -- a plain TCPServer ------------------------------------------------------------------------------


class EchoServer(ProxyTCPServerMixin, TCPServer):
    """The TCPServer idiom of Tornado's docs: who is this, and what did the proxy say."""

    async def handle_stream(self, stream: Any, address: Any) -> None:
        try:
            if isinstance(stream, SSLIOStream):
                await stream.wait_for_handshake()  # Tornado's once-per-stream call, still the application's
            line = await stream.read_until(b"\n")
            found = header(address)
            version = None if found is None else found.version
            await stream.write(f"{address[0]} {address[1]} {version} {line.decode()}".encode())
        except StreamClosedError:
            pass
        finally:
            stream.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@async_test
async def test_tcpserver_mixin_gives_handle_stream_the_real_client_and_the_header(
    tls: bool, cert: Certificate
) -> None:
    server = EchoServer(ssl_options=cert.server_context() if tls else None, trusted="127.0.0.1")
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]

    def talk() -> bytes:
        with connect(port) as raw:
            raw.sendall(proxyproto.encode_v1(REAL_V4, DEST_V4))
            sock = cert.client_context().wrap_socket(raw, server_hostname="localhost") if tls else raw
            sock.sendall(b"PRI hello\n")
            return read_all(sock)

    try:
        answer = await asyncio.to_thread(talk)
    finally:
        server.stop()
    assert answer == f"{REAL_V4[0]} {REAL_V4[1]} 1 PRI hello\n".encode()


# -- behind a real haproxy --------------------------------------------------------------------------


def haproxy_config(front: int, backend: int) -> str:
    return (
        "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 5s\n    timeout server 5s\n\n"
        f"listen fe\n    bind 127.0.0.1:{front}\n    server app 127.0.0.1:{backend} send-proxy-v2\n"
    )


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls-passthrough"])
@async_test
async def test_behind_real_haproxy_send_proxy_v2_remote_ip_is_the_client(
    tls: bool, cert: Certificate, tmp_path: Path
) -> None:
    exe = require_haproxy()
    front = free_port()

    def through_haproxy() -> tuple[list[dict[str, Any]], tuple[str, int]]:
        with connect(front, local="127.0.0.2") as raw:
            own = raw.getsockname()[:2]
            sock = cert.client_context().wrap_socket(raw, server_hostname="localhost") if tls else raw
            seen = []
            for _ in range(2):  # keep-alive through haproxy: one header, two requests
                sock.sendall(request(close=False))
                status, body = read_response(sock)
                assert status == 200
                seen.append(json.loads(body))
            return seen, own

    async with serving(ssl_options=cert.server_context() if tls else None) as (_, backend):
        (tmp_path / "haproxy.cfg").write_text(haproxy_config(front, backend))
        with command([exe, "-f", str(tmp_path / "haproxy.cfg"), "-db"], front, workdir=tmp_path):
            reports, own = await asyncio.to_thread(through_haproxy)
    assert [(r["remote_ip"], r["port"]) for r in reports] == [own] * 2
    assert all(r["header_version"] == 2 for r in reports)
    assert {r["protocol"] for r in reports} == {"https" if tls else "http"}


# -- docs/tornado.rst: every example runs as written, only the port changed ---------------------------

DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "tornado.rst"


def docs_block(name: str) -> str:
    """The ``.. code-block::`` with ``:name: <name>``, dedented."""
    match = re.search(
        r"^\.\. code-block:: \w+\n   :name: " + re.escape(name) + r"\n\n((?:(?:    .*)?\n)+)",
        DOCS_PAGE.read_text(),
        re.MULTILINE,
    )
    assert match, f"no block named {name} in {DOCS_PAGE}"
    return "\n".join(line[4:] for line in match.group(1).splitlines()).strip() + "\n"


def test_docs_page_renders_cleanly() -> None:
    from doc_examples import missing_link_targets, rendering_warnings

    assert rendering_warnings(DOCS_PAGE) == ""
    assert missing_link_targets(DOCS_PAGE) == []


def ask_example(name: str, port: int, tls: bool, cert: Certificate) -> str:
    """What a client behind the proxy (a v2 header from 127.0.0.1) is told by the example."""
    with connect(port) as raw:
        raw.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4))
        sock = cert.client_context().wrap_socket(raw, server_hostname="localhost") if tls else raw
        if name == "tcpserver-example":
            greeting = sock.recv(65536).decode()
            sock.sendall(b"echo me\n")
            assert sock.recv(65536) == b"echo me\n"
            return greeting
        sock.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        status, body = read_response(sock)
        assert status == 200
        return body.decode()


@pytest.mark.parametrize(
    ("name", "fixed_port", "tls", "expected"),
    [
        ("hello-example", 8080, False, f"Hello, {REAL_V4[0]}:{REAL_V4[1]} (PROXY v2)\n"),
        ("settings-example", 8443, True, f"Hello, {REAL_V4[0]} over https\n"),
        ("tcpserver-example", 8080, False, f"Hello, {REAL_V4[0]}:{REAL_V4[1]} (PROXY v2)\n"),
    ],
)
def test_docs_example_serves_the_real_client(
    name: str, fixed_port: int, tls: bool, expected: str, tmp_path: Path, cert: Certificate
) -> None:
    import sys

    from support import CTRL_C_ABLE

    source = docs_block(name)
    assert str(fixed_port) in source
    (tmp_path / "cert.pem").write_bytes(cert.cert.read_bytes())
    (tmp_path / "key.pem").write_bytes(cert.key.read_bytes())
    for attempt in range(3):  # a free port can be taken by another process before the example binds it
        port = free_port()
        script = tmp_path / f"{name}.py"
        script.write_text(source.replace(str(fixed_port), str(port)))
        # As a reader runs it: from the directory holding it (and cert.pem, key.pem), Ctrl-C working.
        argv = [sys.executable, "-c", f"import os; os.chdir({str(tmp_path)!r}); {CTRL_C_ABLE}", str(script)]
        try:
            with command(argv, port, workdir=tmp_path):
                answer = ask_example(name, port, tls, cert)
            break
        except AssertionError as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
    assert answer == expected
