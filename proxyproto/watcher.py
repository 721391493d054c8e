"""What wakes a socketserver's loop: a selector over the listener, a wake-up pipe and the parked connections.

:class:`Watcher` is the selector of a :class:`~proxyproto.waiting.WaitingRoom`:
its descriptor is the server's ``fileno()`` (epoll and kqueue descriptors are
pollable), so ``serve_forever()`` wakes when a connection arrives, when a
:class:`Parked` connection's header progresses, and while completed
connections are queued.  It never reads a connection, and never spins on
unread bytes (on epoll, a socket holding an ambiguous prefix is switched to
edge-triggered; elsewhere it is looked at again after
:data:`~proxyproto.sock.RETRY_DELAY`).
"""

from __future__ import annotations

import os
import select
import selectors
import socket
from typing import Any

from .sock import RETRY_DELAY, HeaderAttempt

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

Address = Any  # what socket.accept() gives: a tuple for IP families, str or bytes for AF_UNIX

_EPOLLET = getattr(select, "EPOLLET", 0)
#: What the selector's keys carry for the two descriptors that are no parked connection.
LISTENER = "listener"
WAKEUP = "wakeup"


class Parked:
    """A connection whose header is not complete yet."""

    __slots__ = ("attempt", "deadline", "edge", "peer", "registered", "retry_at", "saved_timeout", "trusted")

    def __init__(
        self, attempt: HeaderAttempt, peer: Address, deadline: float, saved_timeout: float | None, trusted: bool
    ) -> None:
        self.attempt = attempt
        self.peer = peer
        #: Whether the peer is trusted: only then may its header reach the handler.
        self.trusted = trusted
        self.deadline = deadline
        self.saved_timeout = saved_timeout
        self.registered = False  # watched by the selector
        self.edge = False  # registered edge-triggered, waiting for bytes past an ambiguous prefix
        self.retry_at = 0.0  # not watched: step it again at this time (no edge trigger here)


class Watcher:
    """The selector the serving loop polls: the listener, a wake-up pipe and every parked connection.

    Its :attr:`descriptor` is the server's ``fileno()`` (epoll and kqueue
    descriptors are pollable), so the loop wakes when a connection arrives,
    when a parked header progresses, and, through :meth:`signal`, while
    connections are queued.  :meth:`open` answers None where the platform's
    selector has no descriptor.  It never reads a connection.
    """

    __slots__ = ("descriptor", "listening", "selector", "signalled", "wakeup")

    def __init__(self, selector: selectors.BaseSelector, wakeup: tuple[int, int], listener: socket.socket) -> None:
        self.selector = selector
        #: The selector's own descriptor, the server's ``fileno()``.
        self.descriptor: int = selector.fileno()  # type: ignore[attr-defined]
        self.wakeup = wakeup
        self.signalled = False  # the wake-up pipe holds a byte
        selector.register(wakeup[0], selectors.EVENT_READ, WAKEUP)
        selector.register(listener, selectors.EVENT_READ, LISTENER)
        self.listening = True  # the listener is registered

    @classmethod
    def open(cls, listener: socket.socket) -> Watcher | None:
        """A watcher of ``listener``; None where the platform's selector has no pollable descriptor."""
        selector = selectors.DefaultSelector()
        if not hasattr(selector, "fileno"):  # pragma: no cover
            selector.close()
            return None
        # The wake-up pipe is made now, not when first needed: by then the
        # process may be out of descriptors (and the queue must still drain).
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        return cls(selector, (read_fd, write_fd), listener)

    def ready(self) -> list[tuple[selectors.SelectorKey, int]]:
        """What is ready now, without waiting: keys whose ``data`` is the listener's mark or a parked connection."""
        return self.selector.select(0)

    def listen(self, listener: socket.socket, on: bool) -> None:
        """Watch the listener, or stop (the accept back-off, a forking server at ``max_children``)."""
        if on is self.listening:
            return
        if on:
            self.selector.register(listener, selectors.EVENT_READ, LISTENER)
        else:
            self.selector.unregister(listener)
        self.listening = on

    def watch(self, parked: Parked, now: float) -> None:
        """Watch a parked connection until it can make progress, without ever spinning on unread bytes."""
        sock = parked.attempt.sock
        selector = self.selector
        if not parked.registered:
            selector.register(sock, selectors.EVENT_READ, parked)
            parked.registered = True
        if parked.attempt.needs_retry and not parked.edge:
            # Bytes of an ambiguous prefix wait in the kernel and poll cannot be told to wait
            # for more (no SO_RCVLOWAT here).  On epoll, switch the socket to edge-triggered:
            # it is reported again when more bytes (or the peer's close) arrive.  Elsewhere,
            # stop watching it and look again after a short delay, when the loop next wakes.
            epoll = getattr(selector, "_selector", None)
            if _EPOLLET and isinstance(epoll, select.epoll):
                epoll.modify(sock.fileno(), select.EPOLLIN | _EPOLLET)
                parked.edge = True
            else:
                selector.unregister(sock)
                parked.registered = False
                parked.retry_at = now + RETRY_DELAY

    def unwatch(self, parked: Parked) -> None:
        """Stop watching a connection that leaves the waiting room."""
        if parked.registered:
            self.selector.unregister(parked.attempt.sock)
            parked.registered = False

    def signal(self, pending: bool) -> None:
        """Keep the selector readable while ``pending`` (completed connections are queued), or stop."""
        if pending == self.signalled:
            return
        if pending:
            os.write(self.wakeup[1], b"!")
        else:
            try:
                os.read(self.wakeup[0], 64)
            except BlockingIOError:  # pragma: no cover
                pass
        self.signalled = pending

    def close(self) -> None:
        """Close the selector and the wake-up pipe, unregistering nothing (safe in a forked child)."""
        self.selector.close()
        os.close(self.wakeup[0])
        os.close(self.wakeup[1])
