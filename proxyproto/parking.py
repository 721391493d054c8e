"""Connections waiting for their header, oldest first, and the one rule that closes the oldest.

Both asyncio adapters (:mod:`proxyproto.aio`'s streams acceptor and
:class:`proxyproto.aio_protocol.ProxyProtocolFactory`, and so uvicorn,
aiohttp and hypercorn) and the socketserver mixin
(:class:`proxyproto.waiting.ParkedConnections`) park a connection whose
header is not in yet in a :class:`Parking`, and only there is a parked
connection closed to make room for another: one eviction loop, one log line
(:meth:`Parking.evict_oldest`), one ``kind``.

Two limits make room:

``max_pending``
    at most that many connections wait at once; past it the oldest is
    closed (a real proxy sends its header at once, so the oldest parked
    connection is the likeliest attacker).  The line names the knob as the
    adapter spells it (the mixin's ``proxy_max_pending``).

the descriptor reserve
    the asyncio adapters do not own ``accept()``: the loop accepts, and
    when the process has no descriptor left it fails with EMFILE, which no
    adapter sees, so the socketserver mixin's remedy (close the oldest parked
    connection when ``accept()`` fails, and accept again) is out of reach
    without patching the loop.  So the fault is prevented instead.  The
    kernel gives every new descriptor the lowest free number, so a
    connection whose descriptor is ``fd`` proves that ``0 .. fd - 1`` were
    all in use when it was accepted.  When a connection is parked with
    ``fd`` at or above ``limit - reserve`` (``limit``: the soft
    ``RLIMIT_NOFILE``, read with ``resource.getrlimit`` on each park, one
    system call, so a limit changed while serving is seen), the process is
    short of descriptors, and waiting connections are what it can give back:
    the oldest are closed until ``reserve`` of them wait, and at most
    ``reserve`` wait (each newcomer closes the oldest) until none waits any
    more.  What they held is free for the next accepts, so a good client
    gets in, and the listen queue a flood filled drains in a few accepts.
    The reserve is ``min(32, limit // 8)``, both the margin that raises the
    alarm and the number of connections that may keep waiting meanwhile: an
    eighth of a small limit (64: 8) leaves most descriptors to served
    connections and still notices the shortage with room for a burst, and a
    few dozen is enough for a large one, where ``max_pending`` (256) keeps
    waiting connections few anyway and a shortage comes from served
    connections.  Only waiting connections are ever closed for it; a
    connection whose header came with it never waits and costs no check.
    The socketserver mixin passes no descriptor, so the reserve never applies
    to it: it owns ``accept()`` and, on EMFILE, closes the oldest parked
    connection itself (:meth:`Parking.evict_oldest`) and accepts again.

When the fault comes all the same, ``accept()`` fails in the loop and the
loop's own back-off applies: ENFILE (the whole system is out of
descriptors), descriptors held by served connections (never closed for a
waiting one), or a burst deeper than the free descriptors (asyncio accepts a
whole listen backlog in one callback, before any of those connections reaches
an adapter).  asyncio then logs the error and stops accepting on that
listener for a second (``asyncio.constants.ACCEPT_RETRY_DELAY``); Python
3.11 logs, and re-arms the listener, once per connection left in that
callback's batch, so a deep listen backlog (uvicorn's 2048) costs a burst of
log lines and CPU until the queue drains.  libuv (uvloop) accepts and drops
what it cannot hold with a spare descriptor.  The parks that follow cut the
waiting connections down, so the next accepts succeed and the fault ends.

Without the ``resource`` module (Windows) only ``max_pending`` applies.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Hashable
from typing import Any, Callable, Generic, TypeVar

from .policy import peer_text
from .refusal_log import KIND_EVICTED, RefusalLog

try:
    import resource as _resource
except ImportError:  # pragma: no cover - Windows
    _resource = None  # type: ignore[assignment]

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

#: The ``kind`` of every eviction line (the socketserver mixin's too).
EVICTED = KIND_EVICTED
_RLIMIT_NOFILE = getattr(_resource, "RLIMIT_NOFILE", None)
_RLIM_INFINITY = getattr(_resource, "RLIM_INFINITY", -1)

K = TypeVar("K", bound=Hashable)

#: Seconds a listener rests after accept() failed for lack of descriptors or memory.
ACCEPT_BACKOFF = 0.1
#: accept() errors that mean "out of descriptors or memory": the listener stays readable, so
#: retrying at once would spin (the mixin, the gunicorn workers and the relay rest instead).
ACCEPT_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: Those of them a closed descriptor (an evicted parked connection) can cure.
OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE))


def descriptor_reserve(limit: int) -> int:
    """Descriptors kept free under a soft ``RLIMIT_NOFILE`` of ``limit``: ``min(32, limit // 8)``."""
    return min(32, limit // 8)


def descriptor_of(transport: Any) -> int | None:
    """The descriptor of an asyncio (or uvloop) transport's socket; None when it has none (closed)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _soft_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE``; None when unknown or unlimited."""
    if _resource is None or _RLIMIT_NOFILE is None:
        return None
    try:
        soft = _resource.getrlimit(_RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return None
    if soft == _RLIM_INFINITY or soft <= 0:
        return None
    return int(soft)


class Parking(Generic[K]):
    """The connections waiting for their header, oldest first; :meth:`add` makes room, then parks.

    One per listener (or per factory).  ``close(key)`` closes an evicted connection; it is called after the key
    has left :attr:`waiting`.  Refusal lines go through ``refusals``, one sentence for every eviction
    (:meth:`evict_oldest`), which name ``max_pending`` as the operator spells it (``refusals.name_of``:
    ``max_pending``, the socketserver mixin's ``proxy_max_pending``, ``PROXYPROTO_MAX_PENDING``).
    """

    __slots__ = ("cap", "close", "listener_of", "refusals", "waiting")

    def __init__(
        self, refusals: RefusalLog, close: Callable[[K], object], listener_of: Callable[[K], object] | None = None
    ) -> None:
        self.refusals = refusals
        self.close = close
        #: The address of a key's listener, asked only for an eviction line (a log shared by several listeners).
        self.listener_of = listener_of
        #: key -> the peer address it came from, oldest first (dicts keep insertion order).
        self.waiting: dict[K, Any] = {}
        #: The cap the descriptor reserve set (None: only max_pending), until no connection waits.
        self.cap: int | None = None

    def __len__(self) -> int:
        return len(self.waiting)

    def __contains__(self, key: object) -> bool:
        return key in self.waiting

    def add(self, key: K, peer: Any, fd: int | None, max_pending: int) -> None:
        """Park ``key`` (from ``peer``, on descriptor ``fd`` when known), closing the oldest as the limits say.

        Nothing happens when ``key`` is parked already.
        """
        waiting = self.waiting
        if key in waiting:
            return
        if not waiting:
            self.cap = None  # nobody waits: the descriptor pressure is over
        cap, why = max_pending, self.refusals.name_of("max_pending")
        if fd is not None and fd >= 0:
            limit = _soft_limit()
            if limit is not None:
                reserve = descriptor_reserve(limit)
                if fd >= limit - reserve:
                    self.cap = max(1, reserve)
                if self.cap is not None and self.cap < cap:
                    cap, why = self.cap, f"the process is near its RLIMIT_NOFILE of {limit}"
        elif self.cap is not None and self.cap < cap:
            cap, why = self.cap, "the process is near its RLIMIT_NOFILE"
        while waiting and len(waiting) >= cap:
            self.evict_oldest(cap, why)
        waiting[key] = peer

    def evict_oldest(self, count: int, why: str) -> None:
        """Close the connection that has waited longest (one must wait), and log it: ``count`` wait, ``why``.

        The line, the only eviction wording of the library, reads "<peer>: closed: <count> connections already
        wait for their header (<why>)"; ``why`` names the limit (``max_pending``, the descriptor reserve) or the
        fault (the socketserver mixin's "the process is out of file descriptors").  The key leaves
        :attr:`waiting` before ``close`` is called.
        """
        waiting = self.waiting
        oldest = next(iter(waiting))
        oldest_peer = waiting.pop(oldest)
        self.refusals.log(
            logging.WARNING,
            "%s: closed: %d connections already wait for their header (%s)",
            peer_text(oldest_peer),
            count,
            why,
            kind=EVICTED,
            listener=None if self.listener_of is None else self.listener_of(oldest),
        )
        self.close(oldest)

    def discard(self, key: K) -> bool:
        """Stop counting ``key``; False when it was not parked (evicted, or never parked)."""
        return self.waiting.pop(key, _ABSENT) is not _ABSENT


_ABSENT: Any = object()
