"""What the inner protocol sees once the header is decided: the real transport, with the header's addresses.

:class:`ProxyTransport` wraps the real transport (or the TLS one over it) and
answers ``get_extra_info`` from the header; :class:`SocketView` is its
``"socket"``, whose ``getpeername()``/``getsockname()``/``family`` describe
the header's addresses; :func:`proxy_extra` builds the keys the header
changes; :func:`hand_over` gives the inner protocol the transport through
that view; :func:`deliver` and :func:`hand_rest` give a protocol bytes
already read, the way a transport would.  Used by
:mod:`proxyproto.aio_protocol`, :mod:`proxyproto.aio_header` and
:mod:`proxyproto.aio`; nothing here reads a socket.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import Any, Callable

from .advice import SIGNATURE_PEEK
from .header import Family, ProxyHeader
from .peers import socket_family
from .policy import Policy, uses_addresses

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

_AF_INET, _AF_INET6, _AF_UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
#: An argument not given: the callee asks the transport itself.
NOT_GIVEN: Any = object()
#: A value in a ProxyTransport's extra dict meaning "absent": ``get_extra_info`` answers the caller's default.
ABSENT: Any = object()
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# Enum members as module constants for the per-connection code: on CPython 3.11 an enum member's
# attribute access goes through EnumType's slow attribute hook, a global is one lookup.
_REQUIRE, _USE = Policy.REQUIRE, Policy.USE
_INET, _INET6 = Family.INET, Family.INET6
_SOCKET_FAMILY = {Family.INET: socket.AF_INET, Family.INET6: socket.AF_INET6, Family.UNIX: socket.AF_UNIX}
_new = object.__new__
#: ``get_extra_info``'s "not in the extra dict": the real transport answers.
_MISSING: Any = object()


def is_unix_transport(transport: Any) -> bool:
    """Whether ``transport`` runs over a UNIX socket: asked of the socket itself, never of its label.

    ``uvicorn --fd`` labels a TCP listener AF_UNIX (``socket.fromfd(fd,
    AF_UNIX, ...)``), and asyncio's accepted sockets inherit the label.
    """
    sock = transport.get_extra_info("socket")
    return sock is not None and socket_family(sock) == _AF_UNIX


def served_sockname(policy: Policy, header: ProxyHeader | None, local: Any, listener_family: int) -> Any:
    """The local address a served connection reports: the header's destination when its addresses are used.

    The same rule as :func:`proxyproto.policy.served_address` for the peer,
    so ``peername`` and ``sockname`` always come from the same place.
    """
    if header is None or not uses_addresses(policy, header):
        return local
    if header.family is Family.UNIX and listener_family in _IP_FAMILIES:
        return local
    destination = header.destination
    if header.family is Family.INET6:
        assert isinstance(destination, tuple)
        return (destination[0], destination[1], 0, 0)
    return destination


def served_family(policy: Policy, header: ProxyHeader | None, listener_family: int) -> int:
    """The address family of what :func:`served_address` and :func:`served_sockname` report.

    The header's family when its addresses are used (INET: AF_INET, INET6:
    AF_INET6, UNIX: AF_UNIX), else the real socket's (``listener_family``).
    Servers shape the client address by the family (hypercorn keeps an
    AF_INET address as is, the first two items of an AF_INET6 one, and
    nothing of an AF_UNIX one), so it must describe the address reported,
    not the socket it came through.
    """
    if header is None or not uses_addresses(policy, header):
        return listener_family
    if header.family is Family.UNIX and listener_family in _IP_FAMILIES:
        return listener_family  # served with the socket's own peer (DESIGN.md)
    return _SOCKET_FAMILY.get(header.family, listener_family)


class SocketView:
    """The connection's socket as the header describes it.

    ``getpeername()`` and ``getsockname()`` answer with the header's source
    and destination (in the socket module's shape: ``(host, port)`` for
    IPv4, ``(host, port, 0, 0)`` for IPv6, a path for UNIX), and ``family``
    is the family of those addresses (:func:`served_family`), so that code
    shaping an address by ``sock.family`` gets it right when the header's
    family differs from the listener's.  The rest of the socket API an
    asyncio transport's ``get_extra_info("socket")`` offers
    (``asyncio.trsock.TransportSocket``'s: ``type``, ``proto``, ``fileno``,
    ``setsockopt``, ``settimeout``, ...) is the real socket's.  Servers such
    as uvicorn and hypercorn read the client's address from
    ``get_extra_info("socket").getpeername()`` before ``"peername"``, so a
    transport that changed only ``"peername"`` would still show the proxy.

    The delegation is written out, not a ``__getattr__``: on CPython a class
    with ``__getattr__`` takes the slow path for *every* attribute, and
    servers call ``getpeername()`` on every connection.
    """

    __slots__ = ("_local", "_peer", "_sock", "family")
    _sock: socket.socket  # the transport's socket object (TransportSocket, uvloop's PseudoSocket): that API

    def __init__(self, sock: Any, peer: Any, local: Any, family: int | None = None) -> None:
        self._sock = sock
        self._peer = peer
        self._local = local
        #: The family of ``getpeername()``'s address; the real socket's when not given.
        self.family: int = sock.family if family is None else family

    def getpeername(self) -> Any:
        return self._peer

    def getsockname(self) -> Any:
        return self._local

    # The real socket's, as asyncio.trsock.TransportSocket offers them.
    @property
    def type(self) -> socket.SocketKind:
        return self._sock.type

    @property
    def proto(self) -> int:
        return self._sock.proto

    def fileno(self) -> int:
        return self._sock.fileno()

    def dup(self) -> socket.socket:
        return self._sock.dup()

    def get_inheritable(self) -> bool:
        return self._sock.get_inheritable()

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def __repr__(self) -> str:
        return f"<SocketView family={self.family!r} peer={self._peer!r} local={self._local!r} of {self._sock!r}>"


def proxy_extra(
    raw: asyncio.BaseTransport,
    policy: Policy,
    header: ProxyHeader | None,
    peer: Any = NOT_GIVEN,
    sock: Any = NOT_GIVEN,
) -> dict[str, Any]:
    """The ``get_extra_info`` keys that ``header`` changes on the raw transport ``raw`` (or TLS over it).

    ``peer`` and ``sock``: the raw transport's ``"peername"`` and ``"socket"``
    when the caller has them already (asked of ``raw`` otherwise).  The real
    ``"sockname"`` is never needed: when the header's addresses are not used,
    the transport's own keys answer.  The same rules as
    :func:`proxyproto.policy.served_address`, :func:`served_sockname` and
    :func:`served_family`, in one pass.
    """
    if peer is NOT_GIVEN:
        peer = raw.get_extra_info("peername")
    # uses_addresses(policy, header), without its call: this runs per connection.
    if header is None or header.source is None or (policy is not _REQUIRE and policy is not _USE):
        return {"proxy_header": header, "proxy_peername": peer}
    if sock is NOT_GIVEN:
        sock = raw.get_extra_info("socket")
    family = header._kind[2]  # header.family without the property's call: this runs per connection
    peername: Any
    sockname: Any
    if family is _INET:
        peername, sockname, view_family = header.source, header.destination, _AF_INET
    elif family is _INET6:
        source, destination = header.source, header.destination
        assert isinstance(source, tuple) and isinstance(destination, tuple)
        peername = (source[0], source[1], 0, 0)
        sockname, view_family = (destination[0], destination[1], 0, 0), _AF_INET6
    else:  # UNIX (uses_addresses is false for UNSPEC)
        # On an IP socket (whatever its label says: uvicorn --fd's is AF_UNIX), the socket's own
        # addresses (DESIGN.md); without a socket object, the peer's shape tells.
        if (type(peer) is tuple) if sock is None else socket_family(sock) in _IP_FAMILIES:
            return {"proxy_header": header, "proxy_peername": peer}
        peername, sockname, view_family = header.source, header.destination, _AF_UNIX
    if sock is None:
        return {"proxy_header": header, "proxy_peername": peer, "peername": peername, "sockname": sockname}
    # SocketView(sock, peername, sockname, view_family), without the call of __init__ (per connection)
    view = _new(SocketView)
    view._sock, view._peer, view._local, view.family = sock, peername, sockname, view_family
    return {"proxy_header": header, "proxy_peername": peer, "peername": peername, "sockname": sockname, "socket": view}


class ProxyTransport(asyncio.Transport):
    """The transport an inner protocol sees: the real one, with the header's addresses.

    ``get_extra_info``: ``"peername"``, ``"sockname"`` and ``"socket"`` from the
    header when its addresses are used (else the real transport's),
    ``"proxy_header"`` (the header or None) and ``"proxy_peername"`` (the
    proxy's own address); every other key, and every method (writes, flow
    control, close, ``set_protocol``), is the real transport's.  The methods
    servers call per request (``write``, ``is_closing``, ``close``) are the
    real transport's own bound methods, set on the instance (no extra Python
    frame per call); the others delegate.
    """

    def __init__(self, transport: asyncio.Transport, extra: dict[str, Any]) -> None:
        self._transport = transport
        self._proxy_extra = extra
        # Instance attributes shadow the delegating methods below (which document the interface).
        self.write = transport.write  # type: ignore[method-assign]
        self.is_closing = transport.is_closing  # type: ignore[method-assign]
        self.close = transport.close  # type: ignore[method-assign]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        value = self._proxy_extra.get(name, _MISSING)
        if value is _MISSING:
            return self._transport.get_extra_info(name, default)
        return default if value is ABSENT else value

    # Everything else is the real transport's.
    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    # Bytes read with the header for a protocol that paused in its connection_made wait here
    # (hold), with the real transport paused, until it resumes: they come first, then the socket's.
    _held = b""
    _paused = False
    _handing = False

    def hold(self, data: bytes) -> None:
        """Keep ``data`` for the protocol until it calls :meth:`resume_reading` (it paused)."""
        self._held += data
        self._paused = True

    def pause_reading(self) -> None:
        self._paused = True
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if not self._held:
            self._transport.resume_reading()
        elif not self._handing:  # on the next iteration, never inside the protocol's own call
            self._handing = True
            asyncio.get_running_loop().call_soon(self._hand_held)

    def _hand_held(self) -> None:
        self._handing = False
        transport = self._transport
        if self._paused or transport.is_closing():
            return  # paused again meanwhile: kept for the next resume_reading
        held, self._held = self._held, b""
        deliver(transport.get_protocol(), held)
        if not self._paused and not transport.is_closing():
            transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def write(self, data: Any) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def __repr__(self) -> str:
        return f"<ProxyTransport peer={self.get_extra_info('peername')!r} of {self._transport!r}>"


def deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand bytes already read to ``protocol`` the way a transport would (both protocol kinds)."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        rest = memoryview(data)
        while rest:
            buf = memoryview(protocol.get_buffer(len(rest)))
            size = min(len(buf), len(rest))
            if size == 0:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buf[:size] = rest[:size]
            protocol.buffer_updated(size)
            rest = rest[size:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


def deliver_in_turn(protocol: asyncio.BufferedProtocol, transport: Any, data: bytes) -> None:
    """Give ``data`` to ``protocol`` through its ``get_buffer``/``buffer_updated``, as a transport would.

    Whatever is left once ``protocol`` is no longer ``transport``'s (it handed
    the transport over on the way) goes to the protocol that took it.
    """
    rest = memoryview(data)
    while rest:
        if transport is not None and transport.get_protocol() is not protocol:
            deliver(transport.get_protocol(), bytes(rest))
            return
        buf = memoryview(protocol.get_buffer(len(rest)))
        size = min(len(buf), len(rest))
        buf[:size] = rest[:size]
        protocol.buffer_updated(size)
        rest = rest[size:]


def hand_over(
    transport: Any,
    inner: asyncio.BaseProtocol,
    connect: Callable[[Any, asyncio.BaseTransport], None] | None,
    extra: dict[str, Any],
    rest: bytes,
) -> None:
    """``inner`` takes ``transport``: told of the connection through a :class:`ProxyTransport` over ``extra``.

    ``connect``: the function that tells it, called with ``inner`` and the
    view, in place of its own ``connection_made`` (``header_first``'s
    original one), or None.  ``rest``: the bytes read with the header, given
    right after (:func:`hand_rest`).
    """
    if transport.get_protocol() is not inner:  # else header_first's inner had it all along
        transport.set_protocol(inner)
    view = ProxyTransport(transport, extra)
    if connect is None:
        inner.connection_made(view)
    else:  # header_first: its own connection_made would only pass the view on, one call deeper
        connect(inner, view)
    if rest:
        hand_rest(transport, view, inner, rest)


def hand_rest(transport: Any, view: ProxyTransport, inner: asyncio.BaseProtocol, rest: bytes) -> None:
    """Give ``inner`` the bytes read with its header, right after its ``connection_made`` (``view``'s)."""
    if transport.is_closing():
        return
    if isinstance(transport, asyncio.ReadTransport) and not transport.is_reading():
        # The inner paused in connection_made, and asyncio's transports honour that: the bytes
        # read with the header wait for its resume_reading.  (uvloop's are no ReadTransport: it
        # reads into a protocol that paused there, so they go now, in order with what it reads
        # next.)
        view.hold(rest)
    elif isinstance(inner, asyncio.BufferedProtocol):
        deliver(inner, rest)
    else:  # deliver() would do just this, one call deeper
        inner.data_received(rest)  # type: ignore[attr-defined]



class FirstBytes(asyncio.Protocol):
    """Stands between ``transport`` and its protocol ``inner`` until the first bytes: shows them to ``look``.

    For a diagnosis that must not change what is served (an untrusted
    peer's stream under SKIP: does it start with a PROXY header?): the
    first bytes go to ``look`` and then, unchanged and in order, to
    ``inner``, which takes the transport back at that moment; until then
    every other callback is passed on.  ``inner`` has been told of the
    connection already.
    """

    def __init__(self, transport: Any, inner: asyncio.BaseProtocol, look: Callable[[bytes], None]) -> None:
        self.transport = transport
        self.inner = inner
        self.look = look

    def data_received(self, data: bytes) -> None:
        self.transport.set_protocol(self.inner)
        try:
            self.look(bytes(data[:SIGNATURE_PEEK]))
        finally:
            deliver(self.inner, data)

    def eof_received(self) -> bool | None:
        self.transport.set_protocol(self.inner)
        eof_received = getattr(self.inner, "eof_received", None)
        return None if eof_received is None else bool(eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
