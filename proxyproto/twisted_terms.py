"""What Twisted hands the Twisted adapter (addresses, failures) in the engine's terms, and the header's addresses back.

The engine (trust, parking, refusal lines) reads the socket module's
addresses: ``(host, port)``, ``(host, port, flow, scope)``, a path; Twisted
gives and takes ``IPv4Address``, ``IPv6Address`` and ``UNIXAddress``, and
says why a connection ended with a ``Failure``.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from .header import Family

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst


def socket_address(address: Any) -> Any:
    """A Twisted address as the socket module gives it: ``(host, port)``, ``(host, port, flow, scope)``, a path."""
    if isinstance(address, IPv6Address):
        return (address.host, address.port, address.flowInfo, address.scopeID)
    if isinstance(address, IPv4Address):
        return (address.host, address.port)
    if isinstance(address, UNIXAddress):
        return address.name
    return None


def socket_of(transport: Any) -> Any:
    """The socket under a Twisted transport (``getHandle()``); None for a transport without one."""
    try:
        return transport.getHandle()
    except Exception:  # a transport without a socket: trust is then the address's alone
        return None


def family_of(address: Any) -> int:
    """The socket family of a Twisted address (``AF_UNIX`` for anything not IP)."""
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    return getattr(socket, "AF_UNIX", -1)


def twisted_address(family: Family, address: Any) -> Any:
    """One address of a header as Twisted gives addresses (``IPv4Address``, ``IPv6Address``, ``UNIXAddress``)."""
    if family is Family.INET6:
        return IPv6Address("TCP", address[0], address[1])
    if family is Family.INET:
        return IPv4Address("TCP", address[0], address[1])
    return UNIXAddress(address)


def error_text(reason: Any) -> str:
    """A Twisted ``Failure``'s message, for a refusal line (no trailing period: the line goes on)."""
    return str(reason.getErrorMessage()).rstrip(".")
