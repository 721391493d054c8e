"""The Twisted protocol each connection first gets: it reads the PROXY header, then is the inner protocol's transport.

A :class:`ProxyProtocolWrapper` is in one of three states:

* waiting for its header: the bytes Twisted delivers go to the one scanner
  (:meth:`proxyproto.settings.Settings.scanner`), under a deadline and in
  a parking slot (:class:`proxyproto.parking.Parking`), until it says what
  they are; then the policy table (:func:`proxyproto.policy.decide`)
  closes the connection with one refusal line, or serves it;
* served: the inner protocol is built (``buildProtocol`` with the address
  it is served with), connected to the wrapper as its transport, and
  handed the bytes after the header in the same call;
* with ``ssl``, served and waiting for the TLS handshake after the header
  (:class:`proxyproto.twisted_tls.Handshake`): the same deadline and slot,
  until the TLS layer says it is done.

Trust is the one decision (:meth:`proxyproto.settings.Settings.trust`); the
header handed on is a trusted peer's only (:func:`proxyproto.advice.handed_on`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error as _error
from twisted.internet import interfaces
from twisted.protocols import policies as _policies
from zope.interface import classImplements, directlyProvides, implementedBy, implementer, providedBy

from .advice import handed_on, refusal_line, untrusted_look
from .header import ProxyHeader
from .policy import Outcome, Policy, decide, peer_text, served_address
from .reader import HeaderScanner
from .refusal_log import kind_of, listener_text
from .twisted_terms import error_text, family_of, socket_address, socket_of, twisted_address
from .twisted_tls import Handshake

if TYPE_CHECKING:
    from .twisted_endpoint import ProxyProtocolFactory

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

_ProtocolWrapper: Any = _policies.ProtocolWrapper
_ConnectionDone: Any = _error.ConnectionDone
_SOCKET_PEER: Any = object()  # served_address's answer when the socket's own peer is kept


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
    _address: Any = None  # proxy_peer as the socket module gives it, for the engine
    _peer: Any = None
    _host: Any = None
    _scanner: HeaderScanner | None = None
    _timer: Any = None
    _policy = Policy.REQUIRE
    _trusted = False
    _look: Any = None
    #: With ``ssl``: the TLS layer while its handshake (after the header) is not done, else None.
    _tls: Handshake | None = None
    _fd: int | None = None

    def __init__(self, factory: ProxyProtocolFactory) -> None:
        super().__init__(factory, None)

    # -- IProtocol ----------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        _declare(self, transport)
        self.transport = transport
        self.connected = 1
        factory = self.factory
        factory.registerProtocol(self)
        self.proxy_peer = transport.getPeer()
        self._address = address = socket_address(self.proxy_peer)
        host = transport.getHost()
        log = factory.refusals
        if log.listener is None:
            log.listener = listener_text(socket_address(host))
        if factory.closed:
            transport.abortConnection()
            return
        settings = factory.settings
        handle = socket_of(transport)
        try:
            self._policy, self._trusted = settings.trust(address, handle, family=family_of(host))
        except Exception as exc:  # a user's hook: its failure closes this connection, nothing else
            log.hook_failed(address, exc)
            transport.abortConnection()
            return
        self._fd = handle.fileno() if handle is not None and hasattr(handle, "fileno") else None
        if self._policy is Policy.SKIP:
            if not self._trusted and not factory.hooked:
                self._look = untrusted_look(log, settings, address)
            self._serve(None, b"")
            return
        self._scanner = settings.scanner()
        self._wait()

    def dataReceived(self, data: bytes) -> None:
        scanner = self._scanner
        if scanner is None:
            if self.wrappedProtocol is not None:
                look = self._look
                if look is not None:
                    self._look = None
                    look(data)
                self.wrappedProtocol.dataReceived(data)
                if self._tls is not None and self._tls.done:
                    self._release()  # the handshake is done: the connection no longer waits
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
        scanner, tls = self._scanner, self._tls
        if scanner is not None or tls is not None:
            self._release()
            self._lost_waiting(scanner, tls, reason)
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

    # -- waiting ------------------------------------------------------------------------

    def _wait(self) -> None:
        """Wait for the header, or the TLS handshake: a parking slot, and a deadline of ``header_timeout``."""
        factory = self.factory
        factory.parking.add(self, self._address, self._fd, factory.settings.max_pending)
        self._timer = factory.reactor().callLater(factory.settings.header_timeout, self._expired)

    def _release(self) -> None:
        """Forget the waiting state: the scanner or the handshake, the deadline, the parking slot."""
        self._scanner = None
        self._tls = None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self.factory.parking.discard(self)

    def _expired(self) -> None:
        """The deadline passed: the header's outcome is decided as such, or the handshake's connection closed."""
        self._timer = None
        scanner, tls = self._scanner, self._tls
        if scanner is not None:
            self._decided(scanner.expire(), b"")
        elif tls is not None:
            self._release()
            self.factory.refusals.handshake_expired(self._address, self.factory.settings.header_timeout)
            self.transport.abortConnection()

    def _lost_waiting(self, scanner: HeaderScanner | None, tls: Handshake | None, reason: Any) -> None:
        """Say why a connection closed while it waited for its header (``scanner``) or its handshake (``tls``)."""
        log, peer = self.factory.refusals, peer_text(self._address)
        if tls is not None:
            tls.lost(log, peer, reason)
        elif reason is not None and not reason.check(_ConnectionDone):
            # A reset (or another error) before the header was decided: a read error, as the other adapters say it.
            log.read_failed(self._address, error_text(reason))
        else:  # a full close before the header was decided
            assert scanner is not None
            outcome = scanner.eof()
            verdict = decide(self._policy, outcome)
            if not verdict.serve:
                self._refuse(verdict.level, outcome, scanner)

    def abort(self) -> None:
        """Close a connection still waiting for its header or handshake (evicted, or the factory stopped)."""
        self._release()  # the eviction's line (or the stop) says why: no second line for the handshake
        self.transport.abortConnection()

    # -- deciding, serving --------------------------------------------------------------

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
        self._serve(scanner.header, rest)

    def _refuse(self, level: int, outcome: Outcome, scanner: HeaderScanner) -> None:
        factory = self.factory
        reason = refusal_line(
            factory.settings, self._policy, outcome, scanner, self._trusted, factory.hooked, self._address
        )
        factory.refusals.log(level, "%s: closed: %s", peer_text(self._address), reason, kind=kind_of(outcome))

    def _serve(self, header: ProxyHeader | None, rest: bytes) -> None:
        """Build the inner protocol for the address served, connect it to this wrapper, hand it ``rest``.

        ``header``: what was read; the inner protocol sees it only from a trusted peer (:func:`handed_on`).
        """
        factory = self.factory
        self.proxy_header = header = handed_on(
            factory.refusals, factory.settings, self._address, self._policy, header, self._trusted, factory.hooked
        )
        if header is not None:
            family = family_of(self.transport.getHost())
            if served_address(self._policy, header, _SOCKET_PEER, family) is not _SOCKET_PEER:
                self._peer = twisted_address(header.family, header.source)
                self._host = twisted_address(header.family, header.destination)
        inner = factory.inner.buildProtocol(self.getPeer())
        if inner is None:  # the factory refused the connection, as Twisted lets it
            self.transport.loseConnection()
            return
        self.wrappedProtocol = inner
        inner.makeConnection(self)
        if factory.ssl is not None and self.connected:
            tls = Handshake(inner)
            if not tls.done:
                self._tls = tls
                self._wait()
        if rest and self.wrappedProtocol is not None and self.connected:
            self.dataReceived(rest)


#: ProxyProtocolWrapper subclasses declaring a transport class's interfaces, made once per class.
_DECLARING: dict[type, type[ProxyProtocolWrapper]] = {}


def _declare(wrapper: ProxyProtocolWrapper, transport: Any) -> None:
    """Make ``wrapper`` provide what ``transport`` does (``ITCPTransport``, ...) for the inner protocol, as
    ``ProtocolWrapper`` does; half-close it provides always (an end of stream mid-header is an outcome of its own).

    zope.interface makes a new specification (and its resolution order) for every ``directlyProvides``:
    hundreds of microseconds per connection.  A transport class's declaration is made once instead, as a
    subclass (:data:`_DECLARING`); only a transport with interfaces of its own (declared on the instance)
    has them copied with ``directlyProvides``.
    """
    kind = type(transport)
    made = _DECLARING.get(kind)
    if made is None:
        spec = providedBy(transport)
        if spec is not implementedBy(kind):
            directlyProvides(wrapper, spec)
            return
        made = type(f"ProxyProtocolWrapperFor{kind.__name__}", (ProxyProtocolWrapper,), {"__module__": __name__})
        classImplements(made, spec)
        _DECLARING[kind] = made
    wrapper.__class__ = made
