"""waitress behind a proxy: ``REMOTE_ADDR``/``REMOTE_PORT`` are the real client, refusals are closed and logged once.

Every test runs a real waitress server (:func:`proxyproto.waitress.create_server`)
in a thread on loopback and talks raw HTTP/1.1 to it over real sockets, so
what is checked is what a WSGI application would see behind HAProxy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port, require_module

import proxyproto

try:
    require_module("waitress")
except pytest.skip.Exception as missing:  # support.require_module skips without allow_module_level
    pytest.skip(str(missing), allow_module_level=True)

from waitress import wasyncore

from proxyproto.waitress import create_server

DOCS = Path(__file__).resolve().parents[2] / "docs" / "web-servers.rst"

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)

#: A body with every byte value, CRLFs and something that looks like a header.
BODY = (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + bytes(range(256))) * 64


class App:
    """A WSGI app that reports what waitress told it, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.calls += 1
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        header = environ.get("proxyproto.header")
        report = {
            "remote_addr": environ["REMOTE_ADDR"],
            "remote_port": environ["REMOTE_PORT"],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
            "header_version": None if header is None else header.version,
        }
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(report).encode()]


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", **kw: Any) -> Iterator[Any]:
    """A waitress server on ``host``, port 0, serving in a thread until the block ends."""
    listen = f"[{host}]:0" if ":" in host else f"{host}:0"
    server = create_server(app, listen=listen, threads=2, **kw)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        # close_all runs in the loop thread (through waitress's trigger); the loop ends with its map.
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        thread.join(10)
        server.task_dispatcher.shutdown()
        assert not thread.is_alive()


def address(server: Any) -> tuple[str, int]:
    return server.socket.getsockname()[:2]  # type: ignore[no-any-return]


def request(body: bytes = BODY, *, keep_alive: bool = False) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"POST /echo HTTP/1.1\r\nHost: example\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n"
        % (len(body), connection)
    ) + body


def exchange(server: Any, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` in one write, read until the server closes."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def report_of(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:200]
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


# -- the real client ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("source", "destination"), [(REAL_V4, DEST_V4), (REAL_V6, DEST_V6)], ids=["ipv4", "ipv6"])
def test_remote_addr_and_port_are_the_headers_source(
    version: int, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    app = App()
    with running(app) as server:
        response = exchange(server, header_bytes(version, source, destination) + request())
    report = report_of(response)
    assert (report["remote_addr"], report["remote_port"]) == (source[0], str(source[1]))
    assert report["header_version"] == version


def test_post_body_after_the_header_is_byte_exact() -> None:
    """Header, request head and body in one segment: waitress's own parser gets the rest, unchanged."""
    app = App()
    with running(app) as server:
        report = report_of(exchange(server, proxyproto.encode_v2(REAL_V4, DEST_V4) + request(BODY)))
    assert report["body_length"] == len(BODY)
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


def test_header_in_pieces_then_request() -> None:
    """A header trickling in over several reads, the last piece carrying the request's first bytes."""
    app = App()
    data = proxyproto.encode_v1(REAL_V6, DEST_V6) + request()
    with running(app) as server, socket.create_connection(address(server), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cuts = [0, 3, 9, 30, len(data)]  # the v1 line is 45 bytes: the last piece ends it and starts the request
        for start, stop in zip(cuts, cuts[1:]):
            sock.sendall(data[start:stop])
            time.sleep(0.05)
        report = report_of(read_all(sock))
    assert report["remote_addr"] == REAL_V6[0]
    assert report["body_sha256"] == hashlib.sha256(BODY).hexdigest()


def test_every_request_of_a_keep_alive_connection_has_the_real_client() -> None:
    app = App()
    with running(app) as server, socket.create_connection(address(server), timeout=10) as sock:
        sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4) + request(b"one", keep_alive=True))
        first = b""
        while not first.endswith(b"}"):
            first += sock.recv(65536)
        sock.sendall(request(b"two"))
        second = read_all(sock)
    assert report_of(first)["remote_addr"] == REAL_V4[0]
    assert report_of(second)["remote_addr"] == REAL_V4[0]
    assert app.calls == 2


def test_ipv6_listener_serves_an_ipv4_source() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    app = App()
    with running(app, host="::1") as server:
        with socket.create_connection(("::1", address(server)[1]), timeout=10) as sock:
            sock.sendall(proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
            report = report_of(read_all(sock))
    assert (report["remote_addr"], report["remote_port"]) == (REAL_V4[0], str(REAL_V4[1]))


def test_unix_listener_serves_the_headers_source(tmp_path: Path) -> None:
    """haproxy in front of a UNIX-socket backend: REMOTE_ADDR is the header's, not waitress's "localhost"."""
    path = str(tmp_path / "waitress.sock")
    app = App()
    server = create_server(app, unix_socket=path, threads=2)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(proxyproto.encode_v2(REAL_V6, DEST_V6) + request())
            report = report_of(read_all(sock))
    finally:
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        thread.join(10)
        server.task_dispatcher.shutdown()
    assert (report["remote_addr"], report["remote_port"]) == (REAL_V6[0], str(REAL_V6[1]))


def test_local_header_keeps_the_socket_address() -> None:
    app = App()
    with running(app) as server:
        report = report_of(exchange(server, proxyproto.encode_v2(command=proxyproto.Command.LOCAL) + request()))
    assert report["remote_addr"] == "127.0.0.1"
    assert report["header_version"] == 2


# -- trust ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("trusted", ["10.0.0.0/8,127.0.0.1", "*", ["127.0.0.0/8"], "::1, 127.0.0.0/8"])
def test_trust_lists_in_every_spelling(trusted: Any) -> None:
    app = App()
    with running(app, trusted=trusted) as server:
        report = report_of(exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
    assert report["remote_addr"] == REAL_V4[0]


def test_untrusted_peers_header_never_reaches_the_app(caplog: pytest.LogCaptureFixture) -> None:
    """SKIP (the default for untrusted peers): the header is payload, waitress answers 400."""
    app = App()
    with running(app, trusted="10.0.0.0/8") as server:
        response = exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
        served = report_of(exchange(server, request()))
    assert re.match(rb"HTTP/1\.[01] 400 ", response), response[:100]
    assert app.calls == 1  # only the plain request
    assert served["remote_addr"] == "127.0.0.1"
    assert served["header_version"] is None


def test_untrusted_reject_closes_a_spoof_attempt(caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    with (
        caplog.at_level(logging.DEBUG, logger="proxyproto"),
        running(app, trusted="10.0.0.0/8", untrusted_policy="REJECT") as server,
    ):
        response = exchange(server, proxyproto.encode_v2(REAL_V4, DEST_V4) + request())
        served = report_of(exchange(server, request()))
    assert response == b""
    assert app.calls == 1
    assert served["remote_addr"] == "127.0.0.1"
    records = proxy_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "127.0.0.1:" in records[0].getMessage() and "refuses" in records[0].getMessage()
    assert_no_tracebacks(caplog)


def test_policy_for_decides_per_connection_from_peer_and_local_address() -> None:
    """The hook replaces the three trust knobs (here ``trusted=""``, which alone trusts no one)."""
    calls: list[tuple[Any, Any]] = []

    def policy_for(peer: Any, local: Any) -> str:
        calls.append((peer, local))
        return "REQUIRE" if len(calls) == 1 else "SKIP"

    app = App()
    with running(app, trusted="", policy_for=policy_for) as server:
        listening = address(server)
        trusted = report_of(exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
        skipped = exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
    assert trusted["remote_addr"] == REAL_V4[0] and trusted["header_version"] == 1
    assert re.match(rb"HTTP/1\.[01] 400 ", skipped), skipped[:100]  # SKIP: the header was payload
    assert [peer[0] for peer, _ in calls] == ["127.0.0.1", "127.0.0.1"]
    assert [tuple(local[:2]) for _, local in calls] == [listening] * 2


def test_policy_for_that_raises_closes_that_connection_with_one_error_line(caplog: pytest.LogCaptureFixture) -> None:
    def policy_for(peer: Any, local: Any) -> str:
        raise RuntimeError("no such proxy")

    app = App()
    with running(app, policy_for=policy_for) as server:
        response = exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
    assert response == b"" and app.calls == 0
    records = proxy_records(caplog)
    assert [r.levelno for r in records] == [logging.ERROR], caplog.text
    assert "policy_for failed: RuntimeError: no such proxy" in records[0].getMessage()


def test_untrusted_policy_use_is_refused_before_binding() -> None:
    with pytest.raises(ValueError, match="untrusted"):
        create_server(App(), listen="127.0.0.1:0", trusted="10.0.0.0/8", untrusted_policy="USE")


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
def test_malformed_header_is_closed_with_one_log_line(garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    with caplog.at_level(logging.DEBUG, logger="proxyproto"), running(app) as server:
        response = exchange(server, garbage + b"\0" * 64 + request())
    assert response == b""
    assert app.calls == 0
    records = proxy_records(caplog)
    assert len(records) == 1, caplog.text
    assert records[0].levelno == logging.WARNING and records[0].getMessage().startswith("127.0.0.1:")
    assert_no_tracebacks(caplog)


def test_require_closes_a_plain_request_and_use_serves_it(caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    with caplog.at_level(logging.DEBUG, logger="proxyproto"):
        with running(app) as server:
            refused = exchange(server, request())
        with running(app, policy="USE") as server:
            served = report_of(exchange(server, request()))
            with_header = report_of(exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
    assert refused == b""
    assert served["remote_addr"] == "127.0.0.1" and served["body_sha256"] == hashlib.sha256(BODY).hexdigest()
    assert with_header["remote_addr"] == REAL_V4[0]
    records = proxy_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert_no_tracebacks(caplog)


def test_ignore_reads_the_header_but_keeps_the_socket_address() -> None:
    app = App()
    with running(app, policy="IGNORE") as server:
        report = report_of(exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request()))
    assert report["remote_addr"] == "127.0.0.1" and report["header_version"] == 1


@pytest.mark.parametrize(("sent", "level"), [(b"", logging.INFO), (b"PROXY TCP4 ", logging.WARNING)])
def test_header_deadline_closes_silent_and_partial_clients(
    sent: bytes, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()
    with caplog.at_level(logging.DEBUG, logger="proxyproto"), running(app, header_timeout=0.3) as server:
        with socket.create_connection(address(server), timeout=10) as sock:
            sock.sendall(sent)
            started = time.monotonic()
            assert read_all(sock) == b""
            elapsed = time.monotonic() - started
    # The deadline is checked on every pass of waitress's loop, which wakes at least once a second.
    assert 0.25 < elapsed < 3.0
    records = proxy_records(caplog)
    assert len(records) == 1 and records[0].levelno == level, caplog.text
    assert_no_tracebacks(caplog)


def test_peer_closing_before_a_byte_is_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    with caplog.at_level(logging.DEBUG, logger="proxyproto"), running(app) as server:
        socket.create_connection(address(server), timeout=10).close()
        exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())  # a served one, after it
    records = proxy_records(caplog)
    assert [r.levelno for r in records] == [logging.DEBUG], caplog.text


def test_max_pending_closes_the_oldest_waiting_connection(caplog: pytest.LogCaptureFixture) -> None:
    app = App()
    with caplog.at_level(logging.DEBUG, logger="proxyproto"), running(app, max_pending=2) as server:
        socks = []
        try:
            for _ in range(3):
                socks.append(socket.create_connection(address(server), timeout=10))
                time.sleep(0.1)
            assert read_all(socks[0]) == b""  # the oldest, closed
            socks[1].sendall(proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
            assert report_of(read_all(socks[1]))["remote_addr"] == REAL_V4[0]
        finally:
            for sock in socks:
                sock.close()
    assert any("max_pending" in r.getMessage() for r in proxy_records(caplog)), caplog.text


@pytest.mark.parametrize(
    "knobs",
    [{"max_pending": 200}, {"settings": proxyproto.Settings(max_pending=9)}, {}],
    ids=["max_pending", "settings", "default"],
)
def test_max_pending_above_half_the_connection_limit_is_lowered_said_once_and_named_in_evictions(
    knobs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Parked connections count toward waitress's ``connection_limit``: a chosen ``max_pending`` above
    half of it costs one WARNING naming both (the default is lowered as documented, without a line),
    and an eviction names the limit in force."""
    asked = knobs["settings"].max_pending if "settings" in knobs else knobs.get("max_pending")
    app = App()
    with caplog.at_level(logging.DEBUG, logger="proxyproto"):
        with running(app, connection_limit=8, **knobs) as server:
            socks = []
            try:
                for _ in range(5):
                    socks.append(socket.create_connection(address(server), timeout=10))
                    time.sleep(0.05)
                assert read_all(socks[0]) == b""  # four wait at most: the oldest, closed
                socks[1].sendall(proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
                assert report_of(read_all(socks[1]))["remote_addr"] == REAL_V4[0]
            finally:
                for sock in socks:
                    sock.close()
    lines = [(r.levelno, r.getMessage()) for r in proxy_records(caplog)]
    start = [(lvl, line) for lvl, line in lines if "connection_limit=8 (" in line]
    said = (
        f"max_pending={asked} is more than half of waitress's connection_limit=8 (connections waiting for "
        "their PROXY header count toward it): at most 4 wait; raise connection_limit to let more wait"
    )
    assert start == ([] if asked is None else [(logging.WARNING, said)]), lines
    evictions = [line for _, line in lines if "already wait" in line]
    assert evictions and all(
        "closed: 4 connections already wait for their header "
        "(max_pending lowered to 4, half of waitress's connection_limit=8)" in line
        for line in evictions
    ), evictions


def test_max_pending_within_half_the_connection_limit_is_kept_without_a_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="proxyproto"):
        server = create_server(App(), listen="127.0.0.1:0", threads=1, connection_limit=8, max_pending=4)
        try:
            assert server.proxy_settings.settings.max_pending == 4
        finally:
            server.close()
            server.task_dispatcher.shutdown()
    assert not [r for r in proxy_records(caplog) if "connection_limit" in r.getMessage()], caplog.text


def test_core_does_not_import_waitress() -> None:
    """No new runtime dependency: ``import proxyproto`` (and its asyncio layers) never imports waitress."""
    code = (
        "import sys, proxyproto, proxyproto.aio, proxyproto.aio_protocol; "
        "assert 'waitress' not in sys.modules, sorted(m for m in sys.modules if m.startswith('waitress'))"
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


def test_docs_waitress_example_runs(tmp_path: Path) -> None:
    """The documented script, unchanged but for its port, serves the real client's address."""
    port = free_port()
    source = docs_block("waitress-example").replace("8080", str(port))
    script = tmp_path / "example.py"
    script.write_text(source)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
            sock.sendall(
                proxyproto.encode_v2(REAL_V4, DEST_V4) + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            response = read_all(sock)
    finally:
        process.terminate()
        process.wait(10)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert response.endswith(b"Hello, 192.0.2.10\n")


def test_silent_clients_up_to_the_connection_limit_cannot_lock_out_a_good_one() -> None:
    """Parked connections count toward waitress's ``connection_limit``: ``max_pending`` is kept
    below it, so the oldest silent one is evicted and a good client is served at once (with the
    default 256 above a limit of 10, waitress stopped accepting for the whole header timeout)."""
    app = App()
    with running(app, connection_limit=10, header_timeout=30.0) as server:
        silent = [socket.create_connection(address(server), timeout=10) for _ in range(12)]
        try:
            time.sleep(0.3)
            began = time.monotonic()
            answer = exchange(server, proxyproto.encode_v1(REAL_V4, DEST_V4) + request())
            assert report_of(answer)["remote_addr"] == REAL_V4[0]
            assert time.monotonic() - began < 2.0
        finally:
            for sock in silent:
                sock.close()
