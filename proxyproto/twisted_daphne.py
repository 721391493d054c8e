"""Daphne (Django Channels' server) behind the ``proxyproto:`` endpoint: what the endpoint changes in its server.

Daphne listens with ``serverFromString``, so the endpoint reaches it with no
change to Daphne, and its scopes' ``client`` and ``server`` are what the
wrapper's ``getPeer()`` and ``getHost()`` say.  Two things are Daphne's
server's, and the endpoint sets them when it starts listening for one:

* its ``--proxy-headers`` (X-Forwarded-* lines, written by the client) are
  turned off (:func:`forwarded_headers_off`);
* its ``create_application`` puts a trusted peer's header in the scope of
  every request and WebSocket, at ``scope["extensions"]["proxyproto"]``
  (:func:`header_in_scope`, :mod:`proxyproto.asgi`).

Only that server instance is changed, never Daphne's classes; what it
relies on is checked when the factory is made (:func:`daphne_server`).
Daphne is never imported here: a server is Daphne's when ``daphne.server``
is loaded and the application's factory keeps one of its ``Server``.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

from twisted.protocols import policies as _policies

from .asgi import put_header
from .header import ProxyHeader
from .twisted_wrapper import ProxyProtocolWrapper

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

logger = logging.getLogger("proxyproto")
_ProtocolWrapper: Any = _policies.ProtocolWrapper

#: Daphne's ``Server`` attributes naming the request headers it takes the client from (``--proxy-headers``).
_DAPHNE_FORWARDED = ("proxy_forwarded_address_header", "proxy_forwarded_port_header", "proxy_forwarded_proto_header")
#: What Daphne's ``Server.create_application`` takes: Daphne makes every HTTP request's and WebSocket's
#: application with ``server.create_application(protocol, scope)``, ``protocol.transport`` being the
#: connection's.  Checked when a factory wraps a Daphne server's (:func:`daphne_server`).
_DAPHNE_CREATE_APPLICATION = ("self", "protocol", "scope")


def forwarded_headers_off(factory: Any) -> None:
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


def daphne_server(factory: Any) -> Any:
    """Daphne's ``Server`` when ``factory`` is its (Daphne's ``HTTPFactory`` keeps it as ``server``), else None.

    ``RuntimeError`` when that Daphne no longer makes its applications
    through ``create_application(protocol, scope)``: served on, its scopes
    would silently lack the header (:func:`header_in_scope`).
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


def header_in_scope(server: Any) -> None:
    """Make ``server`` (Daphne's, checked by :func:`daphne_server`) put trusted peers' headers in its scopes.

    Only this server instance's ``create_application`` is replaced (an
    attribute of the instance, wrapping the method), once: Daphne's classes
    and other servers of the process are untouched.
    """
    if not isinstance(server.create_application, _ApplicationsWithHeader):
        server.create_application = _ApplicationsWithHeader(server.create_application)


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


def connection_header(transport: Any) -> ProxyHeader | None:
    """The ``proxy_header`` of the :class:`ProxyProtocolWrapper` ``transport`` is or wraps (TLS); else None."""
    while isinstance(transport, _ProtocolWrapper):
        if isinstance(transport, ProxyProtocolWrapper):
            return transport.proxy_header
        transport = transport.transport
    return None
