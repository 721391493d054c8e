"""A trusted peer's header is in every ASGI scope of its connection, at ``scope["extensions"]["proxyproto"]``.

Through the real servers: uvicorn with ``proxyproto.uvicorn`` (h11 and httptools, on asyncio's
loop and uvloop's) and hypercorn with ``proxyproto.hypercorn.serve``.  The application
answers with what its scope holds (``proxyproto.asgi.header(scope)``, the keys of
``scope["extensions"]``, and whether any ``ProxyHeader`` is anywhere in the scope), for HTTP
requests and WebSockets.  A trusted peer's header, TLVs included, is there for every request of
the connection; an untrusted peer's never is, under any policy, nor the header of a connection a
``policy_for`` hook does not trust: the ``"proxyproto"`` key is then absent, not None.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable

import pytest
from support import free_port, listening, require_module, run_on, uvicorn_server
from web_kit import DEST_V4, REAL_V4, Certificate, connect, http2_bodies, reporting_app, self_signed, websocket

import proxyproto
import proxyproto.asgi
from proxyproto import TLV, TLVType

AUTHORITY = b"app.example"
UNIQUE_ID = b"req-7f3a-0001"
HEADER = proxyproto.encode_v2(
    REAL_V4, DEST_V4, tlvs=[TLV(TLVType.AUTHORITY, AUTHORITY), TLV(TLVType.UNIQUE_ID, UNIQUE_ID)]
)
LOCAL = proxyproto.encode_v2(command=proxyproto.Command.LOCAL)
#: What the application reports for HEADER.
SEEN_HEADER = {
    "command": "PROXY",
    "source": list(REAL_V4),
    "authority": AUTHORITY.decode(),
    "unique_id": UNIQUE_ID.decode(),
}
#: Trust lists under which 127.0.0.1 (every client here) is, and is not, a trusted peer.
TRUSTED, UNTRUSTED = "127.0.0.1", "10.0.0.0/8"


# -- the application ------------------------------------------------------------------------------


def _holds_a_header(value: Any) -> bool:
    if isinstance(value, proxyproto.ProxyHeader):
        return True
    if isinstance(value, dict):
        return any(_holds_a_header(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_a_header(v) for v in value)
    return False


def report(scope: dict[str, Any]) -> dict[str, Any]:
    """What the scope holds of the connection's header."""
    header = proxyproto.asgi.header(scope)
    extensions = scope.get("extensions") or {}
    return {
        "type": scope["type"],
        "extensions": sorted(extensions),
        "extension": sorted(extensions[proxyproto.asgi.EXTENSION]) if proxyproto.asgi.EXTENSION in extensions else None,
        "header": None
        if header is None
        else {
            "command": header.command.name,
            "source": None if header.source is None else list(header.source),
            "authority": header.authority,
            "unique_id": None if header.unique_id is None else header.unique_id.decode(),
        },
        "anywhere": _holds_a_header(scope),
    }


#: HTTP: a JSON report of the scope; WebSocket: the report as the first message, then until closed.
app = reporting_app(report)


# -- the servers: each a context manager yielding the address ---------------------------------------


@contextlib.asynccontextmanager
async def uvicorn_with(impl: str, knobs: dict[str, Any], **config: Any) -> AsyncIterator[tuple[str, int]]:
    require_module("uvicorn")
    require_module(impl)
    import proxyproto.uvicorn

    async with uvicorn_server(app, proxyproto.uvicorn.wrap(impl, **knobs), **config) as (_, address):
        yield address


@contextlib.asynccontextmanager
async def hypercorn_with(knobs: dict[str, Any], **config: Any) -> AsyncIterator[tuple[str, int]]:
    require_module("hypercorn")
    from hypercorn.config import Config

    from proxyproto.hypercorn import serve

    port = free_port()
    settings = Config()
    settings.bind = [f"127.0.0.1:{port}"]
    settings.accesslog = None
    for name, value in config.items():
        setattr(settings, name, value)
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(app, settings, shutdown_trigger=stop.wait, **knobs))
    deadline = time.monotonic() + 10
    while not listening(port):
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "hypercorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield "127.0.0.1", port
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


Serving = Callable[..., Any]
#: server id -> (loop, serving(knobs, **config)).
SERVERS: dict[str, tuple[str, Serving]] = {
    "uvicorn-h11": ("asyncio", lambda knobs, **config: uvicorn_with("h11", knobs, **config)),
    "uvicorn-h11-uvloop": ("uvloop", lambda knobs, **config: uvicorn_with("h11", knobs, **config)),
    "uvicorn-httptools": ("asyncio", lambda knobs, **config: uvicorn_with("httptools", knobs, **config)),
    "uvicorn-httptools-uvloop": ("uvloop", lambda knobs, **config: uvicorn_with("httptools", knobs, **config)),
    "hypercorn": ("asyncio", hypercorn_with),
    "hypercorn-uvloop": ("uvloop", hypercorn_with),
}


def serve_and(server: str, knobs: dict[str, Any], scenario: Callable[[tuple[str, int]], Any], **config: Any) -> None:
    """Run ``scenario(address)`` against ``server`` started with ``knobs`` (and its ``config``)."""
    loop, serving = SERVERS[server]

    async def run() -> None:
        async with serving(knobs, **config) as address:
            await scenario(address)

    run_on(loop, run)


async def requests(address: tuple[str, int], head: bytes, count: int = 1, **kwargs: Any) -> list[dict[str, Any]]:
    """``count`` requests on one connection opened with ``head`` (a header, or nothing); their reports."""
    conn = await connect(address, head, **kwargs)
    try:
        seen = []
        for _ in range(count):
            status, report = await conn.request()
            assert status == 200, (status, report)
            seen.append(report)
        return seen
    finally:
        await conn.close()


def assert_no_header(seen: dict[str, Any]) -> None:
    assert seen["header"] is None and seen["extension"] is None, seen
    assert proxyproto.asgi.EXTENSION not in seen["extensions"], seen  # absent, not None
    assert not seen["anywhere"], seen


# -- a trusted peer's header ----------------------------------------------------------------------


@pytest.mark.parametrize("server", list(SERVERS))
def test_trusted_peers_header_and_its_tlvs_are_in_every_request_scope_of_the_connection(server: str) -> None:
    async def scenario(address: tuple[str, int]) -> None:
        for seen in await requests(address, HEADER, count=3):  # keep-alive: each request's own scope
            assert seen["header"] == SEEN_HEADER, seen
            assert seen["extension"] == ["header"], seen

    serve_and(server, {"trusted": TRUSTED}, scenario)


@pytest.mark.parametrize("server", list(SERVERS))
def test_trusted_peers_header_is_in_the_websocket_scope(server: str) -> None:
    config: dict[str, Any] = {}
    if server.startswith("uvicorn"):
        require_module("websockets")
        config["ws"] = "auto"

    async def scenario(address: tuple[str, int]) -> None:
        conn = await connect(address, HEADER)
        try:
            seen = await websocket(conn)
        finally:
            await conn.close()
        assert seen["type"] == "websocket" and seen["header"] == SEEN_HEADER, seen
        assert proxyproto.asgi.EXTENSION in seen["extensions"], seen

    serve_and(server, {"trusted": TRUSTED}, scenario, **config)


# uvicorn's and websockets' own deprecation of uvicorn's "websockets" (legacy) implementation
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:The .websockets. implementation is deprecated")
@pytest.mark.parametrize("ws", ["websockets", "websockets-sansio", "wsproto"])
def test_trusted_peers_header_is_in_the_websocket_scope_of_each_uvicorn_websocket_protocol(ws: str) -> None:
    uvicorn: Any = require_module("uvicorn")
    require_module("wsproto" if ws == "wsproto" else "websockets")
    if ws not in uvicorn.config.WS_PROTOCOLS:
        pytest.skip(f"this uvicorn has no --ws {ws}")

    async def scenario(address: tuple[str, int]) -> None:
        conn = await connect(address, HEADER)
        try:
            seen = await websocket(conn)
        finally:
            await conn.close()
        assert seen["type"] == "websocket" and seen["header"] == SEEN_HEADER, seen
        # uvicorn's own extension stays beside it.
        assert "websocket.http.response" in seen["extensions"], seen

    serve_and("uvicorn-h11", {"trusted": TRUSTED}, scenario, ws=ws)


def test_trusted_peers_header_is_in_the_scope_of_every_http2_stream_under_hypercorn() -> None:
    """HTTP/2 (cleartext, prior knowledge): two streams on the connection, each scope with the header."""
    require_module("h2")

    async def scenario(address: tuple[str, int]) -> None:
        conn = await connect(address, HEADER)
        try:
            bodies = await http2_bodies(conn)
        finally:
            await conn.close()
        for body in bodies:
            assert json.loads(body)["header"] == SEEN_HEADER, body

    serve_and("hypercorn", {"trusted": TRUSTED}, scenario)


@pytest.mark.parametrize("server", list(SERVERS))
def test_header_arriving_in_pieces_is_in_the_scope(server: str) -> None:
    """A header not complete when the connection is accepted is read by the waiting path: same scope."""

    async def scenario(address: tuple[str, int]) -> None:
        conn = await connect(address, HEADER[:10])
        try:
            await conn.writer.drain()
            await asyncio.sleep(0.1)  # the server is waiting for the rest of the header
            conn.writer.write(HEADER[10:])
            status, seen = await conn.request()
        finally:
            await conn.close()
        assert status == 200 and seen["header"] == SEEN_HEADER, seen

    serve_and(server, {"trusted": TRUSTED}, scenario)


@pytest.mark.parametrize("server", ["uvicorn-h11", "uvicorn-httptools", "hypercorn"])
def test_local_header_from_a_trusted_peer_is_in_the_scope(server: str) -> None:
    """A proxy's health check (LOCAL) is served with the socket's address; its header is still the app's."""

    async def scenario(address: tuple[str, int]) -> None:
        (seen,) = await requests(address, LOCAL)
        assert seen["header"] == {"command": "LOCAL", "source": None, "authority": None, "unique_id": None}, seen

    serve_and(server, {"trusted": TRUSTED}, scenario)


@pytest.mark.parametrize("server", ["uvicorn-h11", "uvicorn-httptools-uvloop", "hypercorn"])
def test_trusted_peers_header_is_in_the_scope_when_tls_follows_it(server: str, tmp_path: Path) -> None:
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    if server.startswith("uvicorn"):
        config = {"ssl_certfile": str(cert.cert), "ssl_keyfile": str(cert.key)}
    else:
        config = {"certfile": str(cert.cert), "keyfile": str(cert.key)}

    async def scenario(address: tuple[str, int]) -> None:
        for seen in await requests(address, HEADER, count=2, tls=cert.client_context()):
            assert seen["header"] == SEEN_HEADER, seen

    serve_and(server, {"trusted": TRUSTED}, scenario, **config)


def test_uvicorn_keeping_its_forwarded_headers_middleware_still_gets_the_header_in_the_scope() -> None:
    """With ``--no-proxy-headers`` (nothing for proxyproto to take off) the scope has the header all the same."""

    async def scenario(address: tuple[str, int]) -> None:
        (seen,) = await requests(address, HEADER)
        assert seen["header"] == SEEN_HEADER, seen

    serve_and("uvicorn-h11", {"trusted": TRUSTED}, scenario, proxy_headers=False)


@pytest.mark.parametrize("name", ["H11", "HttpTools"])
def test_uvicorn_command_line_classes_put_the_header_in_the_scope(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--http proxyproto.uvicorn:H11`` / ``:HttpTools``, settings from the environment."""
    require_module("uvicorn")
    if name == "HttpTools":
        require_module("httptools")
    import proxyproto.uvicorn

    monkeypatch.setenv("PROXYPROTO_ALLOW_IPS", TRUSTED)

    async def scenario() -> None:
        async with uvicorn_server(app, getattr(proxyproto.uvicorn, name)) as (_, address):
            (seen,) = await requests(address, HEADER)
        assert seen["header"] == SEEN_HEADER, seen

    run_on("asyncio", scenario)


# -- no header for the others ---------------------------------------------------------------------


@pytest.mark.parametrize("untrusted_policy", ["IGNORE", "REJECT", "SKIP"])
@pytest.mark.parametrize("server", list(SERVERS))
def test_untrusted_peers_header_is_never_in_the_scope(server: str, untrusted_policy: str) -> None:
    """IGNORE reads the header and serves without it; REJECT and SKIP serve a peer that sends none."""

    async def scenario(address: tuple[str, int]) -> None:
        head = HEADER if untrusted_policy == "IGNORE" else b""
        for seen in await requests(address, head, count=2):
            assert_no_header(seen)

    serve_and(server, {"trusted": UNTRUSTED, "untrusted_policy": untrusted_policy}, scenario)


@pytest.mark.parametrize("server", ["uvicorn-h11", "uvicorn-httptools", "hypercorn"])
def test_untrusted_peers_websocket_scope_has_no_header(server: str) -> None:
    config: dict[str, Any] = {}
    if server.startswith("uvicorn"):
        require_module("websockets")
        config["ws"] = "auto"

    async def scenario(address: tuple[str, int]) -> None:
        conn = await connect(address, HEADER)
        try:
            seen = await websocket(conn)
        finally:
            await conn.close()
        assert seen["type"] == "websocket", seen
        assert_no_header(seen)

    serve_and(server, {"trusted": UNTRUSTED, "untrusted_policy": "IGNORE"}, scenario, **config)


@pytest.mark.parametrize("server", ["uvicorn-h11", "uvicorn-httptools", "hypercorn"])
def test_trusted_peer_served_without_a_header_has_no_extension(server: str) -> None:
    """USE without a header: nothing to put in the scope, and no empty extension either."""

    async def scenario(address: tuple[str, int]) -> None:
        (seen,) = await requests(address, b"")
        assert_no_header(seen)

    serve_and(server, {"trusted": TRUSTED, "policy": "USE"}, scenario)


@pytest.mark.parametrize(
    ("answer", "exposed"), [("REQUIRE", True), ("USE", True), ("IGNORE", False), ("REJECT", False), ("SKIP", False)]
)
@pytest.mark.parametrize("server", ["uvicorn-h11", "uvicorn-httptools", "hypercorn"])
def test_policy_for_hook_decides_whether_the_header_is_in_the_scope(server: str, answer: str, exposed: bool) -> None:
    """A hook's REQUIRE or USE trusts the peer; its IGNORE, REJECT or SKIP does not (only a Policy is answered)."""

    async def scenario(address: tuple[str, int]) -> None:
        head = HEADER if answer in ("REQUIRE", "USE", "IGNORE") else b""  # what each answer serves
        (seen,) = await requests(address, head)
        if exposed:
            assert seen["header"] == SEEN_HEADER, seen
        else:
            assert_no_header(seen)

    serve_and(server, {"policy_for": lambda peer, local: answer}, scenario)


def test_header_reader_answers_none_for_a_scope_without_the_extension() -> None:
    header = proxyproto.parse(HEADER)
    assert header is not None
    assert proxyproto.asgi.header({"type": "http"}) is None
    assert proxyproto.asgi.header({"type": "http", "extensions": {"tls": {}}}) is None
    assert proxyproto.asgi.header({"type": "http", "extensions": {"proxyproto": {"header": header}}}) is header
