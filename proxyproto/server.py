"""ProxyProtocolMixin: socketserver servers that read the PROXY header first.

``get_request()`` runs in the serving loop, so a header read there with a
blocking socket would let one silent client stall every other.  The mixin
therefore never blocks:

* It accepts the connection itself and tries the header at once (peek,
  then an exact ``recv``): real proxies send it before or with the first
  segment, so this is the common path.
* A connection whose header is incomplete is *parked* in a ``selectors``
  selector together with the listening socket, with its deadline.  The
  server's ``fileno()`` is that selector's own descriptor (epoll and kqueue
  descriptors are pollable), so ``serve_forever()`` wakes when either a new
  connection or a parked header makes progress.
* ``get_request()`` returns the next connection whose header is complete,
  or raises ``OSError``, which ``socketserver`` reads as "nothing to do".
  Deadlines are enforced there and in ``service_actions()``.

Configuration is by class attribute, overridable per subclass or instance,
as ``socketserver`` does it, at any time: a change made while serving takes
effect from the next connection (trust is re-read per connection, see
:mod:`proxyproto.settings`), an invalid value set on the instance is refused
where it is set.  See DESIGN.md's policy table for what each policy serves,
closes and logs; refusal lines are rate-limited per listener
(``proxy_log_rate``, :mod:`proxyproto.refusal_log`).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import selectors
import socket
import socketserver
import sys
import time
from typing import Any, Callable

from .header import ProxyHeader
from .peers import socket_family, unix_access
from .policy import Policy, Trust, decide, hook_trust, peer_text, served_address
from .refusal_log import DEFAULT_LOG_RATE, KIND_EVICTED, KIND_POLICY_FOR, KIND_READ_ERROR, KIND_TLS, RefusalLog, kind_of
from .settings import DEFAULT_TRUSTED, TrustSettings, check_setting, check_settings
from .sock import RETRY_DELAY, HeaderAttempt, take_complete_header, wait_for_outcome

__all__ = [
    "ForkingProxyTCPServer",
    "ForkingProxyUnixStreamServer",
    "ProxyProtocolMixin",
    "ProxySocket",
    "ProxyTCPServer",
    "ProxyUnixStreamServer",
    "ThreadingProxyTCPServer",
    "ThreadingProxyUnixStreamServer",
]

logger = logging.getLogger("proxyproto")

_EPOLLET = getattr(select, "EPOLLET", 0)


def _public_accept(listener: socket.socket) -> tuple[int, Any]:
    """``(fd, address)`` of a new connection through the public ``socket.socket.accept`` (no handshake)."""
    conn, peer = socket.socket.accept(listener)
    return conn.detach(), peer


# socket.socket._accept is the C accept() that socket.socket.accept wraps (there since Python 3.3):
# one socket object per connection instead of two (docs/platforms.rst); the public path otherwise.
_ACCEPT: Callable[[socket.socket], tuple[int, Any]] = getattr(socket.socket, "_accept", None) or _public_accept
_getdefaulttimeout = socket.getdefaulttimeout
_LISTENER = "listener"
_WAKEUP = "wakeup"
_ACCEPT_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: Seconds the listener rests after accept() failed for lack of descriptors or memory.
ACCEPT_BACKOFF = 0.1
_OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE))

#: The settings checked when the listener is activated and whenever one is set on an instance.
SETTINGS = (
    "proxy_policy",
    "proxy_trusted",
    "proxy_untrusted_policy",
    "proxy_header_timeout",
    "proxy_max_header_size",
    "proxy_max_pending",
    "proxy_log_rate",
)
#: Read live where they are used; re-checked whenever one changes (see TrustSettings).
_LIVE_CHECKED = SETTINGS[3:]

Address = Any  # what socket.accept() gives: a tuple for IP families, str or bytes for AF_UNIX

# Bumped in every forked child, so finish_request can tell it runs in one without a getpid() call.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ProxySocket(socket.socket):
    """An accepted connection: a real socket, plus the header it started with.

    ``proxy_header`` is the parsed :class:`ProxyHeader` whenever one was
    parsed from a trusted peer (also under IGNORE, and for LOCAL), else None:
    a header from an untrusted peer never reaches the handler
    (:class:`~proxyproto.policy.Trust`).
    """

    __slots__ = ("proxy_header",)

    proxy_header: ProxyHeader | None


class _Parked:
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
        self.registered = False
        self.edge = False  # registered edge-triggered, waiting for bytes past an ambiguous prefix
        self.retry_at = 0.0


class _State:
    """Everything the mixin holds between calls, created when serving starts."""

    __slots__ = (
        "accept_failing",
        "accept_resume_at",
        "children_full",
        "generation",
        "listening",
        "log",
        "parked",
        "ready",
        "selector",
        "settings",
        "signalled",
        "socket_args",
        "wakeup",
    )

    def __init__(self) -> None:
        self.selector: selectors.BaseSelector | None = None
        self.parked: dict[int, _Parked] = {}
        self.ready: collections.deque[tuple[ProxySocket, Address]] = collections.deque()
        self.wakeup: tuple[int, int] | None = None
        self.signalled = False
        #: proxy_policy, proxy_trusted and proxy_untrusted_policy, parsed, re-read per connection.
        self.settings = TrustSettings(_LIVE_CHECKED)
        self.log = RefusalLog(logger, DEFAULT_LOG_RATE)
        self.socket_args = (-1, -1, -1)  # the listener's family, type and proto, read once
        self.listening = False  # the listener is registered with the selector
        self.accept_resume_at = 0.0
        self.accept_failing = False
        self.children_full = False  # a forking server at max_children: accept nothing, hand out nothing
        self.generation = _fork_generation


def _queue(
    state: _State, sock: ProxySocket, header: ProxyHeader | None, policy: Policy, peer: Address, trusted: bool
) -> None:
    """Hand a connection to the serving loop with its header and the address it is served with.

    The header reaches the handler only from a ``trusted`` peer (an untrusted
    one's is never used for the address either: its policy is SKIP, IGNORE
    or REJECT).
    """
    sock.proxy_header = header if trusted else None
    state.ready.append((sock, served_address(policy, header, peer, state.socket_args[0])))


class ProxyProtocolMixin:
    """Make ``self.client_address`` in request handlers the real client behind a proxy.

    Put it first among the bases of any ``socketserver.TCPServer`` or
    ``UnixStreamServer`` subclass (``http.server``, ``wsgiref`` and
    ``xmlrpc.server`` servers included).  A ``get_request`` override placed
    below it in the class order is not called: customise the accepted socket
    in ``finish_request`` or in the handler.
    """

    #: What a connection from a trusted peer must do (the spec's mode: REQUIRE).
    proxy_policy: Policy | str = Policy.REQUIRE
    #: The peers allowed to send headers: loopback by default (and the peers of a UNIX socket whose
    #: file is not world-writable); IP networks, the token ``unix``, ``"*"`` (every peer) or ``""``
    #: (none).  None, which used to mean every peer, is refused.
    proxy_trusted: Any = DEFAULT_TRUSTED
    #: What peers outside ``proxy_trusted`` get (SKIP, IGNORE or REJECT).
    proxy_untrusted_policy: Policy | str = Policy.SKIP
    #: Seconds for the whole header to arrive (never per read).
    proxy_header_timeout: float = 10.0
    #: Cap on a v2 header's 16 + len; larger ones are refused.
    proxy_max_header_size: int = 4096
    #: Verify a CRC-32C TLV when present.
    proxy_verify_checksum: bool = True
    #: Accept the mixed IPv4/IPv6 ``TCP6`` lines nginx emits.
    proxy_allow_v4_in_tcp6: bool = False
    #: Connections whose header is still incomplete; past it the oldest is closed.
    proxy_max_pending: int = 256
    #: Refusal log lines per second for this listener; past it they are counted and summarised.
    proxy_log_rate: float | None = DEFAULT_LOG_RATE

    _pp_state: _State | None = None

    # socketserver attributes the mixin relies on (declared for type checkers).
    socket: socket.socket
    timeout: float | None

    # -- policy ------------------------------------------------------------------

    def proxy_policy_for(self, peer: Address, local: Address | None) -> Policy:
        """The policy for a connection from ``peer`` accepted on ``local``.

        The default applies ``proxy_trusted``: trusted peers (loopback,
        unless it says otherwise) get ``proxy_policy``, the others
        ``proxy_untrusted_policy``; a UNIX-socket peer is trusted when the
        listening socket's file is not world-writable, or when
        ``proxy_trusted`` says ``unix`` or ``"*"``
        (:func:`proxyproto.policy.trust_for`).  Override it for anything
        else; ``local`` is None unless the method is overridden.  An
        override's peer counts as trusted (its header reaches the handler)
        when it answers REQUIRE or USE (:func:`proxyproto.policy.hook_trust`).
        """
        state = self._pp_state
        settings = TrustSettings() if state is None else state.settings
        settings.refresh(self)
        if settings.error is not None:
            raise settings.error
        return self._pp_default_trust(settings, peer).policy

    def _pp_default_trust(self, settings: TrustSettings, peer: Address) -> Trust:
        """``proxy_trusted``'s decision for ``peer``: a UNIX peer's asks the listening socket's mode."""
        return settings.trust(peer, None if type(peer) is tuple else unix_access(self.socket))

    # -- configuration -----------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, when the class is made, the combinations in which the mixin cannot work.

        On a datagram server ``accept()`` fails for every packet (the loop
        would spin logging it); placed after the server class in the bases,
        the mixin is silently inactive and the PROXY line reaches the handler
        as payload.  Both are mistakes that must not reach production quietly.
        """
        super().__init_subclass__(**kwargs)
        if not issubclass(cls, socketserver.BaseServer):
            return  # a mixin stack not yet combined with a server class
        socket_type = getattr(cls, "socket_type", socket.SOCK_STREAM)
        if socket_type != socket.SOCK_STREAM:
            raise TypeError(
                f"{cls.__name__}: ProxyProtocolMixin needs a stream server (TCPServer, UnixStreamServer); "
                "for UDP use proxyproto.ProxyUDPServer, ThreadingProxyUDPServer or ProxyDatagramMixin"
            )
        for klass in cls.__mro__:
            if klass is ProxyProtocolMixin:
                break
            if klass.__module__ != "socketserver":
                continue
            shadowed = sorted(_HOOKS.intersection(vars(klass)))
            if shadowed:
                raise TypeError(
                    f"{cls.__name__}: put ProxyProtocolMixin before {klass.__name__} among the bases "
                    f"(class {cls.__name__}(ProxyProtocolMixin, {klass.__name__}, ...)): socketserver's "
                    f"{', '.join(shadowed)} would run instead of the mixin's and not call it "
                    "(after TCPServer, the PROXY header reaches the handler as payload; after "
                    "ForkingMixIn, header deadlines and max_children stop being enforced)"
                )

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse an invalid ``proxy_*`` value where it is set (ValueError naming the setting)."""
        if name.startswith("proxy_"):
            check_setting(name, value)
        super().__setattr__(name, value)

    def server_activate(self) -> None:
        """Check the ``proxy_*`` settings before listening, so a mistake surfaces in the constructor."""
        check_settings(self, SETTINGS)
        super().server_activate()  # type: ignore[misc]

    # -- socketserver hooks ----------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """As socketserver's, after checking the configuration (so a refusal keeps its message).

        When the check fails, ``shutdown()`` must still return: socketserver's
        waits for an event that only a loop which ran sets, so it is set here.
        """
        if self._pp_state is None:
            try:
                self._pp_start()
            except BaseException:
                shut_down = getattr(self, "_BaseServer__is_shut_down", None)
                if shut_down is not None:
                    shut_down.set()
                raise
        super().serve_forever(poll_interval)  # type: ignore[misc]

    def handle_request(self) -> None:
        """As socketserver's, after checking the configuration (so a refusal keeps its message).

        While the listener rests after ``accept()`` ran out of descriptors, the
        rest of the back-off is waited out first: a ``handle_request`` loop
        without ``timeout`` would otherwise never wake to resume it.
        """
        state = self._pp_state or self._pp_start()
        if state.accept_resume_at and state.selector is not None:
            time.sleep(max(0.0, state.accept_resume_at - time.monotonic()))
            self._pp_expire(state, time.monotonic())
        super().handle_request()  # type: ignore[misc]

    def fileno(self) -> int:
        """The selector's descriptor: readable when a connection or a parked header progresses."""
        state = self._pp_state or self._pp_start()
        if state.selector is None:
            return self.socket.fileno()
        return state.selector.fileno()  # type: ignore[attr-defined,no-any-return]

    def get_request(self) -> tuple[ProxySocket, Address]:
        """The next connection whose header is complete, with the address it is served with."""
        state = self._pp_state or self._pp_start()
        if state.selector is None:
            return self._pp_get_request_blocking(state)
        ready = state.ready
        if state.children_full:
            self._pp_poll(state)  # headers still progress and expire; nobody is handed out
            raise OSError("proxyproto: max_children reached; waiting for a child to exit")
        if not ready:
            if not state.parked and not state.accept_failing:
                # Only the listener is registered, and the loop saw the selector readable:
                # accept at once and save a select() call (the common case).
                self._pp_accept(state)
            else:
                self._pp_poll(state)
        if not ready:
            raise OSError("proxyproto: no connection with a complete header yet")
        request = ready.popleft()
        if state.signalled is not bool(ready):
            self._pp_signal(state, bool(ready))
        return request

    def service_actions(self) -> None:
        """Enforce header deadlines while the loop is idle, then the base class's actions."""
        super().service_actions()  # type: ignore[misc]
        state = self._pp_state
        if state is None:
            return
        if (state.parked or state.accept_resume_at) and state.selector is not None:
            self._pp_expire(state, time.monotonic())
        state.log.rate = self.proxy_log_rate
        if state.log.suppressed:
            state.log.flush()

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap children as ``ForkingMixIn`` does, but never block the loop at ``max_children``.

        socketserver waits in ``waitpid`` until a child exits once
        ``max_children`` are running; meanwhile nothing expires or evicts the
        connections still waiting for their header, and a flood of silent
        clients fills the backlog.  Here, at the cap, exited children are
        reaped without blocking and the loop stops accepting and handing out
        connections until one exits (parked headers keep progressing and
        expiring); ``blocking=True`` (``server_close``) keeps the original.
        """
        active: set[int] | None = getattr(self, "active_children", None)
        cap = getattr(self, "max_children", None)
        if blocking or not active or cap is None or len(active) < cap:
            super().collect_children(blocking=blocking)  # type: ignore[misc]
        else:
            for pid in list(active):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid  # reaped elsewhere
                except OSError:  # pragma: no cover
                    continue
                if done:
                    active.discard(pid)
        state = self._pp_state
        if state is not None and state.selector is not None and cap is not None:
            full = active is not None and len(active) >= cap
            if full is not state.children_full:
                state.children_full = full
                self._pp_listen(state, not full and not state.accept_resume_at)
                self._pp_signal(state, bool(state.ready) and not full)

    def handle_timeout(self) -> None:
        """``handle_request()`` timed out: enforce header deadlines and write a due summary there too.

        (``handle_request()`` never calls ``service_actions``.)
        """
        state = self._pp_state
        if state is not None and state.selector is not None:
            self._pp_expire(state, time.monotonic())
        if state is not None and state.log.suppressed:
            state.log.flush()
        super().handle_timeout()  # type: ignore[misc]

    def finish_request(self, request: Any, client_address: Address) -> None:
        """Run the handler; in a forked child, first drop the parent's connections; wrap TLS."""
        state = self._pp_state
        if state is not None and state.generation != _fork_generation:
            self._pp_forget_in_child(state, request)
        listener = self.socket
        ssl = None if type(listener) is socket.socket else sys.modules.get("ssl")
        if ssl is None or not isinstance(listener, ssl.SSLSocket):
            super().finish_request(request, client_address)  # type: ignore[misc]
            return
        try:
            tls = listener.context.wrap_socket(
                request,
                server_side=True,
                do_handshake_on_connect=listener.do_handshake_on_connect,
                suppress_ragged_eofs=listener.suppress_ragged_eofs,
            )
        except OSError as exc:
            message = "%s: closed: TLS handshake failed: %s"
            if state is None:
                logger.info(message, peer_text(client_address), exc)
            else:
                state.log.log(logging.INFO, message, peer_text(client_address), exc, kind=KIND_TLS)
            return
        tls.proxy_header = getattr(request, "proxy_header", None)
        try:
            super().finish_request(tls, client_address)  # type: ignore[misc]
        finally:
            self.shutdown_request(tls)  # type: ignore[attr-defined]

    def server_close(self) -> None:
        """Close the listener as socketserver does, and every connection still held."""
        state = self._pp_state
        self._pp_state = None
        if state is not None:
            if state.selector is not None:
                state.selector.close()
            for parked in state.parked.values():
                parked.attempt.sock.close()
            for request, _ in state.ready:
                request.close()
            if state.wakeup is not None:
                os.close(state.wakeup[0])
                os.close(state.wakeup[1])
        super().server_close()  # type: ignore[misc]

    # -- machinery -----------------------------------------------------------------

    def _pp_start(self) -> _State:
        """Validate the configuration and register the listening socket (when serving starts)."""
        check_settings(self, SETTINGS)  # ValueError naming the setting
        listener = self.socket
        if listener.type != socket.SOCK_STREAM:
            raise TypeError(
                "ProxyProtocolMixin needs a stream socket; for UDP use proxyproto.ProxyUDPServer, "
                "ThreadingProxyUDPServer or ProxyDatagramMixin"
            )
        state = _State()
        state.settings.refresh(self)
        state.log.rate = self.proxy_log_rate
        # The family the socket really has (a listener made with socket.fromfd may be mislabeled).
        family = socket_family(listener)
        state.socket_args = (int(listener.family) if family < 0 else family, int(listener.type), listener.proto)
        selector = selectors.DefaultSelector()
        if hasattr(selector, "fileno"):
            # The wake-up pipe is made now, not when first needed: by then the
            # process may be out of descriptors (and the queue must still drain).
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            state.wakeup = (read_fd, write_fd)
            selector.register(read_fd, selectors.EVENT_READ, _WAKEUP)
            selector.register(self.socket, selectors.EVENT_READ, _LISTENER)
            state.listening = True
            state.selector = selector
        else:  # pragma: no cover - platforms whose selector has no pollable descriptor
            selector.close()
        self._pp_state = state
        return state

    def _pp_accept_one(self, state: _State) -> tuple[ProxySocket, Address, Trust | None, float | None]:
        """Accept the raw connection (no TLS handshake) as a ProxySocket, with its trust decision and timeout.

        The decision is None when the configuration is invalid: the connection must be closed.
        """
        listener = self.socket
        # The plain socket's accept, not the listener's own: a TLS listener would handshake
        # here, in the serving loop, before the header is read.  It runs socket.accept's steps
        # with ProxySocket as the class (accept() then detach() into a second object measured
        # 7 us more per connection), and with the listener's family, type and proto read
        # once, not through the enum-converting properties every time.
        fd, peer = _ACCEPT(listener)
        family, kind, proto = state.socket_args
        sock = ProxySocket(family, kind, proto, fd)
        timeout = _getdefaulttimeout()  # what the new socket's timeout is
        if timeout is None and listener.gettimeout():
            sock.setblocking(True)
        sock.proxy_header = None
        settings = state.settings
        if settings.refresh(self) or settings.reported:
            # Trust changed since the last connection (or was broken): never keep serving
            # with the old values, never trust an untrusted peer because of a bad new one.
            if not settings.usable("closing every new connection", "serving connections"):
                return sock, peer, None, timeout
        # Whether proxy_policy_for is overridden is asked per connection: a hook assigned on
        # the instance or the class while serving must take effect, like every other setting.
        if type(self).proxy_policy_for is not _DEFAULT_POLICY_FOR or "proxy_policy_for" in self.__dict__:
            try:
                trust = hook_trust(self.proxy_policy_for(peer, sock.getsockname()))
            except Exception as exc:  # a user's hook: its failure closes this connection, never the loop
                state.log.log(
                    logging.ERROR,
                    "%s: closed: proxy_policy_for failed: %s: %s",
                    peer_text(peer),
                    type(exc).__name__,
                    exc,
                    kind=KIND_POLICY_FOR,
                )
                return sock, peer, None, timeout
        else:  # proxy_policy_for's default, without the call
            trust = self._pp_default_trust(settings, peer)
        return sock, peer, trust, timeout

    def _pp_accept(self, state: _State, now: float | None = None, evicted: bool = False) -> None:
        try:
            sock, peer, trust, timeout = self._pp_accept_one(state)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS and state.parked and not evicted:
                # Out of descriptors while connections wait for their header: give the oldest
                # one's place to the newcomer (a real proxy sends its header at once, so the
                # oldest parked connection is the likeliest attacker), and accept again.
                if not state.accept_failing:
                    logger.error("accept() failed: %s; closing connections still waiting for their header", exc)
                    state.accept_failing = True
                self._pp_evict_oldest(state, "the process is out of file descriptors")
                return self._pp_accept(state, now, evicted=True)
            if exc.errno in _ACCEPT_RESOURCE_ERRORS and state.selector is not None:
                if not state.accept_failing:
                    logger.error("accept() failed: %s; pausing the listener until it works again", exc)
                    state.accept_failing = True
                self._pp_listen(state, False)
                state.accept_resume_at = (time.monotonic() if now is None else now) + ACCEPT_BACKOFF
            else:
                logger.warning("accept() failed: %s", exc)
            return
        if state.accept_failing and not evicted:
            logger.warning("accept() works again")
            state.accept_failing = False
        if trust is None:
            sock.close()
            return
        policy, trusted = trust
        if policy is Policy.SKIP:
            state.ready.append((sock, peer))
            return
        if timeout:
            sock.settimeout(0.0)  # a timeout would make CPython wait before recv, whatever the flags
        elif policy is not Policy.REJECT:
            # The common case: the header came with the connection, whole and valid.  Serve it
            # without building the per-connection state machine; anything else takes the long way.
            try:
                header = take_complete_header(
                    sock, self.proxy_max_header_size, self.proxy_verify_checksum, self.proxy_allow_v4_in_tcp6
                )
            except OSError as exc:
                state.log.log(
                    logging.INFO,
                    "%s: closed: %s while reading the PROXY header",
                    peer_text(peer),
                    exc,
                    kind=KIND_READ_ERROR,
                )
                sock.close()
                return
            if header is not None:
                _queue(state, sock, header, policy, peer, trusted)
                return
        if now is None:
            now = time.monotonic()
        parked = _Parked(self._pp_attempt(sock, policy), peer, now + self.proxy_header_timeout, timeout, trusted)
        self._pp_step(state, parked, now)

    def _pp_attempt(self, sock: ProxySocket, policy: Policy) -> HeaderAttempt:
        return HeaderAttempt(
            sock,
            policy,
            max_size=self.proxy_max_header_size,
            verify_checksum=self.proxy_verify_checksum,
            allow_v4_in_tcp6=self.proxy_allow_v4_in_tcp6,
        )

    def _pp_step(self, state: _State, parked: _Parked, now: float) -> None:
        """Advance one connection; conclude, or (re)park it."""
        attempt = parked.attempt
        try:
            done = attempt.step()
        except OSError as exc:
            self._pp_unpark(state, parked)
            state.log.log(
                logging.INFO,
                "%s: closed: %s while reading the PROXY header",
                peer_text(parked.peer),
                exc,
                kind=KIND_READ_ERROR,
            )
            attempt.sock.close()
            return
        if done:
            self._pp_unpark(state, parked)
            self._pp_conclude(state, parked)
        else:
            self._pp_park(state, parked, now)

    def _pp_park(self, state: _State, parked: _Parked, now: float) -> None:
        sock = parked.attempt.sock
        fd = sock.fileno()
        if fd not in state.parked:
            cap = self.proxy_max_pending
            while state.parked and len(state.parked) >= cap:
                self._pp_evict_oldest(state, f"{cap} connections already wait for their header (proxy_max_pending)")
            state.parked[fd] = parked
        selector = state.selector
        assert selector is not None
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
                epoll.modify(fd, select.EPOLLIN | _EPOLLET)
                parked.edge = True
            else:
                selector.unregister(sock)
                parked.registered = False
                parked.retry_at = now + RETRY_DELAY

    def _pp_evict_oldest(self, state: _State, reason: str) -> None:
        """Close the connection that has waited longest for its header."""
        oldest = next(iter(state.parked.values()))
        self._pp_unpark(state, oldest)
        state.log.log(logging.WARNING, "%s: closed: %s", peer_text(oldest.peer), reason, kind=KIND_EVICTED)
        oldest.attempt.sock.close()

    def _pp_listen(self, state: _State, on: bool) -> None:
        """Register the listener with the selector, or take it out (back-off, children at the cap)."""
        if on is state.listening or state.selector is None:
            return
        if on:
            state.selector.register(self.socket, selectors.EVENT_READ, _LISTENER)
        else:
            state.selector.unregister(self.socket)
        state.listening = on

    def _pp_unpark(self, state: _State, parked: _Parked) -> None:
        sock = parked.attempt.sock
        if parked.registered and state.selector is not None:
            state.selector.unregister(sock)
            parked.registered = False
        state.parked.pop(sock.fileno(), None)

    def _pp_poll(self, state: _State) -> None:
        """Accept and advance whatever the selector reports ready, then enforce deadlines."""
        assert state.selector is not None
        now = time.monotonic()
        for key, _ in state.selector.select(0):
            if key.data is _LISTENER:
                self._pp_accept(state, now)
            elif key.data is not _WAKEUP:
                parked = state.parked.get(key.fd)
                if parked is key.data:  # (one evicted by an accept earlier in this batch is gone)
                    self._pp_step(state, parked, now)
        self._pp_expire(state, now)

    def _pp_expire(self, state: _State, now: float) -> None:
        """Close or serve the parked connections whose deadline has passed; retry the timed ones."""
        if state.accept_resume_at and now >= state.accept_resume_at and state.selector is not None:
            state.accept_resume_at = 0.0
            self._pp_listen(state, not state.children_full)
        if not state.parked:
            return
        for parked in list(state.parked.values()):
            if parked.deadline <= now:
                self._pp_unpark(state, parked)
                parked.attempt.timed_out()
                self._pp_conclude(state, parked)
            elif parked.attempt.needs_retry and not parked.edge and parked.retry_at <= now:
                self._pp_step(state, parked, now)
        self._pp_signal(state, bool(state.ready) and not state.children_full)

    def _pp_conclude(self, state: _State, parked: _Parked) -> None:
        """Apply the policy table: queue the connection for service, or close and log it."""
        attempt = parked.attempt
        sock = attempt.sock
        assert attempt.outcome is not None
        verdict = decide(attempt.policy, attempt.outcome)
        if not verdict.serve:
            state.log.log(
                verdict.level,
                "%s: closed: %s",
                peer_text(parked.peer),
                attempt.describe(self.proxy_header_timeout),
                kind=kind_of(attempt.outcome),
            )
            sock.close()
            return
        try:
            attempt.release()
            if sock.gettimeout() != parked.saved_timeout:
                sock.settimeout(parked.saved_timeout)
        except OSError as exc:  # pragma: no cover - the peer vanished meanwhile
            state.log.log(logging.INFO, "%s: closed: %s", peer_text(parked.peer), exc, kind=KIND_READ_ERROR)
            sock.close()
            return
        assert isinstance(sock, ProxySocket)
        _queue(state, sock, attempt.header, attempt.policy, parked.peer, parked.trusted)

    def _pp_signal(self, state: _State, pending: bool) -> None:
        """Keep the selector readable while completed connections are queued."""
        if pending == state.signalled or state.wakeup is None:
            return
        if pending:
            os.write(state.wakeup[1], b"!")
        else:
            try:
                os.read(state.wakeup[0], 64)
            except BlockingIOError:  # pragma: no cover
                pass
        state.signalled = pending

    def _pp_forget_in_child(self, state: _State, keep: Any) -> None:
        """In a forked child: close the parent's connections and selector, touching nothing shared.

        Closing a descriptor in the child leaves the parent's copy (and the
        shared epoll registrations) alone; unregistering would not.
        """
        self._pp_state = None
        for parked in state.parked.values():
            if parked.attempt.sock is not keep:
                parked.attempt.sock.close()
        for request, _ in state.ready:
            if request is not keep:
                request.close()
        if state.selector is not None:
            state.selector.close()
        if state.wakeup is not None:
            os.close(state.wakeup[0])
            os.close(state.wakeup[1])

    def _pp_get_request_blocking(self, state: _State) -> tuple[ProxySocket, Address]:  # pragma: no cover
        """Fallback without a pollable selector: read the header in the loop, bounded by the timeout."""
        sock, peer, trust, saved = self._pp_accept_one(state)
        if trust is None:
            sock.close()
            raise OSError("proxyproto: connection closed: invalid settings")
        policy, trusted = trust
        if policy is Policy.SKIP:
            return sock, peer
        sock.settimeout(0.0)
        deadline = time.monotonic() + self.proxy_header_timeout
        parked = _Parked(self._pp_attempt(sock, policy), peer, deadline, saved, trusted)
        try:
            wait_for_outcome(parked.attempt, parked.deadline)
        except OSError as exc:
            state.log.log(
                logging.INFO,
                "%s: closed: %s while reading the PROXY header",
                peer_text(peer),
                exc,
                kind=KIND_READ_ERROR,
            )
            sock.close()
            raise
        self._pp_conclude(state, parked)
        if not state.ready:
            raise OSError("proxyproto: connection closed by policy")
        return state.ready.popleft()


_DEFAULT_POLICY_FOR = ProxyProtocolMixin.proxy_policy_for
#: The hooks the mixin overrides whose socketserver versions do not call super(): a
#: socketserver class defining one must come after the mixin in the class order.
_HOOKS = frozenset(
    name
    for name in ("get_request", "fileno", "service_actions", "handle_timeout", "collect_children", "finish_request")
    if name in vars(ProxyProtocolMixin)
)

_BACKLOG = 128


class ProxyTCPServer(ProxyProtocolMixin, socketserver.TCPServer):
    """Synchronous TCP server reading the PROXY header first."""

    request_queue_size = _BACKLOG


class ThreadingProxyTCPServer(ProxyProtocolMixin, socketserver.ThreadingTCPServer):
    """A thread per connection, the PROXY header read first."""

    request_queue_size = _BACKLOG


class ProxyUnixStreamServer(ProxyProtocolMixin, socketserver.UnixStreamServer):
    """Synchronous UNIX-socket stream server reading the PROXY header first."""

    request_queue_size = _BACKLOG


class ThreadingProxyUnixStreamServer(ProxyProtocolMixin, socketserver.ThreadingUnixStreamServer):
    """A thread per connection on a UNIX socket, the PROXY header read first."""

    request_queue_size = _BACKLOG


if hasattr(os, "fork"):

    class ForkingProxyTCPServer(ProxyProtocolMixin, socketserver.ForkingTCPServer):
        """A child process per connection, the PROXY header read first."""

        request_queue_size = _BACKLOG

    class ForkingProxyUnixStreamServer(ProxyProtocolMixin, socketserver.ForkingMixIn, socketserver.UnixStreamServer):
        """A child process per connection on a UNIX socket, the PROXY header read first."""

        request_queue_size = _BACKLOG
