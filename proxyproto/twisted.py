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

This module names the public classes; each concept is a module of its own:

* :mod:`proxyproto.twisted_wrapper`: the wrapper protocol and its states
  (waiting for the header, served, waiting for the TLS handshake);
* :mod:`proxyproto.twisted_tls`: TLS after the header (Twisted's TLS layer
  above the wrapper, its handshake bounded);
* :mod:`proxyproto.twisted_endpoint`: the factory and the endpoint;
* :mod:`proxyproto.twisted_daphne`: what the endpoint sets in a Daphne server;
* :mod:`proxyproto.twisted_parser`: the ``proxyproto:`` endpoint string;
* :mod:`proxyproto.twisted_terms`: Twisted's addresses and failures in the
  engine's terms.

Twisted is imported when this module is, which only its users do; the
reactor is never imported here (the endpoint is given one, and the factory
takes ``reactor=``, else the global one when the first connection arrives).
"""

from __future__ import annotations

from .twisted_endpoint import ProxyProtocolFactory, ProxyServerEndpoint, wrap_endpoint
from .twisted_parser import ProxyProtocolEndpointParser
from .twisted_wrapper import ProxyProtocolWrapper

__all__ = [
    "ProxyProtocolEndpointParser",
    "ProxyProtocolFactory",
    "ProxyProtocolWrapper",
    "ProxyServerEndpoint",
    "wrap_endpoint",
]
