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

How it reads (exactly the header, never a byte more) is
:mod:`proxyproto.aio_header`'s; the transport the inner protocol sees,
:mod:`proxyproto.aio_transport`'s; TLS after the header (``ssl=``),
:mod:`proxyproto.aio_tls`'s.

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
from functools import partial
from typing import Any, Callable, TypeVar

from . import v1, v2
from .advice import untrusted_look, warn_if_every_peer_trusted
from .aio_header import CAN_PEEK, PEEK_FLAGS, READ_FLAGS, HeaderProtocol, WaitingReads
from .aio_tls import handshake_timeout
from .aio_transport import (
    ABSENT,
    FirstBytes,
    ProxyTransport,
    proxy_extra,
)
from .errors import ProxyProtocolError
from .parking import Parking, descriptor_of
from .policy import Policy, Trust, peer_text
from .reader import HeaderScanner
from .refusal_log import RefusalLog
from .settings import Settings, settings_for

__all__ = ["ProxyProtocolFactory", "wrap_protocol_factory"]

logger = logging.getLogger("proxyproto")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
_P = TypeVar("_P", bound=asyncio.BaseProtocol)

_AF_INET, _SOCK_STREAM = socket.AF_INET, socket.SOCK_STREAM
# Enum members as module constants for the per-connection code: on CPython 3.11 an enum member's
# attribute access goes through EnumType's slow attribute hook, a global is one lookup.
_REQUIRE, _USE, _SKIP = Policy.REQUIRE, Policy.USE, Policy.SKIP
#: What the inline path peeks at: every header real senders emit fits (a longer one, or a prefix,
#: goes to a HeaderProtocol, which peeks up to the size cap); small enough for CPython's
#: small-object allocator.
_INLINE_PEEK = 400
_V1_LAST_CR = v1.MAX_LENGTH - 2  # where the CR of the longest v1 line is
_socket_object = _socket.socket
_new = object.__new__


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
        settings: Settings | None = None,
        ssl: _ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        **knobs: Any,
    ) -> None:
        #: The knobs (:class:`~proxyproto.settings.Settings`): ``settings=`` with the keyword knobs on top.
        self.settings = settings = settings_for(settings, knobs)
        warn_if_every_peer_trusted(settings)
        if ssl is not None and settings.policy_for is None:
            for name, value in (("policy", settings.policy), ("untrusted_policy", settings.untrusted_policy)):
                if value in (Policy.USE, Policy.IGNORE, Policy.REJECT):
                    instead = "REQUIRE (or SKIP)" if name == "policy" else "SKIP"
                    raise ValueError(
                        f"{name}={value.name} with ssl=: a stream that turns out to have no header would have "
                        f"lost its first bytes to the TLS layer; use {instead}"
                    )
        self.factory = factory
        self.ssl = ssl
        #: Seconds for the TLS handshake after the header: ``header_timeout`` unless given (see
        #: :func:`wrap_protocol_factory`); the connection counts toward ``max_pending`` meanwhile.
        self.ssl_handshake_timeout = handshake_timeout(ssl_handshake_timeout, settings.header_timeout)
        self.refusals = RefusalLog(logger, settings.log_rate, later=call_later, name_of=settings.name_of)
        #: Connections not handed to their protocol yet, and the one rule that evicts them (max_pending,
        #: the descriptor reserve); :attr:`parked` is its dict (oldest first: dicts keep insertion order).
        self.parking: Parking[HeaderProtocol] = Parking(self.refusals, HeaderProtocol.abort, HeaderProtocol.sockname)
        self.parked: dict[HeaderProtocol, Any] = self.parking.waiting
        self.handshakes: set[asyncio.Future[None]] = set()
        self.closed = False
        #: :meth:`lost_before_connection` has written its line.
        self.said_tls_first = False
        #: Whether :meth:`header_first` classes may take a header already in the socket inline:
        #: no TLS layer to leave bytes for and no user hook to call (those go through HeaderProtocol).
        self.inline = (
            ssl is None
            and settings.policy_for is None
            and CAN_PEEK
            and type(self).policy_for is ProxyProtocolFactory.policy_for  # a subclass may decide otherwise
        )
        self._header_first: dict[type, type] = {}
        #: ``(name, value)`` pairs set on the inner protocol of a connection whose client the PROXY
        #: protocol pins (:func:`~proxyproto.policy.pins_the_client`: a trusted peer whose header is
        #: read), before it is told of the connection: an adapter's way to serve such connections
        #: differently (``proxyproto.uvicorn`` gives them the application without uvicorn's
        #: X-Forwarded-For middleware).
        self.trusted_overrides: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> HeaderProtocol:
        return HeaderProtocol(self)

    def scanner(self) -> HeaderScanner:
        """A :class:`~proxyproto.reader.HeaderScanner` for one connection's header, with this factory's options.

        ``required``: every byte before the header's end may be read, since
        a stream without a header is closed or handed on with those bytes.
        """
        return self.settings.scanner(required=True)

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

    def look_for_untrusted_header(self, peer: Any, transport: Any, inner: asyncio.BaseProtocol) -> None:
        """Served under SKIP, an untrusted peer: a WARNING if its first bytes, when they come, are a PROXY header.

        ``inner`` has the transport already; :class:`~proxyproto.aio_transport.FirstBytes`
        shows the first bytes on their way to it, and changes nothing it gets.
        """
        if self.hooked or transport.is_closing() or transport.get_protocol() is not inner:
            return
        where = partial(transport.get_extra_info, "sockname")  # the line names this connection's listener
        transport.set_protocol(FirstBytes(transport, inner, untrusted_look(self.refusals, self.settings, peer, where)))

    def lost_before_connection(self) -> None:
        """A protocol this factory made was dropped before its connection was made: say why, once.

        asyncio makes the protocol when it accepts, then its own TLS layer
        handshakes before telling the protocol: a failed handshake drops it
        unseen.  With proxyproto that means TLS under the wrapper (``ssl=``
        given to ``loop.create_server``), which the PROXY header, sent
        before any TLS, breaks on every connection.
        """
        if self.ssl is None and not self.closed and not self.said_tls_first:
            self.said_tls_first = True
            logger.error(
                "connections are dropped before proxyproto sees them: a TLS layer under the wrapper fails its "
                "handshake on the PROXY header (ssl= given to loop.create_server, or to the server?); give the "
                "SSLContext to proxyproto instead (wrap_protocol_factory(ssl=...)): TLS is negotiated after the "
                "header%s",
                "" if self.refusals.listener is None else f" (listener {self.refusals.listener})",
            )

    @property
    def hooked(self) -> bool:
        """Whether a hook decides trust (the ``policy_for`` knob, or a subclass's :meth:`policy_for`)."""
        return self.settings.policy_for is not None or type(self).policy_for is not ProxyProtocolFactory.policy_for

    def policy_for(self, peer: Any, transport: asyncio.BaseTransport) -> Policy:
        """The policy for a connection from ``peer`` (:meth:`trust`'s; a subclass may override this)."""
        return self.trust(peer, transport).policy

    def trust(self, peer: Any, transport: asyncio.BaseTransport) -> Trust:
        """The connection's policy, and whether its peer is trusted (only then is its header handed on).

        :meth:`proxyproto.settings.Settings.trust` decides, with a subclass's
        :meth:`policy_for` as the hook when it overrides it (and no
        ``policy_for`` knob was given).
        """
        hook = None
        if self.settings.policy_for is None and type(self).policy_for is not ProxyProtocolFactory.policy_for:

            def hook(peer: Any, local: Any) -> Policy | str:
                return self.policy_for(peer, transport)

        return self.settings.trust(peer, transport.get_extra_info("socket"), hook)

    def admit(self, peer: Any, transport: asyncio.BaseTransport) -> Trust | None:
        """:meth:`trust` for a new connection; None (logged) when it must close unserved.

        Its refusal lines name the connection's own listener (one factory may
        serve several: gunicorn's ``-b`` twice, Sanic's ``app.prepare`` twice),
        asked of the transport only when a line is written.  A user's
        ``policy_for`` hook that fails closes that connection, never
        the server; with ``ssl=``, a hook's opt-in policy (USE, IGNORE,
        REJECT) is refused too: its sniffed bytes would never reach the TLS layer.
        """
        try:
            trust = self.trust(peer, transport)
            if self.ssl is not None and trust.policy is not _REQUIRE and trust.policy is not _SKIP:
                raise ValueError(f"policy {trust.policy.name} with ssl=: only REQUIRE or SKIP can negotiate TLS")
        except Exception as exc:  # a user's hook: its failure closes this connection, nothing else
            self.refusals.hook_failed(peer, exc, listener=transport.get_extra_info("sockname"))
            return None
        return trust

    def make_inner(self, peer: Any) -> asyncio.BaseProtocol | None:
        """``factory()``, the inner protocol of a connection from ``peer`` to serve; None (logged) when it fails."""
        try:
            return self.factory()
        except Exception:
            logger.exception("%s: closed: the protocol factory failed", peer_text(peer))
            return None

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
        self.parking.add(waiting, waiting.peer, descriptor_of(waiting.transport), self.settings.max_pending)

    def unpark(self, waiting: HeaderProtocol) -> None:
        self.parked.pop(waiting, None)


def _header_first_class(factory: ProxyProtocolFactory, inner_class: type[_P]) -> type[_P]:
    """``inner_class`` reading the header first: see :meth:`ProxyProtocolFactory.header_first`."""
    inner_connection_made = inner_class.connection_made
    match_v1, match_v2 = v1.match_line, v2.match

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
        # What HeaderProtocol.connection_made, peek_complete_header and serve do, written out
        # for the case of every connection from a real proxy: a trusted peer (REQUIRE or USE)
        # whose whole header is in the socket already.  This runs per connection, so no call
        # or object is made here that this case does not need (bench/README.md).  Anything
        # else goes to a HeaderProtocol with nothing consumed; the contract suite and
        # tests/aio/test_header_first_inline.py hold the two paths to the same answers.
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        settings = factory.settings
        policy = settings.trust(peer, sock).policy
        if (policy is _REQUIRE or policy is _USE) and sock is not None:
            # aio_header.borrow(peer, sock), without its call (the family is only a label to recv)
            peek = _socket_object(_AF_INET, _SOCK_STREAM, 0, sock.fileno())
            try:
                got = peek.recv(_INLINE_PEEK, PEEK_FLAGS)
            except OSError:
                got = b""  # nothing yet, or an error the transport reports itself
            header = None
            if got:
                try:
                    # parse()'s fast paths, without its call: a line up to its first CRLF, or a
                    # v2 header; anything they refuse goes to the HeaderProtocol, which says why.
                    if got[0] == 0x0D:
                        header = match_v2(got, settings.max_header_size, settings.verify_checksum)
                    else:
                        end = got.find(b"\r\n")  # as parse() finds it
                        if 6 <= end <= _V1_LAST_CR:
                            header = match_v1(got, end + 2, settings.allow_v4_in_tcp6)
                except ProxyProtocolError:
                    pass  # the HeaderProtocol says what is wrong, and closes
            if header is not None:
                size = header.length
                try:
                    taken = peek.recv(size, READ_FLAGS)  # exactly the header: the rest is the transport's
                except OSError:
                    taken = b""
                if len(taken) == size:
                    peek.detach()
                    extra = proxy_extra(transport, policy, header, peer, sock)
                    # No TLS on this transport (none follows the header: factory.ssl is None, and
                    # one under it would have swallowed the header): answered here, not by a
                    # miss that asks the real transport (uvicorn asks per connection).
                    extra["sslcontext"] = ABSENT
                    for name, value in factory.trusted_overrides:  # REQUIRE or USE, trusted: pins_the_client
                        setattr(self, name, value)
                    # ProxyTransport(transport, extra), without the type call's __init__ (per connection)
                    served = _new(ProxyTransport)
                    served._transport, served._proxy_extra = transport, extra
                    served.write = transport.write  # type: ignore[method-assign]
                    served.is_closing = transport.is_closing  # type: ignore[method-assign]
                    served.close = transport.close  # type: ignore[method-assign]
                    inner_connection_made(self, served)
                    return
                # A stream socket gives what a peek just showed; should it not, nothing is lost.
                reading = HeaderProtocol(factory, self, inner_connection_made)
                reading.transport, reading.peer, reading.policy = transport, peer, policy
                reading.trusted = True  # REQUIRE and USE without a hook: only a trusted peer's
                scanner = factory.scanner()
                scanner.feed(taken)
                reading.reads = WaitingReads(scanner, peek)
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
    settings: Settings | None = None,
    ssl: _ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    **knobs: Any,
) -> ProxyProtocolFactory:
    """A protocol factory for ``loop.create_server`` / ``create_unix_server`` that reads the header first.

    ``factory`` makes the inner protocol (any ``asyncio.Protocol`` or
    ``BufferedProtocol``: a plain one, ``StreamReaderProtocol``, a web
    server's); it is called once the header is in, and only for connections
    that are served.  The knobs are docs/configuration.rst's, as keywords
    (``trusted="10.0.0.0/8"``, ``header_timeout=5``) or as one
    :class:`~proxyproto.settings.Settings` (``settings=``, the keywords on
    top): ``trusted`` defaults to ``"127.0.0.1,::1"`` (loopback only; ``"*"``
    for every peer, ``""`` for none; UNIX-socket peers only behind a socket
    file that is not world-writable, unless it holds ``unix``; None is
    refused).

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

    Raises ``ValueError`` for an invalid knob, ``TypeError`` for an unknown one.
    """
    return ProxyProtocolFactory(
        factory, settings=settings, ssl=ssl, ssl_handshake_timeout=ssl_handshake_timeout, **knobs
    )
