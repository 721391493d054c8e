"""The Twisted factory and endpoint whose connections read the PROXY header first.

:class:`ProxyProtocolFactory` wraps any protocol factory (``reactor.listenTCP``
and the like): each connection gets a :class:`~proxyproto.twisted_wrapper.ProxyProtocolWrapper`,
and once its header is decided, the wrapped factory's protocol (under
Twisted's TLS layer with ``ssl``: :mod:`proxyproto.twisted_tls`).  The
factory holds what its connections share: the settings, the deadlines'
reactor, the rate-limited refusal lines (:class:`proxyproto.refusal_log.RefusalLog`)
and the connections still waiting (:class:`proxyproto.parking.Parking`:
past ``max_pending`` the oldest is closed; all are closed when the factory
stops, so a shutdown never waits for them).  :func:`wrap_endpoint` wraps a
listening endpoint, making such a factory at each ``listen``; when the
application's factory is Daphne's, its server is set up for the endpoint
(:mod:`proxyproto.twisted_daphne`).
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import interfaces
from twisted.protocols import policies as _policies
from zope.interface import implementer

from .advice import warn_if_every_peer_trusted
from .parking import Parking
from .refusal_log import RefusalLog
from .settings import Settings, settings_for
from .twisted_daphne import daphne_server, forwarded_headers_off, header_in_scope
from .twisted_tls import check_tls_layer, tls_factory
from .twisted_wrapper import ProxyProtocolWrapper

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

logger = logging.getLogger("proxyproto")
_WrappingFactory: Any = _policies.WrappingFactory


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
        warn_if_every_peer_trusted(self.settings)
        #: Whether a ``policy_for`` hook decides trust (its answers need no advice in refusal lines).
        self.hooked = self.settings.policy_for is not None
        if ssl is not None:
            check_tls_layer()
        self.ssl = ssl
        #: The application's factory (Daphne's forwarded headers are turned off on it when listening starts).
        self.application = wrappedFactory
        #: Daphne's server when the application's factory is its: its scopes get the header when listening starts.
        self.daphne = daphne_server(wrappedFactory)
        #: What builds each served connection's protocol: ``wrappedFactory``, under the TLS layer with ``ssl``.
        self.inner = wrappedFactory if ssl is None else tls_factory(ssl, wrappedFactory)
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
        forwarded_headers_off(self.application)
        if self.daphne is not None:
            header_in_scope(self.daphne)

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
