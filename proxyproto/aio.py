"""asyncio: read the PROXY header from a ``StreamReader``, and servers that do it for you.

:func:`read_header` drives the same sans-I/O core as the blocking
:func:`proxyproto.read_header`, with the same outcomes and exceptions (the
policy table of :mod:`proxyproto.policy`).  It looks at the bytes already in
the ``StreamReader``'s buffer without consuming them, and consumes exactly
the header once it is complete; everything after the header (or, under the
opt-in policies, a stream that is no header at all) stays in the reader for
the application.  Peeking needs three private attributes of
``asyncio.StreamReader`` (``_buffer``, ``_eof``, ``_wait_for_data``), unchanged
from Python 3.4 to 3.13; a test pins them.

:func:`start_server` and :func:`start_unix_server` wrap ``asyncio.start_server``
and ``asyncio.start_unix_server``: each connection reads its header in its own
task (a slow or silent client never delays another), refusals are closed and
logged as the socketserver mixin logs them, and the callback receives
``(reader, writer)`` where ``writer`` is a :class:`ProxyStreamWriter`:

* ``writer.get_extra_info("peername")``: the real client (the header's
  source, in the socket module's shape) when the policy uses the header's
  addresses; otherwise the socket's own peer, as without a proxy;
  ``("sockname")`` and ``("socket")`` agree with it (the header's
  destination; a socket view whose ``getpeername()``/``getsockname()`` say
  the same, as hypercorn reads them);
* ``writer.get_extra_info("proxy_header")``: the parsed header when the
  peer is trusted, else None (an untrusted peer's header never reaches the
  application, under any policy);
* ``writer.get_extra_info("proxy_peername")``: the socket's own peer (the proxy).

TLS: ``ssl=`` is negotiated *after* the header, as everywhere in proxyproto
(haproxy's ``send-proxy`` in front of TLS passthrough), with the machinery of
:func:`proxyproto.aio_protocol.wrap_protocol_factory` (``loop.start_tls``
once the header is in); ``ssl_before_header=`` is asyncio's own ``ssl=``
(the handshake first, the header inside TLS, for a TLS-terminating proxy).

At most ``max_pending`` connections wait for their header at once: past it
the oldest is closed and logged (a real proxy sends its header at once, so
the oldest silent connection is the likeliest attacker), so a flood of
silent connections holds a bounded number of descriptors; when the process
runs short of descriptors, fewer wait (:mod:`proxyproto.parking`).  Refusal lines are
rate limited (:class:`~proxyproto.refusal_log.RefusalLog`, ``log_rate``).
Servers built on protocols rather than streams use
:func:`proxyproto.aio_protocol.wrap_protocol_factory`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import ssl as _ssl
from collections.abc import Awaitable
from functools import partial
from typing import Any, Callable

from . import reader as core
from .advice import SIGNATURE_PEEK, handed_on, refusal_line, untrusted_look, warn_if_every_peer_trusted
from .aio_protocol import ProxyProtocolFactory, call_later, wrap_protocol_factory
from .aio_transport import FirstBytes, proxy_extra
from .header import ProxyHeader
from .parking import Parking, descriptor_of
from .policy import (
    Attempt,
    Outcome,
    Policy,
    decide,
    peer_text,
)
from .refusal_log import RefusalLog, kind_of, listener_text
from .settings import Settings, settings_for, split_knobs

__all__ = ["ProxyStreamWriter", "read_header", "start_server", "start_unix_server"]

logger = logging.getLogger("proxyproto")

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
#: asyncio's default StreamReader buffer limit (``asyncio.start_server``'s ``limit``).
_LIMIT = 2**16


class _Attempt(Attempt):
    """One stream's header: peek at the reader's buffer, let the scanner decide, consume exactly."""

    __slots__ = ("reader",)

    def __init__(self, reader: asyncio.StreamReader, policy: Policy, scanner: core.HeaderScanner) -> None:
        super().__init__(policy, scanner)
        self.reader = reader

    async def run(self) -> None:
        """Wait until the outcome is known; ``OSError`` from the transport propagates."""
        reader = self.reader
        scanner = self.scanner
        window = scanner.window
        while True:
            failure = reader.exception()
            if failure is not None:
                raise failure
            data = bytes(reader._buffer[:window])  # type: ignore[attr-defined]
            if len(data) > scanner.seen:
                outcome = scanner.look(data)  # nothing is consumed: the buffer keeps every byte
                if outcome is Outcome.HEADER:
                    await reader.readexactly(scanner.take)  # already buffered: returns at once
                if outcome is not None:
                    return
            if reader._eof:  # type: ignore[attr-defined]
                scanner.eof()
                return
            await reader._wait_for_data("read_header")  # type: ignore[attr-defined]



async def _attempt(
    reader: asyncio.StreamReader, policy: Policy, timeout: float, scanner: core.HeaderScanner
) -> _Attempt:
    attempt = _Attempt(reader, policy, scanner)
    try:
        await asyncio.wait_for(attempt.run(), timeout)
    except asyncio.TimeoutError:
        attempt.timed_out()
    return attempt


async def read_header(
    reader: asyncio.StreamReader,
    *,
    timeout: float = 10.0,
    policy: Policy | str = Policy.REQUIRE,
    **parse_options: Any,
) -> ProxyHeader | None:
    """Read the PROXY header at the start of ``reader``, waiting at most ``timeout`` seconds in all.

    Consumes exactly the header; the bytes after it (and, where the policy
    serves a stream without a header, every byte) stay in ``reader``.
    Returns the header, or None where the policy serves a stream without one
    (SKIP never looks).  Raises, where the policy closes: :class:`NoProxyHeader`,
    :class:`InvalidHeader`, :class:`ChecksumError`, :class:`HeaderRejected`,
    :class:`HeaderTimeout`, exactly as :func:`proxyproto.read_header` does.
    ``OSError`` from the transport passes through.  ``parse_options`` are
    those of :func:`proxyproto.parse`.
    """
    policy = Policy(policy)
    if policy is Policy.SKIP:
        return None
    attempt = await _attempt(reader, policy, timeout, core.HeaderScanner(**parse_options))
    assert attempt.outcome is not None
    if not decide(policy, attempt.outcome).serve:
        raise attempt.exception(timeout)
    return attempt.header


class ProxyStreamWriter(asyncio.StreamWriter):
    """A ``StreamWriter`` whose ``get_extra_info`` knows what the PROXY header said.

    ``"peername"``: the real client when the header's addresses are used,
    else the socket's peer; ``"sockname"``: the header's destination, under
    the same rule; ``"socket"``: the real socket, or when the header's
    addresses are used a :class:`~proxyproto.aio_transport.SocketView` whose
    ``getpeername()`` and ``getsockname()`` give the two above (hypercorn
    and uvicorn read the socket object first); ``"proxy_header"``: the
    header or None; ``"proxy_peername"``: the socket's own peer (the proxy).
    Every other key is the transport's.
    """

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        header: ProxyHeader | None,
        policy: Policy | str = Policy.REQUIRE,
        *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """``extra``: the keys to answer, when the caller has them (a ``ProxyTransport`` answers them itself)."""
        # The transport and protocol of the stream asyncio made: writes, drain,
        # close and start_tls behave exactly as on the original writer.
        protocol: Any = writer.transport.get_protocol()  # the stream's protocol, as writer._protocol
        super().__init__(writer.transport, protocol, reader, asyncio.get_running_loop())
        self._proxy_extra = proxy_extra(writer.transport, Policy(policy), header) if extra is None else extra

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._proxy_extra:
            return self._proxy_extra[name]
        return super().get_extra_info(name, default)


#: The StreamReader attributes :func:`read_header` looks at (docs/platforms.rst): asyncio has no
#: public way to see buffered bytes without consuming them, or to wait for more.
_STREAM_INTERNALS = ("_buffer", "_eof", "_wait_for_data")


def _require_stream_internals(reader: Any) -> None:
    """Raise ``RuntimeError`` naming what is missing when ``reader`` lacks what :func:`read_header` uses."""
    missing = [name for name in _STREAM_INTERNALS if not hasattr(reader, name)]
    if missing:
        raise RuntimeError(
            f"proxyproto.aio: this Python's asyncio.StreamReader has no {', '.join(missing)}, which "
            "read_header needs to look at bytes without consuming them (see docs/platforms.rst)"
        )


def _sockname(writer: asyncio.StreamWriter) -> Any:
    """The address of ``writer``'s listener: its refusal lines name their own (a server may have several)."""
    return writer.get_extra_info("sockname")


class _Acceptor:
    """The callback ``asyncio.start_server`` runs per connection: header first, then the user's."""

    def __init__(self, client_connected_cb: ClientConnected, settings: Settings) -> None:
        _require_stream_internals(asyncio.StreamReader())  # at start, not at the first connection
        self.callback = client_connected_cb
        self.settings = settings
        warn_if_every_peer_trusted(settings)
        self.refusals = RefusalLog(logger, settings.log_rate, later=call_later, name_of=settings.name_of)
        #: Writers of the connections whose header is not in yet, oldest first, and the one rule
        #: that evicts them (:class:`proxyproto.parking.Parking`, shared with aio_protocol).
        self.parking: Parking[asyncio.StreamWriter] = Parking(self.refusals, self.evict, _sockname)
        self.pending = self.parking.waiting
        #: Writers closed by max_pending or the descriptor reserve: their reading task ends without a second line.
        self.evicted: set[asyncio.StreamWriter] = set()

    def park(self, writer: asyncio.StreamWriter, peer: Any) -> None:
        """Count ``writer`` as waiting for its header; past max_pending or the descriptor reserve, close the oldest."""
        self.parking.add(writer, peer, descriptor_of(writer.transport), self.settings.max_pending)

    def evict(self, writer: asyncio.StreamWriter) -> None:
        self.evicted.add(writer)
        writer.transport.abort()

    def unpark(self, writer: asyncio.StreamWriter) -> bool:
        """Stop counting ``writer``; False when an eviction has already closed it."""
        if writer in self.evicted:
            self.evicted.discard(writer)
            return False
        self.parking.discard(writer)
        return True

    def look_for_untrusted_header(self, peer: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Under SKIP: a WARNING when the untrusted peer's first bytes, already here, are a PROXY header."""
        look = untrusted_look(self.refusals, self.settings, peer, partial(_sockname, writer))
        held = bytes(reader._buffer[:SIGNATURE_PEEK])  # type: ignore[attr-defined]
        transport: Any = writer.transport
        if held:
            look(held)
        elif not transport.is_closing():
            transport.set_protocol(FirstBytes(transport, transport.get_protocol(), look))

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            policy, trusted = self.settings.trust(peer, writer.get_extra_info("socket"))
        except Exception as exc:  # a user's hook: its failure closes this connection, nothing else
            self.refusals.hook_failed(peer, exc, listener=_sockname(writer))
            writer.close()
            return
        header: ProxyHeader | None = None
        if policy is Policy.SKIP:
            if not trusted and self.settings.policy_for is None:
                self.look_for_untrusted_header(peer, reader, writer)
        else:
            self.park(writer, peer)
            try:
                attempt = await _attempt(reader, policy, self.settings.header_timeout, self.settings.scanner())
            except OSError as exc:
                if self.unpark(writer):  # (one closed by max_pending has had its line)
                    self.refusals.read_failed(peer, exc, _sockname(writer))
                writer.close()
                return
            if not self.unpark(writer):
                writer.close()
                return
            assert attempt.outcome is not None
            verdict = decide(policy, attempt.outcome)
            hooked = self.settings.policy_for is not None
            if not verdict.serve:
                self.refusals.log(
                    verdict.level,
                    "%s: closed: %s",
                    peer_text(peer),
                    refusal_line(self.settings, policy, attempt.outcome, attempt.scanner, trusted, hooked, peer),
                    kind=kind_of(attempt.outcome),
                    listener=_sockname(writer),
                )
                writer.close()
                return
            where = None if trusted or attempt.header is None else _sockname(writer)  # only for its line
            header = handed_on(self.refusals, self.settings, peer, policy, attempt.header, trusted, hooked, where)
        result = self.callback(reader, ProxyStreamWriter(writer, reader, header, policy))
        if inspect.isawaitable(result):
            await result


def _tls_server_factory(
    client_connected_cb: ClientConnected,
    settings: Settings,
    ssl: _ssl.SSLContext,
    ssl_handshake_timeout: float | None,
    limit: int,
) -> ProxyProtocolFactory:
    """The protocol factory of a streams server whose TLS is negotiated after the header.

    asyncio's own streams (``StreamReaderProtocol``) made by
    :func:`~proxyproto.aio_protocol.wrap_protocol_factory`, which reads the
    header from the raw connection and then runs ``loop.start_tls`` (the
    machinery, tests and refusals of its ``ssl=``); the callback gets a
    :class:`ProxyStreamWriter` whose extra keys are the ``ProxyTransport``'s.
    """
    loop = asyncio.get_running_loop()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        return client_connected_cb(reader, ProxyStreamWriter(writer, reader, None, extra={}))

    def streams() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, connected, loop=loop)

    return wrap_protocol_factory(streams, settings=settings, ssl=ssl, ssl_handshake_timeout=ssl_handshake_timeout)


async def _serve(
    client_connected_cb: ClientConnected,
    tls: dict[str, Any],
    kwargs: dict[str, Any],
    plain: Callable[..., Awaitable[asyncio.Server]],
    create: Callable[[asyncio.AbstractEventLoop], Callable[..., Awaitable[asyncio.Server]]],
) -> asyncio.Server:
    """Listen with ``plain`` (asyncio's start_*server) or, given ``ssl``, ``create`` (the loop's create_*server)."""
    ssl, before, handshake_timeout = tls["ssl"], tls["ssl_before_header"], tls["ssl_handshake_timeout"]
    knobs, kwargs = split_knobs(kwargs)
    settings = settings_for(knobs.pop("settings", None), knobs)
    if ssl is not None and before is not None:
        raise ValueError(
            "ssl= (TLS negotiated after the PROXY header) and ssl_before_header= (TLS before it): give one"
        )
    if ssl is None:
        acceptor = _Acceptor(client_connected_cb, settings)
        if before is not None:
            kwargs["ssl"] = before
        if handshake_timeout is not None:
            kwargs["ssl_handshake_timeout"] = handshake_timeout  # asyncio's: only with ssl_before_header
        server = await plain(acceptor, **kwargs)
        acceptor.refusals.listener = listener_text(*[sock.getsockname() for sock in server.sockets])
        return server
    factory = _tls_server_factory(client_connected_cb, settings, ssl, handshake_timeout, kwargs.pop("limit", _LIMIT))
    server = await create(asyncio.get_running_loop())(factory, **kwargs)
    factory.refusals.listener = listener_text(*[sock.getsockname() for sock in server.sockets])
    close = server.close

    def close_with_waiting() -> None:
        close()
        factory.close()  # connections still waiting for their header or handshake were never served

    server.close = close_with_waiting  # type: ignore[method-assign]
    return server


async def start_server(
    client_connected_cb: ClientConnected,
    host: Any = None,
    port: int | None = None,
    *,
    settings: Settings | None = None,
    ssl: _ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_before_header: _ssl.SSLContext | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_server`` whose connections start with a PROXY header.

    The knobs are docs/configuration.rst's, as keywords
    (``trusted="10.0.0.0/8"``, ``max_pending=64``) or as one
    :class:`~proxyproto.settings.Settings` (``settings=``, keywords on top):
    ``trusted`` is ``"127.0.0.1,::1"`` by default (loopback only; ``"*"``
    for every peer, ``""`` for none; None is refused); past ``max_pending``
    connections waiting for their header the oldest is closed and logged.
    ``client_connected_cb`` gets ``(reader, writer)`` with ``writer`` a
    :class:`ProxyStreamWriter`.

    ``ssl``: an ``SSLContext`` negotiated *after* the header, as everywhere
    in proxyproto (haproxy's ``send-proxy`` in front of TLS passthrough),
    by :func:`~proxyproto.aio_protocol.wrap_protocol_factory`'s machinery
    and rules: only REQUIRE and SKIP (``ValueError`` for USE, IGNORE and
    REJECT, whose look at the first bytes would take them from the
    handshake); the handshake is bounded by ``ssl_handshake_timeout``
    (default ``header_timeout``) and counts toward ``max_pending``.
    ``ssl_before_header``: an ``SSLContext`` negotiated *before* the header
    (asyncio's own ``ssl=``: a TLS-terminating proxy in front that sends the
    header inside TLS); then ``ssl_handshake_timeout`` is asyncio's.  At most
    one of the two.  Other ``kwargs`` go to ``asyncio.start_server``
    (``limit=``, ``backlog=``, ...).  Raises ``ValueError`` for an invalid
    knob (an ``untrusted_policy`` of USE or REQUIRE included).
    """
    tls = {"ssl": ssl, "ssl_before_header": ssl_before_header, "ssl_handshake_timeout": ssl_handshake_timeout}
    return await _serve(
        client_connected_cb,
        tls,
        {"host": host, "port": port, "settings": settings, **kwargs},
        asyncio.start_server,
        lambda loop: loop.create_server,
    )


async def start_unix_server(
    client_connected_cb: ClientConnected,
    path: str | os.PathLike[str] | None = None,
    *,
    settings: Settings | None = None,
    ssl: _ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_before_header: _ssl.SSLContext | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_unix_server`` whose connections start with a PROXY header.

    As :func:`start_server` (``ssl`` after the header, ``ssl_before_header``
    before it).  A peer is trusted when the socket file is not
    world-writable (its permissions restrict who can connect: asyncio binds
    under the process's umask), or when ``trusted`` says ``unix`` or ``"*"``;
    ``""`` trusts no one.  The mode is read per connection.
    """
    tls = {"ssl": ssl, "ssl_before_header": ssl_before_header, "ssl_handshake_timeout": ssl_handshake_timeout}
    return await _serve(
        client_connected_cb,
        tls,
        {"path": path, "settings": settings, **kwargs},
        asyncio.start_unix_server,
        lambda loop: loop.create_unix_server,
    )
