"""HAProxy PROXY protocol (v1 and v2) for socketserver-based servers.

The core (``parse``, ``ProxyHeader``, the encoders) is a pure function of
bytes and does no I/O; the I/O layer (``read_header``, ``create_connection``,
the mixin and the prebuilt servers) drives that same core.

``__all__`` below is the package's public surface, each name once.  The other
public names live in their own modules (``proxyproto.udp``, ``proxyproto.aio``,
``proxyproto.uvicorn``...); docs/api.rst lists every public name, and every
name it does not list is private and may change.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ChecksumError,
    HeaderRejected,
    HeaderTimeout,
    InvalidHeader,
    NoProxyHeader,
    ProxyProtocolError,
)
from .header import Command, Family, Protocol, ProxyHeader
from .policy import Policy
from .reader import parse
from .tlv import TLV, SSLClient, SSLInfo, TLVType
from .v1 import encode as encode_v1
from .v2 import encode as encode_v2

__version__ = "0.1.0"

# The I/O layer is loaded on first use, so that importing the core (or any
# of its modules) never pulls in socket, selectors or socketserver.
_IO_NAMES = {
    "read_header": "sock",
    "create_connection": "sock",
    "ProxyProtocolMixin": "server",
    "ProxySocket": "server",
    "ProxyTCPServer": "server",
    "ThreadingProxyTCPServer": "server",
    "ForkingProxyTCPServer": "server",
    "ProxyUnixStreamServer": "server",
    "ThreadingProxyUnixStreamServer": "server",
    "ForkingProxyUnixStreamServer": "server",
    "Settings": "settings",
}

if TYPE_CHECKING:
    from .server import (
        ForkingProxyTCPServer,
        ForkingProxyUnixStreamServer,
        ProxyProtocolMixin,
        ProxySocket,
        ProxyTCPServer,
        ProxyUnixStreamServer,
        ThreadingProxyTCPServer,
        ThreadingProxyUnixStreamServer,
    )
    from .settings import Settings
    from .sock import create_connection, read_header


def __getattr__(name: str) -> Any:
    module = _IO_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'proxyproto' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "TLV",
    "ChecksumError",
    "Command",
    "Family",
    "ForkingProxyTCPServer",
    "ForkingProxyUnixStreamServer",
    "HeaderRejected",
    "HeaderTimeout",
    "InvalidHeader",
    "NoProxyHeader",
    "Policy",
    "Protocol",
    "ProxyHeader",
    "ProxyProtocolError",
    "ProxyProtocolMixin",
    "ProxySocket",
    "ProxyTCPServer",
    "ProxyUnixStreamServer",
    "SSLClient",
    "SSLInfo",
    "Settings",
    "TLVType",
    "ThreadingProxyTCPServer",
    "ThreadingProxyUnixStreamServer",
    "create_connection",
    "encode_v1",
    "encode_v2",
    "parse",
    "read_header",
]
