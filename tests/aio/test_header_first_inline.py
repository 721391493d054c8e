"""``header_first``'s inline path gives the answers of the general path, for every input.

``ProxyProtocolFactory.header_first`` reads a header that is already in the socket without a
``HeaderProtocol`` (the per-connection path of uvicorn, written out for speed).  The general
path, ``wrap_protocol_factory``, goes through ``HeaderProtocol`` every time.  Here both serve the
same bytes, sent before the loop accepts (so the inline path is the one that runs), over real
loopback sockets on asyncio and uvloop, with a plain and a buffered inner protocol, and what the
inner protocol sees must be equal: served or not, every ``get_extra_info`` key a server reads,
the socket view's answers, and the payload, byte for byte.  A spy counts the ``HeaderProtocol``
objects: none for a trusted peer's valid header (the case of every connection from a proxy),
one for anything else.

The inline path also keeps what the general path guarantees beyond the answers: a peer that
resets before the accept (no peername) is never trusted, a factory subclass's ``policy_for`` is
obeyed, and a waiting connection of a custom uvicorn protocol class still gets its deadline.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import pytest
from aio_kit import DEST_V4, DEST_V6, REAL_V4, REAL_V6, run_on
from support import require_module

import proxyproto
from proxyproto.aio_header import HeaderProtocol
from proxyproto.aio_protocol import ProxyProtocolFactory, wrap_protocol_factory

LOOPS = ["asyncio", "uvloop"]
PAYLOAD = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 64

TLVS = [(proxyproto.TLVType.ALPN, b"h2"), (proxyproto.TLVType.AUTHORITY, b"example.com")]
WIRES = {
    "v1 tcp4": proxyproto.encode_v1(REAL_V4, DEST_V4),
    "v1 tcp6": proxyproto.encode_v1(REAL_V6, DEST_V6),
    "v1 unknown": b"PROXY UNKNOWN\r\n",
    "v2 tcp4": proxyproto.encode_v2(REAL_V4, DEST_V4),
    "v2 tcp6": proxyproto.encode_v2(REAL_V6, DEST_V6),
    "v2 tcp4 tlvs": proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=TLVS),
    "v2 tcp4 crc": proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=TLVS, checksum=True),
    # Longer than the inline path's peek: a HeaderProtocol reads it, to the same answers.
    "v2 tcp4 long tlv": proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=[(proxyproto.TLVType.AUTHORITY, b"a" * 250)] * 4),
    "v2 unix": proxyproto.encode_v2("/run/client.sock", "/run/server.sock"),
    "v2 local": proxyproto.encode_v2(None, None),
    "v2 bad crc": proxyproto.encode_v2(REAL_V4, DEST_V4, checksum=True)[:-1] + b"\x00",
    "v1 malformed": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "no header": b"",
    "v2 cut by eof": proxyproto.encode_v2(REAL_V4, DEST_V4)[:20],
}
#: Sent without the payload after it: the stream ends inside the header.
ALONE = {"v2 cut by eof"}
#: The inputs the inline path must serve without a HeaderProtocol (trusted peer, REQUIRE or USE).
INLINE = {"v1 tcp4", "v1 tcp6", "v1 unknown", "v2 tcp4", "v2 tcp6", "v2 tcp4 tlvs", "v2 tcp4 crc"}
INLINE |= {"v2 unix", "v2 local"}
#: Served too, by a HeaderProtocol (the header is longer than the inline path's peek).
SERVED = INLINE | {"v2 tcp4 long tlv"}
KEYS = ("peername", "sockname", "proxy_header", "proxy_peername")


class Observer(asyncio.Protocol):
    """What a server would read from the transport, and every byte it is given."""

    def __init__(self, seen: list[dict[str, Any]]) -> None:
        self.seen = seen
        self.record: dict[str, Any] = {"data": bytearray()}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        record = self.record
        for key in KEYS:
            record[key] = transport.get_extra_info(key)
        sock = transport.get_extra_info("socket")
        record["socket"] = (sock.getpeername(), sock.getsockname(), sock.family, sock.type, sock.fileno() >= 0)
        record["socket options"] = (sock.proto, sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE), sock.gettimeout())
        record["sslcontext"] = transport.get_extra_info("sslcontext")
        record["unknown keys"] = (transport.get_extra_info("peercert"), transport.get_extra_info("no such", "dflt"))
        # Keywords as asyncio's own transports take them (a dict's get would not).
        record["keywords"] = (
            transport.get_extra_info(name="no such", default="kw"),
            transport.get_extra_info("sslcontext", default="kw"),
        )
        self.seen.append(record)

    def data_received(self, data: bytes) -> None:
        self.record["data"] += data

    def eof_received(self) -> bool:
        self.transport.write(b"served")
        self.transport.close()
        return False


class BufferedObserver(Observer, asyncio.BufferedProtocol):
    def __init__(self, seen: list[dict[str, Any]]) -> None:
        super().__init__(seen)
        self.buf = bytearray(7)  # small: the bytes read with the header go in several pieces

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.record["data"] += self.buf[:nbytes]


INNER = {"plain": Observer, "buffered": BufferedObserver}


def serve_once(loop: str, path: str, kind: str, name: str, **settings: Any) -> tuple[bytes, list[Any], int]:
    """The answer to ``WIRES[name] + PAYLOAD`` sent before the accept, what the inner protocol saw, and
    how many HeaderProtocol objects were made, through ``header_first`` or the general wrapper."""
    seen: list[dict[str, Any]] = []
    made = [0]
    original = HeaderProtocol.__init__

    def counting(self: HeaderProtocol, *args: Any, **kwargs: Any) -> None:
        made[0] += 1
        original(self, *args, **kwargs)

    answer = b""

    async def scenario() -> None:
        nonlocal answer
        inner = INNER[kind]
        factory = wrap_protocol_factory(lambda: inner(seen), header_timeout=2.0, **settings)
        make: Any = factory
        if path == "header_first":
            cls = factory.header_first(inner)

            def make() -> Any:
                return cls(seen)

        server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
        async with server:
            client = socket.create_connection(server.sockets[0].getsockname()[:2], timeout=10)
            with client:
                client.sendall(WIRES[name] + (b"" if name in ALONE else PAYLOAD))
                client.shutdown(socket.SHUT_WR)
                client.setblocking(False)
                loop_ = asyncio.get_running_loop()
                try:
                    while chunk := await asyncio.wait_for(loop_.sock_recv(client, 65536), 10):
                        answer += chunk
                except ConnectionResetError:
                    pass

    HeaderProtocol.__init__ = counting  # type: ignore[method-assign]
    try:
        run_on(loop, scenario)
    finally:
        HeaderProtocol.__init__ = original  # type: ignore[method-assign]
    return answer, [local_ports_hidden(record) for record in seen], made[0]


def local_ports_hidden(value: Any) -> Any:
    """``value`` with the ports of 127.0.0.1 addresses as ``"*"``: two runs use two servers, and
    two clients, whose ephemeral ports differ; the header's addresses are never on 127.0.0.1."""
    if isinstance(value, dict):
        return {key: local_ports_hidden(item) for key, item in value.items()}
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, tuple):
        if len(value) == 2 and value[0] == "127.0.0.1":
            return ("127.0.0.1", "*")
        return tuple(local_ports_hidden(item) for item in value)
    return value


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", sorted(INNER))
@pytest.mark.parametrize("wire", sorted(WIRES))
def test_inline_path_answers_as_the_general_path(loop: str, kind: str, wire: str) -> None:
    """Trusted peer under REQUIRE: the same verdict, keys, socket view and payload on both paths."""
    inline = serve_once(loop, "header_first", kind, wire)
    general = serve_once(loop, "wrapper", kind, wire)
    assert inline[:2] == general[:2]
    answer, seen, made = inline
    if wire in SERVED:
        assert answer == b"served" and made == (0 if wire in INLINE else 1), (answer, made)
        assert seen[0]["data"] == PAYLOAD
        assert seen[0]["proxy_header"] == proxyproto.parse(WIRES[wire])
        assert seen[0]["sslcontext"] is None
        assert seen[0]["unknown keys"] == (None, "dflt")
        assert seen[0]["keywords"] == ("kw", "kw")
    else:
        assert answer == b"" and seen == [] and made == 1, (answer, seen, made)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("settings", "wire"),
    [
        ({"policy": "USE"}, "v2 tcp6"),
        ({"policy": "USE"}, "no header"),
        ({"policy": "IGNORE"}, "v2 tcp4"),
        ({"policy": "REJECT"}, "no header"),
        ({"policy": "REJECT"}, "v2 tcp4"),
        ({"policy": "SKIP"}, "v1 tcp4"),
        ({"trusted": "10.0.0.0/8"}, "v2 tcp4"),
        ({"trusted": "10.0.0.0/8", "untrusted_policy": "IGNORE"}, "v2 tcp4"),
        ({"trusted": "10.0.0.0/8", "untrusted_policy": "REJECT"}, "no header"),
        ({"trusted": "127.0.0.0/8"}, "v1 tcp6"),
        ({"trusted": "*"}, "v2 tcp4"),
        ({"max_header_size": 20}, "v2 tcp4 tlvs"),
        ({"verify_checksum": False}, "v2 bad crc"),
        ({"allow_v4_in_tcp6": True}, "v1 tcp4"),
    ],
)
def test_inline_path_follows_every_knob_as_the_general_path(loop: str, settings: dict[str, Any], wire: str) -> None:
    """The policy table, the trust list and the parse options: the inline path decides as the
    general one does, for the cells it serves itself and the ones it hands over."""
    inline = serve_once(loop, "header_first", "plain", wire, **settings)
    general = serve_once(loop, "wrapper", "plain", wire, **settings)
    assert inline[:2] == general[:2]


def test_uvicorn_protocol_class_is_built_directly_after_the_first_connection() -> None:
    """proxyproto.uvicorn puts the header-first class in the config's http_protocol_class at the
    first connection, so uvicorn builds it without the ``--http`` class's ``__new__`` after that."""
    uvicorn = require_module("uvicorn")
    from proxyproto.uvicorn import wrap

    http = wrap("h11", trusted="127.0.0.1")
    loop = asyncio.new_event_loop()
    try:
        config = uvicorn.Config(lambda scope, receive, send: None, http=http, lifespan="off")
        config.load()
        assert config.http_protocol_class is http
        state = uvicorn.server.ServerState()
        options = {"config": config, "server_state": state, "app_state": {}, "_loop": loop}
        protocol = http(**options)
        made = config.http_protocol_class
        assert made is not http and type(protocol) is made
        assert type(made(**options)) is made
        other = uvicorn.Config(lambda scope, receive, send: None, http=http, lifespan="off")
        other.load()
        assert type(http(**{**options, "config": other})) is not made  # one class per config
    finally:
        loop.close()


def test_socket_view_offers_every_name_of_asyncios_transport_socket() -> None:
    """SocketView delegates by name, not by ``__getattr__`` (which would slow every attribute):
    every public name of ``asyncio.trsock.TransportSocket`` is there, and answers as the socket."""
    import asyncio.trsock

    from proxyproto.aio_transport import SocketView

    names = {name for name in vars(asyncio.trsock.TransportSocket) if not name.startswith("_")}
    names.discard("getsockbyname")  # asyncio forwards it to a method sockets do not have: it cannot work
    assert names <= set(dir(SocketView)), names - set(dir(SocketView))
    assert "__getattr__" not in vars(SocketView)
    with socket.socket() as raw:
        real = asyncio.trsock.TransportSocket(raw)
        view = SocketView(real, REAL_V4, DEST_V4)
        assert (view.type, view.proto, view.fileno(), view.gettimeout()) == (real.type, real.proto, raw.fileno(), 0.0)
        view.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        assert view.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert view.get_inheritable() is False
        view.settimeout(0)
        view.setblocking(False)
        duplicate = view.dup()
        duplicate.close()
        assert (view.getpeername(), view.getsockname(), view.family) == (REAL_V4, DEST_V4, socket.AF_INET)


# -- the inline path keeps the general path's trust, policy hook and deadline ---------------------

REQUEST = b"POST /admin HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
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
        _send_and_reset(listener.getsockname(), SPOOF + REQUEST)
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
                client.sendall(SPOOF + REQUEST)
                time.sleep(0.05)
                server = await asyncio.get_running_loop().create_server(make, sock=listener)
                async with server:
                    for _ in range(50):
                        if seen and len(seen[0]["data"]) >= len(SPOOF + REQUEST):
                            break
                        await asyncio.sleep(0.02)

        run_on(loop, scenario)

    general, inline = results["wrapper"], results["header_first"]
    assert general and general[0]["proxy_header"] is None and bytes(general[0]["data"]) == SPOOF + REQUEST
    assert inline and inline[0]["proxy_header"] is None, inline
    assert inline[0]["peername"] != REAL_V4
    assert bytes(inline[0]["data"]) == SPOOF + REQUEST


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
