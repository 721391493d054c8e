"""TLS after the header: the hand-over of a connection from the header's protocol to ``loop.start_tls``.

Why TLS is the wrapper's job: ``create_server(ssl=...)`` handshakes before
the protocol sees a byte, so the header would reach the TLS layer and fail
(aiosmtpd's bug aio-libs/aiosmtpd#559).  Given ``ssl=``, the wrapper reads the
header from the raw connection and then runs ``loop.start_tls``: the
handshake happens after the header, as with haproxy's ``send-proxy`` in front
of TLS passthrough.  uvloop starts reading when ``connection_made`` returns,
whatever the protocol paused, so it may read (a ClientHello) into the
header's protocol once more before ``start_tls`` takes the transport: that
protocol never answers such a read with an empty buffer (a fatal error to
uvloop), keeps those bytes here (:meth:`TLSHandOver.keep`), and they reach
the TLS protocol before its handshake starts (:meth:`TLSHandOver.hand_over_late`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .aio_transport import ProxyTransport, deliver, proxy_extra
from .header import ProxyHeader
from .policy import peer_text
from .refusal_log import KIND_TLS

if TYPE_CHECKING:
    from .aio_header import HeaderProtocol

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst


def handshake_timeout(given: float | None, header_timeout: float) -> float:
    """The TLS handshake's bound: ``given`` when the user gave one, else ``header_timeout``.

    Raises ``ValueError`` naming ``ssl_handshake_timeout`` for anything but a
    finite number of seconds above 0.
    """
    if given is None:
        return header_timeout
    if isinstance(given, bool) or not isinstance(given, (int, float)) or not 0 < given < float("inf"):
        raise ValueError(f"ssl_handshake_timeout: must be a finite number of seconds above 0, got {given!r}")
    return float(given)


class _Holding(asyncio.Protocol):
    """Keeps what the TLS layer decrypts before the inner protocol has been told of the connection."""

    __slots__ = ("data", "eof", "lost", "lost_exc")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc

    def data_received(self, data: bytes) -> None:
        self.data.append(bytes(data))

    def eof_received(self) -> bool:
        self.eof = True
        return True


class TLSHandOver:
    """One connection's TLS handshake after its header, then its inner protocol over the TLS transport.

    Made by the :class:`~proxyproto.aio_header.HeaderProtocol` (``reading``)
    that decided to serve the connection; ``reading`` stays parked (counted
    toward ``max_pending``, closed on shutdown) until the handshake is done.
    Until ``start_tls`` takes the transport, ``reading`` gives what the
    transport still reads to :meth:`keep`, and the peer's end of its side to
    :meth:`eof_received`.
    """

    __slots__ = ("eof", "late", "reading")

    def __init__(self, reading: HeaderProtocol) -> None:
        self.reading = reading
        #: The bytes (of the ClientHello) the transport read before ``start_tls`` took it; None once handed over.
        self.late: bytearray | None = bytearray()
        #: Whether the peer ended its side before the handshake could start.
        self.eof = False

    def start(self, inner: asyncio.BaseProtocol, header: ProxyHeader | None) -> None:
        """Park the connection, pause its reads and start the handshake's task (on the next iteration)."""
        reading = self.reading
        factory = reading.factory
        transport = reading.transport
        assert transport is not None
        factory.park(reading)  # until the handshake is done: counted, and closed on shutdown
        transport.pause_reading()
        task = asyncio.ensure_future(self.run(inner, header))
        factory.handshakes.add(task)  # a reference, so the task is not collected mid-handshake
        task.add_done_callback(factory.handshakes.discard)

    def keep(self, data: bytes | bytearray) -> None:
        """Keep ``data``, read before ``start_tls`` took the transport, for the TLS layer; pause the transport.

        The rest waits in the kernel for the TLS layer.
        """
        if self.late is not None:
            self.late += data
        transport = self.reading.transport
        if transport is not None:
            transport.pause_reading()

    def eof_received(self) -> bool:
        """The peer ended its side before the handshake could start: remember it (:attr:`eof`); True.

        No TLS session can complete (the client's Finished never comes), so
        there is nothing to serve: :meth:`run` closes the connection, and
        the transport, told True, leaves it open until then.
        """
        self.eof = True
        return True

    def hand_over_late(self) -> None:
        """Give the TLS protocol the bytes read after the decision, before anything else.

        Neither loop's ``start_tls`` can be told of bytes already read, and
        uvloop may read once more into the header's protocol before
        ``start_tls`` takes the transport.  Both loops' TLS protocols are
        buffered ones whose ``buffer_updated`` before ``connection_made`` only
        queues the bytes in the incoming BIO, which the handshake then reads
        first, in stream order (what arrives later is read after
        ``resume_reading``).
        """
        late, self.late = self.late, None
        reading = self.reading
        reading.handed_to_tls()
        transport = reading.transport
        if not late or transport is None or transport.is_closing():
            return
        tls = transport.get_protocol()
        if tls is reading:  # start_tls failed before taking the transport; its error is reported
            return
        rest = memoryview(late)
        while rest:
            buf = memoryview(tls.get_buffer(len(rest)))  # type: ignore[attr-defined]
            size = min(len(buf), len(rest))
            buf[:size] = rest[:size]
            tls.buffer_updated(size)  # type: ignore[attr-defined]
            rest = rest[size:]

    async def run(self, inner: asyncio.BaseProtocol, header: ProxyHeader | None) -> None:
        """The handshake, within ``factory.ssl_handshake_timeout``; then ``inner`` gets the TLS transport."""
        reading = self.reading
        transport: Any = reading.transport
        assert transport is not None
        factory = reading.factory
        assert factory.ssl is not None
        holding = _Holding()
        loop = asyncio.get_running_loop()
        if self.eof or transport.is_closing():
            factory.unpark(reading)
            factory.refusals.log(
                logging.INFO,
                "%s: closed before the TLS handshake started",
                peer_text(reading.peer),
                kind=KIND_TLS,
                listener=transport.get_extra_info("sockname"),
            )
            transport.abort()
            return
        # Scheduled before start_tls's own connection_made and resume_reading callbacks, so it
        # runs after start_tls has set its TLS protocol on the paused transport and before that
        # protocol starts the handshake or reads anything.
        loop.call_soon(self.hand_over_late)
        try:
            tls = await loop.start_tls(
                transport,
                holding,
                factory.ssl,
                server_side=True,
                ssl_handshake_timeout=factory.ssl_handshake_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError and ConnectionError are OSErrors
            factory.refusals.log(
                logging.INFO,
                "%s: closed: TLS handshake failed: %s",
                peer_text(reading.peer),
                exc,
                kind=KIND_TLS,
                listener=transport.get_extra_info("sockname"),
            )
            transport.abort()
            return
        finally:
            factory.unpark(reading)
        if tls is None:
            return
        if transport.is_closing():
            # Aborted mid-handshake (a shutdown, max_pending): asyncio's start_tls raises, uvloop's
            # returns a TLS transport anyway, and would never tell the inner of the end of a
            # connection it was told of (uvicorn's graceful shutdown would wait for it forever).
            factory.refusals.log(
                logging.INFO,
                "%s: closed during the TLS handshake",
                peer_text(reading.peer),
                kind=KIND_TLS,
                listener=transport.get_extra_info("sockname"),
            )
            tls.abort()
            return
        # What arrived with the handshake (data, the peer's close_notify, even the end of the
        # connection) reaches the inner protocol in order, after connection_made.
        tls.set_protocol(inner)
        inner.connection_made(ProxyTransport(tls, proxy_extra(transport, reading.policy, header)))
        for chunk in holding.data:
            deliver(inner, chunk)
        if holding.eof and isinstance(inner, (asyncio.Protocol, asyncio.BufferedProtocol)) and not inner.eof_received():
            tls.close()
        if holding.lost:
            inner.connection_lost(holding.lost_exc)
