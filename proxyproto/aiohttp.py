"""aiohttp: a site whose connections start with a PROXY header, so ``request.remote`` is the real client.

aiohttp serves an application through a runner (``web.AppRunner``) and one
or more *sites*; ``runner.server`` is a protocol factory that sites hand to
``loop.create_server``.  :class:`ProxyTCPSite` is ``web.TCPSite`` with that
factory wrapped by :func:`proxyproto.aio_protocol.wrap_protocol_factory`:
each connection reads its header first, and aiohttp's request handler
then sees a transport whose ``peername`` is the header's source, which is
where ``request.remote`` and ``request.transport.get_extra_info("peername")``
come from.  ``request.transport.get_extra_info("proxy_header")`` is the
parsed header (TLVs, SSL details), ``"proxy_peername"`` the proxy's own address.

``ssl_context`` is negotiated *after* the header (haproxy's ``send-proxy``
in front of TLS passthrough, aio-libs/aiohttp#11252): given to
``web.TCPSite``, the handshake would come first and read the header as a
broken ClientHello.

aiohttp is imported when this module is, which only its users do.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

# Without aiohttp installed (a [test]-only install), mypy sees Any here.
from aiohttp import web  # type: ignore[import-not-found,unused-ignore]

from .aio_protocol import ProxyProtocolFactory, wrap_protocol_factory
from .settings import Settings

__all__ = ["ProxyTCPSite"]


#: The private slots of ``web.TCPSite`` that :meth:`ProxyTCPSite.start` reads and sets in its
#: place (docs/platforms.rst); ``_bound_port`` too where it exists (aiohttp 3.10 and later).
_SITE_SLOTS = ("_server", "_host", "_port", "_backlog", "_reuse_address", "_reuse_port")


def _require_site_slots() -> None:
    """Raise ``RuntimeError`` naming them when this aiohttp's ``TCPSite`` lacks :data:`_SITE_SLOTS`.

    The subclass has a ``__dict__``: without this check, a renamed slot would
    be set there silently, and ``BaseSite.stop`` would no longer close the
    listener.
    """
    slots = {name for klass in web.TCPSite.__mro__ for name in getattr(klass, "__slots__", ())}
    missing = [name for name in _SITE_SLOTS if name not in slots]
    if missing:
        raise RuntimeError(
            f"proxyproto.aiohttp: this aiohttp's web.TCPSite has no {', '.join(missing)}, which "
            "ProxyTCPSite.start sets in its place (see docs/platforms.rst)"
        )


class ProxyTCPSite(web.TCPSite):  # type: ignore[misc,unused-ignore]
    """``web.TCPSite`` for a backend behind a PROXY-protocol proxy.

    Takes ``web.TCPSite``'s arguments and the knobs of docs/configuration.rst,
    as keywords or as one :class:`~proxyproto.settings.Settings`
    (``settings=``, keywords on top): ``trusted`` is ``"127.0.0.1,::1"`` by
    default (loopback only; networks, ``"10.0.0.0/8,127.0.0.1"``, ``"*"``
    for every peer, ``""`` for none; None is refused).
    ``ssl_context`` (aiohttp's spelling of ``ssl``) is negotiated after
    the header, within ``ssl_handshake_timeout`` (default: ``header_timeout``).  Invalid knobs raise ``ValueError``
    here, before anything is bound.  :meth:`stop` (and so
    ``runner.cleanup()``) also closes the connections still waiting for
    their header, which aiohttp does not know of yet.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        settings: Settings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        backlog: int = 128,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        **knobs: Any,
    ) -> None:
        _require_site_slots()
        super().__init__(
            runner,
            host,
            port,
            ssl_context=ssl_context,
            backlog=backlog,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
        )
        server = runner.server
        assert server is not None  # BaseSite.__init__ refuses a runner that is not set up
        #: The wrapped protocol factory: ``proxy_factory.pending`` counts connections waiting for a header.
        self.proxy_factory: ProxyProtocolFactory = wrap_protocol_factory(
            server, settings=settings, ssl=ssl_context, ssl_handshake_timeout=ssl_handshake_timeout, **knobs
        )

    async def start(self) -> None:
        # web.TCPSite.start would pass ssl= to create_server (TLS before the header):
        # register the site as BaseSite.start does, then listen with the wrapped factory.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.proxy_factory,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        # TCPSite.port reports _bound_port (aiohttp >= 3.10); older releases have no such slot.
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        self.proxy_factory.close()
