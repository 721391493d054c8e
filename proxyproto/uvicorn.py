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
uvicorn's conventions (see :data:`ENVIRONMENT`), read when the server
handles its first connection (and checked when this module is imported, so
a typo stops the server at start):

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
``PROXYPROTO_LOG_RATE``          refusal lines per second and kind, default 20; ``none``: no cap

:func:`wrap` makes a class with settings in code instead, for
``uvicorn.Config(app, http=proxyproto.uvicorn.wrap("h11", trusted=...))``.

TLS: uvicorn passes its ``--ssl-*`` context to ``loop.create_server``, which
would handshake before the header.  uvicorn has no documented hook between
its ``Config`` and ``create_server`` that the ``--http`` class (the only
thing ``uvicorn app:app --http ...`` lets us plug in) could use:
``ssl_context_factory`` must return a context, a ``Server`` subclass or a
``run()`` of our own would not serve the command line, and a ``--loop``
factory would patch the event loop instead.  So importing this module
replaces ``uvicorn.Config.ssl`` with a data descriptor (:class:`_SSLTakeover`)
that stores the value where a plain attribute would (the instance's
``__dict__``) and answers None to uvicorn (so ``create_server`` gets no
context) only for configs whose HTTP class has the
``proxyproto_tls_after_header`` marker (the classes here and those
:func:`wrap` makes); every other config reads and writes ``ssl`` exactly
as before.  Installing it is idempotent (a second import or a reload keeps
one descriptor, and the marker, not a class identity, decides).  The
wrapper negotiates TLS with the real context right after the header
(uvicorn's start-up line then says ``http://``; proxyproto logs one line
saying TLS follows the header).

With TLS, the policies that may serve a stream without a header (USE,
IGNORE, REJECT, for ``PROXYPROTO_POLICY`` or, when ``PROXYPROTO_ALLOW_IPS``
is set, ``PROXYPROTO_UNTRUSTED_POLICY``) are refused when uvicorn loads its
config: one ERROR line naming the setting and exit status 3, as uvicorn
does for its own configuration errors.

Shutdown: a connection whose header is not in yet is listed in uvicorn's
``server_state.connections`` and closed by uvicorn's graceful shutdown
(nothing was served on it), so shutdown is prompt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

from .aio_protocol import HeaderProtocol, ProxyProtocolFactory
from .policy import Policy
from .refusal_log import DEFAULT_LOG_RATE

__all__ = ["ENVIRONMENT", "H11", "HttpTools", "ProxyHTTPProtocol", "settings_from_env", "wrap"]

logger = logging.getLogger("proxyproto")

#: The environment variables and their defaults.
ENVIRONMENT: dict[str, str] = {
    "PROXYPROTO_POLICY": "REQUIRE",
    "PROXYPROTO_ALLOW_IPS": "127.0.0.1,::1",
    "PROXYPROTO_UNTRUSTED_POLICY": "SKIP",
    "PROXYPROTO_HEADER_TIMEOUT": "10",
    "PROXYPROTO_MAX_PENDING": "256",
    "PROXYPROTO_MAX_HEADER_SIZE": "4096",
    "PROXYPROTO_LOG_RATE": str(DEFAULT_LOG_RATE),
}

_INNER = {
    "h11": "uvicorn.protocols.http.h11_impl:H11Protocol",
    "httptools": "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol",
}


def _number(name: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: not a{'n integer' if kind is int else ' number'}") from None


def settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`proxyproto.aio_protocol.wrap_protocol_factory` the environment asks for.

    Raises ``ValueError`` naming the variable for a value it cannot use.
    """
    env = os.environ if environ is None else environ

    def get(name: str) -> str:
        return env.get(name, ENVIRONMENT[name]).strip()

    settings: dict[str, Any] = {}
    for key, name in (("policy", "PROXYPROTO_POLICY"), ("untrusted_policy", "PROXYPROTO_UNTRUSTED_POLICY")):
        text = get(name)
        try:
            settings[key] = Policy(text.upper())
        except ValueError:
            choices = ", ".join(p.name for p in Policy)
            raise ValueError(f"{name}={text!r}: not a policy ({choices})") from None
    settings["trusted"] = get("PROXYPROTO_ALLOW_IPS")
    settings["header_timeout"] = _number("PROXYPROTO_HEADER_TIMEOUT", get("PROXYPROTO_HEADER_TIMEOUT"), float)
    settings["max_pending"] = _number("PROXYPROTO_MAX_PENDING", get("PROXYPROTO_MAX_PENDING"), int)
    settings["max_header_size"] = _number("PROXYPROTO_MAX_HEADER_SIZE", get("PROXYPROTO_MAX_HEADER_SIZE"), int)
    rate = get("PROXYPROTO_LOG_RATE")
    settings["log_rate"] = None if rate.lower() == "none" else _number("PROXYPROTO_LOG_RATE", rate, float)
    try:  # every value checked the way the factory will check it
        ProxyProtocolFactory(lambda: asyncio.Protocol(), **settings)
    except ValueError as exc:
        message = str(exc)
        setting = message.partition(":")[0].replace("proxy_", "")
        name = "PROXYPROTO_ALLOW_IPS" if setting == "trusted" else f"PROXYPROTO_{setting.upper()}"
        raise ValueError(f"{name if name in ENVIRONMENT else 'PROXYPROTO_*'}: {message}") from None
    return settings


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


class ProxyHTTPProtocol:
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
    builds the later ones directly.
    """

    inner: ClassVar[str | type[asyncio.Protocol]] = _INNER["h11"]
    settings: ClassVar[dict[str, Any] | None] = None
    #: The marker :class:`_SSLTakeover` looks for: configs served by this class get no TLS from uvicorn.
    proxyproto_tls_after_header: ClassVar[bool] = True
    #: uvicorn asks the ``--http`` class for its ALPN protocols when it builds the TLS context.
    alpn_protocols: ClassVar[list[str] | None] = None
    #: The protocol class made for each config (weakly).
    _classes: ClassVar[weakref.WeakKeyDictionary[Any, type[asyncio.Protocol]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._classes = weakref.WeakKeyDictionary()

    def __new__(cls, config: Any, server_state: Any, **kwargs: Any) -> Any:
        protocol_class = cls._classes.get(config)
        if protocol_class is None:
            factory, inner = cls._make_factory(config)
            protocol_class = cls._classes[config] = factory.header_first(inner)
            # What uvicorn and _SSLTakeover ask of the --http class, on the class that replaces it.
            protocol_class.proxyproto_tls_after_header = True  # type: ignore[attr-defined]
            protocol_class.check_tls = cls.check_tls  # type: ignore[attr-defined]
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
    def check_tls(cls, context: Any) -> None:
        """Refuse settings that cannot work with TLS after the header; ValueError naming the setting.

        Called when uvicorn loads a config with ``--ssl-*`` (see
        :class:`_SSLTakeover`), so the error comes at start, not at the
        first connection.
        """
        settings = settings_from_env() if cls.settings is None else dict(cls.settings)
        try:
            ProxyProtocolFactory(lambda: asyncio.Protocol(), ssl=context, **settings)
        except ValueError as exc:
            key, _, reason = str(exc).partition(" with ssl=: ")
            if not reason:
                raise
            name, _, value = key.partition("=")
            where = f"PROXYPROTO_{name.upper()}={value}" if cls.settings is None else f"wrap({name}={value!r})"
            raise ValueError(
                f"proxyproto.uvicorn: {where} cannot be used with uvicorn's --ssl-* settings "
                f"(TLS is negotiated after the PROXY header): {reason}"
            ) from None

    @classmethod
    def _make_factory(cls, config: Any) -> tuple[ProxyProtocolFactory, type[asyncio.Protocol]]:
        """The factory serving ``config``'s connections, and uvicorn's protocol class."""
        inner = cls.inner if isinstance(cls.inner, type) else _import(cls.inner)
        settings = settings_from_env() if cls.settings is None else dict(cls.settings)
        context = vars(config).get("ssl")  # the real context, which uvicorn's create_server no longer sees

        def unused() -> asyncio.BaseProtocol:  # header_first's inner is made by uvicorn, never by the factory
            raise RuntimeError("proxyproto.uvicorn: the protocol is made by uvicorn")

        factory = _UvicornFactory(unused, ssl=context, **settings)
        app = _without_forwarded_headers(config)
        if app is not None:
            factory.trusted_overrides = (("app", app),)
        logger.info(
            "proxyproto: PROXY header policy %s for %s, %s for other peers%s",
            factory.policy.name,
            "every peer" if settings.get("trusted") == "*" else (settings.get("trusted") or "no peer"),
            factory.untrusted_policy.name,
            "; TLS is negotiated after the header" if context is not None else "",
        )
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
        "proxyproto: uvicorn's X-Forwarded-For handling is off for peers trusted to send the PROXY header "
        "(set FORWARDED_ALLOW_IPS to keep it)"
    )
    return app.app


class H11(ProxyHTTPProtocol):
    """``--http proxyproto.uvicorn:H11``: uvicorn's h11 protocol after the PROXY header."""

    inner = _INNER["h11"]


class HttpTools(ProxyHTTPProtocol):
    """``--http proxyproto.uvicorn:HttpTools``: uvicorn's httptools protocol after the PROXY header."""

    inner = _INNER["httptools"]


def wrap(http: str | type[asyncio.Protocol] = "h11", **settings: Any) -> type[ProxyHTTPProtocol]:
    """A ``--http`` class for ``uvicorn.Config(http=...)`` with settings in code.

    ``http``: ``"h11"``, ``"httptools"`` or a protocol class taking uvicorn's
    keyword arguments.  ``settings``: the keyword arguments of
    :func:`proxyproto.aio_protocol.wrap_protocol_factory` (``policy``,
    ``trusted``, ``untrusted_policy``, ``header_timeout``, ``max_pending``,
    ``policy_for``, ...; ``trusted`` defaults to ``"127.0.0.1,::1"`` as
    the environment does, ``"*"`` trusts every peer, None is refused);
    without any, the environment is read.
    TLS comes from uvicorn's own ``ssl_*`` settings.  Raises ``ValueError``
    for an invalid setting.
    """
    inner = _INNER.get(http, http) if isinstance(http, str) else http
    if isinstance(inner, str) and ":" not in inner:
        raise ValueError(f"http={http!r}: use 'h11', 'httptools' or a protocol class")
    fixed: dict[str, Any] | None = None
    if settings:
        fixed = {"trusted": ENVIRONMENT["PROXYPROTO_ALLOW_IPS"], **settings}
        ProxyProtocolFactory(lambda: asyncio.Protocol(), **fixed)  # raises ValueError now, not per connection
    name = f"Proxy{inner.__name__ if isinstance(inner, type) else inner.rpartition(':')[2]}"
    attributes: dict[str, Any] = {"inner": inner, "settings": fixed, "__module__": __name__}
    if isinstance(inner, type):
        attributes["alpn_protocols"] = getattr(inner, "alpn_protocols", None)
    return type(name, (ProxyHTTPProtocol,), attributes)


def _takes_tls(config: Any) -> Any:
    """The HTTP class of ``config`` when it negotiates TLS after the header itself, else None."""
    http = vars(config).get("http_protocol_class")
    return http if getattr(http, "proxyproto_tls_after_header", False) is True else None


def _refuse_at_start(config: Any) -> None:
    """Check ``config``'s TLS against its class's settings once; exit uvicorn's way when they conflict.

    One ERROR line on uvicorn's logger and ``sys.exit(3)`` (uvicorn's
    ``STARTUP_FAILURE``), as uvicorn does for a configuration it cannot
    serve, so the command line stops at start with that one line.
    """
    http = _takes_tls(config)
    context = vars(config).get("ssl")
    if http is None or context is None or _CHECKED.get(config) is context:
        return
    try:
        http.check_tls(context)
    except ValueError as exc:
        logging.getLogger("uvicorn.error").error("%s", exc)
        sys.exit(3)
    _CHECKED[config] = context


#: Configs whose TLS context has been checked against their class's settings (checked once each).
_CHECKED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


class _SSLTakeover:
    """``uvicorn.Config.ssl``: None to uvicorn for configs served by these classes; the context to them.

    A data descriptor on the class, storing the value in the instance's
    ``__dict__`` as a plain attribute would; configs whose HTTP class lacks
    the ``proxyproto_tls_after_header`` marker see no difference.  It is
    also where the settings are checked against TLS at start: when uvicorn
    sets the context (recent versions load the HTTP class first) or, with
    older ones, when ``create_server`` reads it.
    """

    def __get__(self, config: Any, owner: Any = None) -> Any:
        if config is None:
            return self
        context = vars(config).get("ssl")
        if context is not None and _takes_tls(config) is not None:
            _refuse_at_start(config)
            return None
        return context

    def __set__(self, config: Any, value: Any) -> None:
        vars(config)["ssl"] = value
        _refuse_at_start(config)


def _take_over_ssl() -> None:
    """Install :class:`_SSLTakeover` on ``uvicorn.Config``: idempotent, also across reloads of this module.

    A descriptor of this module (of any load of it) is replaced by the
    current one, so there is only ever one, with this code; anything else
    already there belongs to someone else and is not overwritten.
    """
    try:
        from uvicorn.config import Config
    except ImportError:  # the module is importable without uvicorn (docs, type checks)
        return
    current = Config.__dict__.get("ssl")
    ours = type(current).__name__ == "_SSLTakeover" and type(current).__module__ == __name__
    if current is not None and not ours:
        raise RuntimeError(f"proxyproto.uvicorn: uvicorn.Config.ssl is already {current!r}; not replacing it")
    if not isinstance(current, _SSLTakeover):
        Config.ssl = _SSLTakeover()  # type: ignore[assignment,unused-ignore]


_take_over_ssl()
settings_from_env()  # a bad PROXYPROTO_* value stops the server at start, with the variable's name
