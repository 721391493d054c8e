"""Sanic behind a proxy that sends the PROXY protocol: ``app.run(protocol=proxyproto.sanic.HttpProtocol)``.

Sanic makes one protocol object per connection by calling the class given
as ``protocol=`` (``app.run``, ``app.prepare``, ``app.create_server``) with
its own keyword arguments (``loop``, ``app``, ``connections``, ...).  The
classes here are Sanic's own, subclassed: calling one makes Sanic's
protocol with those arguments and hands the connection first to a
:class:`proxyproto.aio_header.HeaderProtocol`, which reads the header
(:mod:`proxyproto.aio_protocol`'s engine: the same trust decision, scanner,
deadlines and refusal lines as every adapter) and then gives Sanic's
protocol a transport that reports the header's addresses.  So
``request.ip`` and ``request.port`` (``request.conn_info.client_ip``,
``client_port``) are the real client, ``request.conn_info.server`` and
``server_port`` the address it dialled::

    app.run(protocol=proxyproto.sanic.HttpProtocol)        # Sanic's HttpProtocol
    app.run(protocol=proxyproto.sanic.WebSocketProtocol)   # an app with WebSocket routes

Settings come from the ``PROXYPROTO_*`` environment variables
(:func:`proxyproto.settings.settings_from_environment`, as for
``proxyproto.uvicorn``), read in each worker process when it serves its
first connection; :func:`wrap` fixes them in code instead, and negotiates
TLS after the header (``wrap(ssl=...)``; Sanic's own ``ssl=`` cannot: it
goes to ``loop.create_server``, which handshakes before anyone reads).

The classes are importable by name, so Sanic's worker processes (spawned,
and sent the class by pickle) get them; so are :func:`wrap`'s classes,
whose arguments travel in their name, as JSON (knobs as values, a
``policy_for`` function and the class by their import paths, ``ssl`` as
Sanic's ``{"cert": ..., "key": ...}`` dict or a certificate directory).

A connection whose header is not in yet is listed in Sanic's
``connections``, so a graceful shutdown closes it at once (nothing was
served on it).  The header itself (a trusted peer's only):
:func:`header` of a request.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import logging
import ssl as _ssl
from typing import TYPE_CHECKING, Any, ClassVar

from sanic.server.protocols.http_protocol import HttpProtocol as _SanicHttpProtocol  # type: ignore[import-not-found,unused-ignore]
from sanic.server.protocols.websocket_protocol import (  # type: ignore[import-not-found,unused-ignore]
    WebSocketProtocol as _SanicWebSocketProtocol,
)

from .advice import policy_line
from .aio_header import HeaderProtocol
from .aio_protocol import ProxyProtocolFactory
from .header import ProxyHeader
from .logs import show_through
from .settings import Settings, settings_for, settings_from_environment

__all__ = ["HttpProtocol", "WebSocketProtocol", "header", "wrap"]

logger = logging.getLogger("proxyproto")

#: The name :func:`wrap`'s classes have in this module: this prefix, then their arguments (:func:`_described`).
_WRAPPED_PREFIX = "wrapped_"
_WRAPPED: dict[str, type[Any]] = {}


def _import_path(obj: Any) -> str | None:
    """``module:qualname`` of a class or function importable by that path (None otherwise)."""
    path = f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', '')}"
    try:
        found = _imported(path)
    except (ImportError, AttributeError, ValueError):
        return None
    return path if found is obj else None


def _imported(path: str) -> Any:
    module, _, qualname = path.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _described(protocol_class: type, settings: Settings | None, ssl: Any) -> str | None:
    """:func:`wrap`'s arguments as the JSON text its class is named after; None where they cannot travel."""
    path = _import_path(protocol_class)
    if path is None:
        return None
    knobs: dict[str, Any] | None = None
    if settings is not None:
        knobs = settings.values()
        knobs.update(policy=settings.policy.value, untrusted_policy=settings.untrusted_policy.value)
        knobs["trusted"] = ",".join(settings.trusted.names())
        if settings.policy_for is not None:
            knobs["policy_for"] = _import_path(settings.policy_for)
            if knobs["policy_for"] is None:
                return None
    try:
        return json.dumps([path, knobs, ssl], separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):  # an SSLContext, say
        return None


def _from_description(text: str) -> type[Any]:
    """The :func:`wrap` class that :func:`_described` described (ValueError or ImportError when it cannot be)."""
    path, knobs, ssl = json.loads(text)
    if knobs is not None and knobs.get("policy_for") is not None:
        knobs["policy_for"] = _imported(knobs["policy_for"])
    return wrap(_imported(path), settings=None if knobs is None else Settings(**knobs), ssl=ssl)


def header(request: Any) -> ProxyHeader | None:
    """The PROXY header of ``request``'s connection: a trusted peer's (TLVs included), else None."""
    transport = getattr(request, "transport", None)
    return None if transport is None else transport.get_extra_info("proxy_header")


class _Listed:
    """A connection waiting for its header, as Sanic's shutdown sees it in its ``connections`` set.

    Sanic calls ``close_if_idle()`` on every connection when it stops, then
    ``abort()`` on those left after its grace period, iterating over the
    set, with its loop stopped (``app.run``) or running (``create_server``):
    the connection is closed on the loop's next turn, and leaves the set
    then (nothing was served on it, so there is nothing to wait for).
    """

    __slots__ = ("loop", "reading")
    websocket = None  # Sanic's shutdown looks for an upgraded connection's

    def __init__(self, reading: HeaderProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self.reading = reading
        self.loop = loop

    def close_if_idle(self) -> bool:
        self.loop.call_soon(self.reading.shutdown)
        return True

    def abort(self) -> None:
        self.close_if_idle()


class _SanicFactory(ProxyProtocolFactory):
    """The engine's factory for one Sanic app and protocol class in one process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listed: dict[HeaderProtocol, tuple[set[Any], _Listed]] = {}

    def park(self, waiting: HeaderProtocol) -> None:
        super().park(waiting)
        connections = getattr(waiting.inner, "connections", None)
        if isinstance(connections, set) and waiting in self.parked:  # not evicted at once
            entry = self.listed[waiting] = (connections, _Listed(waiting, asyncio.get_running_loop()))
            connections.add(entry[1])

    def unpark(self, waiting: HeaderProtocol) -> None:
        super().unpark(waiting)
        entry = self.listed.pop(waiting, None)
        if entry is not None:
            entry[0].discard(entry[1])

    def lost_before_connection(self) -> None:
        """Connections dropped before the header was read: Sanic's own ``ssl=`` handshakes first. Said once."""
        if self.ssl is None and not self.closed and not self.said_tls_first:
            self.said_tls_first = True
            logger.error(
                "connections are dropped before proxyproto sees them: Sanic's ssl= negotiates TLS before the "
                "PROXY header, whose bytes then fail every handshake; give the certificate to proxyproto "
                "instead: app.run(protocol=proxyproto.sanic.wrap(ssl={'cert': ..., 'key': ...})) without "
                "ssl=, and TLS is negotiated after the header"
            )


class _Closing(asyncio.Protocol):
    """The protocol of a connection that cannot be served (the settings are invalid): closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


def _unused() -> asyncio.BaseProtocol:  # the inner protocol is made by Sanic, never by the factory
    raise RuntimeError("proxyproto.sanic: the protocol is made by Sanic")


def _context(ssl: Any) -> _ssl.SSLContext | None:
    """``ssl`` as an ``SSLContext``: one already, or Sanic's shorthand (a dict, a certificate directory, a list)."""
    if ssl is None or isinstance(ssl, _ssl.SSLContext):
        return ssl
    from sanic.http.tls.context import process_to_context  # type: ignore[import-not-found,unused-ignore]

    context: _ssl.SSLContext | None = process_to_context(ssl)
    return context


class _HeaderFirst:
    """What :class:`HttpProtocol` and :class:`WebSocketProtocol` add to Sanic's classes: the header first.

    ``proxy_settings``: the knobs (None: the ``PROXYPROTO_*`` environment);
    ``proxy_ssl``: TLS to negotiate after the header (an ``SSLContext`` or
    Sanic's shorthand), or None.  Calling the class, as Sanic does per
    connection, makes Sanic's protocol and returns the
    :class:`~proxyproto.aio_header.HeaderProtocol` that reads the header
    and then hands the transport to it.
    """

    proxy_settings: ClassVar[Settings | None] = None
    proxy_ssl: ClassVar[Any] = None
    #: The factory of each app (by id; the app is kept with it: Sanic keeps its apps anyway), or None
    #: where the settings were refused.
    _factories: ClassVar[dict[int, tuple[Any, _SanicFactory | None]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._factories = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        factory = cls._factory(kwargs.get("app"))
        protocol: Any = super().__new__(cls)
        protocol.__init__(*args, **kwargs)  # type.__call__ will not: what is returned is another object
        if factory is None:
            return _Closing()
        return HeaderProtocol(factory, protocol)

    @classmethod
    def _factory(cls, app: Any) -> _SanicFactory | None:
        """The factory serving ``app``'s connections in this process, made (and logged) at its first connection.

        None, after one ERROR line, when the settings or ``proxy_ssl`` are
        refused: every connection is then closed unserved.
        """
        entry = cls._factories.get(id(app))
        if entry is None:
            show_through("sanic.error")  # under Sanic's logging setup, proxyproto's lines show with a level
            try:
                settings = settings_from_environment() if cls.proxy_settings is None else cls.proxy_settings
                factory = _SanicFactory(_unused, settings=settings, ssl=_context(cls.proxy_ssl))
            except (ValueError, OSError) as exc:
                logger.error("proxyproto.sanic: every connection is closed: %s", exc)
                entry = cls._factories[id(app)] = (app, None)
            else:
                _log_start(cls, app, settings, factory.ssl is not None)
                entry = cls._factories[id(app)] = (app, factory)
        return entry[1]


def _log_start(cls: type, app: Any, settings: Settings, tls: bool) -> None:
    """The INFO line saying which policy applies to which peers; a WARNING for an app that needs WebSockets."""
    logger.info("%s", policy_line(settings, tls))
    if getattr(app, "websocket_enabled", False) and not hasattr(cls, "websocket_handshake"):
        logger.warning(
            "the app has WebSocket routes, which %s cannot serve: use protocol=proxyproto.sanic.WebSocketProtocol",
            cls.__name__,
        )


class HttpProtocol(_HeaderFirst, _SanicHttpProtocol):  # type: ignore[misc,unused-ignore]
    """``app.run(protocol=proxyproto.sanic.HttpProtocol)``: Sanic's ``HttpProtocol`` after the PROXY header."""


class WebSocketProtocol(_HeaderFirst, _SanicWebSocketProtocol):  # type: ignore[misc,unused-ignore]
    """``app.run(protocol=proxyproto.sanic.WebSocketProtocol)``: Sanic's ``WebSocketProtocol`` after the header.

    The class Sanic itself picks for an app with WebSocket routes.
    """


def wrap(
    protocol_class: type[_SanicHttpProtocol] = _SanicHttpProtocol,
    *,
    settings: Settings | None = None,
    ssl: Any = None,
    **knobs: Any,
) -> type[_SanicHttpProtocol]:
    """A ``protocol=`` class for Sanic with settings in code, and TLS after the header.

    ``protocol_class``: Sanic's ``HttpProtocol`` (the default),
    ``WebSocketProtocol``, or a subclass of either.  The knobs are
    docs/configuration.rst's, as keywords or as one
    :class:`~proxyproto.settings.Settings` (``settings=``, keywords on top;
    ``trusted`` defaults to ``"127.0.0.1,::1"``); without any, the
    ``PROXYPROTO_*`` environment is read.  ``ssl``: TLS negotiated *after*
    the header, as Sanic's ``ssl=`` takes it (an ``SSLContext``, a
    ``{"cert": ..., "key": ...}`` dict, a certificate directory); do not
    give Sanic ``ssl=`` as well.  With it, the policies that may serve a
    stream without a header (USE, IGNORE, REJECT) are refused.

    Sanic's worker processes get the class by pickle, which finds it by its
    name: the arguments, in JSON.  So they must be values (an
    ``SSLContext`` is not: give the dict, or serve with
    ``single_process=True`` or ``create_server``), and the class and a
    ``policy_for`` function importable by name.  Raises ``ValueError``
    for an invalid knob or ``ssl``, ``TypeError`` for an unknown knob or a
    class that is not Sanic's.
    """
    if not (isinstance(protocol_class, type) and issubclass(protocol_class, _SanicHttpProtocol)):
        raise TypeError(f"protocol_class must be Sanic's HttpProtocol or a subclass of it, not {protocol_class!r}")
    if issubclass(protocol_class, _HeaderFirst):
        raise TypeError(f"{protocol_class.__qualname__} reads the PROXY header already: give Sanic's class")
    fixed = settings_for(settings, knobs) if settings is not None or knobs else None
    if fixed is not None or ssl is not None:  # refused now rather than at the first connection
        ProxyProtocolFactory(_unused, settings=fixed, ssl=_context(ssl))
    described = _described(protocol_class, fixed, ssl)
    if described is None:
        # Served in this process only; the name is what pickle's error shows, at app.run with workers.
        name = (
            f"Proxy{protocol_class.__name__} (wrap's arguments cannot reach Sanic's worker processes: "
            "ssl as a dict or a directory, classes and policy_for importable; or app.run(single_process=True))"
        )
    else:
        name = _WRAPPED_PREFIX + base64.urlsafe_b64encode(described.encode()).decode("ascii").rstrip("=")
    made = _WRAPPED.get(name)
    if made is None:
        attributes = {"proxy_settings": fixed, "proxy_ssl": ssl, "__module__": __name__, "__qualname__": name}
        made = type(f"Proxy{protocol_class.__name__}", (_HeaderFirst, protocol_class), attributes)
        if name.startswith(_WRAPPED_PREFIX):
            _WRAPPED[name] = made
    return made


if not TYPE_CHECKING:  # for mypy, the module has only the names above

    def __getattr__(name: str) -> Any:
        """A :func:`wrap` class by its name (what a worker process unpickles): made again from its arguments."""
        made = _WRAPPED.get(name)
        if made is None and name.startswith(_WRAPPED_PREFIX):
            encoded = name[len(_WRAPPED_PREFIX) :]
            try:
                made = _from_description(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode())
            except Exception:
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
            _WRAPPED[name] = made
        if made is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return made
