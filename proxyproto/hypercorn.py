"""hypercorn: ``serve(app, config)`` whose TCP listeners read a PROXY header first, so ``scope["client"]`` is real.

hypercorn's asyncio worker makes its own listeners (``asyncio.start_server``
on the sockets ``config.create_sockets()`` binds) and reads the client's
address from ``writer.get_extra_info("socket").getpeername()``; it has no
hook for what happens between ``accept()`` and its own protocol.  A recipe
built on :func:`proxyproto.aio.start_server` would have to drive hypercorn's
internal ``TCPServer`` and lifespan by hand.  This adapter keeps hypercorn's
own ``serve`` (lifespan, graceful shutdown, HTTP/2, logging) and changes one
thing: while it runs, the running loop's ``create_server`` wraps the
protocol factory of exactly the listening sockets this adapter bound (and
nothing else) with :func:`proxyproto.aio_protocol.wrap_protocol_factory`.

* The TLS handshake of ``config.certfile``/``keyfile`` listeners is moved
  *after* the header (haproxy's ``send-proxy`` in front of TLS passthrough).
* ``config.quic_bind`` (HTTP/3 over UDP) is left alone: the PROXY protocol
  is for TCP.
* Closing a listener also closes the connections still waiting for their
  header, so a silent client never delays shutdown.

hypercorn is imported when :func:`serve` is called.  asyncio's own event
loop is needed (uvloop's loop cannot have its ``create_server`` replaced).
"""

from __future__ import annotations

import asyncio
import copy
import socket
from collections.abc import Awaitable
from typing import Any, Callable, Literal

from .aio_protocol import ProxyProtocolFactory, ProxyTransport, SocketView, wrap_protocol_factory
from .policy import Policy
from .refusal_log import DEFAULT_LOG_RATE

__all__ = ["serve"]


def _family_of(address: Any) -> int | None:
    """The address family an address tuple has the shape of (None for anything else)."""
    if isinstance(address, tuple) and len(address) == 4:
        return socket.AF_INET6
    if isinstance(address, tuple) and len(address) == 2:
        return socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
    return None


class _FamilyView(SocketView):
    """A :class:`SocketView` whose ``family`` is that of the addresses it reports."""

    __slots__ = ("family",)

    def __init__(self, sock: Any, peer: Any, local: Any, family: int) -> None:
        super().__init__(sock, peer, local)
        self.family = family


class _SocketFamily(asyncio.Protocol):
    """Gives hypercorn a ``socket`` whose ``family`` matches ``getpeername()``.

    hypercorn shapes ``scope["client"]`` by ``socket.family`` (AF_INET: the
    address as is; AF_INET6: its first two items; AF_UNIX: None), so an
    IPv6 client behind an IPv4 listener would be a 4-tuple, and any client
    behind a UNIX-socket listener None.  The transport view of
    :mod:`proxyproto.aio_protocol` reports the real socket's family; until
    it reports the header's, this shim sits in front of hypercorn's protocol
    for ``connection_made`` and the bytes read with the header, then hands
    the transport over.
    """

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        family = _family_of(peer)
        if sock is not None and family is not None and family != sock.family:
            view = _FamilyView(sock, peer, transport.get_extra_info("sockname"), family)
            transport = ProxyTransport(transport, {"socket": view})
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()


async def serve(
    app: Any,
    config: Any,
    *,
    shutdown_trigger: Callable[..., Awaitable[Any]] | None = None,
    mode: Literal["asgi", "wsgi"] | None = None,
    policy: Policy | str = Policy.REQUIRE,
    trusted: Any | None = None,
    untrusted_policy: Policy | str = Policy.SKIP,
    header_timeout: float = 10.0,
    max_header_size: int = 4096,
    verify_checksum: bool = True,
    allow_v4_in_tcp6: bool = False,
    max_pending: int = 256,
    log_rate: float | None = DEFAULT_LOG_RATE,
) -> None:
    """``hypercorn.asyncio.serve(app, config)`` behind a PROXY-protocol proxy.

    ``app``, ``config``, ``shutdown_trigger`` and ``mode`` are hypercorn's.
    The other knobs are those of :func:`proxyproto.aio.start_server` (the
    socketserver mixin's ``proxy_*`` attributes without the prefix);
    ``trusted`` takes networks, ``"10.0.0.0/8,127.0.0.1"`` or ``"*"``, and
    None (the default) trusts every peer.  Invalid knobs raise
    ``ValueError`` before anything is bound.  ``config`` is not modified.
    """
    from hypercorn.asyncio import serve as hypercorn_serve  # type: ignore[import-not-found,unused-ignore]

    knobs: dict[str, Any] = {
        "policy": policy,
        "trusted": trusted,
        "untrusted_policy": untrusted_policy,
        "header_timeout": header_timeout,
        "max_header_size": max_header_size,
        "verify_checksum": verify_checksum,
        "allow_v4_in_tcp6": allow_v4_in_tcp6,
        "max_pending": max_pending,
        "log_rate": log_rate,
    }
    wrap_protocol_factory(asyncio.Protocol, **knobs)  # checks the knobs now, before binding
    loop = asyncio.get_running_loop()
    sockets = config.create_sockets()
    listeners = {id(sock) for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]}
    factories: list[ProxyProtocolFactory] = []
    original = loop.create_server
    # Another serve() on this loop may have replaced it already: restore what was there.
    replaced_before = "create_server" in getattr(loop, "__dict__", {})

    async def create_server(protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> asyncio.Server:
        sock: socket.socket | None = kwargs.get("sock")
        if sock is None or id(sock) not in listeners:
            return await original(protocol_factory, *args, **kwargs)
        factory = wrap_protocol_factory(
            lambda: _SocketFamily(protocol_factory()),
            ssl=kwargs.pop("ssl", None),
            ssl_handshake_timeout=kwargs.pop("ssl_handshake_timeout", None),
            **knobs,
        )
        factories.append(factory)
        server = await original(factory, *args, **kwargs)
        close = server.close

        def close_with_waiting() -> None:
            close()
            factory.close()  # connections still waiting for a header were never handed to hypercorn

        server.close = close_with_waiting  # type: ignore[method-assign]
        return server

    ours = copy.copy(config)
    ours.create_sockets = lambda: sockets  # hypercorn serves the sockets bound above
    try:
        loop.create_server = create_server  # type: ignore[method-assign]
    except AttributeError:
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets, *sockets.quic_sockets]:
            sock.close()
        raise RuntimeError("proxyproto.hypercorn.serve needs asyncio's own event loop (not uvloop)") from None
    try:
        if mode is None:  # hypercorn < 0.15 has no mode argument
            await hypercorn_serve(app, ours, shutdown_trigger=shutdown_trigger)
        else:
            await hypercorn_serve(app, ours, shutdown_trigger=shutdown_trigger, mode=mode)
    finally:
        if replaced_before:
            loop.create_server = original  # type: ignore[method-assign]
        else:
            del loop.create_server  # the class's method again
        for factory in factories:
            factory.close()
