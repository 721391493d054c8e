"""The ``proxyproto:`` endpoint string: ``proxyproto:<any server endpoint>[:<knob>=<value>...]``.

Twisted's ``serverFromString`` hands the string's parts after the prefix to
the plugin's parser (``twisted/plugins/proxyproto_endpoints.py``), a
:class:`ProxyProtocolEndpointParser`: the knobs among the keyword options
are this library's, read as the ``PROXYPROTO_*`` variables are; every other
part describes the inner endpoint, built by ``serverFromString`` again
(an inner ``ssl:`` is listened on as plain TCP, its TLS above the header).
Twisted's reading of a description is private, and used as it is
(``_parseServer``, ``_tokenize``): there since Twisted 10.2, and
``serverFromString`` is built on it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet import endpoints as _endpoints
from twisted.internet import interfaces
from twisted.plugin import IPlugin
from zope.interface import implementer

from .settings import KNOBS, Settings, _from_text, settings_from_environment
from .twisted_endpoint import ProxyServerEndpoint

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

_TCP4ServerEndpoint: Any = _endpoints.TCP4ServerEndpoint
#: Twisted's own reading of a server description (``ssl:`` options included), private but there
#: since Twisted 10.2: serverFromString is built on it.
_parseServer: Any = _endpoints._parseServer
_quote: Any = _endpoints.quoteStringArgument
_serverFromString: Any = _endpoints.serverFromString
_tokenize: Any = _endpoints._tokenize  # (and its token kinds): what _parseServer reads a description with
_OP: Any = _endpoints._OP
_STRING: Any = _endpoints._STRING

#: The knobs a ``proxyproto:`` string may set (``policy_for`` is a function: Python only).
STRING_KNOBS = tuple(knob for knob in KNOBS if knob != "policy_for")


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
