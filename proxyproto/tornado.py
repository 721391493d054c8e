"""Tornado: the PROXY header read from the raw connection, before Tornado wraps TLS or parses HTTP.

Tornado's ``TCPServer`` accepts a connection in ``_handle_connection``,
wraps it in TLS there when it has ``ssl_options``, makes the ``IOStream`` and
calls ``handle_stream(stream, address)``.  A header sent before TLS (haproxy's
``send-proxy`` in front of TLS passthrough) would reach the TLS layer, so the
header is read before all that, from the raw socket: :class:`ProxyTCPServerMixin`
overrides ``_handle_connection`` to read it, then lets Tornado's own code run
with the address the policy table gives (the header's source for a trusted
proxy), so ``handle_stream`` and an ``HTTPServer``'s ``request.remote_ip``
see the real client, and ``ssl_options`` negotiate TLS after the header.

How it reads (the argument for peeking rather than reading with the IOStream):
the bytes after the header must reach Tornado intact, and with
``ssl_options`` they are a ClientHello that only the TLS layer may read, and
``IOStream.start_tls`` refuses a stream that has buffered anything.  So the
header is peeked at on the raw socket (``MSG_PEEK``) and exactly its bytes
are consumed (:class:`proxyproto.sock.HeaderAttempt`, the socketserver
mixin's reader): every byte after it stays in the kernel, for Tornado's TLS
layer or its IOStream, and nothing is ever pushed back into a buffer.  A
header that is not all there when the connection is accepted (real proxies
send it with the first segment) waits on the IOLoop: its socket is watched
with ``add_handler`` and a ``call_later`` deadline (``header_timeout``)
closes or serves it, as the policy table says, without stalling anyone
else; at most ``max_pending`` such connections wait
(:class:`proxyproto.parking.Parking`).  Under the opt-in policies an
ambiguous prefix (``PR``) stays in the kernel, and the socket is watched for
one more byte with ``SO_RCVLOWAT`` (Linux TCP; elsewhere a short timer), as
the socketserver mixin does: nothing spins.

Every decision is the engine's: :meth:`proxyproto.settings.Settings.trust`,
the scanner, :func:`proxyproto.policy.decide`; refusal lines go through a
:class:`~proxyproto.refusal_log.RefusalLog`.  Tornado is imported when this
module is, which only its users do.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

# Tornado ships type hints; on a [test]-only install mypy finds no module (hence the ignores).
from tornado.http1connection import HTTP1ServerConnection  # type: ignore[import-not-found,unused-ignore]
from tornado.httpserver import HTTPServer, _HTTPRequestContext  # type: ignore[import-not-found,unused-ignore]
from tornado.ioloop import IOLoop  # type: ignore[import-not-found,unused-ignore]
from tornado.iostream import IOStream, SSLIOStream  # type: ignore[import-not-found,unused-ignore]

from .advice import SIGNATURE_PEEK, handed_on, note_untrusted_header, refusal_line, starts_with_header
from .aio_protocol import call_later
from .header import ProxyHeader
from .parking import Parking
from .policy import SERVES_A_HEADER, Policy, Trust, decide, peer_text, served_address
from .refusal_log import KIND_READ_ERROR, KIND_TLS, KIND_UNTRUSTED_HEADER, RefusalLog, kind_of, listener_text
from .settings import Settings, settings_for, split_knobs
from .sock import RETRY_DELAY, HeaderAttempt, take_complete_header

__all__ = ["ProxyHTTPServer", "ProxyTCPServerMixin", "header"]

logger = logging.getLogger("proxyproto")

_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


# -- the address handle_stream is given ------------------------------------------------------------


class _Carrier:
    """What a served connection's address carries besides itself (class defaults: nothing from a proxy)."""

    #: The PROXY header a trusted peer sent on this connection (also LOCAL, UNKNOWN; also under IGNORE), else None.
    proxy_header: ProxyHeader | None = None
    #: The socket's own peer address: the proxy's, when a header gave the client's.
    proxy_peer: Any = None
    #: Whether the address is the header's source (a trusted PROXY header with addresses, under REQUIRE or USE).
    from_header = False


class _ProxyIPAddress(_Carrier, tuple):  # type: ignore[type-arg]
    """An IP address as ``handle_stream`` gets it: equal to the tuple, plus :class:`_Carrier`'s attributes."""


class _ProxyUnixAddress(_Carrier, str):
    """A UNIX peer's address (Tornado gives ``str``) with the same attributes."""


class _ProxyAbstractAddress(_Carrier, bytes):
    """An abstract UNIX peer's address (``bytes``) with the same attributes."""


_CARRIERS: dict[type, type] = {tuple: _ProxyIPAddress, str: _ProxyUnixAddress, bytes: _ProxyAbstractAddress}


def _carrying(address: Any, proxy_header: ProxyHeader | None, peer: Any, from_header: bool) -> Any:
    """``address`` as a :class:`_Carrier` of the header and the peer (unchanged when its type has none)."""
    kind = _CARRIERS.get(type(address))
    if kind is None:
        return address
    carried = kind(address)
    carried.proxy_header, carried.proxy_peer, carried.from_header = proxy_header, peer, from_header
    return carried


def header(source: Any) -> ProxyHeader | None:
    """The PROXY header a trusted proxy sent on the connection of ``source``, else None.

    ``source``: a ``tornado.httputil.HTTPServerRequest`` (a ``RequestHandler``'s
    ``self.request``), its ``request.connection.context``, or the ``address``
    a :class:`ProxyTCPServerMixin` server's ``handle_stream`` is given.  A
    header from an untrusted peer is never returned (never kept).
    """
    context = getattr(getattr(source, "connection", None), "context", None)
    if context is not None:
        source = context
    found = getattr(source, "proxy_header", None)
    return found if isinstance(found, ProxyHeader) else None


# -- one connection until its header is in ---------------------------------------------------------


class _Waiting:
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
            self.server._proxy_log.log(
                logging.INFO,
                "%s: closed: %s while reading the PROXY header",
                peer_text(self.peer),
                exc,
                kind=KIND_READ_ERROR,
            )
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


# -- the mixin --------------------------------------------------------------------------------------


class ProxyTCPServerMixin:
    """A ``tornado.tcpserver.TCPServer`` mixin: each connection's PROXY header is read before TLS and ``handle_stream``.

    ``class EchoServer(ProxyTCPServerMixin, TCPServer)``, constructed with
    ``TCPServer``'s arguments plus the knobs of docs/configuration.rst as
    keywords (``policy``, ``trusted``, ``header_timeout``, ...) or as one
    :class:`~proxyproto.settings.Settings` (``settings=``, keywords on top);
    ``trusted`` defaults to loopback only.  Invalid knobs raise
    ``ValueError`` before anything listens.

    ``handle_stream(stream, address)`` is called once the header is decided,
    with ``address`` the address the policy table serves the connection
    with (the header's source for a trusted proxy's PROXY header), carrying
    ``address.proxy_header`` (:func:`header` reads it) and
    ``address.proxy_peer`` (the socket's own peer).  ``ssl_options``
    negotiate TLS after the header.  Connections refused by the policy are
    closed with one log line (logger ``proxyproto``) and never reach
    ``handle_stream``.  :meth:`stop` also closes the connections still
    waiting for their header.
    """

    proxy_settings: Settings
    _proxy_log: RefusalLog
    _proxy_parking: Parking[_Waiting]

    def __init__(self, *args: Any, settings: Settings | None = None, **kwargs: Any) -> None:
        knobs, rest = split_knobs({"settings": settings, **kwargs})
        self._proxy_setup(knobs)
        super().__init__(*args, **rest)

    def _proxy_setup(self, knobs: dict[str, Any]) -> None:
        """Build the settings from the knobs (``settings`` among them), the refusal log and the parking."""
        knobs = dict(knobs)
        self.proxy_settings = settings_for(knobs.pop("settings", None), knobs)
        self._proxy_log = RefusalLog(logger, self.proxy_settings.log_rate, later=call_later)
        self._proxy_parking = Parking(self._proxy_log, _Waiting.close)

    # -- Tornado's hooks ----------------------------------------------------------------------

    def add_sockets(self, sockets: Any) -> None:
        sockets = list(sockets)
        super().add_sockets(sockets)  # type: ignore[misc]
        listening = [sock.getsockname() for sock in self._sockets.values()]  # type: ignore[attr-defined]
        self._proxy_log.listener = listener_text(*listening)

    def stop(self) -> None:
        """Stop listening (``TCPServer.stop``), and close every connection still waiting for its header."""
        super().stop()  # type: ignore[misc]
        self._proxy_close_waiting()

    def _handle_connection(self, connection: socket.socket, address: Any) -> None:
        """Tornado's accept callback: decide the header on the raw connection, then Tornado's own steps."""
        settings = self.proxy_settings
        try:
            trust: Trust = settings.trust(address, connection)
        except Exception as exc:  # a user's hook: its failure closes this connection, never the loop
            self._proxy_log.hook_failed(address, exc)
            connection.close()
            return
        policy, trusted = trust
        if policy is Policy.SKIP:
            if not trusted and settings.policy_for is None:
                self._proxy_look_at_first_bytes(connection, address)
            self._proxy_serve(connection, address, None, policy, trusted)
            return
        try:
            # A timeout on the socket (socket.setdefaulttimeout) would make CPython wait before each peek.
            connection.setblocking(False)
            if policy in SERVES_A_HEADER:  # the common path: the whole header arrived with the connection
                found = take_complete_header(
                    connection, settings.max_header_size, settings.verify_checksum, settings.allow_v4_in_tcp6
                )
                if found is not None:
                    self._proxy_serve(connection, address, found, policy, trusted)
                    return
            attempt = HeaderAttempt(
                connection,
                policy,
                max_size=settings.max_header_size,
                verify_checksum=settings.verify_checksum,
                allow_v4_in_tcp6=settings.allow_v4_in_tcp6,
            )
            done = attempt.step()
        except OSError as exc:
            self._proxy_log.log(
                logging.INFO,
                "%s: closed: %s while reading the PROXY header",
                peer_text(address),
                exc,
                kind=KIND_READ_ERROR,
            )
            connection.close()
            return
        if done:
            self._proxy_conclude(attempt, address, trusted)
            return
        waiting = _Waiting(self, attempt, address, trusted)
        self._proxy_parking.add(waiting, address, connection.fileno(), settings.max_pending)
        waiting.wait()

    # -- the decision -------------------------------------------------------------------------

    def _proxy_conclude(self, attempt: HeaderAttempt, peer: Any, trusted: bool) -> None:
        """Apply the policy table's cell to the attempt's outcome: serve, or close with one line."""
        settings = self.proxy_settings
        outcome = attempt.outcome
        assert outcome is not None
        sock = attempt.sock
        verdict = decide(attempt.policy, outcome)
        if not verdict.serve:
            hooked = settings.policy_for is not None
            reason = refusal_line(settings, attempt.policy, outcome, attempt.scanner, trusted, hooked)
            self._proxy_log.log(verdict.level, "%s: closed: %s", peer_text(peer), reason, kind=kind_of(outcome))
            sock.close()
            return
        try:
            attempt.release()  # SO_RCVLOWAT back to one byte, for Tornado's reads
        except OSError as exc:  # pragma: no cover - the peer vanished meanwhile
            self._proxy_log.log(logging.INFO, "%s: closed: %s", peer_text(peer), exc, kind=KIND_READ_ERROR)
            sock.close()
            return
        self._proxy_serve(sock, peer, attempt.header, attempt.policy, trusted)

    def _proxy_serve(
        self, connection: socket.socket, peer: Any, found: ProxyHeader | None, policy: Policy, trusted: bool
    ) -> None:
        """Hand the connection to Tornado (TLS, IOStream, ``handle_stream``) with the address it is served with."""
        settings = self.proxy_settings
        found = handed_on(self._proxy_log, settings, peer, policy, found, trusted, settings.policy_for is not None)
        address = peer if found is None else served_address(policy, found, peer, connection.family)
        carried = _carrying(address, found, peer, address is not peer)
        super()._handle_connection(connection, carried)  # type: ignore[misc]

    def _proxy_look_at_first_bytes(self, connection: socket.socket, peer: Any) -> None:
        """An untrusted peer under SKIP: a WARNING if a PROXY header has already arrived (it stays payload)."""
        if not self._proxy_log.wants(KIND_UNTRUSTED_HEADER):
            return
        try:
            connection.setblocking(False)  # as Tornado's IOStream will: no wait before the peek
            start = connection.recv(SIGNATURE_PEEK, _PEEK)
        except OSError:
            return
        if starts_with_header(start):
            note_untrusted_header(self._proxy_log, self.proxy_settings, peer, Policy.SKIP)

    def _proxy_close_waiting(self) -> None:
        """Close every connection still waiting for its header (nothing was served on them)."""
        parking = self._proxy_parking
        for waiting in list(parking.waiting):
            waiting.close()


# -- the HTTP server --------------------------------------------------------------------------------


class ProxyRequestContext(_HTTPRequestContext):  # type: ignore[misc,unused-ignore]
    """Tornado's per-connection request context, with the header, the proxy's address, and xheaders kept in place.

    ``remote_ip`` is the address the connection is served with (the
    header's source for a trusted proxy), also on a UNIX listener;
    ``address`` the whole tuple (its port: ``address[1]``);
    ``proxy_header`` and ``proxy_peer`` as :class:`ProxyTCPServerMixin`
    gives them.  With ``xheaders=True``, X-Real-Ip and X-Forwarded-For do
    not replace an address a trusted PROXY header gave, unless
    ``xheaders_over_header``; X-Scheme and X-Forwarded-Proto keep
    Tornado's meaning.
    """

    def __init__(
        self, stream: IOStream, address: Any, protocol: str | None, trusted_downstream: Any, xheaders_over_header: bool
    ) -> None:
        super().__init__(stream, address, protocol, trusted_downstream)
        self.proxy_header: ProxyHeader | None = getattr(address, "proxy_header", None)
        self.proxy_peer: Any = getattr(address, "proxy_peer", address)
        from_header = bool(getattr(address, "from_header", False))
        if from_header and isinstance(address, tuple):  # a UNIX listener's context would say "0.0.0.0"
            self.remote_ip = self._orig_remote_ip = address[0]
        self._proxy_pinned = from_header and not xheaders_over_header

    def _apply_xheaders(self, headers: Any) -> None:
        remote_ip = self.remote_ip
        super()._apply_xheaders(headers)
        if self._proxy_pinned:
            self.remote_ip = remote_ip


class ProxyHTTPServer(ProxyTCPServerMixin, HTTPServer):  # type: ignore[misc,unused-ignore]
    """``tornado.httpserver.HTTPServer`` whose connections start with a PROXY header.

    ``ProxyHTTPServer(app, ssl_options=..., xheaders=..., ...)``: Tornado's
    arguments, plus the knobs (keywords or ``settings=``) and
    ``xheaders_over_header`` (see :class:`ProxyRequestContext`).
    ``request.remote_ip`` is the real client, its port
    ``request.connection.context.address[1]``, and the header
    ``header(request)`` (also ``request.connection.context.proxy_header``).
    ``ssl_options`` negotiate TLS after the header; the handshake must end
    within ``header_timeout`` of the header's end.  Graceful shutdown as
    Tornado's: ``stop()`` (which also closes connections still waiting for
    their header), then ``await close_all_connections()``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # HTTPServer is Configurable: initialize() does the work, as in Tornado

    def initialize(
        self,
        request_callback: Any,
        *args: Any,
        settings: Settings | None = None,
        xheaders_over_header: bool = False,
        **kwargs: Any,
    ) -> None:
        knobs, rest = split_knobs({"settings": settings, **kwargs})
        self._proxy_setup(knobs)
        self.xheaders_over_header = xheaders_over_header
        super().initialize(request_callback, *args, **rest)

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        # HTTPServer.handle_stream, with the context that carries the header.
        context = ProxyRequestContext(
            stream, address, self.protocol, self.trusted_downstream, self.xheaders_over_header
        )
        conn = HTTP1ServerConnection(stream, self.conn_params, context)
        self._connections.add(conn)
        conn.start_serving(self)
        if isinstance(stream, SSLIOStream):
            self._proxy_bound_handshake(stream, address)

    async def close_all_connections(self) -> None:
        """Close the connections still waiting for their header, then Tornado's (which it waits for)."""
        self._proxy_close_waiting()
        await super().close_all_connections()

    def _proxy_bound_handshake(self, stream: SSLIOStream, address: Any) -> None:
        """Close a TLS connection whose handshake has not ended ``header_timeout`` seconds after its header."""
        io_loop = IOLoop.current()
        handshake = stream.wait_for_handshake()
        peer = getattr(address, "proxy_peer", address)
        timeout = self.proxy_settings.header_timeout

        def expire() -> None:
            if not handshake.done():
                self._proxy_log.log(
                    logging.INFO,
                    "%s: closed: TLS handshake not done within %g s",
                    peer_text(peer),
                    timeout,
                    kind=KIND_TLS,
                )
                stream.close()

        timer = io_loop.call_later(timeout, expire)

        def done(future: Any) -> None:
            io_loop.remove_timeout(timer)
            if not future.cancelled():
                future.exception()  # Tornado logs a failed handshake itself

        handshake.add_done_callback(done)
