"""asyncio protocols that read the PROXY header first: a wrapper for any protocol factory.

``asyncio.start_server`` hands connections to streams; most asyncio servers
(uvicorn, hypercorn, aiohttp's low-level server, aiosmtpd) hand them to a
*protocol* made by a factory given to ``loop.create_server``.
:func:`wrap_protocol_factory` wraps such a factory::

    factory = proxyproto.aio_protocol.wrap_protocol_factory(MyProtocol, trusted="10.0.0.0/8")
    server = await loop.create_server(factory, "0.0.0.0", 8080)

Each connection first gets a small :class:`asyncio.BufferedProtocol` that
reads the header, and only then the real (inner) protocol, which sees a
transport whose ``get_extra_info("peername")``, ``("sockname")`` and
``("socket")`` tell the header's addresses (uvicorn and hypercorn ask the
socket object first), plus ``"proxy_header"`` and ``"proxy_peername"``.

How it reads: the wrapper never reads a byte past the header, so what
follows it (a request, a ClientHello, the end of the stream) reaches the
inner protocol from the transport itself, in the order and on the loop turns
it would without the wrapper.  A header that is already in the socket when
the connection is made (the case of every real proxy: the header leaves with,
or before, the first segment) is taken in ``connection_made``, before the
transport reads anything: one ``recv`` with ``MSG_PEEK`` (as HAProxy's
receiver does) shows it, a second ``recv`` takes exactly its bytes.  A header
still on its way gets a buffer that grows with it (the wrapper is a
``BufferedProtocol``: the transport reads into the buffer it gives, sized to
what the header still needs), a deadline and a parking slot.  Where the
socket cannot be peeked, the reads are sized by
:func:`proxyproto.reader.measure` alone (16 bytes, then what the length field
says; a v1 line byte by byte after its first 16).

Why TLS is the wrapper's job: ``create_server(ssl=...)`` handshakes before
the protocol sees a byte, so the header would reach the TLS layer and fail
(aiosmtpd's bug aio-libs/aiosmtpd#559).  Given ``ssl=``, the wrapper reads the
header from the raw connection and then runs ``loop.start_tls``: the
handshake happens after the header, as with haproxy's ``send-proxy`` in front
of TLS passthrough.  uvloop starts reading when ``connection_made`` returns,
whatever the protocol paused, so it may read (a ClientHello) into the
wrapper once more before ``start_tls`` takes the transport: the wrapper
never answers such a read with an empty buffer (a fatal error to uvloop),
keeps those bytes and gives them to the TLS protocol before its handshake
starts (:meth:`HeaderProtocol.hand_over_late`).

Every outcome goes through :func:`proxyproto.policy.decide` (DESIGN.md's
table); each connection has its own header deadline; at most ``max_pending``
connections wait for their header at once (past it the oldest is closed, as
the socketserver mixin does), and fewer when the process runs short of file
descriptors (:mod:`proxyproto.parking`); refusal lines are rate limited
(:class:`~proxyproto.refusal_log.RefusalLog`); :meth:`ProxyProtocolFactory.close`
closes the connections still waiting, for a prompt shutdown.
"""

from __future__ import annotations

import _socket
import asyncio
import logging
import socket
import ssl as _ssl
from collections.abc import Iterable
from typing import Any, Callable, TypeVar, Union

from . import reader as core
from . import v2
from .errors import InvalidHeader, NoProxyHeader, ProxyProtocolError
from .header import Family, ProxyHeader
from .parking import Parking, descriptor_of
from .peers import connection_trust, socket_family
from .policy import (
    Outcome,
    Policy,
    Trust,
    decide,
    describe,
    hook_trust,
    peer_text,
    uses_addresses,
)
from .refusal_log import DEFAULT_LOG_RATE, KIND_POLICY_FOR, KIND_TLS, RefusalLog, kind_of
from .settings import adapter_settings

__all__ = [
    "ProxyProtocolFactory",
    "ProxyTransport",
    "SocketView",
    "served_family",
    "served_sockname",
    "wrap_protocol_factory",
]

logger = logging.getLogger("proxyproto")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
_P = TypeVar("_P", bound=asyncio.BaseProtocol)
#: ``policy_for(peer, local) -> Policy``: the mixin's ``proxy_policy_for`` hook, as a function.
PolicyHook = Callable[[Any, Any], Union[Policy, str]]

_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_READ_FLAGS = getattr(socket, "MSG_DONTWAIT", 0)
_CAN_PEEK = hasattr(socket, "MSG_DONTWAIT")
_AF_INET, _AF_INET6, _AF_UNIX, _SOCK_STREAM = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.SOCK_STREAM
_MISSING: Any = object()
#: A value in a ProxyTransport's extra dict meaning "absent": ``get_extra_info`` answers the caller's default.
_DEFAULT: Any = object()
#: The policies under which a valid header is served (the table's first row), looked up once.
#: A tuple, not a set: ``in`` finds a member by identity, where a set would call Enum's Python ``__hash__``.
_SERVES_A_HEADER = tuple(policy for policy in Policy if decide(policy, Outcome.HEADER).serve)
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# Enum members as module constants for the per-connection code: on CPython 3.11 ``Policy.REQUIRE``
# costs a call of EnumType.__getattr__'s hook (about a thousand instructions), a global a lookup.
_REQUIRE, _USE, _SKIP = Policy.REQUIRE, Policy.USE, Policy.SKIP
_INET, _INET6 = Family.INET, Family.INET6
_SOCKET_FAMILY = {Family.INET: socket.AF_INET, Family.INET6: socket.AF_INET6, Family.UNIX: socket.AF_UNIX}
#: What the first read asks for when the socket cannot be peeked: a v2 header's fixed part.
_FIRST_READ = 16
_new = object.__new__
#: What the inline path peeks at: every header real senders emit fits (a longer one, or a prefix,
#: goes to a HeaderProtocol, which peeks up to the size cap); small enough for CPython's
#: small-object allocator.
_INLINE_PEEK = 400
_socket_object = _socket.socket
#: The buffer for bytes read after the decision, before ``start_tls`` takes the transport: a TLS record.
_LATE_READ = 16384
#: The protocols that have ``eof_received`` (``BufferedProtocol`` is not a ``Protocol`` subclass).
_STREAM_PROTOCOLS = (asyncio.Protocol, asyncio.BufferedProtocol)


def call_later(delay: float, callback: Callable[[], None]) -> bool:
    """:data:`proxyproto.refusal_log.Later` for the asyncio adapters: a timer on the running loop.

    The refusal logs call it from the loop's own callbacks; False (nothing
    armed) when no loop is running.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    loop.call_later(delay, callback)
    return True


def _borrow(peer: Any, sock: Any) -> Any:
    """A socket object on ``sock``'s descriptor, for one ``recv``; detach it after, it never closes it.

    The family is only a label (``recv`` does not look at it): the peer's
    shape gives it without the enum conversions of ``sock.family``.
    """
    family = _AF_UNIX if type(peer) is not tuple else _AF_INET6 if len(peer) == 4 else _AF_INET
    return _socket.socket(family, _SOCK_STREAM, 0, sock.fileno())


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
    peer: Any = _MISSING,
    sock: Any = _MISSING,
) -> dict[str, Any]:
    """The ``get_extra_info`` keys that ``header`` changes on the raw transport ``raw`` (or TLS over it).

    ``peer`` and ``sock``: the raw transport's ``"peername"`` and ``"socket"``
    when the caller has them already (asked of ``raw`` otherwise).  The real
    ``"sockname"`` is never needed: when the header's addresses are not used,
    the transport's own keys answer.  The same rules as
    :func:`proxyproto.policy.served_address`, :func:`served_sockname` and
    :func:`served_family`, in one pass.
    """
    if peer is _MISSING:
        peer = raw.get_extra_info("peername")
    # uses_addresses(policy, header), without its call: this runs per connection.
    if header is None or header.source is None or (policy is not _REQUIRE and policy is not _USE):
        return {"proxy_header": header, "proxy_peername": peer}
    if sock is _MISSING:
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
    real transport's own bound methods, set on the instance, so a call costs
    no extra Python frame; the others delegate (binding one costs every
    connection about what a delegated call costs).
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
        return default if value is _DEFAULT else value

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


def _handshake_timeout(given: float | None, header_timeout: float) -> float:
    """The TLS handshake's bound: ``given`` when the user gave one, else ``header_timeout``."""
    if given is None:
        return header_timeout
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not 0 < given < float("inf"):
        raise ValueError(f"ssl_handshake_timeout: must be a finite number of seconds above 0, got {given!r}")
    return float(given)


class ProxyProtocolFactory:
    """A protocol factory for ``loop.create_server``: each connection reads its header, then gets ``factory()``.

    Made by :func:`wrap_protocol_factory`, which documents the knobs.  One
    instance may serve several listeners; :attr:`pending` counts the
    connections whose header is not in yet (across them), :meth:`close`
    closes those connections.
    """

    def __init__(
        self,
        factory: ProtocolFactory,
        *,
        policy: Policy | str = Policy.REQUIRE,
        trusted: Any | None = None,
        untrusted_policy: Policy | str = Policy.SKIP,
        header_timeout: float = 10.0,
        max_header_size: int = 4096,
        verify_checksum: bool = True,
        allow_v4_in_tcp6: bool = False,
        max_pending: int = 256,
        ssl: _ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        policy_for: PolicyHook | None = None,
        log_rate: float | None = DEFAULT_LOG_RATE,
    ) -> None:
        self.policy, self.untrusted_policy, self.trusted = adapter_settings(
            policy=policy,
            trusted=trusted,
            untrusted_policy=untrusted_policy,
            header_timeout=header_timeout,
            max_header_size=max_header_size,
            max_pending=max_pending,
            log_rate=log_rate,
        )
        self.factory = factory
        self.policy_for_hook = policy_for
        if ssl is not None and policy_for is None:
            for name, value in (("policy", self.policy), ("untrusted_policy", self.untrusted_policy)):
                if value in (Policy.USE, Policy.IGNORE, Policy.REJECT) and (name == "policy" or trusted is not None):
                    instead = "REQUIRE (or SKIP)" if name == "policy" else "SKIP"
                    raise ValueError(
                        f"{name}={value.name} with ssl=: a stream that turns out to have no header would have "
                        f"lost its first bytes to the TLS layer; use {instead}"
                    )
        self.header_timeout = float(header_timeout)
        self.max_size = max_header_size
        self.cap = max(max_header_size, core.MAX_V1_LENGTH)
        self.verify_checksum = verify_checksum
        self.allow_v4_in_tcp6 = allow_v4_in_tcp6
        self.max_pending = max_pending
        self.ssl = ssl
        #: Seconds for the TLS handshake after the header: ``header_timeout`` unless given (see
        #: :func:`wrap_protocol_factory`); the connection counts toward ``max_pending`` meanwhile.
        self.ssl_handshake_timeout = _handshake_timeout(ssl_handshake_timeout, self.header_timeout)
        self.refusals = RefusalLog(logger, log_rate, later=call_later)
        #: Connections not handed to their protocol yet, and the one rule that evicts them (max_pending,
        #: the descriptor reserve); :attr:`parked` is its dict (oldest first: dicts keep insertion order).
        self.parking: Parking[HeaderProtocol] = Parking(self.refusals, HeaderProtocol.abort)
        self.parked: dict[HeaderProtocol, Any] = self.parking.waiting
        self.handshakes: set[asyncio.Future[None]] = set()
        self.closed = False
        #: Whether :meth:`header_first` classes may take a header already in the socket inline:
        #: no TLS layer to leave bytes for and no user hook to call (those go through HeaderProtocol).
        self.inline = (
            ssl is None
            and policy_for is None
            and _CAN_PEEK
            and type(self).policy_for is ProxyProtocolFactory.policy_for  # a subclass may decide otherwise
        )
        self._header_first: dict[type, type] = {}
        #: ``(name, value)`` pairs set on the inner protocol of a connection from a trusted peer,
        #: before it is told of the connection: an adapter's way to serve such connections
        #: differently (``proxyproto.uvicorn`` gives them the application without uvicorn's
        #: X-Forwarded-For middleware).
        self.trusted_overrides: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> HeaderProtocol:
        return HeaderProtocol(self)

    def header_first(self, inner_class: type[_P]) -> type[_P]:
        """A subclass of ``inner_class`` whose ``connection_made`` reads the header first.

        The other way to use this factory, for servers that make their
        protocol objects themselves (uvicorn builds one from its ``--http``
        class): instead of a :class:`HeaderProtocol` that reads the header
        and then hands the transport to a second object, the server's own
        protocol is the transport's from the start.  Its ``connection_made``
        reads the header in place (a :class:`HeaderProtocol` does it, over
        the same rules) and calls the original ``connection_made`` with the
        :class:`ProxyTransport`: no second protocol object for the loop, no
        ``set_protocol`` in the common case.  A header still on its way (or
        ``ssl=``) installs the :class:`HeaderProtocol` on the transport until
        it is decided, as :meth:`__call__` does.  One class per inner class
        and factory, made once.
        """
        made = self._header_first.get(inner_class)
        if made is None:
            made = self._header_first[inner_class] = _header_first_class(self, inner_class)
        return made

    def policy_for(self, peer: Any, transport: asyncio.BaseTransport) -> Policy:
        """The policy for a connection from ``peer`` (:meth:`trust`'s; a subclass may override this)."""
        return self.trust(peer, transport).policy

    def trust(self, peer: Any, transport: asyncio.BaseTransport) -> Trust:
        """The connection's policy, and whether its peer is trusted (only then is its header handed on).

        The user's ``policy_for`` hook (or a subclass's :meth:`policy_for`)
        answers a Policy, and its peer counts as trusted when that is REQUIRE
        or USE (:func:`~proxyproto.policy.hook_trust`); else the default rule
        (:func:`~proxyproto.policy.trust_for`), asking the socket itself for a
        peer that is no IP tuple (a UNIX one: is the socket file world-writable?).
        """
        if self.policy_for_hook is not None:
            return hook_trust(self.policy_for_hook(peer, transport.get_extra_info("sockname")))
        if type(self).policy_for is not ProxyProtocolFactory.policy_for:
            return hook_trust(self.policy_for(peer, transport))
        return connection_trust(
            self.policy, self.untrusted_policy, self.trusted, peer, transport.get_extra_info("socket")
        )

    @property
    def pending(self) -> int:
        """Connections whose header (or, with ``ssl=``, handshake) is not complete yet."""
        return len(self.parked)

    def close(self) -> None:
        """Close every connection still waiting for its header; later ones are closed on arrival.

        Call it when the server stops accepting (after ``Server.close()``):
        the connections it closes were never handed to the application, so a
        graceful shutdown has nothing to wait for.
        """
        self.closed = True
        for waiting in list(self.parked):
            waiting.shutdown()

    async def aclose(self) -> None:
        """:meth:`close`, then one loop iteration so the transports finish closing."""
        self.close()
        await asyncio.sleep(0)

    def park(self, waiting: HeaderProtocol) -> None:
        """Count ``waiting`` (its header, or with ``ssl=`` its handshake, is not done); close the oldest as needed.

        Past ``max_pending``, or when ``waiting``'s descriptor is within the
        reserve below the soft ``RLIMIT_NOFILE``, the oldest waiting
        connections are closed first (:class:`proxyproto.parking.Parking`,
        the streams adapter's rule too).  Only connections that wait come
        here, never one whose header was complete on arrival.
        """
        self.parking.add(waiting, waiting.peer, descriptor_of(waiting.transport), self.max_pending)

    def unpark(self, waiting: HeaderProtocol) -> None:
        self.parked.pop(waiting, None)


class _Holding(asyncio.Protocol):
    """Keeps what the TLS layer decrypts before the inner protocol has been told of the connection."""

    __slots__ = ("data", "eof", "lost", "lost_exc")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc

    def data_received(self, data: bytes) -> None:
        self.data.append(bytes(data))

    def eof_received(self) -> bool:
        self.eof = True
        return True


class HeaderProtocol(asyncio.BufferedProtocol):
    """One connection until its header is in: exact reads, then the inner protocol takes the transport.

    The common case costs two system calls of its own and no waiting state:
    a header that arrived with the connection (a proxy sends it before or
    with the first segment) is peeked at and taken in :meth:`connection_made`
    (:meth:`peek_complete_header`), and the inner protocol is served there.
    Only a connection whose header is not complete yet gets a buffer, a
    parking slot and a deadline, and reads through :meth:`get_buffer`.  No
    read ever goes past the header's last byte (where the socket can be
    peeked): the bytes after it, and the end of the stream, are the inner
    protocol's, read by the transport.
    """

    # Class defaults, so that a connection served at once sets only what it uses.
    transport: asyncio.Transport | None = None
    peer: Any = None
    policy = Policy.REQUIRE
    #: Whether the peer is trusted: only then does its header reach the inner protocol.
    trusted = False
    #: True while the header is awaited through :meth:`get_buffer` (parked, with a deadline).
    waiting = False
    #: The header bytes read so far while waiting: ``buf[:held]``.  It grows with what the
    #: header needs (never beyond ``factory.cap``), so a parked connection holds no more
    #: memory than the bytes its peer sent.
    buf: bytes | bytearray = b""
    held = 0
    need = _FIRST_READ
    peek: Any = None
    timer: asyncio.TimerHandle | None = None
    #: Served with ``ssl=``, until ``start_tls`` takes the transport: the bytes (of the
    #: ClientHello) the transport read meanwhile, handed to the TLS layer; else None.
    late: bytearray | None = None
    late_eof = False
    spare = bytearray()  # replaced, never mutated
    #: The inner protocol when it was made before the header (:meth:`ProxyProtocolFactory.header_first`),
    #: else None: ``factory.factory()`` makes it once the connection is to be served.
    inner: asyncio.BaseProtocol | None = None
    #: The function ``connection_made`` of ``inner``'s original class when header_first replaced
    #: it (called with ``inner`` and the view), else None.
    connect: Callable[[Any, asyncio.BaseTransport], None] | None = None

    def __init__(
        self,
        factory: ProxyProtocolFactory,
        inner: asyncio.BaseProtocol | None = None,
        connect: Callable[[Any, asyncio.BaseTransport], None] | None = None,
    ) -> None:
        self.factory = factory
        if inner is not None:
            self.inner = inner
            self.connect = connect

    # -- asyncio.BaseProtocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw: Any = transport  # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        factory = self.factory
        self.transport = raw
        self.peer = peer = raw.get_extra_info("peername")
        if factory.closed:
            self.reclaim()
            raw.abort()
            return
        try:
            policy, self.trusted = factory.trust(peer, raw)
            self.policy = policy
            if factory.ssl is not None and policy is not _REQUIRE and policy is not _SKIP:
                # Refused when built without a hook; a hook can still answer an opt-in policy,
                # whose sniffed bytes the TLS layer would never see.
                raise ValueError(f"policy {policy.name} with ssl=: only REQUIRE or SKIP can negotiate TLS")
        except Exception as exc:  # a user's hook: its failure closes this connection, never the server
            factory.refusals.log(
                logging.ERROR,
                "%s: closed: policy_for failed: %s: %s",
                peer_text(peer),
                type(exc).__name__,
                exc,
                kind=KIND_POLICY_FOR,
            )
            self.reclaim()
            raw.abort()
            return
        if policy is _SKIP:
            # With ssl=, the handshake starts on the next iteration.  asyncio honours the pause
            # serve() asks for here; uvloop starts reading once connection_made returns and may
            # read (the ClientHello) first: get_buffer keeps those bytes for the TLS layer.
            self.serve(None, b"")
            return
        sock = raw.get_extra_info("socket") if _CAN_PEEK else None
        if sock is not None and self.peek_complete_header(peer, sock):
            return
        self.wait()

    def wait(self) -> None:
        """The header is not all there yet: wait for it, with a deadline, reading through this protocol."""
        raw: Any = self.transport
        factory = self.factory
        if raw.get_protocol() is not self:
            raw.set_protocol(self)  # header_first's inner has the transport until now
        self.waiting = True
        factory.park(self)
        self.timer = asyncio.get_running_loop().call_later(factory.header_timeout, self.expire)

    def peek_complete_header(self, peer: Any, sock: Any) -> bool:
        """Serve at once when the header is complete in the socket; True when decided.

        Called from :meth:`connection_made` before the transport has read
        anything (asyncio registers its reader after ``connection_made``,
        uvloop starts reading when it returns, and neither reads before the
        loop polls again).  One peek, and a ``recv`` of exactly the header's
        bytes when the peek holds all of them, leave the stream on the first
        byte after the header, in the kernel, for the transport to read (and
        with ``ssl=``, for the TLS layer).  A stream that is no header is
        served with nothing consumed where the policy serves it, and closed
        where it does not, as a malformed header always is.  Anything else (a
        prefix, nothing yet, the end of the stream) returns False with
        nothing consumed, and with the peek socket in :attr:`peek`, for the
        waiting path.
        """
        factory = self.factory
        self.peek = peek = _borrow(peer, sock)
        try:
            ahead = peek.recv(factory.cap, _PEEK_FLAGS)
            if not ahead:
                return False  # the end of the stream, which the transport reports (eof_received)
            header = core.parse(
                ahead,
                max_size=factory.max_size,
                verify_checksum=factory.verify_checksum,
                allow_v4_in_tcp6=factory.allow_v4_in_tcp6,
            )
        except OSError:
            return False  # nothing yet, or an error the transport will report
        except NoProxyHeader as exc:
            if not decide(self.policy, Outcome.NO_HEADER).serve:
                self.conclude(Outcome.NO_HEADER, exc)
                return True
            self.peek = None
            peek.detach()
            self.serve(None, b"", sock)  # nothing was read: every byte is the inner protocol's
            return True
        except ProxyProtocolError as exc:
            self.conclude(Outcome.INVALID, exc)  # closed, whatever the policy: nothing to keep
            return True
        if header is None:
            return False  # a valid prefix: the rest has not arrived
        size = header.length
        try:
            got = peek.recv(size, _READ_FLAGS)
        except OSError:
            return False
        if len(got) != size:  # a stream socket gives what it just showed; never lose a byte anyway
            self.keep(got)
            return False
        self.peek = None
        peek.detach()
        if self.policy in _SERVES_A_HEADER:
            self.serve(header, b"", sock)
        else:
            self.held = size
            self.conclude(Outcome.HEADER, header=header)
        return True

    def keep(self, data: bytes) -> None:
        """Hold ``data``, the first bytes of a header read before waiting for the rest."""
        self.buf = bytearray(data)
        self.held = len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()

    def eof_received(self) -> bool | None:
        if self.late is not None:
            # The peer ended its side before the handshake could start: no TLS session can
            # complete (the client's Finished never comes), so there is nothing to serve.
            self.late_eof = True
            return True  # start_tls's task closes the connection
        held = self.held
        if held:
            error = InvalidHeader(f"header truncated by EOF after {held} byte(s)", offset=held)
            self.conclude(Outcome.INVALID, error)
            return None
        inner = self.conclude(Outcome.EOF)
        if inner is None or self.transport is None or self.transport.is_closing():
            return None
        if isinstance(inner, _STREAM_PROTOCOLS):  # BufferedProtocol is no Protocol subclass
            return inner.eof_received()
        return None

    def data_received(self, data: bytes) -> None:
        """``data`` as a transport would give it through :meth:`get_buffer` and :meth:`buffer_updated`.

        A ``BufferedProtocol`` needs no ``data_received``, and neither loop
        calls this one; but uvloop looks the attribute up on every protocol
        it is given (``set_protocol`` and each new connection), and a missing
        attribute cost it an ``AttributeError`` per connection.  So it
        exists, and is correct: the bytes after a decision go to the
        protocol that took the transport.
        """
        rest = memoryview(data)
        while rest:
            transport = self.transport
            if transport is not None and transport.get_protocol() is not self:
                deliver(transport.get_protocol(), bytes(rest))
                return
            buf = memoryview(self.get_buffer(len(rest)))
            size = min(len(buf), len(rest))
            buf[:size] = rest[:size]
            self.buffer_updated(size)
            rest = rest[size:]

    # -- reading exactly the header -------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never an empty buffer: uvloop treats one as a fatal error and resets the connection.
        if not self.waiting:
            # The header is decided (or never looked for) and the transport still reads into
            # this protocol: with ssl=, uvloop in the iteration before start_tls takes over.
            self.spare = bytearray(_LATE_READ)
            return memoryview(self.spare)
        held = self.held
        end = held + max(self.wanted(held), 1)
        buf = self.buf
        if len(buf) < end:
            # A new buffer, not a resize: the transport may still hold a view of the old one.
            grown = bytearray(end)
            grown[:held] = buf[:held]
            self.buf = buf = grown
        return memoryview(buf)[held:end]

    def wanted(self, held: int) -> int:
        """How many more bytes belong to the header, as far as the socket (a peek) or the bytes held show.

        Never more than the header's end: what follows it is the inner
        protocol's (or the TLS layer's).  With a peek, a valid prefix takes
        all that is there (every byte of it is the header's), and a stream
        the peek shows to be wrong takes what is there, to be concluded on.
        """
        factory = self.factory
        peek = self.peek
        if peek is None:
            return self.need
        try:
            ahead = peek.recv(factory.cap - held, _PEEK_FLAGS)
        except OSError:
            ahead = b""  # nothing yet, or an error the transport's own read will report
        if not ahead:
            return 1
        try:
            size = core.measure(bytes(self.buf[:held]) + ahead, factory.max_size)
        except ProxyProtocolError:
            return len(ahead)  # concluded on this read: take what is there
        return size - held if size > 0 else len(ahead)

    def buffer_updated(self, nbytes: int) -> None:
        if not self.waiting:
            spare, self.spare = self.spare, bytearray()
            if self.late is not None:
                self.late += spare[:nbytes]
                if self.transport is not None:
                    self.transport.pause_reading()  # the rest waits in the kernel for the TLS layer
            return  # else the connection is closing: nothing more is read for anyone
        self.held += nbytes
        data = bytes(self.buf[: self.held])
        factory = self.factory
        try:
            size = core.measure(data, factory.max_size)
        except NoProxyHeader as exc:
            self.conclude(Outcome.NO_HEADER, exc)
            return
        except InvalidHeader as exc:
            self.conclude(Outcome.INVALID, exc)
            return
        if size < 0:
            self.need = -size
            return
        try:
            header = core.decode(data, size, factory.verify_checksum, factory.allow_v4_in_tcp6)
        except ProxyProtocolError as exc:
            self.conclude(Outcome.INVALID, exc)
            return
        self.conclude(Outcome.HEADER, header=header, rest=data[size:])

    def expire(self) -> None:
        self.timer = None
        self.conclude(Outcome.PARTIAL if self.held else Outcome.SILENT)

    # -- deciding ---------------------------------------------------------------------------

    def release(self) -> None:
        """Forget the waiting state: deadline, parking slot, peek socket."""
        self.waiting = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.peek is not None:
            self.peek.detach()
            self.peek = None
        self.factory.unpark(self)

    def shutdown(self) -> None:
        """Close a connection whose header is not in (server shutdown); nothing was served on it."""
        self.factory.unpark(self)
        self.abort()

    def abort(self) -> None:
        self.release()
        if self.transport is not None:
            self.reclaim()
            self.transport.abort()

    def reclaim(self) -> None:
        """Make this protocol the transport's again, before a connection that is not served closes.

        A :meth:`ProxyProtocolFactory.header_first` inner holds the transport
        from the start; it was never told of the connection, so it must not
        be told of its end either (uvicorn's ``connection_lost`` would fail
        on a transport it never got).  Only from that inner: a TLS protocol
        mid-handshake keeps the transport, and learns of the close itself.
        """
        transport = self.transport
        inner = self.inner
        if inner is not None and transport is not None and transport.get_protocol() is inner:
            transport.set_protocol(self)

    def conclude(
        self,
        outcome: Outcome,
        error: ProxyProtocolError | None = None,
        *,
        header: ProxyHeader | None = None,
        rest: bytes = b"",
    ) -> asyncio.BaseProtocol | None:
        """Close or serve, as the policy table says; the inner protocol when served."""
        self.release()
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        factory = self.factory
        policy = self.policy
        verdict = decide(policy, outcome)
        if not verdict.serve:
            factory.refusals.log(
                verdict.level,
                "%s: closed: %s",
                peer_text(self.peer),
                describe(policy, outcome, error, self.held, factory.header_timeout),
                kind=kind_of(outcome),
            )
            self.reclaim()
            transport.close()
            return None
        if outcome is not Outcome.HEADER:
            rest = bytes(self.buf[: self.held])  # no header: every byte read is payload
        self.buf = bytearray()
        return self.serve(header, rest)

    def serve(self, header: ProxyHeader | None, rest: bytes, sock: Any = _MISSING) -> asyncio.BaseProtocol | None:
        """Hand the connection to the inner protocol; ``header`` only when the peer is trusted."""
        if not self.trusted:
            header = None  # an untrusted peer's header (under IGNORE) is read and removed, never handed on
        transport = self.transport
        assert transport is not None
        factory = self.factory
        inner = self.inner
        if inner is None:
            try:
                inner = factory.factory()
            except Exception:
                logger.exception("%s: closed: the protocol factory failed", peer_text(self.peer))
                transport.abort()
                return None
        if self.trusted:
            for name, value in factory.trusted_overrides:
                setattr(inner, name, value)
        if factory.ssl is not None:
            factory.park(self)  # until the handshake is done: counted, and closed on shutdown
            self.late = bytearray()
            transport.pause_reading()
            task = asyncio.ensure_future(self.start_tls(inner, header))
            factory.handshakes.add(task)  # a reference, so the task is not collected mid-handshake
            task.add_done_callback(factory.handshakes.discard)
            return None
        if transport.get_protocol() is not inner:  # else header_first's inner had it all along
            transport.set_protocol(inner)
        view = ProxyTransport(transport, proxy_extra(transport, self.policy, header, self.peer, sock))
        connect = self.connect
        if connect is None:
            inner.connection_made(view)
        else:  # header_first: its own connection_made would only pass the view on, one call deeper
            connect(inner, view)
        if rest:
            hand_rest(transport, view, inner, rest)
        return inner

    def hand_over_late(self) -> None:
        """Give the TLS protocol the bytes this one read after the decision, before anything else.

        Neither loop's ``start_tls`` can be told of bytes already read, and
        uvloop may read once more into this protocol before ``start_tls``
        takes the transport.  Both loops' TLS protocols are buffered ones
        whose ``buffer_updated`` before ``connection_made`` only queues the
        bytes in the incoming BIO, which the handshake then reads first, in
        stream order (what arrives later is read after ``resume_reading``).
        """
        late, self.late = self.late, None
        transport = self.transport
        if not late or transport is None or transport.is_closing():
            return
        tls = transport.get_protocol()
        if tls is self:  # start_tls failed before taking the transport; its error is reported
            return
        rest = memoryview(late)
        while rest:
            buf = memoryview(tls.get_buffer(len(rest)))  # type: ignore[attr-defined]
            size = min(len(buf), len(rest))
            buf[:size] = rest[:size]
            tls.buffer_updated(size)  # type: ignore[attr-defined]
            rest = rest[size:]

    async def start_tls(self, inner: asyncio.BaseProtocol, header: ProxyHeader | None) -> None:
        transport = self.transport
        assert transport is not None
        factory = self.factory
        assert factory.ssl is not None
        holding = _Holding()
        loop = asyncio.get_running_loop()
        if self.late_eof or transport.is_closing():
            factory.unpark(self)
            factory.refusals.log(
                logging.INFO, "%s: closed before the TLS handshake started", peer_text(self.peer), kind=KIND_TLS
            )
            transport.abort()
            return
        # Scheduled before start_tls's own connection_made and resume_reading callbacks, so it
        # runs after start_tls has set its TLS protocol on the paused transport and before that
        # protocol starts the handshake or reads anything.
        loop.call_soon(self.hand_over_late)
        try:
            tls = await loop.start_tls(
                transport,
                holding,
                factory.ssl,
                server_side=True,
                ssl_handshake_timeout=factory.ssl_handshake_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError and ConnectionError are OSErrors
            factory.refusals.log(
                logging.INFO, "%s: closed: TLS handshake failed: %s", peer_text(self.peer), exc, kind=KIND_TLS
            )
            transport.abort()
            return
        finally:
            factory.unpark(self)
        if tls is None:
            return
        if transport.is_closing():
            # Aborted mid-handshake (a shutdown, max_pending): asyncio's start_tls raises, uvloop's
            # returns a TLS transport anyway, and would never tell the inner of the end of a
            # connection it was told of (uvicorn's graceful shutdown would wait for it forever).
            factory.refusals.log(
                logging.INFO, "%s: closed during the TLS handshake", peer_text(self.peer), kind=KIND_TLS
            )
            tls.abort()
            return
        # What arrived with the handshake (data, the peer's close_notify, even the end of the
        # connection) reaches the inner protocol in order, after connection_made.
        tls.set_protocol(inner)
        inner.connection_made(ProxyTransport(tls, proxy_extra(transport, self.policy, header)))
        for chunk in holding.data:
            deliver(inner, chunk)
        if holding.eof and isinstance(inner, _STREAM_PROTOCOLS) and not inner.eof_received():
            tls.close()
        if holding.lost:
            inner.connection_lost(holding.lost_exc)


def _header_first_class(factory: ProxyProtocolFactory, inner_class: type[_P]) -> type[_P]:
    """``inner_class`` reading the header first: see :meth:`ProxyProtocolFactory.header_first`."""
    inner_connection_made = inner_class.connection_made
    parse, match_v2 = core.parse, v2.match

    def connection_made(self: Any, transport: Any) -> None:
        if type(transport) is ProxyTransport:  # the header is decided: what the server wrote runs now
            inner_connection_made(self, transport)
            return
        if not factory.inline or factory.closed:
            reading = HeaderProtocol(factory, self, inner_connection_made)
            if factory.ssl is not None:
                transport.set_protocol(reading)  # every byte is the header's, then the TLS layer's
            reading.connection_made(transport)
            return
        # What HeaderProtocol.connection_made, factory.policy_for, peek_complete_header and
        # serve do, written out for the case of every connection from a real proxy: a trusted
        # peer (REQUIRE or USE) whose whole header is in the socket already.  This runs per
        # connection, so no call or object is made here that this case does not need (the
        # figures are in bench/README.md).  Anything else goes to a HeaderProtocol with
        # nothing consumed; tests/aio/test_header_first_inline.py holds the two paths to the
        # same answers.
        peer = transport.get_extra_info("peername")
        trusted = factory.trusted
        if not isinstance(peer, tuple):
            policy = factory.policy_for(peer, transport)  # a UNIX peer, or one the loop could not tell
        elif trusted is None:
            policy = factory.policy
        else:  # factory.policy_for, inline for an IP peer
            host = peer[0]
            verdict = trusted.verdicts.get(host)  # TrustedNetworks' memory of this peer, without a call
            policy = factory.policy if (host in trusted if verdict is None else verdict) else factory.untrusted_policy
        if policy is _REQUIRE or policy is _USE:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # _borrow(peer, sock), without its call (the family is only a label to recv)
                peek = _socket_object(_AF_INET, _SOCK_STREAM, 0, sock.fileno())
                try:
                    got = peek.recv(_INLINE_PEEK, _PEEK_FLAGS)
                except OSError:
                    got = b""  # nothing yet, or an error the transport reports itself
                header = None
                if got:
                    try:
                        if got[0] == 0x0D:  # v2 (parse() would dispatch there, one call deeper)
                            header = match_v2(got, factory.max_size, factory.verify_checksum)
                        else:
                            header = parse(
                                got,
                                max_size=factory.max_size,
                                verify_checksum=factory.verify_checksum,
                                allow_v4_in_tcp6=factory.allow_v4_in_tcp6,
                            )
                    except ProxyProtocolError:
                        pass  # the HeaderProtocol says what is wrong, and closes
                if header is not None:
                    size = header.length
                    try:
                        taken = peek.recv(size, _READ_FLAGS)  # exactly the header: the rest is the transport's
                    except OSError:
                        taken = b""
                    if len(taken) == size:
                        peek.detach()
                        extra = proxy_extra(transport, policy, header, peer, sock)
                        # No TLS on this transport (none follows the header: factory.ssl is None, and
                        # one under it would have swallowed the header): answered here, not by a
                        # miss that asks the real transport (uvicorn asks per connection).
                        extra["sslcontext"] = _DEFAULT
                        for name, value in factory.trusted_overrides:  # REQUIRE and USE: a trusted peer
                            setattr(self, name, value)
                        inner_connection_made(self, ProxyTransport(transport, extra))
                        return
                    # A stream socket gives what a peek just showed; should it not, nothing is lost.
                    reading = HeaderProtocol(factory, self, inner_connection_made)
                    reading.transport, reading.peer, reading.policy, reading.peek = transport, peer, policy, peek
                    reading.trusted = True  # REQUIRE and USE: only a trusted peer's (check_untrusted_policy)
                    reading.keep(taken)
                    reading.wait()
                    return
                peek.detach()
        # Anything else, with nothing consumed: a HeaderProtocol decides it from the start.
        HeaderProtocol(factory, self, inner_connection_made).connection_made(transport)

    name = f"HeaderFirst{inner_class.__name__}"
    attributes = {"connection_made": connection_made, "__module__": __name__, "__qualname__": name}
    return type(name, (inner_class,), attributes)


def wrap_protocol_factory(
    factory: ProtocolFactory,
    *,
    policy: Policy | str = Policy.REQUIRE,
    trusted: Any | None = None,
    untrusted_policy: Policy | str = Policy.SKIP,
    header_timeout: float = 10.0,
    max_header_size: int = 4096,
    verify_checksum: bool = True,
    allow_v4_in_tcp6: bool = False,
    max_pending: int = 256,
    ssl: _ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    policy_for: PolicyHook | None = None,
    log_rate: float | None = DEFAULT_LOG_RATE,
) -> ProxyProtocolFactory:
    """A protocol factory for ``loop.create_server`` / ``create_unix_server`` that reads the header first.

    ``factory`` makes the inner protocol (any ``asyncio.Protocol`` or
    ``BufferedProtocol``: a plain one, ``StreamReaderProtocol``, a web
    server's); it is called once the header is in, and only for connections
    that are served.  The knobs are the socketserver mixin's, without the
    ``proxy_`` prefix (DESIGN.md): ``policy`` for trusted peers,
    ``trusted`` (None: every peer; else networks, or a string like
    ``"10.0.0.0/8, 127.0.0.1"`` or ``"*"``; UNIX-socket peers only behind a
    socket file that is not world-writable, unless it holds ``unix``),
    ``untrusted_policy`` (SKIP, IGNORE or REJECT),
    ``header_timeout`` (seconds for the whole header), ``max_header_size``,
    ``verify_checksum``, ``allow_v4_in_tcp6``, ``max_pending`` (connections
    waiting for their header; past it the oldest is closed), ``policy_for``
    (``(peer, local) -> Policy``, replaces the three trust knobs) and
    ``log_rate`` (refusal lines per second).

    ``ssl``: an ``SSLContext`` to negotiate *after* the header; do not pass
    ``ssl=`` to ``create_server`` as well.  With it, the policies that look at
    a stream and may serve it without a header (USE, IGNORE, REJECT) are
    refused with ``ValueError``: the bytes read to decide would be lost to
    the handshake.  ``ssl_handshake_timeout``: seconds for that handshake,
    counted from its start (the header decided, or at once for a peer under
    SKIP); by default ``header_timeout`` (not asyncio's 60 s), so a client
    that sends its header and then nothing, or an untrusted one that sends
    nothing at all, is closed as promptly as one that never sends its
    header: a connection lives at most ``2 * header_timeout`` before it is
    served.  (A fresh window rather than what is left of the header's: a
    proxy sends its header at once, so the two differ only for a slow header,
    and the connection served at once keeps no start time.)  A value given
    is used as it is (a finite number above 0).  A connection counts toward
    ``max_pending`` until its handshake is done.

    Raises ``ValueError`` for an invalid knob.
    """
    return ProxyProtocolFactory(
        factory,
        policy=policy,
        trusted=trusted,
        untrusted_policy=untrusted_policy,
        header_timeout=header_timeout,
        max_header_size=max_header_size,
        verify_checksum=verify_checksum,
        allow_v4_in_tcp6=allow_v4_in_tcp6,
        max_pending=max_pending,
        ssl=ssl,
        ssl_handshake_timeout=ssl_handshake_timeout,
        policy_for=policy_for,
        log_rate=log_rate,
    )
