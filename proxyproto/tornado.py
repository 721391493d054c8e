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

import inspect
import logging
import socket
from typing import Any, Callable

# Tornado ships type hints; on a [test]-only install mypy finds no module (hence the ignores).
from tornado.http1connection import HTTP1ServerConnection  # type: ignore[import-not-found,unused-ignore]
from tornado.httpserver import HTTPServer, _HTTPRequestContext  # type: ignore[import-not-found,unused-ignore]
from tornado.iostream import IOStream, SSLIOStream  # type: ignore[import-not-found,unused-ignore]
from tornado.tcpserver import TCPServer  # type: ignore[import-not-found,unused-ignore]

from .advice import SIGNATURE_PEEK, handed_on, refusal_line, untrusted_look, warn_if_every_peer_trusted
from .aio_protocol import call_later
from .header import ProxyHeader
from .parking import Parking
from .policy import SERVES_A_HEADER, Policy, Trust, decide, peer_text, pins_the_client, served_address
from .refusal_log import KIND_READ_ERROR, KIND_UNTRUSTED_HEADER, RefusalLog, kind_of, listener_text
from .settings import Settings, settings_for, split_knobs
from .sock import HeaderAttempt, take_complete_header
from .tornado_parked import Handshake, Waiting, close_held

__all__ = ["ProxyHTTPServer", "ProxyTCPServerMixin", "header"]

logger = logging.getLogger("proxyproto")

_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


# -- the Tornado this module relies on ---------------------------------------------------------------


def _check_tornado(tcp_server: type = TCPServer, context: type = _HTTPRequestContext) -> None:
    """Raise ``ImportError`` unless Tornado still has the private names this module overrides.

    :class:`ProxyTCPServerMixin` reads the header in
    ``TCPServer._handle_connection(connection, address)`` (Tornado's accept
    callback, private), and :class:`ProxyRequestContext` overrides
    ``_HTTPRequestContext._apply_xheaders(headers)``.  Were either renamed,
    the mixin would be bypassed silently (every connection served with no
    header read) or xheaders would no longer be pinned: so the import fails
    instead, naming what is missing.  Run when this module is imported.
    """
    expected = (
        (tcp_server, "_handle_connection", ["self", "connection", "address"]),
        (context, "_apply_xheaders", ["self", "headers"]),
    )
    for owner, name, parameters in expected:
        method = getattr(owner, name, None)
        try:
            found = None if method is None else list(inspect.signature(method).parameters)
        except (TypeError, ValueError):  # pragma: no cover - not a Python function
            found = None
        if found != parameters:
            import tornado  # type: ignore[import-not-found,unused-ignore]

            raise ImportError(
                f"proxyproto.tornado needs {owner.__module__}.{owner.__qualname__}.{name}"
                f"({', '.join(parameters)}), which Tornado {getattr(tornado, 'version', '?')} does not have "
                f"(found: {found}): this proxyproto does not support that Tornado"
            )


_check_tornado()


# -- the address handle_stream is given ------------------------------------------------------------


class _Carrier:
    """What a served connection's address carries besides itself (class defaults: nothing from a proxy)."""

    #: The PROXY header a trusted peer sent on this connection (also LOCAL, UNKNOWN; also under IGNORE), else None.
    proxy_header: ProxyHeader | None = None
    #: The socket's own peer address: the proxy's, when a header gave the client's.
    proxy_peer: Any = None
    #: Whether the address is the header's source (a trusted PROXY header with addresses, under REQUIRE or USE).
    from_header = False
    #: Whether the peer is a trusted proxy that speaks PROXY (trusted, under REQUIRE, USE or IGNORE): the
    #: connection's address and scheme are the header's or the socket's, never a request's X-* lines.
    from_proxy = False


class _ProxyIPAddress(_Carrier, tuple):  # type: ignore[type-arg]
    """An IP address as ``handle_stream`` gets it: equal to the tuple, plus :class:`_Carrier`'s attributes."""


class _ProxyUnixAddress(_Carrier, str):
    """A UNIX peer's address (Tornado gives ``str``) with the same attributes."""


class _ProxyAbstractAddress(_Carrier, bytes):
    """An abstract UNIX peer's address (``bytes``) with the same attributes."""


_CARRIERS: dict[type, type] = {tuple: _ProxyIPAddress, str: _ProxyUnixAddress, bytes: _ProxyAbstractAddress}


def _carrying(address: Any, proxy_header: ProxyHeader | None, peer: Any, from_header: bool, from_proxy: bool) -> Any:
    """``address`` as a :class:`_Carrier` of the header and the peer (unchanged when its type has none)."""
    kind = _CARRIERS.get(type(address))
    if kind is None:
        return address
    carried = kind(address)
    carried.proxy_header, carried.proxy_peer, carried.from_header = proxy_header, peer, from_header
    carried.from_proxy = from_proxy
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
    negotiate TLS after the header; the handshake must end within
    ``header_timeout`` and counts toward ``max_pending`` until it does
    (:class:`Handshake`).  Connections refused by the policy are
    closed with one log line (logger ``proxyproto``) and never reach
    ``handle_stream``.  :meth:`stop` also closes the connections still
    waiting for their header or handshake.
    """

    proxy_settings: Settings
    _proxy_log: RefusalLog
    _proxy_parking: Parking[Waiting | Handshake]

    def __init__(self, *args: Any, settings: Settings | None = None, **kwargs: Any) -> None:
        knobs, rest = split_knobs({"settings": settings, **kwargs})
        self._proxy_setup(knobs)
        super().__init__(*args, **rest)

    def _proxy_setup(self, knobs: dict[str, Any]) -> None:
        """Build the settings from the knobs (``settings`` among them), the refusal log and the parking.

        Also puts :meth:`_proxy_handed_over` before this server's
        ``handle_stream`` (an attribute of the instance, wrapping the class's
        method): Tornado makes the stream between the two, and the subclass,
        not this mixin, defines ``handle_stream``.
        """
        knobs = dict(knobs)
        settings = self.proxy_settings = settings_for(knobs.pop("settings", None), knobs)
        warn_if_every_peer_trusted(settings)
        self._proxy_log = RefusalLog(logger, settings.log_rate, later=call_later, name_of=settings.name_of)
        self._proxy_parking = Parking(self._proxy_log, close_held)
        handle_stream: Callable[[IOStream, Any], Any] = self.handle_stream  # type: ignore[has-type,attr-defined,unused-ignore]

        def handed_over(stream: IOStream, address: Any) -> Any:
            self._proxy_handed_over(stream, address)
            return handle_stream(stream, address)

        self.handle_stream = handed_over

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
            untrusted = not trusted and settings.policy_for is None
            late = untrusted and not self._proxy_look_at_first_bytes(connection, address)
            self._proxy_serve(connection, address, None, policy, trusted, look_later=late)
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
            self._proxy_log.read_failed(address, exc)
            connection.close()
            return
        if done:
            self._proxy_conclude(attempt, address, trusted)
            return
        waiting = Waiting(self, attempt, address, trusted)
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
            reason = refusal_line(settings, attempt.policy, outcome, attempt.scanner, trusted, hooked, peer)
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
        self,
        connection: socket.socket,
        peer: Any,
        found: ProxyHeader | None,
        policy: Policy,
        trusted: bool,
        look_later: bool = False,
    ) -> None:
        """Hand the connection to Tornado (TLS, IOStream, ``handle_stream``) with the address it is served with.

        ``look_later``: an untrusted peer under SKIP whose first bytes were not
        in at accept; the stream's first read looks at them.
        """
        settings = self.proxy_settings
        found = handed_on(self._proxy_log, settings, peer, policy, found, trusted, settings.policy_for is not None)
        address = peer if found is None else served_address(policy, found, peer, connection.family)
        carried = _carrying(address, found, peer, address is not peer, pins_the_client(policy, trusted))
        self._proxy_look_later = look_later  # for _proxy_handed_over, which Tornado's code calls in between
        try:
            super()._handle_connection(connection, carried)  # type: ignore[misc]
        finally:
            self._proxy_look_later = False

    _proxy_look_later = False

    def _proxy_handed_over(self, stream: IOStream, address: Any) -> None:
        """Tornado made ``stream`` (in ``_handle_connection``, just before ``handle_stream``): bound its handshake.

        With ``ssl_options``, a :class:`Handshake` bounds the TLS handshake
        by ``header_timeout`` and parks it.  For an untrusted peer under SKIP
        whose first bytes were not in at accept, the stream's first read looks
        at them (a WARNING if they are a PROXY header), on a plain stream;
        under TLS such a header fails the handshake, which Tornado logs.
        """
        look_later = self._proxy_look_later
        peer = getattr(address, "proxy_peer", address)
        if isinstance(stream, SSLIOStream):
            Handshake(self, stream, peer)
        elif look_later:
            _look_at_first_read(stream, untrusted_look(self._proxy_log, self.proxy_settings, peer))

    def _proxy_look_at_first_bytes(self, connection: socket.socket, peer: Any) -> bool:
        """An untrusted peer under SKIP: a WARNING if a PROXY header has already arrived (it stays payload).

        True when it looked (bytes were in, or the WARNING is not wanted): no later look is needed.
        """
        if not self._proxy_log.wants(KIND_UNTRUSTED_HEADER):
            return True
        try:
            connection.setblocking(False)  # as Tornado's IOStream will: no wait before the peek
            start = connection.recv(SIGNATURE_PEEK, _PEEK)
        except BlockingIOError:
            return False  # nothing in yet
        except OSError:
            return True  # the stream's own reads will meet the error
        if not start:
            return False
        untrusted_look(self._proxy_log, self.proxy_settings, peer)(start)
        return True

    def _proxy_close_waiting(self) -> None:
        """Close every connection still waiting for its header (nothing was served on them)."""
        parking = self._proxy_parking
        for waiting in list(parking.waiting):
            waiting.close()


def _look_at_first_read(stream: IOStream, look: Callable[[bytes], None]) -> None:
    """Give ``look`` the first bytes ``stream`` reads (its ``read_from_fd``, wrapped until they come)."""
    read_from_fd = stream.read_from_fd

    def first_read(buf: Any) -> int | None:
        count: int | None = read_from_fd(buf)
        if count:
            del stream.read_from_fd  # the class's method again
            look(bytes(buf[: min(count, SIGNATURE_PEEK)]))
        return count

    stream.read_from_fd = first_read  # type: ignore[method-assign,unused-ignore]


# -- the HTTP server --------------------------------------------------------------------------------


class ProxyRequestContext(_HTTPRequestContext):  # type: ignore[misc,unused-ignore]
    """Tornado's per-connection request context, with the header, the proxy's address, and xheaders kept in place.

    ``remote_ip`` is the address the connection is served with (the
    header's source for a trusted proxy), also on a UNIX listener;
    ``address`` the whole tuple (its port: ``address[1]``);
    ``proxy_header`` and ``proxy_peer`` as :class:`ProxyTCPServerMixin`
    gives them.  With ``xheaders=True``, on a connection from a trusted
    proxy that speaks PROXY (trusted, under REQUIRE, USE or IGNORE; whatever
    header it sent: addresses, UNKNOWN, LOCAL, or one IGNORE drops), no
    request line changes ``remote_ip`` or ``protocol`` (X-Real-Ip,
    X-Forwarded-For, X-Scheme, X-Forwarded-Proto are a client's words, which
    a TCP proxy passes on), unless ``xheaders_over_header``.  On any other
    connection xheaders work as in Tornado.
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
        self._proxy_pinned = bool(getattr(address, "from_proxy", False)) and not xheaders_over_header

    def _apply_xheaders(self, headers: Any) -> None:
        if not self._proxy_pinned:
            super()._apply_xheaders(headers)


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

    async def close_all_connections(self) -> None:
        """Close the connections still waiting for their header, then Tornado's (which it waits for)."""
        self._proxy_close_waiting()
        await super().close_all_connections()
