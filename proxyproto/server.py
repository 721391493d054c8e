"""ProxyProtocolMixin: socketserver servers that read the PROXY header first.

The mixin overrides the ``socketserver`` hooks it must, each a few lines
that call ``super()``, and leaves the waiting to a
:class:`~proxyproto.waiting.WaitingRoom`, made when serving starts: the
serving loop never blocks on a header (how: :mod:`proxyproto.waiting`).
What stays here is what is the server's own: accepting the raw connection
(no TLS handshake in the loop), deciding whom to believe
(``proxy_policy_for``), the ``proxy_*`` settings, the forking server's
``max_children``, and the TLS hand-over in ``finish_request``.

Configuration is by class attribute, overridable per subclass or instance,
as ``socketserver`` does it, at any time: a change made while serving takes
effect from the next connection (trust is re-read per connection, see
:mod:`proxyproto.settings`), an invalid value set on the instance is refused
where it is set.  See DESIGN.md's policy table for what each policy serves,
closes and logs; refusal lines are rate-limited per listener
(``proxy_log_rate``, :mod:`proxyproto.refusal_log`).
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import sys
from typing import Any, Callable

from . import waiting
from .advice import untrusted_look, warn_if_every_peer_trusted
from .attributes import LiveSettings, SettingsAttributes, check_attributes
from .header import ProxyHeader
from .policy import Policy, Trust, peer_text
from .refusal_log import DEFAULT_LOG_RATE, KIND_TLS, RefusalLog, listener_text
from .settings import DEFAULT_TRUSTED, Settings
from .settings import KNOBS as ALL_KNOBS
from .sock import look_at_first_read
from .waiting import WaitingRoom

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


def _public_accept(listener: socket.socket) -> tuple[int, Any]:
    """``(fd, address)`` of a new connection through the public ``socket.socket.accept`` (no handshake)."""
    conn, peer = socket.socket.accept(listener)
    return conn.detach(), peer


# socket.socket._accept is the C accept() that socket.socket.accept wraps (there since Python 3.3):
# one socket object per connection instead of two (docs/platforms.rst); the public path otherwise.
_ACCEPT: Callable[[socket.socket], tuple[int, Any]] = getattr(socket.socket, "_accept", None) or _public_accept
_getdefaulttimeout = socket.getdefaulttimeout

#: The knobs the mixin has as ``proxy_*`` attributes (every one but ``policy_for``, a method here).
KNOBS = tuple(knob for knob in ALL_KNOBS if knob != "policy_for")

Address = Any  # what socket.accept() gives: a tuple for IP families, str or bytes for AF_UNIX


class ProxySocket(socket.socket):
    """An accepted connection: a real socket, plus the header it started with.

    ``proxy_header`` is the parsed :class:`ProxyHeader` whenever one was
    parsed from a trusted peer (also under IGNORE, and for LOCAL), else None:
    a header from an untrusted peer never reaches the handler
    (:class:`~proxyproto.policy.Trust`).
    """

    __slots__ = ("proxy_header",)

    proxy_header: ProxyHeader | None


class ProxyProtocolMixin(SettingsAttributes):
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

    #: While serving: the connections waiting for their header (made when serving starts).
    _pp_room: WaitingRoom | None = None
    _proxy_knobs = KNOBS

    # socketserver attributes the mixin relies on (declared for type checkers).
    socket: socket.socket
    server_address: Any
    timeout: float | None

    # -- configuration -----------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, when the class is made, the combinations in which the mixin cannot work (:func:`_check_bases`)."""
        super().__init_subclass__(**kwargs)
        _check_bases(cls)


    # -- socketserver hooks ----------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """As socketserver's, after checking the configuration (so a refusal keeps its message)."""
        self._proxy_serve_forever(lambda: self._pp_room or self._pp_start(), poll_interval)

    def handle_request(self) -> None:
        """As socketserver's, after checking the configuration (so a refusal keeps its message).

        While the listener rests after ``accept()`` ran out of descriptors, the
        rest of the back-off is waited out first: a ``handle_request`` loop
        without ``timeout`` would otherwise never wake to resume it.
        """
        room = self._pp_room or self._pp_start()
        if room.accept_resume_at:
            room.wait_out_backoff()
        super().handle_request()  # type: ignore[misc]

    def fileno(self) -> int:
        """The waiting room's descriptor: readable when a connection or a parked header progresses."""
        descriptor = (self._pp_room or self._pp_start()).descriptor
        return self.socket.fileno() if descriptor is None else descriptor

    def get_request(self) -> tuple[ProxySocket, Address]:
        """The next connection whose header is complete, with the address it is served with."""
        return (self._pp_room or self._pp_start()).next_request()

    def service_actions(self) -> None:
        """The base class's actions (ForkingMixIn reaps children), then the header deadlines and refusal summaries."""
        super().service_actions()  # type: ignore[misc]
        room = self._pp_room
        if room is not None:
            room.tidy(room.live.current.log_rate)

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
        room = self._pp_room
        if room is not None and cap is not None:
            room.pause_for_children(active is not None and len(active) >= cap)

    def handle_timeout(self) -> None:
        """``handle_request()`` timed out: enforce header deadlines and write a due summary there too.

        (``handle_request()`` never calls ``service_actions``.)
        """
        room = self._pp_room
        if room is not None:
            room.after_timeout()
        super().handle_timeout()  # type: ignore[misc]

    def finish_request(self, request: Any, client_address: Address) -> None:
        """Run the handler; in a forked child, first drop the parent's connections; wrap TLS."""
        room = self._pp_room
        if room is not None and room.generation != waiting.fork_generation:
            self._pp_room = self._proxy_live = None
            room.close(keep=request)  # the parent's connections, not this child's own
        listener = self.socket
        ssl = None if type(listener) is socket.socket else sys.modules.get("ssl")
        if ssl is None or not isinstance(listener, ssl.SSLSocket):
            super().finish_request(request, client_address)  # type: ignore[misc]
            return
        tls = _handshake_later(listener, request, client_address, None if room is None else room.log)
        if tls is None:
            return
        try:
            super().finish_request(tls, client_address)  # type: ignore[misc]
        finally:
            self.shutdown_request(tls)  # type: ignore[attr-defined]

    def server_close(self) -> None:
        """Close the listener as socketserver does, and every connection still held."""
        room = self._pp_room
        self._pp_room = self._proxy_live = None
        if room is not None:
            room.close()
        super().server_close()  # type: ignore[misc]

    # -- accepting -------------------------------------------------------------------

    def _pp_start(self) -> WaitingRoom:
        """Validate the configuration and open the waiting room, listener registered (when serving starts)."""
        check_attributes(self, KNOBS)  # ValueError naming the attribute
        if self.socket.type != socket.SOCK_STREAM:
            raise TypeError(
                "ProxyProtocolMixin needs a stream socket; for UDP use proxyproto.udp.ProxyUDPServer, "
                "ThreadingProxyUDPServer or ProxyDatagramMixin"
            )
        live = LiveSettings(KNOBS)
        live.refresh(self)
        warn_if_every_peer_trusted(live.current)
        log = RefusalLog(logger, live.current.log_rate, name_of=live.current.name_of)
        log.listener = listener_text(self.server_address)
        room = WaitingRoom(self, self._pp_accept, log, live)
        self._proxy_live = live
        self._pp_room = room
        return room

    def _pp_accept(self, room: WaitingRoom) -> tuple[ProxySocket, Address, Trust | None, float | None]:
        """Accept the raw connection (no TLS handshake) as a ProxySocket, with its trust decision and timeout.

        The decision is None when the configuration is invalid or the hook
        failed: the connection must be closed.
        """
        listener = self.socket
        # The plain socket's accept, not the listener's own: a TLS listener would handshake
        # here, in the serving loop, before the header is read.  It runs socket.accept's steps
        # with ProxySocket as the class (one object per connection, not two: bench/README.md),
        # and with the listener's family, type and proto read once, not through the
        # enum-converting properties every time.
        fd, peer = _ACCEPT(listener)
        family, kind, proto = room.socket_args
        sock = ProxySocket(family, kind, proto, fd)
        timeout = _getdefaulttimeout()  # what the new socket's timeout is
        if timeout is None and listener.gettimeout():
            sock.setblocking(True)
        sock.proxy_header = None
        live = self._proxy_live
        assert live is not None
        if live.refresh(self) or live.reported:
            # The settings changed since the last connection (or were broken): never keep serving
            # with the old values, never trust an untrusted peer because of a bad new one.
            if not live.usable("closing every new connection", "serving connections"):
                return sock, peer, None, timeout
        hook = self._proxy_hook()
        live.hooked = hook is not None
        try:
            trust = live.current.trust(peer, sock, hook)
        except Exception as exc:  # a user's hook: its failure closes this connection, never the loop
            room.log.hook_failed(peer, exc, "proxy_policy_for")
            return sock, peer, None, timeout
        if trust.policy is Policy.SKIP and not trust.trusted and hook is None:
            self._pp_look_at_first_bytes(sock, peer, room.log, live.current)
        return sock, peer, trust, timeout

    @staticmethod
    def _pp_look_at_first_bytes(sock: ProxySocket, peer: Address, log: RefusalLog, settings: Settings) -> None:
        """An untrusted peer under SKIP: a WARNING if the first bytes its handler reads are a PROXY header."""
        look_at_first_read(sock, untrusted_look(log, settings, peer))


def _check_bases(cls: type) -> None:
    """TypeError for a server class in which the mixin cannot work.

    On a datagram server ``accept()`` fails for every packet (the loop
    would spin logging it); placed after the server class in the bases,
    the mixin is silently inactive and the PROXY line reaches the handler
    as payload.  Both are mistakes that must not reach production quietly.
    """
    if not issubclass(cls, socketserver.BaseServer):
        return  # a mixin stack not yet combined with a server class
    socket_type = getattr(cls, "socket_type", socket.SOCK_STREAM)
    if socket_type != socket.SOCK_STREAM:
        raise TypeError(
            f"{cls.__name__}: ProxyProtocolMixin needs a stream server (TCPServer, UnixStreamServer); "
            "for UDP use proxyproto.udp.ProxyUDPServer, ThreadingProxyUDPServer or ProxyDatagramMixin"
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


def _handshake_later(listener: Any, request: Any, client_address: Address, log: RefusalLog | None) -> Any:
    """``request`` wrapped in TLS as the listener ``listener`` would have; None (logged) when that fails.

    The handshake runs where the handler runs (its thread or child, or in the
    loop for the sync classes, as without the mixin) when the listener says
    ``do_handshake_on_connect``; the header stays on ``proxy_header``.
    """
    try:
        tls = listener.context.wrap_socket(
            request,
            server_side=True,
            do_handshake_on_connect=listener.do_handshake_on_connect,
            suppress_ragged_eofs=listener.suppress_ragged_eofs,
        )
    except OSError as exc:
        message = "%s: closed: TLS handshake failed: %s"
        if log is None:
            logger.info(message, peer_text(client_address), exc)
        else:
            log.log(logging.INFO, message, peer_text(client_address), exc, kind=KIND_TLS)
        return None
    tls.proxy_header = getattr(request, "proxy_header", None)
    return tls


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
