"""Daphne (Django Channels' server) through the real ``daphne -e proxyproto:...`` command.

Daphne builds its listeners with Twisted's ``serverFromString``, so the
``proxyproto:`` endpoint plugin reaches it with no change to Daphne: the ASGI
application's ``scope["client"]`` is the header's source, and a trusted peer's
header is at ``scope["extensions"]["proxyproto"]["header"]``.  The application is
a Channels ``ProtocolTypeRouter`` in front of ``web_kit.app``, a minimal ASGI
application that answers a JSON report of its scope, or of ``SCOPE_APP``'s, which
reports what its scope holds of the header.  Each server is the real command,
stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port, listening, require_haproxy, require_module, run_on
from web_kit import (
    DEST_V4,
    DEST_V6,
    REAL_V4,
    REAL_V6,
    ROOT,
    Certificate,
    command,
    connect,
    get,
    http2_bodies,
    self_signed,
    websocket,
    ws_receive,
    ws_send,
)

import proxyproto
from proxyproto import TLV, TLVType

require_module("daphne")
require_module("channels")
require_module("twisted.internet")


#: A Channels application: its protocol router in front of web_kit's ASGI app (no Django project needed).
CHANNELS_APP = """
from channels.routing import ProtocolTypeRouter
from web_kit import app

application = ProtocolTypeRouter({"http": app, "websocket": app})
"""


#: A Channels application answering what its scope holds of the connection's header (HTTP: a JSON
#: body; WebSocket: its first message).  It marks the dicts it was given: a mark found in a later
#: scope would be a dict shared between scopes.
SCOPE_APP = """
from channels.routing import ProtocolTypeRouter
from web_kit import reporting_app

import proxyproto.asgi


def report(scope):
    extensions = scope.get("extensions") or {}
    own = extensions.get(proxyproto.asgi.EXTENSION)
    header = proxyproto.asgi.header(scope)
    seen = {
        "extensions": sorted(extensions),
        "marked": "marked" in extensions or (own is not None and "marked" in own),
        "header": None if header is None else {"source": list(header.source), "authority": header.authority},
    }
    extensions["marked"] = True
    if own is not None:
        own["marked"] = True
    return seen


app = reporting_app(report)
application = ProtocolTypeRouter({"http": app, "websocket": app})
"""

AUTHORITY = "app.example"
#: A v2 header with a TLV, and what SCOPE_APP reports of it.
HEADER = proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=[TLV(TLVType.AUTHORITY, AUTHORITY.encode())])
SEEN_HEADER = {"source": list(REAL_V4), "authority": AUTHORITY}
#: What SCOPE_APP reports of a scope holding HEADER, in dicts of its own.
HELD = {"extensions": ["proxyproto"], "marked": False, "header": SEEN_HEADER}


def held(seen: dict[str, Any]) -> dict[str, Any]:
    """What SCOPE_APP's report says of the header (without web_kit's digest of the request's body)."""
    return {key: seen[key] for key in ("extensions", "marked", "header")}


@contextlib.contextmanager
def daphne(
    tmp_path: Path,
    endpoint: str,
    port: int,
    env: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
    app: str = CHANNELS_APP,
) -> Iterator[Path]:
    """``daphne [flags] -e <endpoint> channels_app:application`` until the block ends; its output file.

    ``app``: the source of ``channels_app.py``.
    """
    (tmp_path / "channels_app.py").write_text(app)
    args = [sys.executable, "-m", "daphne", *flags, "-e", endpoint, "channels_app:application"]
    paths = os.pathsep.join([str(tmp_path), str(ROOT), str(ROOT / "tests" / "web")])
    with command(args, port, env={"PYTHONPATH": paths, **(env or {})}, workdir=tmp_path):
        yield tmp_path / f"server-{port}.out"


@pytest.mark.parametrize(
    "header, source",
    [
        (proxyproto.encode_v1(REAL_V4, DEST_V4), REAL_V4),
        (proxyproto.encode_v1(REAL_V6, DEST_V6), REAL_V6),
        (proxyproto.encode_v2(REAL_V4, DEST_V4), REAL_V4),
        (proxyproto.encode_v2(REAL_V6, DEST_V6), REAL_V6),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-inet", "v2-inet6"],
)
def test_scope_client_is_the_headers_source(tmp_path: Path, header: bytes, source: tuple[str, int]) -> None:
    port = free_port()
    with daphne(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), header)
            try:
                for _ in range(2):  # keep-alive: every request of the connection
                    status, seen = await conn.request()
                    assert status == 200 and seen["client"] == list(source), seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_a_websockets_scope_client_is_the_headers_source(tmp_path: Path) -> None:
    port = free_port()
    with daphne(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), proxyproto.encode_v1(REAL_V4, DEST_V4))
            try:
                seen = await websocket(conn)
                assert seen["client"] == list(REAL_V4), seen
                ws_send(conn, "echo")
                assert await ws_receive(conn) == "echo"
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_proxy_headers_never_replace_a_websockets_client_from_the_header(tmp_path: Path) -> None:
    """``--proxy-headers`` behind the endpoint: the client's own X-Forwarded-For is not its address."""
    port = free_port()
    endpoint = f"proxyproto:tcp:{port}:interface=127.0.0.1"
    with daphne(tmp_path, endpoint, port, flags=("--proxy-headers",)) as out:

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), proxyproto.encode_v1(REAL_V4, DEST_V4))
            try:
                seen = await websocket(conn, headers="X-Forwarded-For: 198.51.100.66\r\nX-Forwarded-Port: 1\r\n")
                assert seen["client"] == list(REAL_V4), seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)
    assert "--proxy-headers" in out.read_text()


def test_an_untrusted_peers_header_is_not_believed(tmp_path: Path) -> None:
    port = free_port()
    with daphne(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1:untrusted_policy=IGNORE", port) as out:

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), proxyproto.encode_v2(REAL_V4, DEST_V4), local="127.0.0.2")
            own = conn.writer.get_extra_info("sockname")
            try:
                status, seen = await conn.request()
                assert status == 200 and seen["client"] == [own[0], own[1]], seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)
    assert "127.0.0.2" in out.read_text() and "not trusted" in out.read_text()


def test_behind_real_haproxy_send_proxy_v2(tmp_path: Path) -> None:
    exe = require_haproxy()
    backend, front = free_port(), free_port()
    config = (
        "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 5s\n    timeout server 5s\n\n"
        f"listen fe\n    bind 127.0.0.1:{front}\n    server app 127.0.0.1:{backend} send-proxy-v2\n"
    )
    (tmp_path / "haproxy.cfg").write_text(config)
    with (
        daphne(tmp_path, f"proxyproto:tcp:{backend}:interface=127.0.0.1", backend),
        command([exe, "-f", str(tmp_path / "haproxy.cfg"), "-db"], front, workdir=tmp_path),
    ):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", front), local="127.0.0.2")
            own = conn.writer.get_extra_info("sockname")
            try:
                for _ in range(2):
                    status, seen = await conn.request()
                    assert status == 200 and seen["client"] == [own[0], own[1]], seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_an_ipv6_listener_and_tls_after_the_header(tmp_path: Path) -> None:
    made = self_signed(tmp_path)
    if made is None:
        pytest.skip("openssl is not installed")
    cert: Certificate = made
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
    port, tls_port = free_port(), free_port()
    tls = f"proxyproto:ssl:{tls_port}:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}"
    with daphne(tmp_path, rf"proxyproto:tcp6:{port}:interface=\:\:1", port), daphne(tmp_path, tls, tls_port):

        async def scenario() -> None:
            status, seen = await get(("::1", port), proxyproto.encode_v2(REAL_V6, DEST_V6))
            assert status == 200 and seen["client"] == list(REAL_V6), seen
            status, seen = await get(
                ("127.0.0.1", tls_port), proxyproto.encode_v2(REAL_V4, DEST_V4), tls=cert.client_context()
            )
            assert status == 200 and seen["client"] == list(REAL_V4) and seen["scheme"] == "https", seen

        run_on("asyncio", scenario)


def test_sigterm_with_connections_waiting_for_their_header_returns_promptly(tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "daphne", "-e", f"proxyproto:tcp:{port}:interface=127.0.0.1", "web_kit:app"]
    with command(args, port, workdir=tmp_path) as proc:
        parked = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        try:
            parked[0].sendall(proxyproto.encode_v2(REAL_V4, DEST_V4)[:10])  # one with half a header
            time.sleep(0.3)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            took = time.monotonic() - start
        finally:
            for sock in parked:
                sock.close()
    assert took < 5, f"daphne took {took:.1f} s to stop with 5 connections waiting for their header"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    made = self_signed(tmp_path_factory.mktemp("daphne-tls"))
    if made is None:
        pytest.skip("openssl is not installed")
    return made


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls-after-the-header"])
def test_trusted_peers_header_and_its_tlvs_are_in_the_scope_of_every_request_of_the_connection(
    tmp_path: Path, request: pytest.FixtureRequest, tls: bool
) -> None:
    port = free_port()
    endpoint = f"proxyproto:tcp:{port}:interface=127.0.0.1:trusted=127.0.0.1"
    context = None
    if tls:
        cert: Certificate = request.getfixturevalue("cert")
        endpoint = f"proxyproto:ssl:{port}:interface=127.0.0.1:trusted=127.0.0.1:privateKey={cert.key}"
        endpoint += f":certKey={cert.cert}"
        context = cert.client_context()
    with daphne(tmp_path, endpoint, port, app=SCOPE_APP):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), HEADER, tls=context)
            try:
                for _ in range(2):  # keep-alive: each request's scope has the header, in dicts of its own
                    status, seen = await conn.request()
                    assert status == 200, seen
                    assert held(seen) == HELD, seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_trusted_peers_header_is_in_the_scope_of_every_http2_stream(tmp_path: Path, cert: Certificate) -> None:
    """HTTP/2 (TLS after the header, ALPN h2): two streams on the connection, each scope with the header."""
    require_module("h2")
    port = free_port()
    endpoint = f"proxyproto:ssl:{port}:interface=127.0.0.1:trusted=127.0.0.1:privateKey={cert.key}"
    context = cert.client_context()
    context.set_alpn_protocols(["h2"])
    with daphne(tmp_path, f"{endpoint}:certKey={cert.cert}", port, app=SCOPE_APP):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), HEADER, tls=context)
            try:
                assert conn.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
                bodies = await http2_bodies(conn, scheme="https")
            finally:
                await conn.close()
            for body in bodies:
                seen = json.loads(body)
                assert held(seen) == HELD, seen

        run_on("asyncio", scenario)


def test_trusted_peers_header_and_its_tlvs_are_in_the_websocket_scope(tmp_path: Path) -> None:
    port = free_port()
    with daphne(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1:trusted=127.0.0.1", port, app=SCOPE_APP):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", port), HEADER)
            try:
                seen = await websocket(conn)
                assert held(seen) == HELD, seen
            finally:
                await conn.close()

        run_on("asyncio", scenario)


def test_an_untrusted_peers_header_is_never_in_the_scope(tmp_path: Path) -> None:
    """127.0.0.2 against a 127.0.0.1 trust list, its header read and removed (IGNORE): no "proxyproto" key.

    A plain ``tcp:`` endpoint of the same Daphne keeps Daphne's scope too.
    """
    port, plain = free_port(), free_port()
    endpoint = f"proxyproto:tcp:{port}:interface=127.0.0.1:trusted=127.0.0.1:untrusted_policy=IGNORE"
    flags = ("-e", f"tcp:{plain}:interface=127.0.0.1")
    with daphne(tmp_path, endpoint, port, flags=flags, app=SCOPE_APP):
        deadline = time.monotonic() + 10
        while not listening(plain):
            assert time.monotonic() < deadline, "the plain endpoint did not start listening"
            time.sleep(0.05)
        nothing = {"extensions": [], "marked": False, "header": None}  # no "proxyproto" key at all

        async def scenario() -> None:
            for address, head in ((("127.0.0.1", port), HEADER), (("127.0.0.1", plain), b"")):
                conn = await connect(address, head, local="127.0.0.2")
                try:
                    status, seen = await conn.request()
                    assert status == 200 and held(seen) == nothing, (address, seen)
                finally:
                    await conn.close()
            conn = await connect(("127.0.0.1", port), HEADER, local="127.0.0.2")
            try:
                assert held(await websocket(conn)) == nothing
            finally:
                await conn.close()

        run_on("asyncio", scenario)


#: ``daphne`` whose Server makes its applications otherwise than ``create_application(protocol, scope)``.
CHANGED_DAPHNE = """
import daphne.server
from daphne.cli import CommandLineInterface


def create_application(self, scope, protocol):
    raise AssertionError("never called: the endpoint refuses this Daphne before listening")


daphne.server.Server.create_application = create_application
CommandLineInterface.entrypoint()
"""


def test_a_daphne_that_makes_its_applications_otherwise_is_refused_before_listening(tmp_path: Path) -> None:
    """Its scopes would silently lack the header: the endpoint says so and Daphne does not start."""
    port = free_port()
    args = [sys.executable, "-c", CHANGED_DAPHNE, "-e", f"proxyproto:tcp:{port}:interface=127.0.0.1", "web_kit:app"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "web")])}
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode != 0, done.stderr
    assert "this Daphne's Server has no create_application(protocol, scope)" in done.stderr, done.stderr
    assert not listening(port)
