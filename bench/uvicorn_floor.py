"""uvicorn's own protocols plus the one thing every PROXY server must do per connection: parse a header.

``python bench/uvicorn_pair.py --floor`` serves these (``--http
uvicorn_floor:HttpTools`` or ``:H11``) to plain clients beside plain uvicorn:
each connection parses one of 64 v2 headers (a proxy's differ by client),
followed by a request as it would be read from the socket, with
:func:`proxyproto.parse`, and throws the result away.  Nothing else of
proxyproto runs: no policy, no read, no transport view.  What this costs over
plain uvicorn is what parsing alone costs on the machine, a floor under the
cost of any Python implementation of the protocol, proxyproto's included.
"""

from __future__ import annotations

from itertools import cycle
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_pair import REQUEST_CLOSE, headers

from proxyproto import parse

_READS = cycle([header + REQUEST_CLOSE for header in headers(2)])


class HttpTools(HttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:
        parse(next(_READS))
        super().connection_made(transport)


class H11(H11Protocol):
    def connection_made(self, transport: Any) -> None:
        parse(next(_READS))
        super().connection_made(transport)
