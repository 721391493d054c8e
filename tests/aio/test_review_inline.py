"""Review of the header-first inline path (b41fa9c, daa302a, 122faff): regressions for what it found.

Real loopback sockets, asyncio and uvloop, in the style of test_header_first_inline.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import pytest
from aio_kit import DEST_V4, REAL_V4, run_on
from support import require_module

import proxyproto
from proxyproto.aio_protocol import ProxyProtocolFactory, wrap_protocol_factory

LOOPS = ["asyncio", "uvloop"]
PAYLOAD = b"POST /admin HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
SPOOF = proxyproto.encode_v2(REAL_V4, DEST_V4)


class Recorder(asyncio.Protocol):
    def __init__(self, seen: list[dict[str, Any]]) -> None:
        self.seen = seen
        self.record: dict[str, Any] = {"data": bytearray()}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.record["peername"] = transport.get_extra_info("peername")
        self.record["proxy_header"] = transport.get_extra_info("proxy_header")
        sock = transport.get_extra_info("socket")
        try:
            self.record["socket_peer"] = sock.getpeername()
        except OSError as exc:
            self.record["socket_peer"] = exc
        self.seen.append(self.record)

    def data_received(self, data: bytes) -> None:
        self.record["data"] += data

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def _listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def _send_and_reset(address: Any, data: bytes) -> None:
    """Connect, send ``data``, then reset (SO_LINGER 0): all before the server's loop accepts."""
    client = socket.create_connection(address, timeout=5)
    client.sendall(data)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    time.sleep(0.05)  # the RST reaches the queued connection


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("path", ["header_first", "wrapper"])
def test_untrusted_peer_that_resets_before_accept_gets_no_trust(loop: str, path: str) -> None:
    """An untrusted peer (127.0.0.1 outside trusted=10.0.0.0/8) sends a spoofed header and a request,
    then resets before the accept.  uvloop then answers ``get_extra_info("peername")`` with None
    (getpeername fails with ENOTCONN; the queued bytes stay readable), and ``not isinstance(peer,
    tuple)`` counts it as a UNIX peer, "always trusted": REQUIRE, and the request is served with the
    header's address.  Whatever the loop, a peer that is not known to be trusted must never have
    its header's addresses used."""
    seen: list[dict[str, Any]] = []

    async def scenario() -> None:
        factory = wrap_protocol_factory(lambda: Recorder(seen), trusted="10.0.0.0/8", header_timeout=1.0)
        make: Any = factory
        if path == "header_first":
            cls = factory.header_first(Recorder)

            def make() -> Any:
                return cls(seen)

        listener = _listener()
        _send_and_reset(listener.getsockname(), SPOOF + PAYLOAD)
        server = await asyncio.get_running_loop().create_server(make, sock=listener)
        async with server:
            for _ in range(50):
                if seen:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
        factory.close()

    run_on(loop, scenario)
    for record in seen:
        assert record["peername"] != REAL_V4, record
        assert not isinstance(record["socket_peer"], tuple) or record["socket_peer"] != REAL_V4, record


class _SkipEveryone(ProxyProtocolFactory):
    """A factory narrowing trust by overriding the public ``policy_for`` method (not the hook)."""

    def policy_for(self, peer: Any, transport: Any) -> proxyproto.Policy:
        return proxyproto.Policy.SKIP


@pytest.mark.parametrize("loop", LOOPS)
def test_factory_subclass_policy_for_is_honoured_by_header_first(loop: str) -> None:
    """``ProxyProtocolFactory.policy_for`` is the method HeaderProtocol asks; the inline path computes
    the policy from ``factory.trusted`` itself and never calls it, so an override that answers SKIP
    is obeyed by ``factory()`` but not by ``factory.header_first(cls)``, which uses the header."""
    results: dict[str, list[dict[str, Any]]] = {}

    for path in ("wrapper", "header_first"):
        seen: list[dict[str, Any]] = []
        results[path] = seen

        async def scenario(seen: list[dict[str, Any]] = seen, path: str = path) -> None:
            factory = _SkipEveryone(lambda: Recorder(seen))
            make: Any = factory
            if path == "header_first":
                cls = factory.header_first(Recorder)

                def make() -> Any:
                    return cls(seen)

            listener = _listener()
            client = socket.create_connection(listener.getsockname(), timeout=5)
            with client:
                client.sendall(SPOOF + PAYLOAD)
                time.sleep(0.05)
                server = await asyncio.get_running_loop().create_server(make, sock=listener)
                async with server:
                    for _ in range(50):
                        if seen and len(seen[0]["data"]) >= len(SPOOF + PAYLOAD):
                            break
                        await asyncio.sleep(0.02)

        run_on(loop, scenario)

    general, inline = results["wrapper"], results["header_first"]
    assert general and general[0]["proxy_header"] is None and bytes(general[0]["data"]) == SPOOF + PAYLOAD
    assert inline and inline[0]["proxy_header"] is None, inline
    assert inline[0]["peername"] != REAL_V4
    assert bytes(inline[0]["data"]) == SPOOF + PAYLOAD


class _CustomHTTP(asyncio.Protocol):
    """A ``wrap()``-able protocol class taking uvicorn's keyword arguments, keeping the state under
    another name (nothing in uvicorn's contract asks for a ``server_state`` attribute)."""

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
        self.state = server_state

    def connection_made(self, transport: Any) -> None:
        self.transport = transport


def test_uvicorn_waiting_connection_of_a_custom_class_still_has_its_deadline() -> None:
    """``_UvicornFactory.park`` now finds the server's state as ``waiting.inner.server_state``; a
    wrapped class without that attribute makes ``park`` raise inside ``connection_made`` after the
    connection was counted in ``parked`` and before its header timer was set: a traceback in the
    loop, and a silent client that is never closed (nor evicted before max_pending others)."""
    uvicorn: Any = require_module("uvicorn")
    from proxyproto.uvicorn import wrap

    http = wrap(_CustomHTTP, trusted="*", header_timeout=0.3)
    errors: list[Any] = []
    answer: list[Any] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context.get("exception")))
        config = uvicorn.Config(lambda scope, receive, send: None, http=http, lifespan="off")
        config.load()
        state = uvicorn.server.ServerState()

        def create_protocol() -> Any:
            return config.http_protocol_class(config=config, server_state=state, app_state={}, _loop=loop)

        server = await loop.create_server(create_protocol, "127.0.0.1", 0)
        async with server:
            client = socket.create_connection(server.sockets[0].getsockname()[:2], timeout=5)
            client.setblocking(False)
            with client:
                try:
                    answer.append(await asyncio.wait_for(loop.sock_recv(client, 100), 3.0))
                except asyncio.TimeoutError:
                    answer.append("still open after 3 s (header_timeout is 0.3 s)")
                except ConnectionResetError:
                    answer.append(b"")

    run_on("asyncio", scenario)
    assert errors == [], errors
    assert answer == [b""], answer
