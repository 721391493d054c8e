"""What the inner protocol is told, whichever object reads the header: the at-once read
(``take_complete_header``), ``ProxyProtocolFactory.header_first`` and the general wrapper.

Real loopback sockets, asyncio and uvloop.  What must hold whichever object reads the header:
a protocol that never got ``connection_made`` never gets ``connection_lost`` (uvicorn's would
raise); a protocol that pauses reading in ``connection_made`` gets no byte until it resumes;
every payload byte arrives once, in order; the policy table's cells close or serve as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from typing import Any, Callable

import pytest
from aio_kit import DEST_V4, REAL_V4, run_on
from support import require_module

import proxyproto
from proxyproto.aio_protocol import wrap_protocol_factory

V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)
V1 = proxyproto.encode_v1(REAL_V4, DEST_V4)
LOOPS = ["asyncio", "uvloop"]


class Journal(asyncio.Protocol):
    """Records every callback, in order, with the transport's reading state at data time."""

    def __init__(self, log: list[Any], *, pause: bool = False) -> None:
        self.log = log
        self.pause = pause
        self.paused = False
        self.data = bytearray()
        self.done = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.log.append(("made", transport.get_extra_info("peername")))
        if self.pause:
            transport.pause_reading()
            self.paused = True

    def data_received(self, data: bytes) -> None:
        self.log.append(("data", len(data), self.paused))
        self.data += data

    def eof_received(self) -> bool:
        self.log.append(("eof", self.paused))
        self.transport.write(hashlib.sha256(bytes(self.data)).hexdigest().encode())
        self.transport.close()
        self.done.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.append(("lost",))
        self.transport.is_closing()  # as uvicorn's protocols do: use what connection_made set

    def resume(self) -> None:
        self.paused = False
        self.transport.resume_reading()


class BufferedJournal(asyncio.BufferedProtocol):
    def __init__(self, log: list[Any], *, pause: bool = False) -> None:
        self.log = log
        self.pause = pause
        self.paused = False
        self.data = bytearray()
        self.buf = bytearray(5)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.log.append(("made", transport.get_extra_info("peername")))
        if self.pause:
            transport.pause_reading()
            self.paused = True

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.log.append(("data", nbytes, self.paused))
        self.data += self.buf[:nbytes]

    def eof_received(self) -> bool:
        self.log.append(("eof", self.paused))
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.append(("lost",))
        self.transport.is_closing()

    def resume(self) -> None:
        self.paused = False
        self.transport.resume_reading()


async def send_before_accept(address: Any, data: bytes, *, eof: bool = True) -> socket.socket:
    """Connect and write ``data`` before the loop accepts; the client socket, non-blocking."""
    client = socket.create_connection(address, timeout=10)
    client.sendall(data)
    if eof:
        client.shutdown(socket.SHUT_WR)
    client.setblocking(False)
    return client


async def read_all(client: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    answer = b""
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 10):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


async def server_for(make: Callable[[], asyncio.BaseProtocol]) -> tuple[asyncio.AbstractServer, Any]:
    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


# -- the inner protocol that never got connection_made never gets connection_lost -----------------

REFUSED = {
    "REQUIRE no header": ("REQUIRE", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "REQUIRE malformed": ("REQUIRE", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\ndata"),
    "REJECT header": ("REJECT", V2 + b"data"),
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_header_first_refused_at_once_never_calls_connection_lost_without_connection_made(
    loop: str, case: str
) -> None:
    """A header_first protocol refused in its own connection_made (the bytes are all there) was
    never told of the connection, so it must not be told of its end either: the wrapper (before
    the change) never made it at all.  uvicorn's connection_lost calls ``self.transport.close()``
    on the None that only connection_made replaces."""
    policy, wire = REFUSED[case]
    log: list[Any] = []
    errors: list[str] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, c: errors.append(repr(c.get("exception"))))
        factory = wrap_protocol_factory(asyncio.Protocol, policy=policy)
        cls = factory.header_first(Journal)
        server, address = await server_for(lambda: cls(log))
        async with server:
            with await send_before_accept(address, wire) as client:
                assert await read_all(client) == b""
            await asyncio.sleep(0.05)  # connection_lost runs on a later iteration

    run_on(loop, scenario)
    assert log == [] and errors == []


@pytest.mark.parametrize("loop", LOOPS)
def test_header_first_closed_factory_aborts_without_calling_connection_lost(loop: str) -> None:
    """``factory.close()`` then a new connection: aborted in connection_made, before any header; the
    server's protocol never got connection_made, so no connection_lost either."""
    log: list[Any] = []
    errors: list[str] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, c: errors.append(repr(c.get("exception"))))
        factory = wrap_protocol_factory(asyncio.Protocol)
        cls = factory.header_first(Journal)
        server, address = await server_for(lambda: cls(log))
        factory.close()
        async with server:
            with await send_before_accept(address, V2 + b"data") as client:
                assert await read_all(client) == b""
            await asyncio.sleep(0.05)

    run_on(loop, scenario)
    assert log == [] and errors == []


@pytest.mark.parametrize("loop", LOOPS)
def test_header_first_waiting_then_timeout_never_touches_the_inner(loop: str) -> None:
    """Pinned (passes): half a header, then silence past the deadline under REQUIRE: the
    HeaderProtocol installed for the wait takes the close; the inner sees nothing."""
    log: list[Any] = []

    async def scenario() -> None:
        factory = wrap_protocol_factory(asyncio.Protocol, header_timeout=0.2)
        cls = factory.header_first(Journal)
        server, address = await server_for(lambda: cls(log))
        async with server:
            with await send_before_accept(address, V2[:9], eof=False) as client:
                started = time.monotonic()
                assert await read_all(client) == b""
                assert time.monotonic() - started < 2
            assert factory.pending == 0

    run_on(loop, scenario)
    assert log == []


# -- uvicorn: what the above means for the --http classes ----------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_uvicorn_refused_connection_raises_nothing_in_the_loop(
    loop: str, http: str, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn with REQUIRE, a client sending a plain HTTP request: closed with proxyproto's one
    WARNING line (rate-limited), and no 'Exception in callback' traceback from uvicorn's
    connection_lost (AttributeError: 'NoneType' object has no attribute 'close'), which any peer
    could trigger at will, unlimited by log_rate."""
    uvicorn: Any = require_module("uvicorn")
    if http == "httptools":
        require_module("httptools")
    import proxyproto.uvicorn as ppu

    errors: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        running.set_exception_handler(lambda _, c: errors.append(repr(c.get("exception"))))
        cls = ppu.wrap(http, policy="REQUIRE", trusted="*")
        config = uvicorn.Config(app, http=cls, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            assert not task.done()
            await asyncio.sleep(0.01)
        address = server.servers[0].sockets[0].getsockname()[:2]
        try:
            with await send_before_accept(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") as client:
                assert await read_all(client) == b""
            await asyncio.sleep(0.1)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)

    caplog.set_level(logging.INFO, logger="proxyproto")
    run_on(loop, scenario)
    assert any("not a PROXY protocol signature" in r.getMessage() for r in caplog.records)
    assert errors == []


# -- flow control: a protocol that pauses in connection_made ----------------------------------------


@pytest.mark.parametrize("loop", ["asyncio"])  # uvloop itself ignores a pause made in connection_made
@pytest.mark.parametrize("kind", ["wrapper plain", "wrapper buffered", "header_first plain", "header_first buffered"])
def test_inner_pausing_in_connection_made_gets_no_byte_until_it_resumes(loop: str, kind: str) -> None:
    """An inner protocol that calls ``transport.pause_reading()`` in its connection_made is owed no
    data_received / buffer_updated until it resumes (asyncio's flow-control contract).  Before
    the change the bytes after the header stayed in the kernel (peek, exact read) and the
    contract held; now the at-once read hands them over right after connection_made anyway.
    asyncio only: uvloop 0.23 reads into a protocol that paused in connection_made even without
    proxyproto (its own bug), so there is nothing to hold the wrapper to there."""
    payload = os.urandom(3000)
    log: list[Any] = []
    paused_log: list[Any] = []
    holder: list[Any] = []

    async def scenario() -> None:
        cls: Any = Journal if kind.endswith("plain") else BufferedJournal
        if kind.startswith("header_first"):
            cls = wrap_protocol_factory(asyncio.Protocol).header_first(cls)

        def make() -> asyncio.BaseProtocol:
            holder.append(cls(log, pause=True))
            return holder[-1]

        server, address = await server_for(make if kind.startswith("header_first") else wrap_protocol_factory(make))
        async with server:
            with await send_before_accept(address, V2 + payload, eof=False) as client:
                for _ in range(100):
                    if holder and log:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # several iterations with the inner paused
                paused_log.extend(log)
                holder[0].resume()
                for _ in range(200):
                    if len(holder[0].data) >= len(payload):
                        break
                    await asyncio.sleep(0.01)
                client.close()

    run_on(loop, scenario)
    assert paused_log == [("made", REAL_V4)], paused_log
    assert bytes(holder[0].data) == payload


# -- pinned: bytes once, in order, through header_first --------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", ["plain", "buffered"])
@pytest.mark.parametrize("how", ["at once", "prefix then rest"])
def test_header_first_payload_byte_exact_past_the_read_ahead(loop: str, kind: str, how: str) -> None:
    """Pinned (passes): v1 header then 200 KiB (more than the 64 KiB read ahead), at once or after
    a prefix that parks the connection; every byte once, in order; real client reported."""
    payload = os.urandom(200 << 10)
    log: list[Any] = []
    holder: list[Any] = []

    async def scenario() -> None:
        factory = wrap_protocol_factory(asyncio.Protocol)
        cls = factory.header_first(Journal if kind == "plain" else BufferedJournal)

        def make() -> asyncio.BaseProtocol:
            holder.append(cls(log))
            return holder[-1]

        server, address = await server_for(make)
        async with server:
            if how == "at once":
                client = await send_before_accept(address, V1 + payload[:20000], eof=False)
                rest = payload[20000:]
            else:
                rest = payload
                client = await send_before_accept(address, V1[:7], eof=False)
                for _ in range(200):
                    if factory.pending:
                        break
                    await asyncio.sleep(0.01)
                assert factory.pending == 1
                client.setblocking(True)
                client.sendall(V1[7:])
                client.setblocking(False)
            with client:
                loop_ = asyncio.get_running_loop()
                await loop_.sock_sendall(client, rest)
                client.shutdown(socket.SHUT_WR)
                for _ in range(500):
                    if holder and ("eof", False) in log:
                        break
                    await asyncio.sleep(0.01)
            assert factory.pending == 0

    run_on(loop, scenario)
    (inner,) = holder
    assert bytes(inner.data) == payload
    assert log[0] == ("made", REAL_V4) and log.count(("made", REAL_V4)) == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_header_first_max_pending_evicts_the_oldest_waiting_never_its_inner(loop: str) -> None:
    """Pinned (passes): max_pending=1, two connections parked on half a header: the older one is
    closed (its HeaderProtocol takes the close; its inner is never told), the newer one is
    served with its real client once its header completes."""
    log: list[Any] = []
    holder: list[Any] = []

    async def scenario() -> None:
        factory = wrap_protocol_factory(asyncio.Protocol, max_pending=1)
        cls = factory.header_first(Journal)

        def make() -> asyncio.BaseProtocol:
            holder.append(cls(log))
            return holder[-1]

        server, address = await server_for(make)
        async with server:
            old = await send_before_accept(address, V2[:9], eof=False)
            for _ in range(200):
                if factory.pending:
                    break
                await asyncio.sleep(0.01)
            new = await send_before_accept(address, V2[:9], eof=False)
            with old, new:
                assert await read_all(old) == b""
                new.setblocking(True)
                new.sendall(V2[9:] + b"payload")
                new.shutdown(socket.SHUT_WR)
                new.setblocking(False)
                assert await read_all(new) == hashlib.sha256(b"payload").hexdigest().encode()
            assert factory.pending == 0

    run_on(loop, scenario)
    assert log[0] == ("made", REAL_V4) and log.count(("made", REAL_V4)) == 1
    assert bytes(holder[1].data) == b"payload" and not holder[0].data
