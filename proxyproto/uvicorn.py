"""uvicorn behind a proxy that sends the PROXY protocol: ``--http proxyproto.uvicorn:H11``.

uvicorn builds one HTTP protocol object per connection from the class named
by ``--http`` (``Config(http=...)``), calling it with keyword arguments
(``config``, ``server_state``, ``app_state``, ``_loop``).  The classes here
take the same arguments, read the PROXY header first
(:mod:`proxyproto.aio_protocol`), and then build uvicorn's own
``H11Protocol`` or ``HttpToolsProtocol`` with those arguments, over a
transport that reports the header's addresses: ``scope["client"]`` and
``scope["server"]`` are the real client and the address it dialled::

    uvicorn app:app --http proxyproto.uvicorn:H11
    uvicorn app:app --http proxyproto.uvicorn:HttpTools
    PROXYPROTO_ALLOW_IPS=10.0.0.0/8 uvicorn app:app --http proxyproto.uvicorn:H11

Configuration comes from environment variables with gunicorn's and
uvicorn's conventions (:func:`proxyproto.settings.settings_from_environment`), read when uvicorn loads its
config (so a typo stops the server at start, naming the variable) and
when the server handles its first connection:

``PROXYPROTO_POLICY``            REQUIRE (default), USE, IGNORE, REJECT or SKIP (any case)
``PROXYPROTO_ALLOW_IPS``         peers trusted to send a header: comma-separated IPs or
                                 CIDRs, or ``*``; default ``127.0.0.1,::1`` (gunicorn's
                                 ``proxy_allow_ips``, uvicorn's ``FORWARDED_ALLOW_IPS``);
                                 UNIX-socket peers only behind a socket file that is not
                                 world-writable (``--uds`` makes it 0o666), unless the
                                 list holds ``unix`` (``127.0.0.1,::1,unix``) or is ``*``
``PROXYPROTO_UNTRUSTED_POLICY``  SKIP (default), IGNORE or REJECT
``PROXYPROTO_HEADER_TIMEOUT``    seconds for the whole header, default 10 (0.001 to 3600)
``PROXYPROTO_MAX_PENDING``       connections waiting for their header, default 256 (at least 1)
``PROXYPROTO_MAX_HEADER_SIZE``   cap on a v2 header, default 4096 (16 to 65551)
``PROXYPROTO_VERIFY_CHECKSUM``   verify a CRC-32C TLV, default true (true/false, 1/0, yes/no, on/off)
``PROXYPROTO_ALLOW_V4_IN_TCP6``  accept nginx's mixed ``TCP6`` lines, default false
``PROXYPROTO_LOG_RATE``          refusal lines per second and kind, default 20; ``none``: no cap

:func:`wrap` makes a class with settings in code instead, for
``uvicorn.Config(app, http=proxyproto.uvicorn.wrap("h11", trusted=...))``.

TLS: uvicorn passes its ``--ssl-*`` context to ``loop.create_server``, which
would handshake before the header.  Importing this module changes nothing
outside it.  The one moment uvicorn hands control to the ``--http`` class
before it builds that context is ``Config.load()`` asking the class for its
``alpn_protocols``; these classes answer through a property of their
metaclass, which finds the config being loaded in its caller's frame (the
frame of ``uvicorn.config.Config.load`` itself, nothing else) and, for that
one config instance:

* checks the settings (the environment, or :func:`wrap`'s), and, when the
  config has TLS (``config.is_ssl``), that the policies can negotiate it
  after the header;
* when it has TLS, makes that instance's class a subclass of its own whose
  ``ssl`` attribute reads None (the context uvicorn then builds is stored in
  the instance's ``__dict__``, as a plain attribute would be), so uvicorn's
  ``create_server`` gets no context and the wrapper negotiates TLS with it
  right after the header (uvicorn's start-up line then says ``http://``;
  proxyproto logs one line saying TLS follows the header).

No other config, class or loop sees any difference.  A setting that cannot
work (a bad ``PROXYPROTO_*`` value; with TLS, the policies that may serve a
stream without a header: USE, IGNORE, REJECT, for ``PROXYPROTO_POLICY`` or,
when ``PROXYPROTO_ALLOW_IPS`` is set, ``PROXYPROTO_UNTRUSTED_POLICY``)
raises a ``ValueError`` naming the variable from ``Config.load()``; under
uvicorn's command line it is one ERROR line and exit status 3, as uvicorn
does for its own configuration errors (the exception is also click's
``ClickException``, which uvicorn's click command reports that way).
Should a uvicorn stop asking for ``alpn_protocols`` from ``Config.load``,
a config with TLS is refused at its first connection with one ERROR line
(TLS would come before the header), never served otherwise; see
``docs/platforms.rst``.

Shutdown: a connection whose header is not in yet is listed in uvicorn's
``server_state.connections`` and closed by uvicorn's graceful shutdown
(nothing was served on it), so shutdown is prompt.

The header itself: a trusted peer's is in every HTTP and WebSocket scope of
its connection, at ``scope["extensions"]["proxyproto"]["header"]``
(:mod:`proxyproto.asgi`); an untrusted peer's never is.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import ssl
import weakref
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

from .advice import policy_line
from .aio_header import HeaderProtocol
from .aio_protocol import ProxyProtocolFactory
from .asgi import EXTENSION, with_header
from .logs import show_through
from .policy import pins_the_client
from .settings import VARIABLES, Settings, settings_for, settings_from_environment

__all__ = ["H11", "HttpTools", "ProxyHTTPProtocol", "wrap"]

logger = logging.getLogger("proxyproto")

_INNER = {
    "h11": "uvicorn.protocols.http.h11_impl:H11Protocol",
    "httptools": "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol",
}


if TYPE_CHECKING:
    _Reported = Exception
else:
    try:  # uvicorn's command line is a click command: click reports its ClickException in one line
        from click import ClickException as _Reported
    except ImportError:  # pragma: no cover (uvicorn always brings click)
        _Reported = Exception


class _StartupError(ValueError, _Reported):
    """A setting uvicorn cannot serve with, raised from ``Config.load()`` before anything listens.

    A ``ValueError`` whose text names the variable or the :func:`wrap`
    knob.  It is also click's ``ClickException``: uvicorn's command line
    (a click command that lets exceptions of ``Config.load`` through) then
    shows it as one ERROR line on uvicorn's logger and exits with status 3,
    uvicorn's ``STARTUP_FAILURE``.  Anywhere else it propagates as any
    exception does.
    """

    exit_code = 3

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def show(self, file: Any = None) -> None:
        """What click calls before exiting: the line goes where uvicorn's own errors go."""
        logging.getLogger("uvicorn.error").error("%s", self.message)


def _import(path: str) -> type[asyncio.Protocol]:
    import importlib

    module, _, name = path.partition(":")
    cls: type[asyncio.Protocol] = getattr(importlib.import_module(module), name)
    return cls


class _UvicornFactory(ProxyProtocolFactory):
    """The wrapper's factory for one uvicorn config: a waiting connection is listed in its server's state.

    Each connection's own ``server_state`` (uvicorn gives it to the
    protocol), not one fixed at creation: a config may be served by several
    ``uvicorn.Server`` objects, one after the other or at once, and each
    one's shutdown must see its own waiting connections.
    """

    #: The overrides that take uvicorn's X-Forwarded-For middleware off, when it is (for WebSockets).
    trusted_overrides_without_headers: tuple[tuple[str, Any], ...] | None = None

    def park(self, waiting: HeaderProtocol) -> None:
        super().park(waiting)
        state = _state_of(waiting)
        if state is not None:
            state.connections.add(waiting)  # uvicorn's shutdown calls waiting.shutdown()

    def unpark(self, waiting: HeaderProtocol) -> None:
        super().unpark(waiting)
        state = _state_of(waiting)
        if state is not None:
            state.connections.discard(waiting)


def _state_of(waiting: HeaderProtocol) -> Any:
    """The ``server_state`` of the uvicorn protocol ``waiting`` reads the header for, or None.

    uvicorn's protocols keep it as ``server_state``; for a class of the
    user's that does not, :meth:`ProxyHTTPProtocol.__new__` sets it.
    """
    return getattr(waiting.inner, "server_state", None)


def _header_in_scope(config: Any, factory: _UvicornFactory) -> None:
    """Make a trusted peer's header reach the ASGI scopes of its connection (:mod:`proxyproto.asgi`).

    HTTP: the application that connections from trusted peers get (the
    factory's ``trusted_overrides``, or uvicorn's own) becomes
    :func:`_app_with_header` of it.  WebSocket: uvicorn makes the WebSocket
    protocol from ``config.ws_protocol_class`` when a request upgrades;
    that becomes :func:`_websocket_with_header`'s subclass.  Untrusted
    peers are served as before: their transport has no header to find.
    """
    overrides = dict(factory.trusted_overrides)
    app = overrides.get("app", getattr(config, "loaded_app", None))
    if app is not None:
        overrides["app"] = _app_with_header(app)
        factory.trusted_overrides = tuple(overrides.items())
    without_forwarded = dict(factory.trusted_overrides_without_headers or ()).get("app")
    if without_forwarded is not None:
        _TRUSTED_WEBSOCKET_APPS[config] = (factory, without_forwarded)
    ws_class = getattr(config, "ws_protocol_class", None)
    if ws_class is not None and ws_class not in _WEBSOCKET_CLASSES.values():
        config.ws_protocol_class = _websocket_with_header(ws_class)


def _app_with_header(app: Any) -> Any:
    """``app`` putting the connection's header, if any, at ``scope["extensions"]["proxyproto"]`` first.

    One function per config, given to the connections of trusted peers.
    The header is the connection's transport's (a trusted peer's only),
    found through the ``receive`` uvicorn passes: a bound method of its
    request cycle, which keeps the transport (``docs/platforms.rst``), so
    nothing is made per connection.  Should that not hold, the scope is
    left as uvicorn made it.
    """

    def app_with_header(scope: Any, receive: Any, send: Any) -> Any:
        try:
            header = receive.__self__.transport._proxy_extra["proxy_header"]
        except (AttributeError, KeyError):  # not uvicorn's cycle, or not our ProxyTransport
            header = None
        if header is not None:  # asgi.put_header(scope, header), without its call: this runs per request
            if "extensions" in scope:
                scope["extensions"][EXTENSION] = {"header": header}
            else:  # uvicorn's HTTP scopes have none
                scope["extensions"] = {EXTENSION: {"header": header}}
        return app(scope, receive, send)

    return app_with_header


#: For a config whose trusted peers are served without uvicorn's X-Forwarded-For middleware: its
#: factory (to ask whether a WebSocket's peer is trusted) and the application without it.
_TRUSTED_WEBSOCKET_APPS: weakref.WeakKeyDictionary[Any, tuple[_UvicornFactory, Any]] = weakref.WeakKeyDictionary()

#: The WebSocket protocol classes made by :func:`_websocket_with_header`, by the class they extend.
_WEBSOCKET_CLASSES: weakref.WeakKeyDictionary[type, type[asyncio.BaseProtocol]] = weakref.WeakKeyDictionary()


def _websocket_with_header(cls: type[asyncio.BaseProtocol]) -> type[asyncio.BaseProtocol]:
    """A subclass of uvicorn's WebSocket protocol ``cls`` whose scope has the connection's header, if any.

    uvicorn gives the WebSocket protocol the transport of the HTTP
    connection it upgrades, which reports the header of a trusted peer
    (``get_extra_info("proxy_header")``); the subclass's ``connection_made``
    wraps its ``app`` with :func:`proxyproto.asgi.with_header` when there is
    one.  A trusted peer's WebSocket, like its HTTP requests, is served
    without uvicorn's X-Forwarded-For middleware where
    :func:`_without_forwarded_headers` takes it off (its client must not come
    from bytes the proxy relayed).  One class per ``cls``, made once.
    """
    made = _WEBSOCKET_CLASSES.get(cls)
    if made is None:
        inner_connection_made = cls.connection_made

        def connection_made(self: Any, transport: Any) -> None:
            trusted_app = _TRUSTED_WEBSOCKET_APPS.get(getattr(self, "config", None))
            if trusted_app is not None:
                factory, app = trusted_app
                raw = getattr(transport, "_transport", transport)  # the ProxyTransport's own transport
                try:
                    trust = factory.trust(transport.get_extra_info("proxy_peername"), raw)
                    pinned = pins_the_client(trust.policy, trust.trusted)
                except Exception:  # a user's hook that fails: served as an untrusted peer would be
                    pinned = False
                if pinned:
                    self.app = app
            header = transport.get_extra_info("proxy_header")
            if header is not None:
                self.app = with_header(self.app, header)
            inner_connection_made(self, transport)

        attributes = {"connection_made": connection_made, "__module__": __name__, "__qualname__": cls.__qualname__}
        made = _WEBSOCKET_CLASSES[cls] = type(cls.__name__, (cls,), attributes)
    return made


class _HTTPClass(type):
    """The metaclass of :class:`ProxyHTTPProtocol`: where ``uvicorn.Config.load()`` meets the ``--http`` class."""

    @property
    def alpn_protocols(cls) -> list[str] | None:
        """The inner protocol's ALPN protocols; asked by ``Config.load()``, it also prepares that config.

        uvicorn reads this while loading a config, before it builds the
        config's TLS context; the config is found in the caller's frame
        (only when the caller is ``uvicorn.config.Config.load``) and
        prepared by :func:`_prepare` (settings checked; with TLS, the
        context kept from ``create_server``).  Raises
        :class:`_StartupError` for settings that cannot be served.
        """
        frame = inspect.currentframe()
        try:
            config = _loading_config(cls, frame.f_back if frame is not None else None)
        finally:
            del frame  # no reference cycle through the frame
        if config is not None:
            _prepare(cls, config)  # type: ignore[arg-type]
        inner: list[str] | None = cls.inner_alpn_protocols  # type: ignore[attr-defined]
        return inner


class ProxyHTTPProtocol(metaclass=_HTTPClass):
    """Base of :class:`H11` and :class:`HttpTools`: uvicorn's ``--http`` class that reads the header first.

    Subclasses name the inner protocol (``inner``, an import path or a
    class) and, optionally, fixed ``settings`` (None: the environment).
    Calling the class, as uvicorn does per connection, makes uvicorn's own
    protocol, of a subclass whose ``connection_made`` reads the header
    before uvicorn's runs
    (:meth:`proxyproto.aio_protocol.ProxyProtocolFactory.header_first`): one
    protocol object per connection, as without the header.  The first call
    for a config also puts that subclass in the config's
    ``http_protocol_class``, which uvicorn reads for every connection, so it
    builds the later ones directly, and in its ``ws_protocol_class`` a
    subclass that puts a trusted peer's header in WebSocket scopes
    (:func:`_header_in_scope`).
    """

    inner: ClassVar[str | type[asyncio.Protocol]] = _INNER["h11"]
    settings: ClassVar[Settings | None] = None
    #: What the class answers uvicorn's ``alpn_protocols`` question with (the inner class's).
    inner_alpn_protocols: ClassVar[list[str] | None] = None
    #: The protocol class made for each config (weakly).
    _classes: ClassVar[weakref.WeakKeyDictionary[Any, type[asyncio.Protocol]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._classes = weakref.WeakKeyDictionary()

    def __new__(cls, config: Any, server_state: Any, **kwargs: Any) -> Any:
        protocol_class = cls._classes.get(config)
        if protocol_class is None:
            try:
                factory, inner = cls._make_factory(config)
            except _TLSFirst as exc:
                if config not in _TLS_FIRST:  # one line per config, then each connection is just closed
                    _TLS_FIRST.add(config)
                    logging.getLogger("uvicorn.error").error("%s", exc)
                raise
            _header_in_scope(config, factory)
            protocol_class = cls._classes[config] = factory.header_first(inner)
        protocol = protocol_class(config=config, server_state=server_state, **kwargs)  # type: ignore[call-arg]
        if getattr(protocol, "server_state", None) is not server_state:
            # A class of the user's (wrap(MyProtocol)) that keeps it under another name: its
            # waiting connections are listed in this server's state through this attribute, so
            # this call stays in between for each connection.
            try:
                setattr(protocol, "server_state", server_state)  # noqa: B010  (any class)
            except AttributeError:
                pass  # __slots__ without it: its waiting connections close at header_timeout
        elif getattr(config, "http_protocol_class", None) is cls:
            # uvicorn looks the class up on its config for every connection: from the next one
            # on, it builds the header-first protocol itself, without this call in between
            # (a Python __new__ with keyword arguments: a third of what the header costs).
            config.http_protocol_class = protocol_class
        return protocol

    @classmethod
    def _settings(cls) -> Settings:
        """The wrapper's settings: :func:`wrap`'s, or the environment's (ValueError naming the variable)."""
        return settings_from_environment() if cls.settings is None else cls.settings

    @classmethod
    def _check_tls(cls, settings: Settings) -> None:
        """Refuse settings that cannot work with TLS after the header: :class:`_StartupError` naming the setting."""
        try:
            ProxyProtocolFactory(
                lambda: asyncio.Protocol(), ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), settings=settings
            )
        except ValueError as exc:
            key, _, reason = str(exc).partition(" with ssl=: ")
            if not reason:
                raise _StartupError(f"proxyproto.uvicorn: {exc}") from None
            name, _, value = key.partition("=")
            where = f"{VARIABLES[name]}={value}" if cls.settings is None else f"wrap({name}={value!r})"
            raise _StartupError(
                f"proxyproto.uvicorn: {where} cannot be used with uvicorn's --ssl-* settings "
                f"(TLS is negotiated after the PROXY header): {reason}"
            ) from None

    @classmethod
    def _make_factory(cls, config: Any) -> tuple[_UvicornFactory, type[asyncio.Protocol]]:
        """The factory serving ``config``'s connections, and uvicorn's protocol class."""
        inner = cls.inner if isinstance(cls.inner, type) else _import(cls.inner)
        settings = cls._settings()
        context = vars(config).get("ssl")  # the real context, which uvicorn's create_server does not see
        if context is not None and getattr(config, "ssl", None) is context:
            raise _TLSFirst(
                "proxyproto.uvicorn: uvicorn gave this config's TLS context to loop.create_server, so TLS "
                "would come before the PROXY header (its Config.load did not ask the --http class for "
                "alpn_protocols; see docs/platforms.rst): every connection is closed"
            )

        def unused() -> asyncio.BaseProtocol:  # header_first's inner is made by uvicorn, never by the factory
            raise RuntimeError("proxyproto.uvicorn: the protocol is made by uvicorn")

        factory = _UvicornFactory(unused, ssl=context, settings=settings)
        app = _without_forwarded_headers(config)
        if app is not None:
            factory.trusted_overrides = factory.trusted_overrides_without_headers = (("app", app),)
        return factory, inner


#: uvicorn's own defaults for ``--forwarded-allow-ips`` (0.30 and later; earlier versions).
_UVICORN_FORWARDED_DEFAULTS = ("127.0.0.1,::1", "127.0.0.1")


def _without_forwarded_headers(config: Any) -> Any:
    """The application without uvicorn's X-Forwarded-For middleware, where it must not act; else None.

    uvicorn trusts ``X-Forwarded-For`` from its ``--forwarded-allow-ips``
    (loopback by default: the same peers as ``PROXYPROTO_ALLOW_IPS``).  A
    connection from a peer trusted to send the PROXY header but served with
    the socket's own address (a LOCAL or UNKNOWN header, IGNORE, USE without
    a header) would then take its client from ``X-Forwarded-For`` bytes that
    the proxy relayed from the client (haproxy in ``mode tcp`` relays them
    untouched).  So, unless the user chose the forwarded-header hosts
    (``FORWARDED_ALLOW_IPS`` in the environment, or ``--forwarded-allow-ips``
    other than uvicorn's default), connections from peers trusted to send
    the header are served without that middleware: the PROXY header is the
    one authority on their addresses.  Other peers keep uvicorn's behaviour.
    """
    app = getattr(config, "loaded_app", None)
    try:
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
    except ImportError:  # pragma: no cover (uvicorn without the middleware)
        return None
    if not isinstance(app, ProxyHeadersMiddleware):
        return None  # --no-proxy-headers, or a uvicorn that wraps differently: nothing to take off
    chosen = getattr(config, "forwarded_allow_ips", None)
    default = chosen is None or (isinstance(chosen, str) and chosen.replace(" ", "") in _UVICORN_FORWARDED_DEFAULTS)
    if os.environ.get("FORWARDED_ALLOW_IPS") is not None or not default:
        return None
    logger.info(
        "uvicorn's X-Forwarded-For handling is off for peers trusted to send the PROXY header "
        "(set FORWARDED_ALLOW_IPS to keep it)"
    )
    return app.app


class H11(ProxyHTTPProtocol):
    """``--http proxyproto.uvicorn:H11``: uvicorn's h11 protocol after the PROXY header."""

    inner = _INNER["h11"]


class HttpTools(ProxyHTTPProtocol):
    """``--http proxyproto.uvicorn:HttpTools``: uvicorn's httptools protocol after the PROXY header."""

    inner = _INNER["httptools"]


def wrap(
    http: str | type[asyncio.Protocol] = "h11", *, settings: Settings | None = None, **knobs: Any
) -> type[ProxyHTTPProtocol]:
    """A ``--http`` class for ``uvicorn.Config(http=...)`` with settings in code.

    ``http``: ``"h11"``, ``"httptools"`` or a protocol class taking uvicorn's
    keyword arguments.  The knobs are docs/configuration.rst's, as keywords
    or as one :class:`~proxyproto.settings.Settings` (``settings=``,
    keywords on top; ``trusted`` defaults to ``"127.0.0.1,::1"`` as the
    environment does, ``"*"`` trusts every peer, None is refused); without
    any, the environment is read.
    TLS comes from uvicorn's own ``ssl_*`` settings.  Raises ``ValueError``
    for an invalid setting.
    """
    inner = _INNER.get(http, http) if isinstance(http, str) else http
    if isinstance(inner, str) and ":" not in inner:
        raise ValueError(f"http={http!r}: use 'h11', 'httptools' or a protocol class")
    fixed = settings_for(settings, knobs) if settings is not None or knobs else None
    name = f"Proxy{inner.__name__ if isinstance(inner, type) else inner.rpartition(':')[2]}"
    attributes: dict[str, Any] = {"inner": inner, "settings": fixed, "__module__": __name__}
    if isinstance(inner, type):
        attributes["inner_alpn_protocols"] = getattr(inner, "alpn_protocols", None)
    made: type[ProxyHTTPProtocol] = _HTTPClass(name, (ProxyHTTPProtocol,), attributes)  # type: ignore[assignment]
    return made


class _TLSFirst(RuntimeError):
    """uvicorn negotiates a config's TLS before the header: the config was not prepared by :func:`_prepare`."""


#: Configs refused by _TLSFirst, so that the ERROR line comes once per config.
_TLS_FIRST: weakref.WeakSet[Any] = weakref.WeakSet()


def _loading_config(cls: type, caller: FrameType | None) -> Any:
    """The ``uvicorn.Config`` whose ``load()`` is the frame ``caller`` and is loading ``cls``; else None.

    Only uvicorn's own ``Config.load`` code counts (a subclass's ``load``
    calling it is seen through that call), and only a config whose
    ``http_protocol_class`` is ``cls`` and that is not loaded yet.
    """
    if caller is None:
        return None
    try:
        from uvicorn.config import Config
    except ImportError:  # pragma: no cover (no uvicorn: nobody loads a config)
        return None
    if caller.f_code is not getattr(Config.load, "__code__", None):
        return None
    for value in caller.f_locals.values():
        if isinstance(value, Config) and vars(value).get("http_protocol_class") is cls and not value.loaded:
            return value
    return None


def _prepare(cls: type[ProxyHTTPProtocol], config: Any) -> None:
    """Check ``config``'s settings; with TLS, keep its context from ``create_server`` (this instance only).

    Raises :class:`_StartupError` for a setting that cannot be served.
    The config's class becomes a subclass of it (:func:`_tls_after_header`)
    whose ``ssl`` reads None; the context uvicorn then builds stays in the
    instance's ``__dict__``, where :meth:`ProxyHTTPProtocol._make_factory`
    takes it.
    """
    try:
        settings = cls._settings()
    except ValueError as exc:
        raise _StartupError(f"proxyproto.uvicorn: {exc}") from None
    if not isinstance(cls.inner, type):
        try:
            _import(cls.inner)
        except ImportError as exc:  # httptools not installed, say: every connection would be reset
            missing = exc.name or str(exc)
            raise _StartupError(
                f"proxyproto.uvicorn: --http {cls.__module__}:{cls.__qualname__} needs {missing}, which cannot be "
                f"imported ({exc}): pip install {missing}, or use --http proxyproto.uvicorn:H11"
            ) from None
    is_ssl = bool(getattr(config, "is_ssl", False))
    if is_ssl:
        cls._check_tls(settings)
    show_through("uvicorn.error")  # under uvicorn's own logging setup, proxyproto's lines show with a level
    logger.info("%s", policy_line(settings, is_ssl))
    if not is_ssl:
        return
    base = type(config)
    if not isinstance(base.__dict__.get("ssl"), _ContextAfterHeader):
        config.__class__ = _tls_after_header(base)


class _ContextAfterHeader:
    """``ssl`` of a config whose TLS follows the header: None to uvicorn, the value kept in ``__dict__``."""

    def __get__(self, config: Any, owner: Any = None) -> Any:
        return self if config is None else None

    def __set__(self, config: Any, value: Any) -> None:
        vars(config)["ssl"] = value


#: The subclass made for each config class (weakly: a user's Config subclass may go away).
_CONFIG_CLASSES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _tls_after_header(base: type) -> type:
    """The subclass of ``base`` (a ``uvicorn.Config`` class) whose ``ssl`` is :class:`_ContextAfterHeader`."""
    made = _CONFIG_CLASSES.get(base)
    if made is None:
        made = _CONFIG_CLASSES[base] = type(base)(
            f"{base.__name__}WithTLSAfterHeader",
            (base,),
            {
                "ssl": _ContextAfterHeader(),
                "__module__": __name__,
                "__doc__": f"{base.__qualname__} whose TLS context proxyproto.uvicorn negotiates after the header.",
            },
        )
    return made
