"""uvicorn's X-Forwarded-For never overrides the PROXY header for peers trusted to send it.

uvicorn trusts ``X-Forwarded-For`` from its ``--forwarded-allow-ips``, loopback by default:
the same peers ``PROXYPROTO_ALLOW_IPS`` trusts by default. A connection from the proxy that is
served with the socket's own address (a LOCAL header, a v1 UNKNOWN line) would then take its
client from bytes the proxy relayed from the client. Under ``proxyproto.uvicorn`` those
connections are served without uvicorn's forwarded-header middleware, unless the user chose
the forwarded-header hosts (``FORWARDED_ALLOW_IPS``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from support import require_module, run_on
from web_kit import DEST_V4, REAL_V4, connect, uvicorn_serving, websocket

import proxyproto

uvicorn: Any = require_module("uvicorn")

import proxyproto.uvicorn as ppu  # noqa: E402

FORGED = "203.0.113.7"
HEADERS = {
    "LOCAL": proxyproto.encode_v2(command=proxyproto.Command.LOCAL),
    "UNKNOWN": b"PROXY UNKNOWN\r\n",
    "PROXY": proxyproto.encode_v2(REAL_V4, DEST_V4),
}
REQUEST = f"GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: {FORGED}\r\nConnection: close\r\n\r\n".encode()


async def client_seen(address: tuple[str, int], header: bytes) -> list[Any]:
    """The app's ``scope["client"]`` for one request that carries a forged X-Forwarded-For."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(header + REQUEST)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status, _, body = answer.partition(b"\r\n\r\n")
    assert b" 200 " in status.split(b"\r\n")[0], answer
    client: list[Any] = json.loads(body)["client"]
    return client


@pytest.fixture(params=["H11", "HttpTools"])
def http(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "HttpTools":
        require_module("httptools")
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    return {"H11": ppu.H11, "HttpTools": ppu.HttpTools}[request.param]


@pytest.mark.parametrize("kind", sorted(HEADERS))
def test_trusted_proxys_connection_ignores_x_forwarded_for_by_default(http: Any, kind: str) -> None:
    async def scenario() -> None:
        async with uvicorn_serving(http) as address:
            client = await client_seen(address, HEADERS[kind])
            assert client[0] != FORGED
            expected = list(REAL_V4) if kind == "PROXY" else ["127.0.0.1", client[1]]
            assert client == expected

    run_on("asyncio", scenario)


@pytest.mark.parametrize("ws", ["websockets", "wsproto"])
@pytest.mark.parametrize("kind", ["LOCAL", "UNKNOWN"])
def test_trusted_proxys_websocket_ignores_x_forwarded_for_by_default(http: Any, kind: str, ws: str) -> None:
    """A WebSocket of a trusted proxy's connection is served like its HTTP requests: XFF is not believed."""
    require_module(ws)

    async def scenario() -> None:
        async with uvicorn_serving(http, ws=ws) as address:
            conn = await connect(address, HEADERS[kind])
            try:
                report = await websocket(conn, headers=f"X-Forwarded-For: {FORGED}\r\n")
            finally:
                await conn.close()
            assert report["client"][0] == "127.0.0.1", report

    run_on("asyncio", scenario)


def test_forwarded_allow_ips_chosen_by_the_user_keeps_uvicorns_handling(
    http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")

    async def scenario() -> None:
        async with uvicorn_serving(http) as address:
            assert (await client_seen(address, HEADERS["LOCAL"]))[0] == FORGED

    run_on("asyncio", scenario)


def test_forwarded_allow_ips_other_than_uvicorns_default_keeps_uvicorns_handling(http: Any) -> None:
    async def scenario() -> None:
        async with uvicorn_serving(http, forwarded_allow_ips="127.0.0.1,10.0.0.1") as address:
            assert (await client_seen(address, HEADERS["LOCAL"]))[0] == FORGED

    run_on("asyncio", scenario)


def test_connection_waiting_for_its_header_ignores_x_forwarded_for_too(http: Any) -> None:
    """The header arrives after the connection is made: the waiting path serves it the same way."""

    async def scenario() -> None:
        async with uvicorn_serving(http) as address:
            reader, writer = await asyncio.open_connection(*address)
            local = HEADERS["LOCAL"]
            writer.write(local[:5])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(local[5:] + REQUEST)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["client"][0] == "127.0.0.1"

    run_on("asyncio", scenario)


def test_trusted_peer_under_ignore_still_ignores_x_forwarded_for(http: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """IGNORE reads the proxy's header and drops its addresses: the header stays the authority, not a line."""
    monkeypatch.setenv("PROXYPROTO_POLICY", "IGNORE")

    async def scenario() -> None:
        async with uvicorn_serving(http) as address:
            assert (await client_seen(address, HEADERS["PROXY"]))[0] == "127.0.0.1"

    run_on("asyncio", scenario)


def test_trusted_peer_under_skip_keeps_uvicorns_handling(http: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SKIP reads no header from anyone: uvicorn's forwarded-header rules apply as without the library."""
    monkeypatch.setenv("PROXYPROTO_POLICY", "SKIP")

    async def scenario() -> None:
        async with uvicorn_serving(http) as address:
            assert (await client_seen(address, b""))[0] == FORGED

    run_on("asyncio", scenario)
