"""The waiting room: a server's connections whose PROXY header is not complete yet.

``get_request()`` runs in the serving loop, so a header read there with a
blocking socket would let one silent client stall every other.  The
:class:`WaitingRoom` of a :class:`~proxyproto.server.ProxyProtocolMixin`
server never blocks:

* It accepts the connection (through the server's ``accept`` function) and
  tries the header at once (peek, then an exact ``recv``): real proxies send
  it before or with the first segment, so this is the common path.
* A connection whose header is incomplete is *parked* in a ``selectors``
  selector together with the listening socket, with its deadline.  The
  server's ``fileno()`` is that selector's own descriptor (epoll and kqueue
  descriptors are pollable), so ``serve_forever()`` wakes when either a new
  connection or a parked header makes progress.
* :meth:`WaitingRoom.next_request` returns the next connection whose header
  is complete, or raises ``OSError``, which ``socketserver`` reads as
  "nothing to do".  While completed connections are queued, a wake-up pipe
  keeps the selector readable.  Deadlines are enforced there and in
  :meth:`WaitingRoom.tidy` (``service_actions()``), or
  :meth:`WaitingRoom.after_timeout` (``handle_timeout()``).
* When ``accept()`` fails for lack of descriptors or memory, the listener
  rests for :data:`ACCEPT_BACKOFF` seconds (out of descriptors with
  connections parked, the oldest gives its place first).
* Nothing spins: a parked socket never stays registered with unread bytes
  (:class:`~proxyproto.watcher.Watcher`).

Where the platform's selector has no pollable descriptor, the header is read
in the loop, bounded by ``proxy_header_timeout``.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, cast

from .advice import handed_on, refusal_line
from .header import ProxyHeader
from .parking import ACCEPT_BACKOFF, ACCEPT_RESOURCE_ERRORS, OUT_OF_DESCRIPTORS, Parking
from .peers import socket_family
from .policy import SERVES_A_HEADER, Policy, Trust, decide, peer_text, served_address
from .refusal_log import KIND_READ_ERROR, RefusalLog, kind_of
from .sock import HeaderAttempt, take_complete_header, wait_for_outcome
from .watcher import LISTENER, WAKEUP, Parked, Watcher

if TYPE_CHECKING:
    from .attributes import LiveSettings
    from .server import ProxyProtocolMixin, ProxySocket

    #: What a server's ``accept`` function returns: the accepted connection, its peer, its trust
    #: decision (None: close it, the configuration is invalid or the hook failed) and the timeout
    #: the socket had when accepted (restored when it is handed out).
    Arrival = tuple[ProxySocket, Any, Trust | None, float | None]

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

logger = logging.getLogger("proxyproto")

Address = Any  # what socket.accept() gives: a tuple for IP families, str or bytes for AF_UNIX


#: Bumped in every forked child: a room made with another value was inherited from the parent.
fork_generation = 0


def _after_fork_in_child() -> None:
    global fork_generation
    fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ParkedConnections:
    """The connections whose header is incomplete, oldest first, each with its deadline.

    :meth:`park` tries the header and parks the connection when it is not
    complete yet; :meth:`step` advances one the :class:`Watcher` reports;
    :meth:`expire` concludes those whose deadline passed.  A concluded
    connection is closed and logged, or handed to ``hand_out(sock, header,
    policy, peer, trusted)`` as the policy table says; a connection parked
    with bytes its caller had read already (``park(..., first=)``) whose
    served stream starts with some of them is handed out with a sixth
    argument, those bytes (only such a caller gets one).  The knobs are read
    from ``live`` (the server's current settings) when used.

    The parked connections are the keys of :attr:`parking`, the
    :class:`~proxyproto.parking.Parking` the asyncio adapters use too: at
    most ``proxy_max_pending`` wait, past it the oldest is closed, with the
    one eviction line of the library naming ``proxy_max_pending``; the
    watcher stops watching an evicted connection before it is closed
    (Parking's close callback).  The key is the :class:`Parked` record
    itself, which the selector also carries as its key's ``data``: a
    descriptor the watcher reports leads to its record without another table,
    and a record evicted earlier in the same batch is no key any more (its
    descriptor may already be a newer connection's).

    Parking's descriptor reserve applies only with ``reserve=True`` (each
    parked socket's descriptor is then passed to it).  The mixin needs none:
    it owns ``accept()``, so it sees EMFILE when it comes and then closes the
    oldest parked connection and accepts again (:meth:`evict_oldest`, the same
    eviction); the reserve would only close waiting connections while
    descriptors are still free, and cost a ``getrlimit`` call per park.  A
    host that opens descriptors of its own for each served connection
    (gunicorn's gthread pool opens a selector) needs the reserve, or a full
    table would fail the next served connection after an eviction.
    """

    __slots__ = ("hand_out", "live", "log", "parking", "reserve", "watcher")

    def __init__(
        self,
        live: LiveSettings,
        watcher: Watcher | None,
        log: RefusalLog,
        hand_out: Callable[..., None],
        reserve: bool = False,
    ) -> None:
        self.live = live
        self.watcher = watcher
        self.log = log
        self.hand_out = hand_out
        self.reserve = reserve
        #: The parked connections, oldest first, and the one rule that evicts them.
        self.parking: Parking[Parked] = Parking(log, self._evicted)

    def park(
        self,
        sock: ProxySocket,
        peer: Address,
        policy: Policy,
        trusted: bool,
        saved_timeout: float | None,
        now: float,
        first: bytes = b"",
    ) -> None:
        """Start waiting for ``sock``'s header (deadline: ``proxy_header_timeout`` from ``now``).

        ``first``: the stream's first bytes, already read out of ``sock`` by
        the caller; the scanner holds them (:meth:`HeaderScanner.feed
        <proxyproto.reader.HeaderScanner.feed>`), the socket gives the rest.
        Those that belong to the served stream (all of them after NO_HEADER
        under an opt-in policy) go to ``hand_out``'s sixth argument.
        """
        attempt = self._attempt(sock, policy)
        parked = Parked(attempt, peer, now + self.live.current.header_timeout, saved_timeout, trusted)
        if first and attempt.scanner.feed(first) is not None:
            self._conclude(parked)  # the bytes read decided it (no header, or malformed)
            return
        self.step(parked, now)

    def read_blocking(
        self, sock: ProxySocket, peer: Address, policy: Policy, trusted: bool, saved_timeout: float | None
    ) -> None:  # pragma: no cover - platforms whose selector has no pollable descriptor
        """Without a watcher: wait for ``sock``'s header here, bounded by ``proxy_header_timeout``."""
        sock.settimeout(0.0)
        deadline = time.monotonic() + self.live.current.header_timeout
        parked = Parked(self._attempt(sock, policy), peer, deadline, saved_timeout, trusted)
        try:
            wait_for_outcome(parked.attempt, parked.deadline)
        except OSError as exc:
            self.read_failed(sock, peer, exc)
            raise
        self._conclude(parked)

    def step(self, parked: Parked, now: float) -> None:
        """Advance one connection; conclude, or (re)park it."""
        try:
            done = parked.attempt.step()
        except OSError as exc:
            self._unpark(parked)
            self.read_failed(parked.attempt.sock, parked.peer, exc)
            return
        if done:
            self._unpark(parked)
            self._conclude(parked)
            return
        # (Nothing happens when it is parked already; the descriptor only for the reserve, see the class.)
        fd = parked.attempt.sock.fileno() if self.reserve else None
        self.parking.add(parked, parked.peer, fd, self.live.current.max_pending)
        assert self.watcher is not None
        self.watcher.watch(parked, now)

    def expire(self, now: float) -> None:
        """Conclude the connections whose deadline has passed; step those waiting for a retry."""
        for parked in list(self.parking.waiting):
            if parked.deadline <= now:
                self._unpark(parked)
                parked.attempt.timed_out()
                self._conclude(parked)
            elif parked.attempt.needs_retry and not parked.edge and parked.retry_at <= now:
                self.step(parked, now)

    def evict_oldest(self) -> None:
        """``accept()`` failed for lack of descriptors: close the connection that has waited longest (one must).

        Through :meth:`proxyproto.parking.Parking.evict_oldest`, the one eviction line.
        """
        parking = self.parking
        parking.evict_oldest(len(parking), "the process is out of file descriptors")

    def _evicted(self, parked: Parked) -> None:
        """Parking's close callback: stop watching an evicted connection (it has left :attr:`parking`), close it."""
        if self.watcher is not None:
            self.watcher.unwatch(parked)
        parked.attempt.sock.close()

    def read_failed(self, sock: socket.socket, peer: Address, exc: OSError) -> None:
        """Close a connection whose socket failed while its header was read, and log it."""
        self.log.read_failed(peer, exc)
        sock.close()

    def close(self, keep: Any = None) -> None:
        """Close every parked connection but ``keep``, reading and unregistering nothing."""
        for parked in self.parking.waiting:
            if parked.attempt.sock is not keep:
                parked.attempt.sock.close()

    def _attempt(self, sock: ProxySocket, policy: Policy) -> HeaderAttempt:
        settings = self.live.current
        return HeaderAttempt(
            sock,
            policy,
            max_size=settings.max_header_size,
            verify_checksum=settings.verify_checksum,
            allow_v4_in_tcp6=settings.allow_v4_in_tcp6,
        )

    def _unpark(self, parked: Parked) -> None:
        if self.watcher is not None:
            self.watcher.unwatch(parked)
        self.parking.discard(parked)

    def _conclude(self, parked: Parked) -> None:
        """Apply the policy table: hand the connection out for service, or close and log it."""
        attempt = parked.attempt
        sock = attempt.sock
        assert attempt.outcome is not None
        verdict = decide(attempt.policy, attempt.outcome)
        if not verdict.serve:
            live = self.live
            outcome = attempt.outcome
            reason = refusal_line(
                live.current, attempt.policy, outcome, attempt.scanner, parked.trusted, live.hooked, parked.peer
            )
            self.log.log(
                verdict.level,
                "%s: closed: %s",
                peer_text(parked.peer),
                reason,
                kind=kind_of(attempt.outcome),
            )
            sock.close()
            return
        try:
            attempt.release()
            if sock.gettimeout() != parked.saved_timeout:
                sock.settimeout(parked.saved_timeout)
        except OSError as exc:  # pragma: no cover - the peer vanished meanwhile
            self.log.log(logging.INFO, "%s: closed: %s", peer_text(parked.peer), exc, kind=KIND_READ_ERROR)
            sock.close()
            return
        rest = attempt.scanner.rest
        if rest:  # bytes of the stream read before it was parked (park's ``first``)
            self.hand_out(cast("ProxySocket", sock), attempt.header, attempt.policy, parked.peer, parked.trusted, rest)
            return
        self.hand_out(cast("ProxySocket", sock), attempt.header, attempt.policy, parked.peer, parked.trusted)


class WaitingRoom:
    """Where one server's connections wait for their header; made when serving starts, closed with the server.

    The server's hooks call it: :meth:`next_request` (``get_request``) hands
    out the connections whose header is complete, in order (:attr:`ready`);
    the others wait in :attr:`waiting` (:class:`ParkedConnections`); the
    :class:`Watcher` wakes the loop (None where the platform has no pollable
    selector: the header is then read in the loop, bounded by
    ``proxy_header_timeout``).  It rests the listener after ``accept()`` ran
    out of descriptors or memory, and pauses it while a forking server is
    at ``max_children``.

    ``accept(room)`` is the server's: it accepts one raw connection and
    decides its trust (``Arrival``); an ``OSError`` from it is
    ``accept()``'s.  The header knobs are read from ``live`` (the server's
    :class:`~proxyproto.settings.LiveSettings`, refreshed per connection by
    ``accept``) and the listener from ``server.socket`` when used, so a change
    made while serving takes effect from the next connection.  Refusal lines
    go to :attr:`log`.
    """

    __slots__ = (
        "accept",
        "accept_failing",
        "accept_resume_at",
        "children_full",
        "descriptor",
        "generation",
        "live",
        "log",
        "parked",
        "ready",
        "server",
        "socket_args",
        "waiting",
        "watcher",
    )

    def __init__(
        self,
        server: ProxyProtocolMixin,
        accept: Callable[[WaitingRoom], Arrival],
        log: RefusalLog,
        live: LiveSettings,
    ) -> None:
        self.server = server
        self.live = live
        self.accept = accept
        self.log = log
        listener = server.socket
        # The family the socket really has (a listener made with socket.fromfd may be mislabeled).
        family = socket_family(listener)
        #: The listener's family, type and proto, read once: the accepted sockets are made with them.
        self.socket_args = (int(listener.family) if family < 0 else family, int(listener.type), listener.proto)
        self.ready: collections.deque[tuple[ProxySocket, Address]] = collections.deque()
        self.accept_resume_at = 0.0  # the listener rests until then (0: it does not)
        self.accept_failing = False  # accept() failed; logged once until it works again
        self.children_full = False  # a forking server at max_children: accept nothing, hand out nothing
        self.generation = fork_generation
        self.watcher = Watcher.open(listener)
        #: What the server's ``fileno()`` answers: the watcher's descriptor (None without a watcher:
        #: the listener's, then).
        self.descriptor = None if self.watcher is None else self.watcher.descriptor
        self.waiting = ParkedConnections(live, self.watcher, log, self._queue)
        self.parked = self.waiting.parking.waiting  # (read for every connection: one attribute, not three)

    def next_request(self) -> tuple[ProxySocket, Address]:
        """The next connection whose header is complete, with its address; ``OSError`` when there is none."""
        watcher = self.watcher
        if watcher is None:
            return self._read_blocking()
        ready = self.ready
        if self.children_full:
            self.poll()  # headers still progress and expire; nobody is handed out
            raise OSError("proxyproto: max_children reached; waiting for a child to exit")
        if not ready:
            if not self.parked and not self.accept_failing:
                # Only the listener is registered, and the loop saw the selector readable:
                # accept at once and save a select() call (the common case).
                self.accept_next()
            else:
                self.poll()
        if not ready:
            raise OSError("proxyproto: no connection with a complete header yet")
        request = ready.popleft()
        if watcher.signalled is not bool(ready):
            watcher.signal(bool(ready))
        return request

    def wait_out_backoff(self) -> None:
        """Sleep out the rest of the listener's back-off, then resume it (``handle_request()`` loops)."""
        if self.accept_resume_at and self.watcher is not None:
            time.sleep(max(0.0, self.accept_resume_at - time.monotonic()))
            self.expire(time.monotonic())

    def tidy(self, log_rate: float | None) -> None:
        """While the loop is idle: enforce deadlines, end a due back-off, write a due refusal summary."""
        if (self.parked or self.accept_resume_at) and self.watcher is not None:
            self.expire(time.monotonic())
        log = self.log
        log.rate = log_rate
        if log.suppressed:
            log.flush()

    def after_timeout(self) -> None:
        """``handle_request()`` timed out: enforce deadlines and write a due summary there too."""
        if self.watcher is not None:
            self.expire(time.monotonic())
        if self.log.suppressed:
            self.log.flush()

    def pause_for_children(self, full: bool) -> None:
        """A forking server reached ``max_children`` (or left it): stop (or resume) accepting and handing out."""
        watcher = self.watcher
        if watcher is None or full is self.children_full:
            return
        self.children_full = full
        watcher.listen(self.server.socket, not full and not self.accept_resume_at)
        watcher.signal(bool(self.ready) and not full)

    def close(self, keep: Any = None) -> None:
        """Close every connection held (but ``keep``) and the watcher; never the listener.

        Nothing is read or unregistered, so a forked child can call it on
        the room it inherited (``keep``: its own request): closing a
        descriptor in the child leaves the parent's copy, and the epoll
        registrations they share, alone.
        """
        if self.watcher is not None:
            self.watcher.close()
        self.waiting.close(keep)
        for request, _ in self.ready:
            if request is not keep:
                request.close()

    def accept_next(self, now: float | None = None, evicted: bool = False) -> None:
        """Accept one connection: queue it if its header came with it (or SKIP), else park it."""
        try:
            sock, peer, trust, timeout = self.accept(self)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._accept_failed(exc, now, evicted)
            return
        if self.accept_failing and not evicted:
            logger.warning("accept() works again")
            self.accept_failing = False
        if trust is None:
            sock.close()
            return
        policy, trusted = trust
        if policy is Policy.SKIP:
            self.ready.append((sock, peer))
            return
        if timeout:
            sock.settimeout(0.0)  # a timeout would make CPython wait before recv, whatever the flags
        elif policy in SERVES_A_HEADER:
            # The common case: the header came with the connection, whole and valid.  Serve it
            # without building the per-connection state machine; anything else takes the long way.
            settings = self.live.current
            try:
                header = take_complete_header(
                    sock, settings.max_header_size, settings.verify_checksum, settings.allow_v4_in_tcp6
                )
            except OSError as exc:
                self.waiting.read_failed(sock, peer, exc)
                return
            if header is not None:
                self._queue(sock, header, policy, peer, trusted)
                return
        self.waiting.park(sock, peer, policy, trusted, timeout, time.monotonic() if now is None else now)

    def _accept_failed(self, exc: OSError, now: float | None, evicted: bool) -> None:
        """Out of descriptors or memory: make room, or rest the listener; log the failure once."""
        if exc.errno in OUT_OF_DESCRIPTORS and self.parked and not evicted:
            # Out of descriptors while connections wait for their header: give the oldest
            # one's place to the newcomer (a real proxy sends its header at once, so the
            # oldest parked connection is the likeliest attacker), and accept again.
            if not self.accept_failing:
                logger.error("accept() failed: %s; closing connections still waiting for their header", exc)
                self.accept_failing = True
            self.waiting.evict_oldest()
            self.accept_next(now, evicted=True)
        elif exc.errno in ACCEPT_RESOURCE_ERRORS and self.watcher is not None:
            if not self.accept_failing:
                logger.error("accept() failed: %s; pausing the listener until it works again", exc)
                self.accept_failing = True
            self.watcher.listen(self.server.socket, False)
            self.accept_resume_at = (time.monotonic() if now is None else now) + ACCEPT_BACKOFF
        else:
            logger.warning("accept() failed: %s", exc)

    def poll(self) -> None:
        """Accept and advance whatever the watcher reports ready, then enforce deadlines."""
        assert self.watcher is not None
        now = time.monotonic()
        for key, _ in self.watcher.ready():
            if key.data is LISTENER:
                self.accept_next(now)
            elif key.data is not WAKEUP:
                parked = key.data
                if parked in self.parked:  # (one evicted by an accept earlier in this batch is gone)
                    self.waiting.step(parked, now)
        self.expire(now)

    def expire(self, now: float) -> None:
        """End a due back-off; conclude the connections whose deadline has passed."""
        watcher = self.watcher
        assert watcher is not None
        if self.accept_resume_at and now >= self.accept_resume_at:
            self.accept_resume_at = 0.0
            watcher.listen(self.server.socket, not self.children_full)
        if not self.parked:
            return
        self.waiting.expire(now)
        watcher.signal(bool(self.ready) and not self.children_full)

    def _queue(
        self, sock: ProxySocket, header: ProxyHeader | None, policy: Policy, peer: Address, trusted: bool
    ) -> None:
        """Hand a connection to the serving loop with its header and the address it is served with.

        The header reaches the handler only from a ``trusted`` peer (an
        untrusted one's is never used for the address either: its policy is
        SKIP, IGNORE or REJECT).
        """
        handed = handed_on(self.log, self.live.current, peer, policy, header, trusted, self.live.hooked)
        sock.proxy_header = handed
        self.ready.append((sock, served_address(policy, handed, peer, self.socket_args[0])))

    def _read_blocking(self) -> tuple[ProxySocket, Address]:  # pragma: no cover
        """Without a watcher: accept, and read the header in the loop, bounded by the timeout."""
        sock, peer, trust, saved = self.accept(self)
        if trust is None:
            sock.close()
            raise OSError("proxyproto: connection closed: invalid settings")
        policy, trusted = trust
        if policy is Policy.SKIP:
            return sock, peer
        self.waiting.read_blocking(sock, peer, policy, trusted, saved)
        if not self.ready:
            raise OSError("proxyproto: connection closed by policy")
        return self.ready.popleft()
