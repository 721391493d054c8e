"""TLS after the header, for Twisted: Twisted's TLS layer above the wrapper, its handshake bounded.

Served with ``ssl``, a connection's inner protocol is Twisted's TLS protocol
(``TLSMemoryBIOProtocol``, made by :func:`tls_factory`), the application's
protocol above it.  Until its handshake is done the connection still waits
(a deadline, a parking slot: :class:`Handshake`).  Twisted says when a
handshake is done only to the application (``IHandshakeListener``), so the
layer's own flag is read after each chunk it is given, and its failure
reason for the refusal line; both are private, checked when a factory with
``ssl`` is made (:func:`check_tls_layer`).
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import error as _error
from twisted.protocols import tls as _tls

from .refusal_log import KIND_TLS, RefusalLog
from .twisted_terms import error_text

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

_TLSMemoryBIOFactory: Any = _tls.TLSMemoryBIOFactory
_ConnectionDone: Any = _error.ConnectionDone
_ConnectionLost: Any = _error.ConnectionLost
#: What this module reads of Twisted's TLS protocol, private: whether its handshake is done, and why it failed.
#: A renamed flag must never silently count every handshake as done (no deadline, no parking slot).
_TLS_STATE = ("_handshakeDone", "_reason")


def check_tls_layer() -> None:
    """Raise ``RuntimeError`` unless Twisted's TLS protocol has the state this module reads (:data:`_TLS_STATE`).

    Read with a default instead, a rename in a new Twisted would count every
    handshake as done: no deadline for it, no parking slot, silently.
    """
    missing = [name for name in _TLS_STATE if not hasattr(_tls.TLSMemoryBIOProtocol, name)]
    if missing:
        raise RuntimeError(
            f"proxyproto.twisted: this Twisted's TLSMemoryBIOProtocol has no {', '.join(missing)}, which ssl= "
            "(TLS after the header) needs to bound the handshake: upgrade proxyproto, or terminate TLS in front"
        )


def tls_factory(ssl: Any, wrapped: Any) -> Any:
    """A server-side TLS layer (context factory ``ssl``) above each connection, ``wrapped``'s protocol above it."""
    return _TLSMemoryBIOFactory(ssl, False, wrapped)


class Handshake:
    """The TLS layer of one connection whose handshake (after the header) is not done yet."""

    __slots__ = ("tls",)

    def __init__(self, tls: Any) -> None:
        self.tls = tls

    @property
    def done(self) -> bool:
        """Whether the handshake is done (read after each chunk the layer is given)."""
        return bool(self.tls._handshakeDone)

    def lost(self, log: RefusalLog, peer: str, reason: Any) -> None:
        """Log why the connection from ``peer`` closed before its handshake was done: it failed, or the peer left."""
        failure = self.tls._reason or reason  # the TLS layer's own reason (an OpenSSL error), else the socket's
        if failure is not None and not failure.check(_ConnectionDone, _ConnectionLost):
            log.log(logging.INFO, "%s: closed: TLS handshake failed: %s", peer, error_text(failure), kind=KIND_TLS)
        else:
            why = "" if failure is None else f": {error_text(failure)}"
            log.log(logging.INFO, "%s: closed during the TLS handshake%s", peer, why, kind=KIND_TLS)
