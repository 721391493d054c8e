"""hypercorn: ``serve(app, config)`` whose TCP listeners read a PROXY header first, so ``scope["client"]`` is real.

hypercorn's asyncio worker makes its own listeners (``asyncio.start_server``
on the sockets ``config.create_sockets()`` binds) and reads the client's
address from ``writer.get_extra_info("socket").getpeername()``; it has no
hook for what happens between ``accept()`` and its own protocol.  A recipe
built on :func:`proxyproto.aio.start_server` would have to drive hypercorn's
internal ``TCPServer`` and lifespan by hand.  This adapter keeps hypercorn's
own ``serve`` (lifespan, graceful shutdown, HTTP/2, logging) and changes one
thing, for this call only: it runs a copy of hypercorn's ``serve`` and
``worker_serve`` functions (same code, same module globals) whose global
``asyncio`` is a view of the asyncio module with its own ``start_server``,
which wraps the protocol factory of exactly the listening sockets this call
bound (and passes every other call through) with
:func:`proxyproto.aio_protocol.wrap_protocol_factory`.  Nothing shared is
changed: no module, class or event loop; two ``serve`` calls on one loop
each have their own wrapper.

* The TLS handshake of ``config.certfile``/``keyfile`` listeners is moved
  *after* the header (haproxy's ``send-proxy`` in front of TLS passthrough).
* ``config.quic_bind`` (HTTP/3 over UDP) is left alone: the PROXY protocol
  is for TCP.
* Closing a listener also closes the connections still waiting for their
  header, so a silent client never delays shutdown.
* An ``app`` that is hypercorn's ``ProxyFixMiddleware`` is bypassed on the
  connections whose client the PROXY protocol pins (a trusted peer under
  REQUIRE, USE or IGNORE: :func:`proxyproto.policy.pins_the_client`): it
  trusts the last ``X-Forwarded-For`` hop whatever the peer, and behind a
  proxy in ``mode tcp`` that hop is the client's own writing.  Other
  connections get the middleware, as hypercorn alone would.

hypercorn is imported when :func:`serve` is called.  Should a hypercorn
release stop creating its listeners with ``asyncio.start_server`` in
``worker_serve`` (or ``serve`` stop calling ``worker_serve``), :func:`serve`
raises ``RuntimeError`` before binding anything, rather than serve without
reading headers (see ``docs/platforms.rst``).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import socket
import types
from collections.abc import Awaitable
from typing import Any, Callable, Literal

from .advice import log_policy
from .aio_protocol import ProxyProtocolFactory, wrap_protocol_factory
from .asgi import with_header
from .logs import show_through
from .settings import Settings, settings_for

__all__ = ["serve"]

logger = logging.getLogger("proxyproto")

#: The attribute the factory sets (``trusted_overrides``) on the inner protocol of a connection whose
#: client the PROXY protocol pins, when the application is a ProxyFixMiddleware to bypass there.
_PINNED_PROTOCOL = "_proxyproto_pins_the_client"
#: The scope key marking a request of such a connection, for :class:`_ProxyFixUnlessPinned` only,
#: which removes it before any application sees the scope.
_PINNED_SCOPE = "proxyproto.pins_the_client"


async def serve(
    app: Any,
    config: Any,
    *,
    shutdown_trigger: Callable[..., Awaitable[Any]] | None = None,
    mode: Literal["asgi", "wsgi"] | None = None,
    settings: Settings | None = None,
    **knobs: Any,
) -> None:
    """``hypercorn.asyncio.serve(app, config)`` behind a PROXY-protocol proxy.

    ``app``, ``config``, ``shutdown_trigger`` and ``mode`` are hypercorn's.
    The other knobs are docs/configuration.rst's, as keywords or as one
    :class:`~proxyproto.settings.Settings` (``settings=``, keywords on
    top); ``trusted`` defaults to ``"127.0.0.1,::1"`` (loopback only) and
    takes networks, ``"10.0.0.0/8,127.0.0.1"``, ``"*"`` for every peer or
    ``""`` for none (None is refused).  Invalid knobs raise ``ValueError``
    before anything is bound.  ``config`` is not modified.
    With certificates in ``config``, TLS is negotiated after the header,
    within ``header_timeout`` unless ``config.ssl_handshake_timeout`` was
    set (hypercorn's own default, 60 s, is not used for it).
    An ``app`` that is hypercorn's ``ProxyFixMiddleware`` is bypassed on
    connections whose client the PROXY protocol pins
    (:func:`~proxyproto.policy.pins_the_client`), said in one INFO line.
    """
    from hypercorn.asyncio import serve as hypercorn_serve  # type: ignore[import-not-found,unused-ignore]

    run = _serve_with_own_start_server(hypercorn_serve)  # RuntimeError, before binding, if hypercorn changed
    chosen = settings_for(settings, knobs)  # the knobs checked now, before binding
    config.log  # noqa: B018  (hypercorn's loggers, which its serve sets up too: proxyproto's lines show through them)
    show_through("hypercorn.error")
    fix = _proxy_fix_middleware(app)
    if fix is not None:
        app = _ProxyFixUnlessPinned(fix)
        logger.info(
            "hypercorn's ProxyFixMiddleware is bypassed on connections from peers trusted to send the PROXY "
            "header: the header gives their client and scheme"
        )
    handshake_set = "ssl_handshake_timeout" in vars(config)  # set on the instance, not hypercorn's default
    sockets = config.create_sockets()
    log_policy(chosen, bool(sockets.secure_sockets))
    listeners = {id(sock) for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]}
    factories: list[ProxyProtocolFactory] = []

    async def start_server(
        client_connected_cb: Callable[..., Any],
        host: Any = None,
        port: Any = None,
        *,
        limit: int = _STREAM_LIMIT,
        **kwargs: Any,
    ) -> Any:
        """``asyncio.start_server`` as this call's copy of hypercorn sees it: its own sockets wrapped."""
        sock: socket.socket | None = kwargs.get("sock")
        if sock is None or id(sock) not in listeners:
            return await asyncio.start_server(client_connected_cb, host, port, limit=limit, **kwargs)
        loop = asyncio.get_running_loop()

        def streams() -> asyncio.StreamReaderProtocol:  # what asyncio.start_server's factory makes
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

        handshake_timeout = kwargs.pop("ssl_handshake_timeout", None)
        factory = wrap_protocol_factory(
            streams,
            ssl=kwargs.pop("ssl", None),
            # hypercorn passes its config's value, 60 s unless set: only a value the user set
            # replaces the wrapper's default (header_timeout).
            ssl_handshake_timeout=handshake_timeout if handshake_set else None,
            settings=chosen,
        )
        if fix is not None:
            factory.trusted_overrides = ((_PINNED_PROTOCOL, True),)
        factories.append(factory)
        return _Listener(await loop.create_server(factory, host, port, **kwargs), factory)

    ours = copy.copy(config)
    ours.create_sockets = lambda: sockets  # hypercorn serves the sockets bound above
    try:
        if mode is None:  # hypercorn < 0.15 has no mode argument
            await run(start_server, app, ours, shutdown_trigger=shutdown_trigger)
        else:
            await run(start_server, app, ours, shutdown_trigger=shutdown_trigger, mode=mode)
    finally:
        for factory in factories:
            factory.close()


#: ``asyncio.start_server``'s default buffer limit (64 KiB), which hypercorn does not change.
_STREAM_LIMIT = 2**16


def _proxy_fix_middleware(app: Any) -> Any:
    """``app`` when it is hypercorn's ``ProxyFixMiddleware`` (whose ``app`` is the one it wraps), else None."""
    try:
        from hypercorn.middleware import ProxyFixMiddleware  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover (a hypercorn without it)
        return None
    return app if isinstance(app, ProxyFixMiddleware) else None


class _ProxyFixUnlessPinned:
    """The ASGI application hypercorn serves in place of a ``ProxyFixMiddleware``: it, unless the connection is pinned.

    A request of a connection whose client the PROXY protocol pins carries
    the :data:`_PINNED_SCOPE` mark (:func:`_tcp_server_with_header` puts
    it); it goes to the application the middleware wraps, its client and
    scheme the connection's.  Every other scope (other peers, lifespan)
    goes through the middleware.
    """

    def __init__(self, fix: Any) -> None:
        self.fix = fix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.pop(_PINNED_SCOPE, False):
            await self.fix.app(scope, receive, send)
        else:
            await self.fix(scope, receive, send)


class _Listener:
    """A listener as hypercorn sees it: closing it also closes the connections still waiting for their header.

    Those were never handed to hypercorn, so its graceful shutdown would not
    close them.  Everything else is the ``asyncio.Server``'s.
    """

    def __init__(self, server: asyncio.AbstractServer, factory: ProxyProtocolFactory) -> None:
        self.server = server
        self.factory = factory

    def close(self) -> None:
        self.server.close()
        self.factory.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


class _AsyncioView(types.ModuleType):
    """The asyncio module as one ``serve`` call's copy of hypercorn sees it: its own ``start_server``."""

    def __init__(self, start_server: Callable[..., Any]) -> None:
        super().__init__("asyncio")
        self.start_server = start_server

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def _copy_with_globals(function: Any, **replaced: Any) -> Any:
    """A copy of ``function`` (same code, defaults and closure) whose module globals have ``replaced``."""
    namespace = dict(function.__globals__)
    namespace.update(replaced)
    copied = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    copied.__kwdefaults__ = function.__kwdefaults__
    copied.__qualname__ = function.__qualname__
    return copied


def _serve_with_own_start_server(hypercorn_serve: Any) -> Callable[..., Awaitable[None]]:
    """``run(start_server, app, config, **kw)``: hypercorn's ``serve`` with ``start_server`` as asyncio's.

    What it relies on (``docs/platforms.rst``): hypercorn's ``serve`` calls
    the module global ``worker_serve``, which calls ``asyncio.start_server``
    through its module global ``asyncio`` for each TCP listener, and makes
    each connection's ``TCPServer(app, ..., writer)`` through its module
    global ``TCPServer`` (replaced by :func:`_tcp_server_with_header`).
    Raises ``RuntimeError`` naming what changed when the code says otherwise.
    """
    worker_serve = hypercorn_serve.__globals__.get("worker_serve")
    code = getattr(worker_serve, "__code__", None)
    names = getattr(code, "co_names", ())
    if "worker_serve" not in hypercorn_serve.__code__.co_names or not {"asyncio", "start_server"} <= set(names):
        raise RuntimeError(
            "proxyproto.hypercorn: this hypercorn's serve() no longer makes its listeners with "
            "asyncio.start_server in worker_serve(), so their connections cannot read a PROXY header "
            "(see docs/platforms.rst)"
        )
    tcp_server = worker_serve.__globals__.get("TCPServer")
    parameters = _parameters(tcp_server)
    if "TCPServer" not in _names_in(code) or not parameters or parameters[-1] != "writer":
        raise RuntimeError(
            "proxyproto.hypercorn: this hypercorn's worker_serve() no longer makes each connection's "
            "TCPServer(app, ..., writer), so a trusted peer's header cannot reach the application's "
            "scope (see docs/platforms.rst)"
        )
    made_with_header = _tcp_server_with_header(tcp_server)

    async def run(start_server: Callable[..., Any], app: Any, config: Any, **kwargs: Any) -> None:
        worker = _copy_with_globals(worker_serve, asyncio=_AsyncioView(start_server), TCPServer=made_with_header)
        await _copy_with_globals(hypercorn_serve, worker_serve=worker)(app, config, **kwargs)

    return run


def _names_in(code: Any) -> set[str]:
    """The global names ``code`` and the functions defined in it use."""
    found = set(getattr(code, "co_names", ()))
    for const in getattr(code, "co_consts", ()):
        if isinstance(const, types.CodeType):
            found |= _names_in(const)
    return found


def _parameters(function: Any) -> list[str]:
    """The names of ``function``'s parameters (a class: its constructor's), or [] when it has none to tell."""
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def _tcp_server_with_header(tcp_server: Callable[..., Any]) -> Callable[..., Any]:
    """hypercorn's ``TCPServer`` as one ``serve`` call's copy of it makes it: the header in each scope.

    hypercorn makes one ``TCPServer(app, ..., reader, writer)`` per
    connection, ``app`` being the application as hypercorn calls it (its
    ``ASGIWrapper``).  When the connection's transport reports a header
    (``writer.get_extra_info("proxy_header")``: a trusted peer's only), that
    connection gets :func:`proxyproto.asgi.with_header` of ``app``, so every
    request and WebSocket scope of it (HTTP/1.1 or HTTP/2) has
    ``scope["extensions"]["proxyproto"]``.  When the factory marked the
    connection's protocol as pinned (:data:`_PINNED_PROTOCOL`, set only for
    a ``ProxyFixMiddleware`` to bypass), each scope also gets the
    :data:`_PINNED_SCOPE` mark that :class:`_ProxyFixUnlessPinned` reads.
    """

    def made(app: Any, *args: Any) -> Any:
        writer = args[-1]
        header = writer.get_extra_info("proxy_header")
        if getattr(writer.transport.get_protocol(), _PINNED_PROTOCOL, False):
            app = _marking_pinned(app)
        return tcp_server(app if header is None else with_header(app, header), *args)

    return made


def _marking_pinned(app: Callable[..., Any]) -> Callable[..., Any]:
    """``app`` (hypercorn's wrapper of the application) for one pinned connection: each scope marked so."""

    def app_marking_pinned(scope: Any, *args: Any) -> Any:
        scope[_PINNED_SCOPE] = True
        return app(scope, *args)

    return app_marking_pinned
