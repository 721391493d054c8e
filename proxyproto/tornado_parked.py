"""Tornado connections held before ``handle_stream``: a header still on its way, a TLS handshake after it.

Private to :mod:`proxyproto.tornado`: its :class:`~proxyproto.tornado.ProxyTCPServerMixin`
parks each connection it cannot serve at once in one of these, in its
:class:`~proxyproto.parking.Parking` (the key), with a ``header_timeout``
deadline on the server's IOLoop.  They decide nothing: the mixin's
``_proxy_conclude`` does, from the engine's :class:`~proxyproto.sock.HeaderAttempt`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tornado.concurrent import Future, chain_future  # type: ignore[import-not-found,unused-ignore]
from tornado.ioloop import IOLoop  # type: ignore[import-not-found,unused-ignore]
from tornado.iostream import SSLIOStream  # type: ignore[import-not-found,unused-ignore]

from .sock import RETRY_DELAY, HeaderAttempt

if TYPE_CHECKING:
    from .tornado import ProxyTCPServerMixin

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst


class Waiting:
    """A connection whose header is not complete yet: watched on the IOLoop, with its deadline.

    Made only when the first look did not decide; the server's
    :class:`~proxyproto.parking.Parking` holds it (the key) until it is
    decided, evicted or shut down.
    """

    __slots__ = ("attempt", "io_loop", "peer", "retry", "server", "timer", "trusted", "watched")

    def __init__(self, server: ProxyTCPServerMixin, attempt: HeaderAttempt, peer: Any, trusted: bool) -> None:
        self.server = server
        self.attempt = attempt
        self.peer = peer
        self.trusted = trusted
        self.io_loop = IOLoop.current()
        self.watched = False
        self.retry: Any = None
        self.timer = self.io_loop.call_later(server.proxy_settings.header_timeout, self.expire)

    def wait(self) -> None:
        """Wait for the socket to show more: watched (``SO_RCVLOWAT`` or bytes to take), or polled again soon."""
        if self.attempt.needs_retry:  # an ambiguous prefix where SO_RCVLOWAT does not work: look again soon
            self.unwatch()
            self.retry = self.io_loop.call_later(RETRY_DELAY, self.readable)
        elif not self.watched:
            self.io_loop.add_handler(self.attempt.sock.fileno(), self.on_events, IOLoop.READ)
            self.watched = True

    def on_events(self, fd: int, events: int) -> None:
        self.readable()

    def readable(self) -> None:
        self.retry = None
        try:
            done = self.attempt.step()
        except OSError as exc:
            self.stop()
            self.server._proxy_log.read_failed(self.peer, exc)
            self.attempt.sock.close()
            return
        if done:
            self.stop()
            self.server._proxy_conclude(self.attempt, self.peer, self.trusted)
        else:
            self.wait()

    def expire(self) -> None:
        self.timer = None
        self.stop()
        self.attempt.timed_out()
        self.server._proxy_conclude(self.attempt, self.peer, self.trusted)

    def unwatch(self) -> None:
        if self.watched:
            self.watched = False
            self.io_loop.remove_handler(self.attempt.sock.fileno())

    def stop(self) -> None:
        """Forget the waiting state (watch, timers, parking slot); the socket stays open."""
        self.unwatch()
        for handle in (self.timer, self.retry):
            if handle is not None:
                self.io_loop.remove_timeout(handle)
        self.timer = self.retry = None
        self.server._proxy_parking.discard(self)

    def close(self) -> None:
        """Close without serving (evicted past ``max_pending``, or the server stopped); the caller logs."""
        self.stop()
        self.attempt.sock.close()


class Handshake:
    """A TLS connection whose header is in and whose handshake is not done: parked, with its deadline.

    ``ssl_options`` negotiate TLS after the header, in Tornado's
    ``SSLIOStream``; this bounds that handshake by ``header_timeout`` (a
    client that sends the header and stalls is closed with one line) and
    counts it in the server's :class:`~proxyproto.parking.Parking` until it
    ends, so ``max_pending`` also bounds header-then-stalled handshakes.
    The end is the stream's ``wait_for_handshake()`` future; as Tornado
    allows that call once per stream, the stream's own ``wait_for_handshake``
    is replaced, for its one call, by one that returns a future chained to
    this one: ``handle_stream`` may still await it.
    """

    __slots__ = ("io_loop", "peer", "server", "stream", "timer")

    def __init__(self, server: ProxyTCPServerMixin, stream: SSLIOStream, peer: Any) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.io_loop = IOLoop.current()
        handshake = stream.wait_for_handshake()

        def wait_for_handshake() -> Future[SSLIOStream]:
            del stream.wait_for_handshake  # once, as Tornado's
            mine: Future[SSLIOStream] = Future()
            chain_future(handshake, mine)
            return mine

        stream.wait_for_handshake = wait_for_handshake  # type: ignore[method-assign,unused-ignore]
        settings = server.proxy_settings
        self.timer = self.io_loop.call_later(settings.header_timeout, self.expire)
        server._proxy_parking.add(self, peer, stream.socket.fileno(), settings.max_pending)
        handshake.add_done_callback(self.done)

    def done(self, future: Any) -> None:
        self.stop()
        if not future.cancelled():
            future.exception()  # Tornado logs a failed handshake itself

    def expire(self) -> None:
        self.timer = None
        self.server._proxy_log.handshake_expired(self.peer, self.server.proxy_settings.header_timeout)
        self.close()

    def stop(self) -> None:
        """Forget the deadline and the parking slot; the stream stays open."""
        if self.timer is not None:
            self.io_loop.remove_timeout(self.timer)
            self.timer = None
        self.server._proxy_parking.discard(self)

    def close(self) -> None:
        """Close the stream (deadline passed, evicted past ``max_pending``, or the server stopped)."""
        self.stop()
        self.stream.close()


def close_held(held: Waiting | Handshake) -> None:
    """Close ``held`` (:class:`~proxyproto.parking.Parking`'s eviction and shutdown call)."""
    held.close()
