"""A client that half-closes right after its request gets its response, as without the wrapper.

A client may send its request and shut down its write side at once (``nc -N`` does, and
haproxy in ``mode tcp`` forwards such a FIN). The server reads the request, then the end of
the stream; a protocol that closes on ``eof_received`` (uvicorn's do) has answered only if its
application ran in between. Without a wrapper the transport delivers the request in one loop
turn and the end of the stream in a later one, and the application runs between them. So
the wrapper must never read past the header: the bytes after it, and the end of the stream,
reach the inner protocol from the transport, on the turns a plain server sees them.

Each test compares with the plain server in the same run, on asyncio and uvloop, with the
FIN 0, 0.1 and 0.5 ms after the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from support import free_port, require_haproxy, require_module, run_on
from web_kit import DEST_V4, REAL_V4, command, uvicorn_serving

import proxyproto
from proxyproto.aio_protocol import wrap_protocol_factory

CLIENTS = 100
FIN_DELAYS_MS = (0.0, 0.1, 0.5)
V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


def half_closing_clients(address: tuple[str, int], data: bytes, delay_ms: float, count: int) -> list[bytes]:
    """``count`` clients, one after the other: send ``data``, FIN ``delay_ms`` later, read to the end."""
    answers = []
    for _ in range(count):
        with socket.create_connection(address, timeout=10) as client:
            client.sendall(data)
            if delay_ms:
                time.sleep(delay_ms / 1000)
            client.shutdown(socket.SHUT_WR)
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(65536):
                    answer += chunk
            answers.append(answer)
    return answers


async def answered(address: tuple[str, int], data: bytes, delay_ms: float, expect: bytes) -> int:
    """How many of :data:`CLIENTS` half-closing clients got an answer starting with ``expect``."""
    answers = await asyncio.get_running_loop().run_in_executor(
        None, half_closing_clients, address, data, delay_ms, CLIENTS
    )
    return sum(answer.startswith(expect) for answer in answers)


@pytest.fixture(params=["H11", "HttpTools"])
def http(request: pytest.FixtureRequest) -> str:
    require_module("uvicorn")
    if request.param == "HttpTools":
        require_module("httptools")
    return str(request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wrapped_and_plain(http: str) -> tuple[Any, str]:
    import proxyproto.uvicorn as ppu

    return {"H11": (ppu.H11, "h11"), "HttpTools": (ppu.HttpTools, "httptools")}[http]


def test_uvicorn_answers_every_client_that_half_closes_after_its_request(http: str, loop: str) -> None:
    wrapped, plain = wrapped_and_plain(http)

    async def scenario() -> None:
        async with uvicorn_serving(wrapped) as proxied, uvicorn_serving(plain) as direct:
            for delay in FIN_DELAYS_MS:
                assert await answered(direct, REQUEST, delay, b"HTTP/1.1 200") == CLIENTS, f"plain, FIN +{delay} ms"
                got = await answered(proxied, V2 + REQUEST, delay, b"HTTP/1.1 200")
                assert got == CLIENTS, f"wrapped, FIN +{delay} ms: {got} of {CLIENTS} answered"

    run_on(loop, scenario)


def test_uvicorn_behind_haproxy_answers_every_client_that_half_closes(http: str, loop: str, tmp_path: Path) -> None:
    exe = require_haproxy()
    wrapped, plain = wrapped_and_plain(http)
    front_wrapped, front_plain = free_port(), free_port()

    async def scenario() -> None:
        async with uvicorn_serving(wrapped) as proxied, uvicorn_serving(plain) as direct:
            config = (
                "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n"
                "    timeout client 5s\n    timeout server 5s\n\n"
                f"listen wrapped\n    bind 127.0.0.1:{front_wrapped}\n"
                f"    server app {proxied[0]}:{proxied[1]} send-proxy-v2\n"
                f"listen plain\n    bind 127.0.0.1:{front_plain}\n"
                f"    server app {direct[0]}:{direct[1]}\n"
            )
            (tmp_path / "haproxy.cfg").write_text(config)
            with command([exe, "-f", str(tmp_path / "haproxy.cfg"), "-db"], front_plain, workdir=tmp_path):
                for delay in FIN_DELAYS_MS:
                    plain_got = await answered(("127.0.0.1", front_plain), REQUEST, delay, b"HTTP/1.1 200")
                    assert plain_got == CLIENTS, f"plain behind haproxy, FIN +{delay} ms: {plain_got}"
                    got = await answered(("127.0.0.1", front_wrapped), REQUEST, delay, b"HTTP/1.1 200")
                    assert got == CLIENTS, f"wrapped behind haproxy, FIN +{delay} ms: {got} of {CLIENTS} answered"

    run_on(loop, scenario)


class AnswersOneTurnLater(asyncio.Protocol):
    """Replies to the first bytes on the next loop turn (as an application task would); closes on EOF."""

    transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        asyncio.get_running_loop().call_soon(self.transport.write, b"answer to " + data)


class BufferedAnswersOneTurnLater(asyncio.BufferedProtocol):
    """:class:`AnswersOneTurnLater` as a BufferedProtocol."""

    transport: Any = None

    def __init__(self) -> None:
        self.buffer = bytearray(65536)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self.buffer[:nbytes])
        asyncio.get_running_loop().call_soon(self.transport.write, b"answer to " + data)


@pytest.mark.parametrize("inner", [AnswersOneTurnLater, BufferedAnswersOneTurnLater], ids=["plain", "buffered"])
def test_wrapped_protocol_answers_every_client_that_half_closes_as_the_bare_protocol_does(
    inner: type[asyncio.BaseProtocol], loop: str
) -> None:
    async def scenario() -> None:
        running = asyncio.get_running_loop()
        bare = await running.create_server(inner, "127.0.0.1", 0)
        wrapped = await running.create_server(wrap_protocol_factory(inner, trusted="127.0.0.1"), "127.0.0.1", 0)
        try:
            for delay in FIN_DELAYS_MS:
                bare_got = await answered(bare.sockets[0].getsockname(), b"ping", delay, b"answer to ping")
                assert bare_got == CLIENTS, f"bare, FIN +{delay} ms"
                got = await answered(wrapped.sockets[0].getsockname(), V2 + b"ping", delay, b"answer to ping")
                assert got == CLIENTS, f"wrapped, FIN +{delay} ms: {got} of {CLIENTS} answered"
        finally:
            for server in (bare, wrapped):
                server.close()
                await server.wait_closed()

    run_on(loop, scenario)
