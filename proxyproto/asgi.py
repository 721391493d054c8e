"""A trusted peer's header in the ASGI scope: ``scope["extensions"]["proxyproto"]["header"]``.

An ASGI application is given its scope and nothing else: it cannot reach
the transport's ``get_extra_info("proxy_header")``.  The ASGI spec's place
for what a server knows beyond the request is the scope's ``extensions``
dict (``"tls"``, ``"http.response.trailers"``, ...), one dict per extension
name.  :mod:`proxyproto.uvicorn`, :mod:`proxyproto.hypercorn` and Daphne
behind :mod:`proxyproto.twisted`'s endpoint put one there for every HTTP
request and WebSocket of a connection whose peer is trusted and sent a
header::

    scope["extensions"]["proxyproto"] == {"header": ProxyHeader(...)}

(a LOCAL header included, and under ``IGNORE``: the header the socketserver
mixin calls ``proxy_header``).  For every other connection (an untrusted
peer, under any policy; ``SKIP``; no header; a ``policy_for`` hook that
answered ``IGNORE``, ``REJECT`` or ``SKIP``) there is no ``"proxyproto"``
key at all.  :func:`header` reads it::

    header = proxyproto.asgi.header(scope)  # ProxyHeader or None

Not ``scope["state"]``: ASGI defines it as a copy of the application's own
lifespan namespace, which the application fills and reads (Starlette's
``request.state``); a server's value there would share the application's
keys, and would take a copy of that namespace per connection, blind to
what the application stores in it later.  This module imports nothing but
the header's type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from .header import ProxyHeader

__all__ = ["EXTENSION", "header"]

#: The key in ``scope["extensions"]``; its value is ``{"header": ProxyHeader}``.
EXTENSION = "proxyproto"


def header(scope: Mapping[str, Any]) -> ProxyHeader | None:
    """The trusted peer's header that the server put in ``scope``, or None when there is none."""
    extension = (scope.get("extensions") or {}).get(EXTENSION)
    if extension is None:
        return None
    found: ProxyHeader | None = extension.get("header")
    return found


def with_header(app: Callable[..., Any], header: ProxyHeader) -> Callable[..., Any]:
    """``app`` (an ASGI application, or a server's wrapper of one) for one connection: ``header`` in each scope.

    The scope is the first argument; the others are passed on as they
    came, and what ``app`` returns (the awaitable the server awaits) is
    returned as it is, so no coroutine is added per request.  Each scope
    gets dicts of its own (the server's ``extensions`` is kept, and made
    when it gave none).
    """

    def app_with_header(scope: Any, *args: Any) -> Any:
        put_header(scope, header)
        return app(scope, *args)

    return app_with_header


def put_header(scope: dict[str, Any], header: ProxyHeader) -> None:
    """Put ``header`` at ``scope["extensions"]["proxyproto"]["header"]``, in dicts of this scope's own.

    The server's ``extensions`` is kept (and made when it gave none); the
    ``"proxyproto"`` dict is always a new one.
    """
    extensions = scope.get("extensions")
    if extensions is None:
        scope["extensions"] = {EXTENSION: {"header": header}}
    else:
        extensions[EXTENSION] = {"header": header}
