"""A client behind a TCP-mode proxy writes its own X-Forwarded-* lines: they must not override what the
trusted proxy's PROXY header says (the address) nor the scheme, in any adapter.

Daphne with ``--proxy-headers``, gunicorn's WSGI workers (whose default ``--forwarded-allow-ips`` holds
the proxy's own address), Tornado with ``xheaders=True``, waitress with ``trusted_proxy`` and hypercorn's
``ProxyFixMiddleware`` each once believed such lines.  Real servers
on loopback, stopped by PID; every wait bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import async_test, free_port, require_module
from web_kit import command

CEILING = 20.0
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
SPOOF = "X-Forwarded-For: 198.51.100.66\r\nX-Real-Ip: 198.51.100.66\r\nX-Forwarded-Proto: https\r\n"


def exchange(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    """``data`` on a fresh connection from 127.0.0.1 (a trusted proxy); the status and the JSON report."""
    with socket.create_connection(("127.0.0.1", port), timeout=CEILING) as sock:
        sock.sendall(data)
        response = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def get(extra: str = "") -> bytes:
    return f"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n".encode()


# -- Daphne ----------------------------------------------------------------------------------------


def test_daphne_proxy_headers_never_replace_a_trusted_headers_client(tmp_path: Path) -> None:
    require_module("daphne")
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "daphne",
        "--proxy-headers",
        "-e",
        f"proxyproto:tcp:{port}:interface=127.0.0.1",
        "gunicorn_kit:asgi_app",
    ]
    with command(args, port, workdir=tmp_path):
        status, report = exchange(port, V1 + get(SPOOF + "X-Forwarded-Port: 1\r\n"))
    assert status == 200
    assert report["client"] == ["203.0.113.7", 5555]
    assert report["scheme"] == "http"
    # The endpoint turned Daphne's --proxy-headers off, and said so once.
    said = (tmp_path / f"server-{port}.out").read_text()
    assert said.count("--proxy-headers") == 1 and "WARNING" in said, said


# -- gunicorn's WSGI workers -----------------------------------------------------------------------


V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


@pytest.mark.parametrize("worker", ["sync", "gthread"])
@pytest.mark.parametrize("header", [V1_UNKNOWN, V2_LOCAL], ids=["v1-unknown", "v2-local"])
def test_gunicorn_scheme_is_never_set_by_a_client_behind_the_trusted_proxy(
    worker: str, header: bytes, tmp_path: Path
) -> None:
    require_module("gunicorn")
    import gunicorn_kit

    with gunicorn_kit.gunicorn(worker, tmp_path, workers=1) as server:
        status, report = exchange(server.port, header + get(SPOOF))
    assert status == 200
    assert report["scheme"] == "http", "a client-written X-Forwarded-Proto set the scheme"


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_scheme_is_never_set_by_a_client_of_the_trusted_proxy_without_a_header(
    worker: str, tmp_path: Path
) -> None:
    require_module("gunicorn")
    import gunicorn_kit

    with gunicorn_kit.gunicorn(worker, tmp_path, "--proxy-protocol", "auto", workers=1) as server:
        status, report = exchange(server.port, get(SPOOF))
        log = server.log()
    assert status == 200
    assert report["scheme"] == "http", "a client-written X-Forwarded-Proto set the scheme"
    assert "secure_scheme_headers and forwarder_headers are off for peers trusted" in log, log


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_forwarded_allow_ips_chosen_by_the_operator_keeps_gunicorns_meaning(
    worker: str, tmp_path: Path
) -> None:
    require_module("gunicorn")
    import gunicorn_kit

    env = {"FORWARDED_ALLOW_IPS": "127.0.0.1"}
    with gunicorn_kit.gunicorn(worker, tmp_path, env=env, workers=1) as server:
        status, report = exchange(server.port, V1_UNKNOWN + get(SPOOF))
    assert status == 200
    assert report["scheme"] == "https"


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_keeps_its_own_forwarded_headers_for_a_trusted_peer_under_skip(worker: str, tmp_path: Path) -> None:
    """SKIP reads no header: gunicorn's forwarded-header rules apply to its trusted proxy as without this library."""
    require_module("gunicorn")
    import gunicorn_kit

    env = {"PROXYPROTO_POLICY": "SKIP"}
    with gunicorn_kit.gunicorn(worker, tmp_path, env=env, workers=1) as server:
        status, report = exchange(server.port, get(SPOOF))
    assert status == 200
    assert report["scheme"] == "https"


# -- Tornado ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tornado_serving(**kw: Any) -> AsyncIterator[int]:
    require_module("tornado")
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler

    from proxyproto.tornado import ProxyHTTPServer

    class Report(RequestHandler):
        def get(self) -> None:
            self.finish({"client": self.request.remote_ip, "scheme": self.request.protocol})

    server = ProxyHTTPServer(Application([(r"/.*", Report)]), **kw)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    try:
        yield sockets[0].getsockname()[1]
    finally:
        server.stop()
        await asyncio.wait_for(server.close_all_connections(), CEILING)


@async_test
async def test_tornado_xheaders_never_take_the_client_from_a_client_behind_the_trusted_proxy() -> None:
    async with tornado_serving(xheaders=True) as port:
        status, report = await asyncio.to_thread(exchange, port, V1_UNKNOWN + get(SPOOF))
    assert status == 200
    assert report["client"] == "127.0.0.1"


@async_test
async def test_tornado_xheaders_never_take_the_scheme_from_a_client_behind_the_trusted_proxy() -> None:
    async with tornado_serving(xheaders=True) as port:
        status, report = await asyncio.to_thread(exchange, port, V1 + get(SPOOF))
    assert status == 200
    assert report == {"client": "203.0.113.7", "scheme": "http"}


# -- waitress --------------------------------------------------------------------------------------


def waitress_report(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """A WSGI app answering the client, the scheme and the forwarded lines it was given."""
    report = {
        "client": environ["REMOTE_ADDR"],
        "scheme": environ["wsgi.url_scheme"],
        "x_forwarded_for": environ.get("HTTP_X_FORWARDED_FOR"),
        "marked": sorted(key for key in environ if key.startswith("proxyproto.") and key != "proxyproto.header"),
    }
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(report).encode()]


@contextlib.contextmanager
def waitress_serving(**kw: Any) -> Iterator[int]:
    """proxyproto.waitress serving :func:`waitress_report` on loopback in a thread; yields its port."""
    require_module("waitress")
    from waitress import wasyncore

    from proxyproto.waitress import create_server

    server = create_server(waitress_report, listen="127.0.0.1:0", threads=1, **kw)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    try:
        yield server.effective_port
    finally:
        # close_all runs in the loop thread (through waitress's trigger); the loop ends with its map.
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        thread.join(CEILING)
        server.task_dispatcher.shutdown()
        assert not thread.is_alive()


WAITRESS_TRUSTED_PROXY = {"trusted_proxy": "127.0.0.1", "trusted_proxy_headers": "x-forwarded-for x-forwarded-proto"}
V2_LOCAL_HEADER = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


@pytest.mark.parametrize(
    ("policy", "header", "client"),
    [
        ("REQUIRE", V2_LOCAL_HEADER, "127.0.0.1"),
        ("REQUIRE", V1_UNKNOWN, "127.0.0.1"),
        ("REQUIRE", V1, "203.0.113.7"),
        ("IGNORE", V1, "127.0.0.1"),
        ("USE", b"", "127.0.0.1"),
    ],
    ids=["require-v2-local", "require-v1-unknown", "require-v1", "ignore-v1", "use-no-header"],
)
def test_waitress_trusted_proxy_never_takes_the_client_or_scheme_from_a_client_behind_the_trusted_proxy(
    policy: str, header: bytes, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator kept the PROXY-protocol proxy in waitress's ``trusted_proxy`` (from a ``mode http`` past)."""
    with caplog.at_level(logging.INFO, logger="proxyproto"):
        with waitress_serving(policy=policy, **WAITRESS_TRUSTED_PROXY) as port:
            status, report = exchange(port, header + get(SPOOF))
    assert status == 200
    # The relayed lines are removed as waitress removes an untrusted peer's; no mark is left behind.
    assert report == {"client": client, "scheme": "http", "x_forwarded_for": None, "marked": []}
    said = [r.getMessage() for r in caplog.records if r.name == "proxyproto"]
    assert sum("trusted_proxy is not applied" in line for line in said) == 1, said


def test_waitress_keeps_relayed_lines_unused_when_told_not_to_clear_untrusted_ones() -> None:
    with waitress_serving(clear_untrusted_proxy_headers=False, **WAITRESS_TRUSTED_PROXY) as port:
        status, report = exchange(port, V1_UNKNOWN + get(SPOOF))
    assert status == 200
    assert report == {"client": "127.0.0.1", "scheme": "http", "x_forwarded_for": "198.51.100.66", "marked": []}


def test_waitress_trusted_proxy_still_applies_to_peers_not_trusted_to_send_the_header() -> None:
    """No PROXY-protocol peer here (``trusted=""``: SKIP for everyone): waitress's rules, as without this library."""
    with waitress_serving(trusted="", **WAITRESS_TRUSTED_PROXY) as port:
        status, report = exchange(port, get(SPOOF))
    assert status == 200
    assert (report["client"], report["scheme"]) == ("198.51.100.66", "https")


@pytest.mark.parametrize("over_header", [False, True], ids=["default", "trusted_proxy_over_header"])
def test_waitress_trusted_proxy_over_header_compares_the_headers_client_with_trusted_proxy(over_header: bool) -> None:
    """An HTTP proxy (a CDN at 203.0.113.7) in front of the PROXY-protocol proxy: only the opt-in believes it."""
    kw = {"trusted_proxy": "203.0.113.7", "trusted_proxy_headers": "x-forwarded-for x-forwarded-proto"}
    with waitress_serving(trusted_proxy_over_header=over_header, **kw) as port:
        status, report = exchange(port, V1 + get(SPOOF))
        # The proxy's own address, from a LOCAL header, is no trusted_proxy: never believed.
        local_status, local_report = exchange(port, V2_LOCAL_HEADER + get(SPOOF))
    assert status == local_status == 200
    expected = ("198.51.100.66", "https") if over_header else ("203.0.113.7", "http")
    assert (report["client"], report["scheme"]) == expected
    assert (local_report["client"], local_report["scheme"]) == ("127.0.0.1", "http")
