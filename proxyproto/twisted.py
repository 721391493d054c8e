"""Twisted: a protocol wrapper and an endpoint (``proxyproto:``) that read the PROXY header first.

Twisted servers listen through endpoints, most of them built from a string by
``serverFromString`` (``twistd``, ``daphne -e``, Synapse, your own code), so
the header belongs in an endpoint that wraps any other::

    serverFromString(reactor, "proxyproto:tcp:8000:interface=127.0.0.1")
    serverFromString(reactor, "proxyproto:ssl:8443:privateKey=key.pem:certKey=cert.pem")

(the ``proxyproto`` prefix is the plugin ``twisted/plugins/proxyproto_endpoints.py``
installs; :class:`ProxyProtocolEndpointParser` reads the string).  In the
``ssl:`` form the TLS handshake runs *after* the header, as a proxy sending
``send-proxy`` in front of TLS passthrough needs; Twisted's own ``haproxy:``
endpoint can only put TLS outside the header.

From Python: :class:`ProxyProtocolFactory` wraps a protocol factory,
:func:`wrap_endpoint` a listening endpoint.

Each connection first gets a :class:`ProxyProtocolWrapper`.  It feeds the
bytes Twisted delivers to the one scanner (:meth:`proxyproto.settings.Settings.scanner`)
until it says what they are, asks the one trust decision
(:meth:`proxyproto.settings.Settings.trust`) and the policy table
(:func:`proxyproto.policy.decide`) what to do, and only then builds the
inner protocol (``wrappedFactory.buildProtocol`` with the address it is
served with), connects it to itself as its transport and hands it the bytes
after the header, in the same call: nothing lost, nothing invented.  For
the inner protocol, ``transport.getPeer()`` and ``getHost()`` are the
header's addresses (Twisted's ``IPv4Address``, ``IPv6Address`` or
``UNIXAddress``) when the policy uses them, and ``transport.proxy_header``
is a trusted peer's header (else None), also through the TLS layer.  A
Daphne server listening through the endpoint puts that header in the scope
of every request and WebSocket (:mod:`proxyproto.asgi`).

Deadlines are ``reactor.callLater`` timers; the connections still waiting
for their header count toward ``max_pending`` (:class:`proxyproto.parking.Parking`:
past it the oldest is closed) and are closed when the factory stops (the
listening port stops, or the reactor shuts down), so a shutdown never waits
for them.  Refusal lines are rate limited (:class:`proxyproto.refusal_log.RefusalLog`).

Twisted is imported when this module is, which only its users do; the
reactor is never imported here (the endpoint is given one, and the factory
takes ``reactor=``, else the global one when the first connection arrives).
"""

from __future__ import annotations

import inspect
import logging
import socket
import sys
from collections.abc import Mapping
from typing import Any

# Twisted's own annotations (zope interfaces as types, untyped factories and parsers) would turn
# every use here into a cast: its classes and functions are used as Any.  Without Twisted (a
# [test]-only mypy) the modules are missing, which setup.cfg's [mypy-twisted.*] allows.
from twisted.internet import endpoints as _endpoints
from twisted.internet import error as _error
from twisted.internet import interfaces
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.plugin import IPlugin
from twisted.protocols import policies as _policies
from twisted.protocols import tls as _tls
from zope.interface import classImplements, directlyProvides, implementedBy, implementer, providedBy

from .advice import handed_on, refusal_line, untrusted_look
from .asgi import put_header
from .header import Family, ProxyHeader
from .parking import Parking
from .policy import Outcome, Policy, decide, peer_text, served_address
from .reader import HeaderScanner
from .refusal_log import KIND_READ_ERROR, KIND_TLS, RefusalLog, kind_of, listener_text
from .settings import KNOBS, Settings, _from_text, settings_for, settings_from_environment

_ProtocolWrapper: Any = _policies.ProtocolWrapper
_WrappingFactory: Any = _policies.WrappingFactory
_TLSMemoryBIOFactory: Any = _tls.TLSMemoryBIOFactory
_ConnectionDone: Any = _error.ConnectionDone
#: What this module reads of Twisted's TLS protocol, private: whether its handshake is done, and why it failed.
#: Checked when a factory with ``ssl`` is made (:func:`_check_tls_layer`): a renamed flag must never silently
#: count every handshake as done (no deadline, no parking slot).
_TLS_STATE = ("_handshakeDone", "_reason")
_TCP4ServerEndpoint: Any = _endpoints.TCP4ServerEndpoint
#: Twisted's own reading of a server description (``ssl:`` options included), private but there
#: since Twisted 10.2: serverFromString is built on it.
_parseServer: Any = _endpoints._parseServer
_quote: Any = _endpoints.quoteStringArgument
_serverFromString: Any = _endpoints.serverFromString
_tokenize: Any = _endpoints._tokenize  # (and its token kinds): what _parseServer reads a description with
_OP: Any = _endpoints._OP
_STRING: Any = _endpoints._STRING

__all__ = [
    "ProxyProtocolEndpointParser",
    "ProxyProtocolFactory",
    "ProxyProtocolWrapper",
    "ProxyServerEndpoint",
    "wrap_endpoint",
]

logger = logging.getLogger("proxyproto")

#: The knobs a ``proxyproto:`` string may set (``policy_for`` is a function: Python only).
STRING_KNOBS = tuple(knob for knob in KNOBS if knob != "policy_for")
_SOCKET_PEER: Any = object()  # served_address's answer when the socket's own peer is kept


def socket_address(address: Any) -> Any:
    """A Twisted address as the socket module gives it: ``(host, port)``, ``(host, port, flow, scope)``, a path."""
    if isinstance(address, IPv6Address):
        return (address.host, address.port, address.flowInfo, address.scopeID)
    if isinstance(address, IPv4Address):
        return (address.host, address.port)
    if isinstance(address, UNIXAddress):
        return address.name
    return None


def _family(address: Any) -> int:
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    return getattr(socket, "AF_UNIX", -1)


def _error_text(reason: Any) -> str:
    """A Twisted ``Failure``'s message, for a refusal line (no trailing period: the line goes on)."""
    return str(reason.getErrorMessage()).rstrip(".")


def _check_tls_layer() -> None:
    """Raise ``RuntimeError`` unless Twisted's TLS protocol has the state this module reads (:data:`_TLS_STATE`).

    Read with a default instead, a rename in a new Twisted would count every
    handshake as done: no deadline for it, no parking slot, silently.
    """
    missing = [name for name in _TLS_STATE if not hasattr(_tls.TLSMemoryBIOProtocol, name)]
    if missing:
        raise RuntimeError(
            f"proxyproto.twisted: this Twisted's TLSMemoryBIOProtocol has no {', '.join(missing)}, which ssl= "
            "(TLS after the header) needs to bound the handshake: upgrade proxyproto, or terminate TLS in front"
        )


#: Daphne's ``Server`` attributes naming the request headers it takes the client from (``--proxy-headers``).
_DAPHNE_FORWARDED = ("proxy_forwarded_address_header", "proxy_forwarded_port_header", "proxy_forwarded_proto_header")


def _forwarded_headers_off(factory: Any) -> None:
    """Turn off Daphne's ``--proxy-headers`` (``factory.server``'s), logging a WARNING once; anything else: nothing.

    Daphne would take the client's address, port and scheme from
    ``X-Forwarded-*`` lines of every request: lines the client writes, which a
    TCP proxy sending the PROXY header passes on untouched.  Behind this
    endpoint the PROXY header of a trusted peer is the authority, so those
    lines must not replace it.  Daphne's setting belongs to its whole server
    (every ``-e`` endpoint of the process): it is turned off for all of them.
    """
    server = getattr(factory, "server", None)
    header = getattr(server, _DAPHNE_FORWARDED[0], None)
    if not header:
        return
    for name in _DAPHNE_FORWARDED:
        setattr(server, name, None)
    logger.warning(
        "proxyproto: Daphne's --proxy-headers (%s) is turned off for this server: behind the proxyproto: endpoint "
        "a trusted proxy's PROXY header says who the client is, and X-Forwarded-* lines are the client's own",
        header,
    )


#: What Daphne's ``Server.create_application`` takes: Daphne makes every HTTP request's and WebSocket's
#: application with ``server.create_application(protocol, scope)``, ``protocol.transport`` being the
#: connection's.  Checked when a factory wraps a Daphne server's (:func:`_daphne_server`).
_DAPHNE_CREATE_APPLICATION = ("self", "protocol", "scope")


def _daphne_server(factory: Any) -> Any:
    """Daphne's ``Server`` when ``factory`` is its (Daphne's ``HTTPFactory`` keeps it as ``server``), else None.

    ``RuntimeError`` when that Daphne no longer makes its applications
    through ``create_application(protocol, scope)``: served on, its scopes
    would silently lack the header (:func:`_header_in_scope`).
    """
    daphne = sys.modules.get("daphne.server")  # imported by Daphne before it listens; never by this module
    server = getattr(factory, "server", None)
    if daphne is None or not isinstance(server, daphne.Server):
        return None
    try:
        taken = tuple(inspect.signature(daphne.Server.create_application).parameters)
    except (AttributeError, TypeError, ValueError):
        taken = ()
    if taken != _DAPHNE_CREATE_APPLICATION:
        raise RuntimeError(
            "proxyproto.twisted: this Daphne's Server has no create_application(protocol, scope), through which the "
            "proxyproto: endpoint puts a trusted peer's header in the ASGI scope: upgrade proxyproto, or pin Daphne"
        )
    return server


class _ApplicationsWithHeader:
    """A Daphne server's ``create_application`` that first puts the connection's header in the scope.

    The header is that of the :class:`ProxyProtocolWrapper` the protocol's
    transport is (or is under, through Twisted's TLS layer): a trusted
    peer's only (``proxy_header``).  Any other connection (an untrusted
    peer's, one without a header, one of another endpoint of the same
    server) keeps the scope Daphne made.
    """

    def __init__(self, create_application: Any) -> None:
        self.create_application = create_application

    def __call__(self, protocol: Any, scope: dict[str, Any]) -> Any:
        transport = getattr(protocol, "transport", None)  # an HTTP/1.1 request's, a WebSocket's
        if transport is None:  # an HTTP/2 request: its channel is a stream of Twisted's H2Connection
            transport = getattr(getattr(getattr(protocol, "channel", None), "_conn", None), "transport", None)
        header = connection_header(transport)
        if header is not None:
            put_header(scope, header)
        return self.create_application(protocol, scope)


def _header_in_scope(server: Any) -> None:
    """Make ``server`` (Daphne's, checked by :func:`_daphne_server`) put trusted peers' headers in its scopes.

    Only this server instance's ``create_application`` is replaced (an
    attribute of the instance, wrapping the method), once: Daphne's classes
    and other servers of the process are untouched.
    """
    if not isinstance(server.create_application, _ApplicationsWithHeader):
        server.create_application = _ApplicationsWithHeader(server.create_application)


def connection_header(transport: Any) -> ProxyHeader | None:
    """The ``proxy_header`` of the :class:`ProxyProtocolWrapper` ``transport`` is or wraps (TLS); else None."""
    while isinstance(transport, _ProtocolWrapper):
        if isinstance(transport, ProxyProtocolWrapper):
            return transport.proxy_header
        transport = transport.transport
    return None


def twisted_address(family: Family, address: Any) -> Any:
    """One address of a header as Twisted gives addresses (``IPv4Address``, ``IPv6Address``, ``UNIXAddress``)."""
    if family is Family.INET6:
        return IPv6Address("TCP", address[0], address[1])
    if family is Family.INET:
        return IPv4Address("TCP", address[0], address[1])
    return UNIXAddress(address)


@implementer(interfaces.IHalfCloseableProtocol)
class ProxyProtocolWrapper(_ProtocolWrapper):  # type: ignore[misc]  # Twisted's class, as Any
    """One connection: reads its PROXY header, then is the inner protocol's transport.

    ``proxy_header``: the header of a trusted peer (a LOCAL one included, and
    under IGNORE), else None.  ``proxy_peer``: the socket's own peer (the
    proxy), as Twisted gives it.  :meth:`getPeer` and :meth:`getHost`: the
    header's addresses where the policy uses them, else the socket's.
    ``wrappedProtocol`` is None until the connection is served.
    """

    factory: ProxyProtocolFactory
    wrappedProtocol: Any
    proxy_header: ProxyHeader | None = None
    proxy_peer: Any = None
    _peer: Any = None
    _host: Any = None
    _scanner: HeaderScanner | None = None
    _timer: Any = None
    _policy = Policy.REQUIRE
    _trusted = False
    _look: Any = None
    #: With ``ssl``: the TLS protocol while its handshake (after the header) is not done, else None.
    _tls: Any = None
    _fd: int | None = None

    def __init__(self, factory: ProxyProtocolFactory) -> None:
        super().__init__(factory, None)

    # -- IProtocol ----------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        # The transport's interfaces (ITCPTransport, ...) for the inner protocol, as ProtocolWrapper
        # gives them; and half-close, always: an end of stream mid-header is an outcome of its own.
        declared = _declaring(transport)
        if declared is None:
            directlyProvides(self, providedBy(transport))
        else:
            self.__class__ = declared
        self.transport = transport
        self.connected = 1
        factory = self.factory
        factory.registerProtocol(self)
        self.proxy_peer = peer = transport.getPeer()
        host = transport.getHost()
        address = socket_address(peer)
        log = factory.refusals
        if log.listener is None:
            log.listener = listener_text(socket_address(host))
        if factory.closed:
            transport.abortConnection()
            return
        settings = factory.settings
        try:
            handle = transport.getHandle()
        except Exception:  # a transport without a socket: trust is then the address's alone
            handle = None
        try:
            self._policy, self._trusted = settings.trust(address, handle, family=_family(host))
        except Exception as exc:  # a user's hook: its failure closes this connection, nothing else
            log.hook_failed(address, exc)
            transport.abortConnection()
            return
        self._fd = handle.fileno() if handle is not None and hasattr(handle, "fileno") else None
        if self._policy is Policy.SKIP:
            if not self._trusted and settings.policy_for is None:
                self._look = untrusted_look(log, settings, address)
            self._serve(None, b"")
            return
        self._scanner = settings.scanner()
        factory.parking.add(self, address, self._fd, settings.max_pending)
        self._timer = factory.reactor().callLater(settings.header_timeout, self._expired)

    def dataReceived(self, data: bytes) -> None:
        scanner = self._scanner
        if scanner is None:
            if self.wrappedProtocol is not None:
                look = self._look
                if look is not None:
                    self._look = None
                    look(data)
                self.wrappedProtocol.dataReceived(data)
                if self._tls is not None and self._tls._handshakeDone:
                    self._tls = None  # the handshake is done: the connection no longer waits
                    self._release()
            return
        outcome = scanner.feed(data)
        if outcome is not None:
            self._decided(outcome, scanner.rest)

    def readConnectionLost(self) -> None:
        scanner = self._scanner
        if scanner is not None:
            self._decided(scanner.eof(), b"")
        inner = self.wrappedProtocol
        if inner is None or not self.connected:
            return
        if interfaces.IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()
        else:  # closed at the end of the stream, as Twisted closes a protocol that is not half-closeable
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        inner = self.wrappedProtocol
        if inner is not None:
            inner.writeConnectionLost()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = 0
        scanner = self._scanner
        peer = peer_text(socket_address(self.proxy_peer))
        if scanner is not None and reason is not None and not reason.check(_ConnectionDone):
            # A reset (or another error) before the header was decided: a read error, as the other adapters say it.
            self._release()
            self.factory.refusals.log(
                logging.INFO,
                "%s: closed: %s while reading the PROXY header",
                peer,
                _error_text(reason),
                kind=KIND_READ_ERROR,
            )
        elif scanner is not None:  # a full close before the header was decided
            self._release()
            outcome = scanner.eof()
            verdict = decide(self._policy, outcome)
            if not verdict.serve:
                self._refuse(verdict.level, outcome, scanner)
        elif self._tls is not None:  # the TLS layer failed its handshake, or the peer left during it
            failure = self._tls._reason or reason  # the TLS layer's own reason (an OpenSSL error), else the socket's
            self._tls = None
            self._release()
            if failure is not None and not failure.check(_ConnectionDone, _error.ConnectionLost):
                self.factory.refusals.log(
                    logging.INFO, "%s: closed: TLS handshake failed: %s", peer, _error_text(failure), kind=KIND_TLS
                )
            else:
                why = "" if failure is None else f": {_error_text(failure)}"
                self.factory.refusals.log(
                    logging.INFO, "%s: closed during the TLS handshake%s", peer, why, kind=KIND_TLS
                )
        self.factory.unregisterProtocol(self)
        inner, self.wrappedProtocol = self.wrappedProtocol, None
        if inner is not None:
            inner.connectionLost(reason)

    # -- the transport the inner protocol sees ------------------------------------------

    def getPeer(self) -> Any:
        return self.proxy_peer if self._peer is None else self._peer

    def getHost(self) -> Any:
        return self.transport.getHost() if self._host is None else self._host

    def logPrefix(self) -> str:
        inner = self.wrappedProtocol
        if inner is None:
            return "ProxyProtocol"
        prefix = inner.logPrefix() if interfaces.ILoggingContext.providedBy(inner) else type(inner).__name__
        return f"{prefix} (PROXY)"

    # -- deciding -----------------------------------------------------------------------

    def _expired(self) -> None:
        self._timer = None
        scanner = self._scanner
        if scanner is not None:
            self._decided(scanner.expire(), b"")
        elif self._tls is not None:
            self._tls = None
            self._release()
            timeout = self.factory.settings.header_timeout
            self.factory.refusals.log(
                logging.INFO,
                "%s: closed: TLS handshake not done within %g s",
                peer_text(socket_address(self.proxy_peer)),
                timeout,
                kind=KIND_TLS,
            )
            self.transport.abortConnection()

    def _release(self) -> None:
        """Forget the waiting state: the scanner, the deadline, the parking slot."""
        self._scanner = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self.factory.parking.discard(self)

    def _decided(self, outcome: Outcome, rest: bytes) -> None:
        """Close or serve, as the policy table's cell for ``outcome`` says; ``rest``: the inner protocol's bytes."""
        scanner = self._scanner
        assert scanner is not None
        self._release()
        verdict = decide(self._policy, outcome)
        if not verdict.serve:
            self._refuse(verdict.level, outcome, scanner)
            self.transport.loseConnection()
            return
        factory = self.factory
        hooked = factory.settings.policy_for is not None
        peer = socket_address(self.proxy_peer)
        header = handed_on(
            factory.refusals, factory.settings, peer, self._policy, scanner.header, self._trusted, hooked
        )
        self._serve(header, rest)

    def _refuse(self, level: int, outcome: Outcome, scanner: HeaderScanner) -> None:
        factory = self.factory
        hooked = factory.settings.policy_for is not None
        reason = refusal_line(factory.settings, self._policy, outcome, scanner, self._trusted, hooked)
        factory.refusals.log(
            level, "%s: closed: %s", peer_text(socket_address(self.proxy_peer)), reason, kind=kind_of(outcome)
        )

    def _serve(self, header: ProxyHeader | None, rest: bytes) -> None:
        """Build the inner protocol for the address served, connect it to this wrapper, hand it ``rest``."""
        self.proxy_header = header
        host = self.transport.getHost()
        if header is not None:
            family = _family(host)
            if served_address(self._policy, header, _SOCKET_PEER, family) is not _SOCKET_PEER:
                self._peer = twisted_address(header.family, header.source)
                self._host = twisted_address(header.family, header.destination)
        inner = self.factory.inner.buildProtocol(self.getPeer())
        if inner is None:  # the factory refused the connection, as Twisted lets it
            self.transport.loseConnection()
            return
        self.wrappedProtocol = inner
        inner.makeConnection(self)
        if self.factory.ssl is not None and self.connected:
            self._await_handshake(inner)
        if rest and self.wrappedProtocol is not None and self.connected:
            self.dataReceived(rest)

    def _await_handshake(self, tls: Any) -> None:
        """With ``ssl``: the connection waits (a deadline of ``header_timeout``, a parking slot) until ``tls`` is done.

        Twisted's TLS layer says when its handshake is done only to the
        application (``IHandshakeListener``); its own flag is read after each
        chunk it is given, until it is set (its presence is checked when the
        factory is made: :func:`_check_tls_layer`).
        """
        if tls._handshakeDone:
            return
        self._tls = tls
        factory = self.factory
        factory.parking.add(self, socket_address(self.proxy_peer), self._fd, factory.settings.max_pending)
        self._timer = factory.reactor().callLater(factory.settings.header_timeout, self._expired)

    def abort(self) -> None:
        """Close a connection still waiting for its header or handshake (evicted, or the factory stopped)."""
        self._tls = None  # the eviction's line (or the stop) says why: no second line for the handshake
        self._release()
        self.transport.abortConnection()


#: ProxyProtocolWrapper subclasses declaring a transport class's interfaces, made once per class.
_DECLARING: dict[type, type[ProxyProtocolWrapper]] = {}


def _declaring(transport: Any) -> type[ProxyProtocolWrapper] | None:
    """The :class:`ProxyProtocolWrapper` subclass that provides what ``transport``'s class does; None when it has
    interfaces of its own (declared on the instance), which ``directlyProvides`` then copies.

    zope.interface makes a new specification (and its resolution order) for every ``directlyProvides``:
    hundreds of microseconds per connection, where a class's declaration is made once.
    """
    kind = type(transport)
    made = _DECLARING.get(kind)
    if made is None:
        spec = providedBy(transport)
        if spec is not implementedBy(kind):
            return None
        made = type(f"ProxyProtocolWrapperFor{kind.__name__}", (ProxyProtocolWrapper,), {"__module__": __name__})
        classImplements(made, spec)
        _DECLARING[kind] = made
    return made


class ProxyProtocolFactory(_WrappingFactory):  # type: ignore[misc]  # Twisted's class, as Any
    """A protocol factory whose connections read the PROXY header, then get ``wrappedFactory``'s protocol.

    The knobs are docs/configuration.rst's, as keywords (``trusted="10.0.0.0/8"``,
    ``header_timeout=5``) or as one :class:`~proxyproto.settings.Settings`
    (``settings=``, the keywords on top); ``trusted`` defaults to
    ``"127.0.0.1,::1"`` (loopback only).  ``ssl``: a TLS context factory
    (``twisted.internet.ssl.CertificateOptions``, anything Twisted's
    ``TLSMemoryBIOFactory`` takes) negotiated *after* the header, the
    handshake within ``header_timeout`` of its start.  ``reactor``: the
    reactor for the deadlines (default: the global one, looked up when the
    first connection arrives).  Invalid knobs raise ``ValueError``, unknown
    ones ``TypeError``.

    :attr:`pending` counts the connections whose header is not in yet;
    :meth:`close` (called by ``stopFactory``, when the last port using the
    factory stops listening) closes them.
    """

    protocol = ProxyProtocolWrapper
    noisy = False  # the wrapped factory says it starts and stops; once is enough

    def __init__(
        self,
        wrappedFactory: Any,
        *,
        settings: Settings | None = None,
        ssl: Any = None,
        reactor: Any = None,
        **knobs: Any,
    ) -> None:
        self.settings = settings_for(settings, knobs)
        if ssl is not None:
            _check_tls_layer()
        self.ssl = ssl
        #: The application's factory (Daphne's forwarded headers are turned off on it when listening starts).
        self.application = wrappedFactory
        #: Daphne's server when the application's factory is its: its scopes get the header when listening starts.
        self.daphne = _daphne_server(wrappedFactory)
        #: What builds each served connection's protocol: ``wrappedFactory``, under the TLS layer with ``ssl``.
        self.inner = wrappedFactory if ssl is None else _TLSMemoryBIOFactory(ssl, False, wrappedFactory)
        super().__init__(self.inner)
        self._reactor = reactor
        self.refusals = RefusalLog(logger, self.settings.log_rate, later=self._later, name_of=self.settings.name_of)
        self.parking: Parking[ProxyProtocolWrapper] = Parking(self.refusals, ProxyProtocolWrapper.abort)
        self.closed = False

    def reactor(self) -> Any:
        """The reactor of the deadlines: the one given, else the global one."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _later(self, delay: float, callback: Any) -> bool:
        reactor = self.reactor()
        if not getattr(reactor, "running", False):
            return False
        reactor.callLater(delay, callback)
        return True

    def buildProtocol(self, addr: Any) -> ProxyProtocolWrapper:
        return ProxyProtocolWrapper(self)

    def startFactory(self) -> None:
        """Listening starts: serve new connections; Daphne's ``--proxy-headers`` is turned off, and its scopes get
        a trusted peer's header (docs/twisted.rst)."""
        self.closed = False
        _forwarded_headers_off(self.application)
        if self.daphne is not None:
            _header_in_scope(self.daphne)

    def stopFactory(self) -> None:
        """The last port using this factory stopped listening: close the connections waiting for their header."""
        self.close()

    @property
    def pending(self) -> int:
        """Connections whose header is not in yet."""
        return len(self.parking)

    def close(self) -> None:
        """Close every connection still waiting for its header (none was handed to the application)."""
        self.closed = True
        for waiting in list(self.parking.waiting):
            waiting.abort()


@implementer(interfaces.IStreamServerEndpoint)
class ProxyServerEndpoint:
    """A listening endpoint whose connections read the PROXY header first (see :func:`wrap_endpoint`)."""

    def __init__(
        self, endpoint: Any, *, settings: Settings | None = None, ssl: Any = None, reactor: Any = None, **knobs: Any
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings_for(settings, knobs)
        self.ssl = ssl
        self.reactor = reactor
        #: The factory of the last :meth:`listen` (its ``pending`` connections, its ``close``).
        self.factory: ProxyProtocolFactory | None = None

    def listen(self, protocolFactory: Any) -> Any:
        """Listen on the inner endpoint with ``protocolFactory`` wrapped in a :class:`ProxyProtocolFactory`."""
        self.factory = ProxyProtocolFactory(protocolFactory, settings=self.settings, ssl=self.ssl, reactor=self.reactor)
        return self.endpoint.listen(self.factory)


def wrap_endpoint(
    endpoint: Any, *, settings: Settings | None = None, ssl: Any = None, reactor: Any = None, **knobs: Any
) -> ProxyServerEndpoint:
    """``endpoint`` (any ``IStreamServerEndpoint``) with the PROXY header read first on every connection.

    The knobs, ``ssl`` and ``reactor`` are :class:`ProxyProtocolFactory`'s.
    """
    return ProxyServerEndpoint(endpoint, settings=settings, ssl=ssl, reactor=reactor, **knobs)


# -- the endpoint string: proxyproto:<inner description>[:knob=value...] -------------------------


def settings_from_options(options: Mapping[str, str], environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of a ``proxyproto:`` string: ``options`` over ``PROXYPROTO_*`` (:func:`settings_from_environment`).

    ``options``: knob name -> text, read as the environment's values are
    (``policy=USE``, ``header_timeout=2.5``, ``verify_checksum=false``,
    ``log_rate=none``).  ``ValueError`` names the option.
    """
    base = settings_from_environment(environ)
    if not options:
        return base
    try:
        given = {knob: _from_text(knob, text.strip()) for knob, text in options.items()}
        values = {**base.values(), **given}
        # Built afresh, so that refusal lines name the knobs as the string spells them (trusted=, not
        # PROXYPROTO_ALLOW_IPS) whenever the string gives one.
        return Settings(**values)
    except ValueError as exc:
        raise ValueError(f"proxyproto endpoint option {exc}") from None


def _unparse(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The inner endpoint's description again, every part quoted as ``serverFromString`` reads it."""
    parts = [_quote(str(arg)) for arg in args]
    parts += [f"{_quote(str(k))}={_quote(str(v))}" for k, v in kwargs.items()]
    return ":".join(parts)


def repeated_options(description: str) -> list[str]:
    """The keyword options ``description`` (a server endpoint string) gives more than once, in order.

    Twisted reads ``name=value`` parts into a dict, the last one winning:
    ``trusted=10.0.0.0/8:trusted=*`` would silently trust every peer.
    """
    seen: set[str] = set()
    repeated: list[str] = []
    part: list[Any] = []
    for kind, value in [*_tokenize(description), (_OP, ":")]:
        if kind == _STRING:
            part.append(value)
        elif value == ":":
            if len(part) > 1:  # name=value
                name = str(part[0])
                if name in seen and name not in repeated:
                    repeated.append(name)
                seen.add(name)
            part = []
    return repeated


def _description_given() -> str | None:
    """The string ``serverFromString`` is reading, found in its frame (Twisted hands the plugin its parts only)."""
    code = _serverFromString.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            description = frame.f_locals.get("description")
            return description if isinstance(description, str) else None
        frame = frame.f_back  # type: ignore[assignment]
    return None


@implementer(IPlugin, interfaces.IStreamServerEndpointStringParser)
class ProxyProtocolEndpointParser:
    """``proxyproto:<any server endpoint>[:<knob>=<value>...]`` for ``serverFromString``.

    The knobs among the keyword options are this library's (named as in
    docs/configuration.rst, ``policy_for`` excepted); every other part
    describes the inner endpoint (``tcp:8000:interface=127.0.0.1``,
    ``tcp6:8000``, ``unix:/run/app.sock:mode=660``, ...).  An inner
    ``ssl:`` (with Twisted's own options: ``privateKey``, ``certKey``,
    ``extraCertChain``, ``dhParameters``, ``sslmethod``, ``interface``,
    ``backlog``) listens on plain TCP and negotiates TLS *after* the header.
    Knobs the string does not give come from the ``PROXYPROTO_*`` variables.
    An option given twice (``trusted=10.0.0.0/8:trusted=*``) is refused
    (``ValueError`` naming it) when the string comes through ``serverFromString``.
    """

    prefix = "proxyproto"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> ProxyServerEndpoint:
        description = _description_given()
        repeated = repeated_options(description) if description is not None else []
        if repeated:
            raise ValueError(
                f"proxyproto endpoint option {', '.join(repeated)}: given more than once; give each option once"
            )
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in STRING_KNOBS}
        settings = settings_from_options(options)
        if not args:
            raise ValueError("proxyproto: endpoint needs an inner endpoint (proxyproto:tcp:8000)")
        description = _unparse(args, kwargs)
        if str(args[0]).lower() == "ssl":
            # Twisted's own reading of an ssl: description (the certificate options), listened on as
            # plain TCP: the TLS layer goes above the header.
            name, parsed, listen = _parseServer(description, None)
            if name != "SSL" or len(parsed) != 3:  # pragma: no cover - a Twisted that reads ssl: otherwise
                raise ValueError("proxyproto: cannot read this Twisted's ssl: description; use wrap_endpoint(ssl=)")
            port, _factory, context = parsed
            return ProxyServerEndpoint(
                _TCP4ServerEndpoint(reactor, port, **listen), settings=settings, ssl=context, reactor=reactor
            )
        return ProxyServerEndpoint(_serverFromString(reactor, description), settings=settings, reactor=reactor)
