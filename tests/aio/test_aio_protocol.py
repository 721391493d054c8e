"""``proxyproto.aio_protocol.wrap_protocol_factory``: any protocol factory reads the header first.

Inner protocols of the three kinds (a plain ``Protocol``, a ``BufferedProtocol``, asyncio's own
``StreamReaderProtocol``), header and payload in one write, two, or byte by byte; the policy
table; trust; deadlines; ``max_pending``; TLS negotiated after the header; ``close()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from aio_kit import DEST_V4, DEST_V6, REAL_V4, REAL_V6, async_test, closed_without_answer, failing_hook, run_on
from support import self_signed_files

import proxyproto
from proxyproto import Policy, aio_header
from proxyproto.aio_header import HeaderProtocol
from proxyproto.aio_protocol import wrap_protocol_factory
from proxyproto.aio_transport import deliver

V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)
V1 = proxyproto.encode_v1(REAL_V4, DEST_V4)
LOCAL = proxyproto.encode_v2(command=proxyproto.Command.LOCAL)


class Sink:
    """What an inner protocol saw: its transport's addresses and every byte, until EOF."""

    def __init__(self) -> None:
        self.extra: dict[str, Any] = {}
        self.data = bytearray()
        self.done = asyncio.Event()

    def made(self, transport: Any) -> None:
        self.transport = transport
        for key in ("peername", "sockname", "proxy_header", "proxy_peername"):
            self.extra[key] = transport.get_extra_info(key)
        sock = transport.get_extra_info("socket")
        self.extra["socket_peer"] = sock.getpeername()
        self.extra["socket_sockname"] = sock.getsockname()
        self.extra["socket_family"] = sock.family

    def eof(self) -> bool:
        self.transport.write(hashlib.sha256(bytes(self.data)).hexdigest().encode())
        self.transport.close()
        self.done.set()
        return False


class Plain(asyncio.Protocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def connection_made(self, transport: Any) -> None:
        self.sink.made(transport)

    def data_received(self, data: bytes) -> None:
        self.sink.data += data

    def eof_received(self) -> bool:
        return self.sink.eof()


class Buffered(asyncio.BufferedProtocol):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buf = bytearray(7)  # small on purpose: payload handed over in pieces

    def connection_made(self, transport: Any) -> None:
        self.sink.made(transport)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.sink.data += self.buf[:nbytes]

    def eof_received(self) -> bool:
        return self.sink.eof()


def streams(sink: Sink) -> asyncio.BaseProtocol:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink.made(writer.transport)
        sink.data += await reader.read()
        writer.write(hashlib.sha256(bytes(sink.data)).hexdigest().encode())
        writer.close()
        sink.done.set()

    return asyncio.StreamReaderProtocol(asyncio.StreamReader(), handle)


INNER: dict[str, Callable[[Sink], asyncio.BaseProtocol]] = {"plain": Plain, "buffered": Buffered, "streams": streams}


async def serve(kind: str, **options: Any) -> tuple[asyncio.AbstractServer, tuple[str, int], list[Sink], Any]:
    sinks: list[Sink] = []

    def make() -> asyncio.BaseProtocol:
        sink = Sink()
        sinks.append(sink)
        return INNER[kind](sink)

    factory = wrap_protocol_factory(make, **options)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2], sinks, factory


async def talk(address: Any, pieces: list[bytes], local: str | None = None, delay: float = 0.0) -> bytes:
    kwargs = {"local_addr": (local, 0)} if local else {}
    reader, writer = await asyncio.open_connection(*address, **kwargs)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if delay:
                await asyncio.sleep(delay)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def splits(data: bytes, how: str) -> list[bytes]:
    if how == "one":
        return [data]
    if how == "two":
        return [data[:9], data[9:]]
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("kind", sorted(INNER))
@pytest.mark.parametrize("header", ["v1", "v2"])
@pytest.mark.parametrize("how", ["one", "two", "bytewise"])
@async_test
async def test_wrapped_protocol_sees_real_client_and_exact_payload(kind: str, header: str, how: str) -> None:
    payload = b"payload\x00after the header"
    server, address, sinks, _ = await serve(kind)
    async with server:
        answer = await talk(address, splits((V1 if header == "v1" else V2) + payload, how), delay=0.002)
    (sink,) = sinks
    assert bytes(sink.data) == payload and answer == hashlib.sha256(payload).hexdigest().encode()
    assert sink.extra["peername"] == REAL_V4 == sink.extra["socket_peer"]
    assert sink.extra["sockname"] == DEST_V4
    assert sink.extra["proxy_peername"][0] == "127.0.0.1"
    assert sink.extra["proxy_header"].version == (1 if header == "v1" else 2)


@pytest.mark.parametrize("kind", sorted(INNER))
@async_test
async def test_wrapped_protocol_one_mebibyte_byte_exact(kind: str) -> None:
    payload = os.urandom(1 << 20)
    server, address, sinks, _ = await serve(kind)
    async with server:
        answer = await talk(address, [V2 + payload])
    assert answer == hashlib.sha256(payload).hexdigest().encode() and bytes(sinks[0].data) == payload


@async_test
async def test_wrapped_protocol_local_header_keeps_the_socket_address() -> None:
    server, address, sinks, _ = await serve("plain")
    async with server:
        await talk(address, [LOCAL + b"x"])
    assert sinks[0].extra["peername"][0] == "127.0.0.1" and bytes(sinks[0].data) == b"x"


# What arrives -> (served?, payload seen) per policy; DESIGN.md's table.
CELLS = {
    "header": V2 + b"data",
    "no header": b"GET / HTTP/1.0\r\n",
    "malformed": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\ndata",
}
EXPECTED = {
    ("REQUIRE", "header"): b"data",
    ("REQUIRE", "no header"): None,
    ("REQUIRE", "malformed"): None,
    ("USE", "header"): b"data",
    ("USE", "no header"): CELLS["no header"],
    ("USE", "malformed"): None,
    ("IGNORE", "header"): b"data",
    ("IGNORE", "no header"): CELLS["no header"],
    ("IGNORE", "malformed"): None,
    ("REJECT", "header"): None,
    ("REJECT", "no header"): CELLS["no header"],
    ("REJECT", "malformed"): None,
    ("SKIP", "header"): CELLS["header"],
    ("SKIP", "no header"): CELLS["no header"],
    ("SKIP", "malformed"): CELLS["malformed"],
}


@pytest.mark.parametrize(("policy", "case"), sorted(EXPECTED))
@async_test
async def test_wrapped_protocol_follows_the_policy_table(policy: str, case: str) -> None:
    server, address, sinks, _ = await serve("plain", policy=policy)
    async with server:
        await talk(address, [CELLS[case]])
    expected = EXPECTED[(policy, case)]
    if expected is None:
        assert sinks == []
    else:
        assert bytes(sinks[0].data) == expected
        uses = policy in ("REQUIRE", "USE") and case == "header"
        assert (sinks[0].extra["peername"] == REAL_V4) is uses


@async_test
async def test_wrapped_protocol_silent_client_require_closed_use_served_after_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")
    loop = asyncio.get_running_loop()
    server, address, sinks, _ = await serve("plain", header_timeout=0.3)
    async with server:
        reader, writer = await asyncio.open_connection(*address)
        start = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.25 <= loop.time() - start < 2.0
        writer.close()
    assert sinks == [] and any("no PROXY header within 0.3 s" in r.getMessage() for r in caplog.records)
    server, address, sinks, _ = await serve("plain", policy="USE", header_timeout=0.2)
    async with server:
        reader, writer = await asyncio.open_connection(*address)
        await asyncio.sleep(0.5)
        writer.write(b"late")
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert bytes(sinks[0].data) == b"late"


@async_test
async def test_wrapped_protocol_slow_and_silent_clients_never_delay_a_good_one() -> None:
    server, address, sinks, _ = await serve("plain", header_timeout=5.0)
    async with server:
        silent = [await asyncio.open_connection(*address) for _ in range(20)]
        slow = asyncio.ensure_future(talk(address, splits(V2, "bytewise"), delay=0.1))
        loop = asyncio.get_running_loop()
        start = loop.time()
        await talk(address, [V2 + b"prompt"])
        assert loop.time() - start < 0.5
        slow.cancel()
        for _, writer in silent:
            writer.close()
    assert bytes(sinks[0].data) == b"prompt"


@async_test
async def test_wrapped_protocol_untrusted_peer_is_skipped_trusted_is_used() -> None:
    server, address, sinks, _ = await serve("plain", trusted="127.0.0.1")
    async with server:
        await talk(address, [V2 + b"x"], local="127.0.0.3")
        await talk(address, [V2 + b"y"], local="127.0.0.1")
    stranger, proxy = sinks
    assert stranger.extra["peername"][0] == "127.0.0.3" and bytes(stranger.data) == V2 + b"x"
    assert proxy.extra["peername"] == REAL_V4 and bytes(proxy.data) == b"y"


@async_test
async def test_wrapped_protocol_max_pending_closes_the_oldest(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="proxyproto")
    server, address, sinks, factory = await serve("plain", max_pending=3, log_rate=None)
    async with server:
        silent = []
        for _ in range(5):
            silent.append(await asyncio.open_connection(*address))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert factory.pending == 3
        assert await asyncio.wait_for(silent[0][0].read(), 5) == b""
        await talk(address, [V2 + b"ok"])
        for _, writer in silent:
            writer.close()
    lines = [r.getMessage() for r in caplog.records if "(max_pending)" in r.getMessage()]
    assert len(lines) >= 2 and "3 connections already wait for their header" in lines[0]
    assert bytes(sinks[0].data) == b"ok"


@async_test
async def test_wrapped_protocol_close_closes_connections_waiting_for_their_header() -> None:
    server, address, _, factory = await serve("plain", header_timeout=60.0)
    async with server:
        silent = [await asyncio.open_connection(*address) for _ in range(5)]
        await asyncio.sleep(0.1)
        assert factory.pending == 5
        await factory.aclose()
        for reader, writer in silent:
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        assert factory.pending == 0


def make_certificate(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = self_signed_files(directory)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=cert)


@pytest.mark.parametrize("kind", sorted(INNER))
def test_wrapped_protocol_tls_is_negotiated_after_the_header(kind: str, tmp_path: Path) -> None:
    server_ctx, client_ctx = make_certificate(tmp_path)

    async def scenario() -> None:
        server, address, sinks, _ = await serve(kind, ssl=server_ctx)
        async with server:
            _, writer = await asyncio.open_connection(*address)
            writer.write(V2)
            await writer.start_tls(client_ctx, server_hostname="localhost")
            writer.write(b"secret")
            await writer.drain()
            writer.close()  # close_notify: the inner protocol sees the end of the stream
            for _ in range(100):
                if sinks and bytes(sinks[0].data) == b"secret":
                    break
                await asyncio.sleep(0.05)
        assert sinks[0].extra["peername"] == REAL_V4
        assert bytes(sinks[0].data).startswith(b"secret")

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("policy", ["USE", "IGNORE", "REJECT"])
def test_wrapped_protocol_refuses_opt_in_policies_with_ssl_at_construction(policy: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ValueError, match=rf"^policy={policy} with ssl=: .*use REQUIRE \(or SKIP\)$"):
        wrap_protocol_factory(asyncio.Protocol, policy=policy, ssl=context)
    if policy != "USE":  # untrusted peers may only SKIP, IGNORE or REJECT
        with pytest.raises(ValueError, match=rf"^untrusted_policy={policy} with ssl=: .*use SKIP$"):
            wrap_protocol_factory(asyncio.Protocol, trusted="10.0.0.0/8", untrusted_policy=policy, ssl=context)
    wrap_protocol_factory(asyncio.Protocol, ssl=context)  # REQUIRE, and SKIP for strangers: fine


@pytest.mark.parametrize(("name", "value"), [("untrusted_policy", Policy.USE), ("max_pending", 0)])
def test_wrapped_protocol_refuses_invalid_knobs(name: str, value: Any) -> None:
    with pytest.raises(ValueError):
        wrap_protocol_factory(asyncio.Protocol, **{name: value})


@async_test
async def test_wrapped_protocol_failing_policy_for_hook_closes_the_connection_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")
    server, address, sinks, factory = await serve("plain", policy_for=failing_hook)
    async with server:
        for _ in range(3):
            assert await closed_without_answer(address, V1 + b"payload")
        assert factory.pending == 0 and sinks == []
    errors = [r.getMessage() for r in caplog.records if r.name == "proxyproto" and r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("TypeError" in e for e in errors)


@async_test
async def test_wrapped_protocol_hook_answering_an_opt_in_policy_with_ssl_is_refused_not_half_served(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    """Built without a hook, USE/IGNORE/REJECT with ``ssl=`` is a ValueError; a hook can still
    answer one per connection, whose sniffed bytes TLS would never see: closed, logged."""
    caplog.set_level(logging.INFO, logger="proxyproto")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server, address, sinks, _ = await serve("plain", policy_for=lambda peer, local: Policy.USE, ssl=context)
    async with server:
        assert await closed_without_answer(address, V1 + b"payload")
        assert sinks == []
    errors = [r.getMessage() for r in caplog.records if r.name == "proxyproto" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "only REQUIRE or SKIP" in errors[0]


# -- TLS after the header, many times, on both loops ---------------------------------------


class Echo(asyncio.Protocol):
    """Echoes every byte; records its peer."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def handshake_with_header_in_one_write(address: Any, header: bytes, client_ctx: ssl.SSLContext) -> None:
    """A TLS client whose ClientHello leaves in the same write as the header (as haproxy's
    ``send-proxy`` forwards it); then one echoed record."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        first = True
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            out = outgoing.read()
            if out or first:
                await loop.sock_sendall(sock, (header if first else b"") + out)
                first = False
            if done:
                break
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionResetError("the server closed during the handshake")
            incoming.write(data)
        tls.write(b"ping")
        await loop.sock_sendall(sock, outgoing.read())
        echoed = b""
        while len(echoed) < 4:
            try:
                echoed += tls.read(4)
            except ssl.SSLWantReadError:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise ConnectionResetError("the server closed before echoing") from None
                incoming.write(data)
        assert echoed == b"ping"
    finally:
        sock.close()


@pytest.fixture(scope="module")
def contexts() -> Any:
    with tempfile.TemporaryDirectory() as directory:
        yield make_certificate(Path(directory))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("path", ["header-then-tls", "header-and-hello-in-one-write", "untrusted-peer-tls-at-once"])
def test_wrapped_protocol_fifty_tls_handshakes_after_the_header_none_reset(
    loop: str, path: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """uvloop asks the header protocol for a buffer once more after a SKIP connection's
    ``connection_made`` (it starts reading then, whatever the protocol paused): an empty buffer
    was a fatal error (a reset), and the bytes read there must reach the TLS layer first."""
    server_ctx, client_ctx = contexts
    errors: list[str] = []

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        running.set_exception_handler(lambda _, context: errors.append(str(context.get("message"))))
        factory = wrap_protocol_factory(Echo, ssl=server_ctx, trusted="127.0.0.1")
        server = await running.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        async with server:
            for _ in range(50):
                if path == "header-and-hello-in-one-write":
                    await handshake_with_header_in_one_write(address, V2, client_ctx)
                    continue
                if path == "header-then-tls":
                    reader, writer = await asyncio.open_connection(*address, local_addr=("127.0.0.1", 0))
                    writer.write(V2)
                    await writer.start_tls(client_ctx, server_hostname="localhost")
                else:  # 127.0.0.2 is not trusted: SKIP, the ClientHello is the first byte
                    reader, writer = await asyncio.open_connection(
                        *address, ssl=client_ctx, server_hostname="localhost", local_addr=("127.0.0.2", 0)
                    )
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                writer.close()
                await writer.wait_closed()
            assert factory.pending == 0

    run_on(loop, scenario)
    assert errors == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01"], ids=["nothing", "part-of-a-client-hello"])
def test_wrapped_protocol_peer_ending_before_the_tls_handshake_is_closed(
    loop: str, sent: bytes, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, _ = contexts
    errors: list[str] = []

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        running.set_exception_handler(lambda _, context: errors.append(str(context.get("message"))))
        factory = wrap_protocol_factory(Echo, ssl=server_ctx, trusted="127.0.0.1")
        server = await running.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        async with server:
            for _ in range(10):
                # Connected, written and half-closed before the server's loop runs again, so
                # uvloop reads the bytes and the end of the stream before start_tls takes over.
                client = socket.create_connection(address, timeout=10, source_address=("127.0.0.2", 0))
                with client:
                    client.sendall(sent)
                    client.shutdown(socket.SHUT_WR)
                    client.setblocking(False)
                    try:
                        assert await asyncio.wait_for(running.sock_recv(client, 100), 10) == b""
                    except ConnectionResetError:
                        pass
            for _ in range(100):
                if factory.pending == 0:
                    break
                await asyncio.sleep(0.02)
            assert factory.pending == 0

    run_on(loop, scenario)
    assert errors == []


# -- the socket view: family and addresses in the shape of the header's family -------------


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("listener", "header", "family", "peer", "local"),
    [
        ("127.0.0.1", proxyproto.encode_v2(REAL_V4, DEST_V4), socket.AF_INET, REAL_V4, DEST_V4),
        ("127.0.0.1", proxyproto.encode_v2(REAL_V6, DEST_V6), socket.AF_INET6, (*REAL_V6, 0, 0), (*DEST_V6, 0, 0)),
        ("127.0.0.1", proxyproto.encode_v1(REAL_V6, DEST_V6), socket.AF_INET6, (*REAL_V6, 0, 0), (*DEST_V6, 0, 0)),
        ("::1", proxyproto.encode_v2(REAL_V4, DEST_V4), socket.AF_INET, REAL_V4, DEST_V4),
        ("::1", proxyproto.encode_v2(REAL_V6, DEST_V6), socket.AF_INET6, (*REAL_V6, 0, 0), (*DEST_V6, 0, 0)),
        ("127.0.0.1", proxyproto.encode_v2("/run/a.sock", "/run/b.sock"), socket.AF_INET, None, None),
        ("127.0.0.1", LOCAL, socket.AF_INET, None, None),
        ("unix", proxyproto.encode_v2(REAL_V4, DEST_V4), socket.AF_INET, REAL_V4, DEST_V4),
        ("unix", proxyproto.encode_v2(REAL_V6, DEST_V6), socket.AF_INET6, (*REAL_V6, 0, 0), (*DEST_V6, 0, 0)),
        ("unix", proxyproto.encode_v2("/run/a.sock", "/run/b.sock"), socket.AF_UNIX, "/run/a.sock", "/run/b.sock"),
    ],
    ids=["v4-on-v4", "v6-on-v4", "v1-v6-on-v4", "v4-on-v6", "v6-on-v6", "unix-on-v4", "local-on-v4",
         "v4-on-unix", "v6-on-unix", "unix-on-unix"],
)  # fmt: skip
@async_test
async def test_wrapped_protocol_socket_family_is_that_of_the_address_it_reports(
    listener: str, header: bytes, family: int, peer: Any, local: Any
) -> None:
    """hypercorn shapes ``scope["client"]`` by ``socket.family``: the view's family, peer and
    local address must agree (IPv6 as the socket module's 4-tuple), whatever the listener is."""
    if listener == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    sinks: list[Sink] = []

    def make() -> asyncio.BaseProtocol:
        sinks.append(Sink())
        return Plain(sinks[-1])

    running = asyncio.get_running_loop()
    factory = wrap_protocol_factory(make)
    with tempfile.TemporaryDirectory() as directory:
        if listener == "unix":
            path = os.path.join(directory, "s")
            server = await running.create_unix_server(factory, path)
            reader, writer = await asyncio.open_unix_connection(path)
        else:
            server = await running.create_server(factory, listener, 0)
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        async with server:
            writer.write(header + b"x")
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
    (sink,) = sinks
    assert sink.extra["socket_family"] == family
    assert sink.extra["socket_peer"] == sink.extra["peername"]
    assert sink.extra["socket_sockname"] == sink.extra["sockname"]
    if peer is None:  # the header's addresses are not used: the socket's own, and its family
        assert sink.extra["peername"] == sink.extra["proxy_peername"]
    else:
        assert sink.extra["peername"] == peer and sink.extra["sockname"] == local
    ip_shape = {socket.AF_INET: 2, socket.AF_INET6: 4}
    if family in ip_shape:
        assert len(sink.extra["peername"]) == ip_shape[family] == len(sink.extra["sockname"])


# -- the at-once path: a header already in the socket when the connection is made ------------
#
# The client below is a blocking socket that connects and writes before the test's coroutine
# yields, so the kernel holds the bytes before the loop accepts: the wrapper finds the whole
# header with its first peek, then reads exactly it, in connection_made
# and serves there.  A spy on the at-once path (peek_complete_header) says which path each
# connection took.


@pytest.fixture
def at_once(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What the at-once path (peek_complete_header) answered, per connection (True: decided at once)."""
    answers: list[bool] = []
    original = aio_header.peek_complete_header

    def spy(reading: HeaderProtocol, peer: Any, sock: Any) -> bool:
        answer = original(reading, peer, sock)
        answers.append(answer)
        return answer

    monkeypatch.setattr(aio_header, "peek_complete_header", spy)
    return answers


async def send_before_accept(address: Any, data: bytes, *, local: str = "127.0.0.1") -> bytes:
    """Connect and write ``data`` (and the end of the stream) before the loop runs; what comes back."""
    loop = asyncio.get_running_loop()
    client = socket.create_connection(address, timeout=10, source_address=(local, 0))
    with client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        client.setblocking(False)
        answer = b""
        try:
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 10):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


async def serve_on_this_loop(kind: str, **options: Any) -> tuple[asyncio.AbstractServer, Any, list[Sink], Any]:
    sinks: list[Sink] = []

    def make() -> asyncio.BaseProtocol:
        sinks.append(Sink())
        return INNER[kind](sinks[-1])

    factory = wrap_protocol_factory(make, **options)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2], sinks, factory


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("kind", sorted(INNER))
@pytest.mark.parametrize("header", ["v1", "v2", "v2-v6"])
def test_header_in_the_first_segment_is_read_in_connection_made_byte_exact(
    loop: str, kind: str, header: str, at_once: list[bool]
) -> None:
    """Header and 256 KiB of payload in one write: served at once, every payload byte to the
    inner protocol in order (none read by the wrapper, none lost), the real client reported."""
    wire = {"v1": V1, "v2": V2, "v2-v6": proxyproto.encode_v2(REAL_V6, DEST_V6)}[header]
    payload = os.urandom(256 << 10)
    errors: list[str] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, c: errors.append(str(c.get("message"))))
        server, address, sinks, factory = await serve_on_this_loop(kind)
        async with server:
            answer = await send_before_accept(address, wire + payload)
            assert factory.pending == 0
        (sink,) = sinks
        assert bytes(sink.data) == payload and answer == hashlib.sha256(payload).hexdigest().encode()
        expected = REAL_V4 if header != "v2-v6" else (*REAL_V6, 0, 0)
        assert sink.extra["peername"] == expected == sink.extra["socket_peer"]
        assert sink.extra["proxy_header"].to_bytes() == wire
        assert sink.extra["proxy_peername"][0] == "127.0.0.1"

    run_on(loop, scenario)
    assert at_once == [True] and errors == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_header_completed_later_takes_the_waiting_path_byte_exact(loop: str, at_once: list[bool]) -> None:
    """Half a header at connection_made: kept by the first read, the rest read as it comes."""
    payload = os.urandom(4096)

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        server, address, sinks, factory = await serve_on_this_loop("buffered")
        async with server:
            client = socket.create_connection(address, timeout=10)
            with client:
                client.sendall(V2[:9])
                for _ in range(200):  # the loop accepts and parks the connection
                    if factory.pending:
                        break
                    await asyncio.sleep(0.01)
                client.sendall(V2[9:] + payload)
                client.shutdown(socket.SHUT_WR)
                client.setblocking(False)
                answer = await asyncio.wait_for(running.sock_recv(client, 100), 10)
        assert answer == hashlib.sha256(payload).hexdigest().encode()
        assert bytes(sinks[0].data) == payload and sinks[0].extra["peername"] == REAL_V4

    run_on(loop, scenario)
    assert at_once == [False]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize(("policy", "case"), sorted(EXPECTED))
def test_header_in_the_first_segment_follows_the_policy_table(
    loop: str, policy: str, case: str, at_once: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    """The cells of DESIGN.md's table when every byte is there at connection_made: each is decided
    at once, and what is served and logged is what the waiting path serves and logs."""
    caplog.set_level(logging.DEBUG, logger="proxyproto")

    async def scenario() -> None:
        server, address, sinks, factory = await serve_on_this_loop("plain", policy=policy, log_rate=None)
        async with server:
            await send_before_accept(address, CELLS[case])
            for _ in range(100):  # a refused connection is closed after the client's read ends
                if factory.pending == 0:
                    break
                await asyncio.sleep(0.01)
        expected = EXPECTED[(policy, case)]
        if expected is None:
            assert sinks == []
        else:
            assert bytes(sinks[0].data) == expected
            uses = policy in ("REQUIRE", "USE") and case == "header"
            assert (sinks[0].extra["peername"] == REAL_V4) is uses
            assert (sinks[0].extra["proxy_header"] is not None) is (case == "header" and policy != "SKIP")

    run_on(loop, scenario)
    closed = [r for r in caplog.records if ": closed: " in r.getMessage()]
    if EXPECTED[(policy, case)] is None:
        assert [r.levelno for r in closed] == [logging.WARNING]
    else:
        assert closed == []
    # Without ssl= every cell whose bytes are all there is decided at once (the wrapper reads them);
    # only a prefix of a header waits (test_header_completed_later_takes_the_waiting_path_byte_exact).
    assert at_once == ([] if policy == "SKIP" else [True])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_header_and_client_hello_in_one_segment_with_ssl(
    loop: str, at_once: list[bool], contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """The header and the ClientHello in the kernel before the loop accepts: the header is read
    exactly at once, the ClientHello is left for the TLS layer, 20 handshakes, none reset."""
    server_ctx, client_ctx = contexts
    errors: list[str] = []

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        running.set_exception_handler(lambda _, c: errors.append(str(c.get("message"))))
        factory = wrap_protocol_factory(Echo, ssl=server_ctx, trusted="127.0.0.1")
        server = await running.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        async with server:
            for _ in range(20):
                client = socket.create_connection(address, timeout=10)
                with client:
                    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                    tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
                    with pytest.raises(ssl.SSLWantReadError):
                        tls.do_handshake()
                    client.sendall(V2 + outgoing.read())  # before the loop runs: one segment
                    client.setblocking(False)
                    while True:
                        data = await asyncio.wait_for(running.sock_recv(client, 65536), 10)
                        assert data, "the server closed during the handshake"
                        incoming.write(data)
                        try:
                            tls.do_handshake()
                            done = True
                        except ssl.SSLWantReadError:
                            done = False
                        if out := outgoing.read():
                            await running.sock_sendall(client, out)
                        if done:
                            break
                    tls.write(b"ping")
                    await running.sock_sendall(client, outgoing.read())
                    echoed = b""
                    while len(echoed) < 4:
                        try:
                            echoed += tls.read(4)
                        except ssl.SSLWantReadError:
                            data = await asyncio.wait_for(running.sock_recv(client, 65536), 10)
                            assert data, "the server closed before echoing"
                            incoming.write(data)
                    assert echoed == b"ping"
            for _ in range(100):
                if factory.pending == 0:
                    break
                await asyncio.sleep(0.01)
            assert factory.pending == 0

    run_on(loop, scenario)
    assert at_once == [True] * 20 and errors == []


class FakeTransport(asyncio.Transport):
    """Just enough of a transport for feeding a header protocol by hand; its socket stays empty
    (every peek finds nothing), so the bytes come only from the test."""

    def __init__(self, protocol: asyncio.BaseProtocol, sock: socket.socket) -> None:
        super().__init__()
        self.protocol = protocol
        self.closed = False
        self.extra = {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 80), "socket": sock}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def write(self, data: Any) -> None:
        pass


@pytest.mark.parametrize("kind", ["plain", "buffered"])
@pytest.mark.parametrize("how", ["one", "two", "bytewise"])
@async_test
async def test_header_protocol_data_received_is_its_buffered_path(kind: str, how: str) -> None:
    """uvloop looks ``data_received`` up on every protocol (a missing one cost it an exception
    per connection), so the header protocol has one: bytes given that way are read as through
    get_buffer, and what follows the header reaches the inner protocol exactly once, in order."""
    sinks: list[Sink] = []

    def make() -> asyncio.BaseProtocol:
        sinks.append(Sink())
        return INNER[kind](sinks[-1])

    factory = wrap_protocol_factory(make)
    protocol = factory()
    quiet, other = socket.socketpair()
    with quiet, other:
        transport = FakeTransport(protocol, quiet)
        protocol.connection_made(transport)
        assert factory.pending == 1
        payload = b"payload\x00" * 40
        for piece in splits(V2 + payload, how):
            target = transport.get_protocol()
            if target is protocol:
                protocol.data_received(piece)
            else:  # the inner protocol took the transport: a transport feeds it directly
                deliver(target, piece)
    (sink,) = sinks
    assert bytes(sink.data) == payload and sink.extra["peername"] == REAL_V4
    assert factory.pending == 0 and not transport.closed


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_blocking_accepted_socket_never_stalls_the_loop(loop: str) -> None:
    """``connect_accepted_socket`` with a socket accepted by hand (blocking, as ``socket.accept``
    gives it) and no byte yet: the loop keeps running, and the header that comes a second later
    is served.  Both loops make the socket non-blocking; the wrapper's first read would not wait
    even on a blocking one (MSG_DONTWAIT: test_header_protocol_data_received_is_its_buffered_path
    drives it over a blocking socketpair, and hung with a plain os.read)."""
    import threading
    import time

    sinks: list[Sink] = []

    def make() -> asyncio.BaseProtocol:
        sinks.append(Sink())
        return Plain(sinks[-1])

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        factory = wrap_protocol_factory(make)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname()[:2], timeout=10)
            accepted, _ = listener.accept()
            assert accepted.getblocking()
            late = threading.Timer(1.0, lambda: client.sendall(V2 + b"data"))
            with client:
                late.start()
                try:
                    started = time.monotonic()
                    await asyncio.wait_for(running.connect_accepted_socket(factory, accepted), 5)
                    assert time.monotonic() - started < 0.5, "the loop waited for the peer's first byte"
                    assert factory.pending == 1
                    while not sinks:
                        await asyncio.sleep(0.01)
                    client.shutdown(socket.SHUT_WR)
                    await asyncio.wait_for(sinks[0].done.wait(), 5)
                finally:
                    late.join()
        assert bytes(sinks[0].data) == b"data" and sinks[0].extra["peername"] == REAL_V4

    run_on(loop, scenario)


# -- header_first: the server's own protocol class reads the header (uvicorn's way) ---------------


class Recorder(asyncio.Protocol):
    """A protocol class a server instantiates itself; records what it saw, as Plain does."""

    made_count = 0

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def connection_made(self, transport: Any) -> None:
        Recorder.made_count += 1  # on the base: type(self) is the header-first subclass
        self.sink.made(transport)

    def data_received(self, data: bytes) -> None:
        self.sink.data += data

    def eof_received(self) -> bool:
        return self.sink.eof()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("how", ["before accept", "two", "bytewise", "no header", "tls"])
def test_header_first_class_serves_like_the_wrapper(
    loop: str, how: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """``factory.header_first(cls)``: the server makes ``cls`` objects itself and each reads the
    header in its ``connection_made``; the original ``connection_made`` runs once, with the view,
    for a header taken at once, one that comes in pieces, and before a TLS handshake; a stream
    without a header under REQUIRE never reaches it; every payload byte arrives, in order."""
    server_ctx, client_ctx = contexts
    payload = os.urandom(64 << 10)
    sinks: list[Sink] = []

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        factory = wrap_protocol_factory(asyncio.Protocol, ssl=server_ctx if how == "tls" else None)
        cls = factory.header_first(Recorder)
        assert issubclass(cls, Recorder) and factory.header_first(Recorder) is cls

        def make() -> Recorder:
            sinks.append(Sink())
            return cls(sinks[-1])

        server = await running.create_server(make, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        async with server:
            if how == "before accept":
                answer = await send_before_accept(address, V2 + payload)
            elif how == "no header":
                answer = await send_before_accept(address, payload)
            elif how == "tls":  # no half-close in TLS: wait for the bytes, not for the answer
                _, writer = await asyncio.open_connection(*address)
                writer.write(V2)
                await asyncio.wait_for(writer.start_tls(client_ctx, server_hostname="localhost"), 10)
                writer.write(payload)
                await writer.drain()
                for _ in range(1000):
                    if sinks and len(sinks[0].data) >= len(payload):
                        break
                    await asyncio.sleep(0.01)
                writer.close()
                answer = hashlib.sha256(bytes(sinks[0].data)).hexdigest().encode()
            else:
                reader, writer = await asyncio.open_connection(*address)
                for piece in splits(V2, how):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0)
                writer.write(payload)
                writer.write_eof()
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
            assert factory.pending == 0
        if how == "no header":
            assert answer == b"" and [s.extra for s in sinks] == [{}]
            return
        (sink,) = sinks
        assert answer == hashlib.sha256(payload).hexdigest().encode() and bytes(sink.data) == payload
        assert sink.extra["peername"] == REAL_V4 == sink.extra["socket_peer"]

    Recorder.made_count = 0
    run_on(loop, scenario)
    assert Recorder.made_count == (0 if how == "no header" else 1)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_header_first_policy_hook_failure_closes_without_telling_the_inner(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``policy_for`` hook that raises closes that connection with one ERROR line; the
    header-first inner, never told of the connection, is not told of its end either (no
    connection_lost, no exception in the loop's handler), and the server keeps serving."""
    errors: list[str] = []
    lost: list[Any] = []

    class Watched(Recorder):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.append(exc)

    calls = 0

    def flaky(peer: Any, local: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("hook down")
        return "REQUIRE"

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        running.set_exception_handler(lambda _, c: errors.append(str(c.get("message"))))
        cls = wrap_protocol_factory(asyncio.Protocol, policy_for=flaky).header_first(Watched)
        sinks: list[Sink] = []

        def make() -> Recorder:
            sinks.append(Sink())
            return cls(sinks[-1])

        server = await running.create_server(make, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        async with server:
            assert await send_before_accept(address, V2 + b"first") == b""
            answer = await send_before_accept(address, V2 + b"second")
        assert answer == hashlib.sha256(b"second").hexdigest().encode()
        assert [bytes(s.data) for s in sinks] == [b"", b"second"] and sinks[0].extra == {}

    caplog.set_level(logging.ERROR, logger="proxyproto")
    run_on(loop, scenario)
    assert len(lost) == 1 and errors == []  # the second connection's end only
    assert [r.getMessage().split(": closed: ")[1].partition(" (listener ")[0] for r in caplog.records] == [
        "policy_for failed: RuntimeError: hook down"
    ]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("how", ["wrapper", "header_first"])
def test_shutdown_mid_handshake_ends_the_handshake_at_once(
    loop: str, how: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """With ``ssl=``, a connection whose header is in but whose ClientHello never comes waits in
    the handshake; ``factory.close()`` (uvicorn's shutdown) aborts it and the TLS layer learns of
    it: the handshake task ends within a second, not at its 60 s timeout (a header-first inner
    took the transport back from the TLS layer before 69682b7's fix was narrowed), and the inner
    protocol never hears of the connection (uvloop's start_tls returned a transport anyway, and
    the inner got connection_made and never connection_lost: uvicorn would wait for it)."""
    import time

    server_ctx, _ = contexts

    async def scenario() -> None:
        running = asyncio.get_running_loop()
        sinks: list[Sink] = []

        def make() -> Recorder:
            sinks.append(Sink())
            return cls(sinks[-1])

        if how == "header_first":
            factory = wrap_protocol_factory(asyncio.Protocol, ssl=server_ctx)
            cls: Any = factory.header_first(Recorder)
            server = await running.create_server(make, "127.0.0.1", 0)
        else:
            factory, cls = wrap_protocol_factory(make, ssl=server_ctx), Recorder
            server = await running.create_server(factory, "127.0.0.1", 0)
        async with server:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            writer.write(V2)  # and no ClientHello
            for _ in range(200):
                if factory.handshakes:
                    break
                await asyncio.sleep(0.01)
            assert factory.pending == 1 and len(factory.handshakes) == 1
            started = time.monotonic()
            factory.close()
            for _ in range(100):
                if not factory.handshakes:
                    break
                await asyncio.sleep(0.01)
            assert not factory.handshakes and time.monotonic() - started < 1.0
            writer.close()
        assert all(s.extra == {} for s in sinks)  # the wrapper makes its inner before the handshake

    Recorder.made_count = 0
    run_on(loop, scenario)
    assert Recorder.made_count == 0
