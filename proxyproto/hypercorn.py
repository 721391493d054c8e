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

from .aio_protocol import PolicyHook, ProxyProtocolFactory, wrap_protocol_factory
from .policy import Policy
from .refusal_log import DEFAULT_LOG_RATE
from .settings import DEFAULT_TRUSTED

__all__ = ["serve"]


async def serve(
    app: Any,
    config: Any,
    *,
    shutdown_trigger: Callable[..., Awaitable[Any]] | None = None,
    mode: Literal["asgi", "wsgi"] | None = None,
    policy: Policy | str = Policy.REQUIRE,
    trusted: Any = DEFAULT_TRUSTED,
    untrusted_policy: Policy | str = Policy.SKIP,
    header_timeout: float = 10.0,
    max_header_size: int = 4096,
    verify_checksum: bool = True,
    allow_v4_in_tcp6: bool = False,
    max_pending: int = 256,
    log_rate: float | None = DEFAULT_LOG_RATE,
    policy_for: PolicyHook | None = None,
) -> None:
    """``hypercorn.asyncio.serve(app, config)`` behind a PROXY-protocol proxy.

    ``app``, ``config``, ``shutdown_trigger`` and ``mode`` are hypercorn's.
    The other knobs are those of :func:`proxyproto.aio.start_server` (the
    socketserver mixin's ``proxy_*`` attributes without the prefix, with
    their defaults: ``docs/configuration.rst``); ``trusted`` defaults to
    ``"127.0.0.1,::1"`` (loopback only) and takes networks,
    ``"10.0.0.0/8,127.0.0.1"``, ``"*"`` for every peer or ``""`` for none
    (None is refused); ``policy_for(peer, local) -> Policy`` replaces the
    three trust knobs with a decision per connection.  Invalid knobs raise
    ``ValueError`` before anything is bound.  ``config`` is not modified.
    With certificates in ``config``, TLS is negotiated after the header,
    within ``header_timeout`` unless ``config.ssl_handshake_timeout`` was
    set (hypercorn's own default, 60 s, is not used for it).
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
        "policy_for": policy_for,
    }
    wrap_protocol_factory(asyncio.Protocol, **knobs)  # checks the knobs now, before binding
    handshake_set = "ssl_handshake_timeout" in vars(config)  # set on the instance, not hypercorn's default
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
        handshake_timeout = kwargs.pop("ssl_handshake_timeout", None)
        factory = wrap_protocol_factory(
            protocol_factory,
            ssl=kwargs.pop("ssl", None),
            # hypercorn passes its config's value, 60 s unless set: only a value the user set
            # replaces the wrapper's default (header_timeout).
            ssl_handshake_timeout=handshake_timeout if handshake_set else None,
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
