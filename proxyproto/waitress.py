"""waitress: the PROXY header read by the channel, so ``REMOTE_ADDR`` is the real client.

waitress is asyncore-based: one loop thread accepts connections and feeds
each ``HTTPChannel`` the bytes it reads through ``received(data)``; worker
threads run the WSGI application with ``REMOTE_ADDR`` and ``REMOTE_PORT``
taken from ``channel.addr``.  So the header belongs in ``received()``:
:class:`ProxyHTTPChannel` feeds the first bytes to a
:class:`proxyproto.reader.HeaderScanner` until it says what they are
(a header, no header, a malformed one, the end of the stream, the
deadline), decides with the same policy table as every other adapter
(:func:`proxyproto.policy.decide`), sets ``self.addr`` from the header, and
hands the bytes after the header, in the same call, to waitress's own
``received()``: header and request line often arrive in one segment.

The header deadline is enforced in ``readable()``, which the asyncore loop
asks of every channel on each pass; the loop wakes at least every
``asyncore_loop_timeout`` seconds (waitress's default: 1), so a silent
client is closed within that much of its deadline, long before waitress's
own ``channel_timeout`` (120 s) would notice it.  The listener's
``readable()`` writes the summary of suppressed refusal lines the same way.

On a connection whose client the PROXY protocol pins (a trusted peer under
REQUIRE, USE or IGNORE: :func:`proxyproto.policy.pins_the_client`), waitress's
``trusted_proxy`` is not applied: its ``X-Forwarded-*`` and ``Forwarded``
lines are what the proxy relayed from its client, and are treated as
waitress treats those of any peer that is not its ``trusted_proxy``
(removed from the environ, unless ``clear_untrusted_proxy_headers=False``).
``trusted_proxy_over_header=True`` applies ``trusted_proxy`` on every
connection, as waitress alone would.

Parked connections count toward waitress's ``connection_limit``, so
``max_pending`` is at most half of it (a chosen one lowered costs one
WARNING at start; the eviction line names the limit in force).

Use :func:`create_server` or :func:`serve` in place of waitress's; they take
waitress's keyword arguments plus the knobs of :mod:`proxyproto.aio`.
waitress is imported when this module is, which only its users do.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

# waitress ships no type hints: mypy sees Any (and, on a [test]-only install, no module at all).
from waitress.channel import HTTPChannel  # type: ignore[import-untyped,import-not-found,unused-ignore]
from waitress.proxy_headers import proxy_headers_middleware  # type: ignore[import-untyped,import-not-found,unused-ignore]
from waitress.server import BaseWSGIServer  # type: ignore[import-untyped,import-not-found,unused-ignore]
from waitress.server import create_server as _waitress_create_server  # type: ignore[import-untyped,import-not-found,unused-ignore]
from waitress.task import WSGITask  # type: ignore[import-untyped,import-not-found,unused-ignore]

from .advice import handed_on, log_policy, note_untrusted_header, refusal_line, starts_with_header
from .header import ProxyHeader
from .parking import Parking
from .peers import socket_family
from .policy import Outcome, Policy, decide, peer_text, pins_the_client, served_address
from .reader import HeaderScanner
from .refusal_log import KIND_POLICY_FOR, RefusalLog, kind_of, listener_text
from .settings import Settings, settings_for, split_knobs

__all__ = ["ProxyHTTPChannel", "create_server", "serve"]

logger = logging.getLogger("proxyproto")

#: The WSGI environ key holding the parsed :class:`~proxyproto.ProxyHeader` (or None).
ENVIRON_KEY = "proxyproto.header"
#: The environ key marking a request whose connection the PROXY protocol pins, for the listener's
#: :class:`_ForwardedLinesUnlessPinned` only, which removes it before any application sees the environ.
_PINNED = "proxyproto.pins_the_client"


class ProxySettings:
    """The settings of one :func:`create_server`, shared by its listeners, with its log and waiting channels.

    ``settings``: a :class:`~proxyproto.settings.Settings`, the keyword
    knobs on top.  ``parking`` holds the channels whose header is
    incomplete, oldest first, and closes the oldest past ``max_pending``
    or near the descriptor limit (:class:`proxyproto.parking.Parking`, the
    rule of every adapter).
    """

    def __init__(self, settings: Settings | None = None, **knobs: Any) -> None:
        self.settings = settings_for(settings, knobs)
        self.log = RefusalLog(logger, self.settings.log_rate, name_of=self.settings.name_of)
        self.parking: Parking[ProxyHTTPChannel] = Parking(self.log, _evicted)
        #: Whether the listeners serve pinned connections without waitress's ``trusted_proxy``
        #: (:class:`_ForwardedLinesUnlessPinned`), so their requests carry the :data:`_PINNED` mark.
        self.marks_pinned = False

    def fit_connection_limit(self, limit: int) -> None:
        """Keep ``max_pending`` at most half of waitress's ``connection_limit``; say so once when it lowers it.

        waitress stops accepting at ``connection_limit`` and parked
        connections count toward it, so more waiting connections than that
        would never be evicted: silent sockets would lock everyone out for the
        whole header timeout.  Half the slots stay for connections past their
        header.  A ``max_pending`` that was chosen (not its default) and is
        lowered gets one WARNING naming both limits; the default is lowered
        as documented, without a line.  Eviction lines then name the limit in
        force rather than ``max_pending`` alone.
        """
        settings = self.settings
        asked, cap = settings.max_pending, limit // 2
        if limit < 2 or asked <= cap:
            return
        self.settings = settings.replace(max_pending=cap)
        name_of = settings.name_of
        knob = name_of("max_pending")
        in_force = f"{knob} lowered to {cap}, half of waitress's connection_limit={limit}"
        self.log.name_of = lambda name: in_force if name == "max_pending" else name_of(name)
        if asked == Settings().max_pending:
            return  # waitress's documented default: half its connection_limit
        logger.warning(
            "%s=%d is more than half of waitress's connection_limit=%d (connections waiting for their PROXY "
            "header count toward it): at most %d wait; raise connection_limit to let more wait",
            knob,
            asked,
            limit,
            cap,
        )


def _evicted(channel: ProxyHTTPChannel) -> None:
    """Parking's close callback: the channel stops reading its header and closes on the loop's next pass."""
    channel._proxy_scanner = None
    channel.will_close = True


class ProxyWSGITask(WSGITask):  # type: ignore[misc]  # waitress has no type hints
    """waitress's WSGI task, with the parsed header in ``environ["proxyproto.header"]``.

    A request of a connection the PROXY protocol pins also carries the
    :data:`_PINNED` mark when its listener's application is a
    :class:`_ForwardedLinesUnlessPinned` (which takes the mark off).
    """

    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        channel = self.channel
        environ[ENVIRON_KEY] = channel.proxy_header  # a trusted peer's only (ProxyHTTPChannel)
        if channel.proxy_pins_the_client and channel._proxy_shared.marks_pinned:
            environ[_PINNED] = True
        return environ


class _ForwardedLinesUnlessPinned:
    """A listener's application when waitress has a ``trusted_proxy``: waitress's own, unless the connection is pinned.

    ``forwarded`` is the application as waitress wrapped it
    (``trusted_proxy`` applied); ``pinned`` the same application as waitress
    serves a peer that is not its ``trusted_proxy`` (the forwarded lines
    removed when ``clear_untrusted_proxy_headers``, else left untouched),
    for the requests of connections whose client the PROXY protocol pins
    (:func:`proxyproto.policy.pins_the_client`): their forwarded lines are
    what the proxy relayed from its client.
    """

    def __init__(self, forwarded: Any, pinned: Any) -> None:
        self.forwarded = forwarded
        self.pinned = pinned

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.pop(_PINNED, False):
            return self.pinned(environ, start_response)
        return self.forwarded(environ, start_response)


class ProxyHTTPChannel(HTTPChannel):  # type: ignore[misc]  # waitress has no type hints
    """An ``HTTPChannel`` that reads the PROXY header before waitress's parser sees a byte.

    The settings come from ``server.proxy_settings`` (a :class:`ProxySettings`),
    which :func:`create_server` sets on each listener.  ``proxy_header`` is
    the parsed header when the peer is trusted, else None (an untrusted
    peer's header is read and removed, never handed on); ``proxy_peername``
    the socket's own peer (the proxy).
    """

    task_class = ProxyWSGITask
    proxy_header: ProxyHeader | None = None
    #: Whether the PROXY protocol alone gives this connection's client and scheme
    #: (:func:`~proxyproto.policy.pins_the_client`): waitress's ``trusted_proxy`` is not applied to it.
    proxy_pins_the_client = False
    _proxy_sniff = False

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.proxy_peername = addr
        shared: ProxySettings = server.proxy_settings
        self._proxy_shared = shared
        settings = shared.settings
        family = socket_family(sock)  # the socket's own, whatever the server's label says
        self._proxy_family: int = server.family if family < 0 else family
        #: The scanner of the bytes held while the header is undecided; None once decided (served or refused).
        self._proxy_scanner: HeaderScanner | None = None
        try:
            self._proxy_policy, self._proxy_trusted = settings.trust(addr, sock, family=self._proxy_family)
        except Exception as exc:  # a user's hook: its failure closes this connection, nothing else
            self._proxy_policy, self._proxy_trusted = Policy.REQUIRE, False
            self._proxy_refuse(
                logging.ERROR, f"closed: policy_for failed: {type(exc).__name__}: {exc}", kind=KIND_POLICY_FOR
            )
            return
        self.proxy_pins_the_client = pins_the_client(self._proxy_policy, self._proxy_trusted)
        if self._proxy_policy is Policy.SKIP:
            #: Look at the first bytes of an untrusted peer for a PROXY header (only to say so).
            self._proxy_sniff = not self._proxy_trusted and settings.policy_for is None
            return
        self._proxy_scanner = settings.scanner()
        self._proxy_deadline = time.monotonic() + settings.header_timeout
        shared.parking.add(self, addr, sock.fileno(), settings.max_pending)

    # -- asyncore hooks --------------------------------------------------------------

    def received(self, data: bytes) -> bool:
        scanner = self._proxy_scanner
        if scanner is None:
            if self._proxy_sniff:
                self._proxy_sniff = False
                if starts_with_header(data):
                    shared = self._proxy_shared
                    note_untrusted_header(shared.log, shared.settings, self.proxy_peername, Policy.SKIP)
            return bool(super().received(data))
        outcome = scanner.feed(data)
        if outcome is None:
            return True
        if self._proxy_trusted or self._proxy_policy is Policy.IGNORE:  # an untrusted one under REJECT: refused below
            shared, hooked = self._proxy_shared, self._proxy_shared.settings.policy_for is not None
            self.proxy_header = handed_on(
                shared.log,
                shared.settings,
                self.proxy_peername,
                self._proxy_policy,
                scanner.header,
                self._proxy_trusted,
                hooked,
            )
        return self._proxy_decided(outcome, scanner.rest)

    def readable(self) -> bool:
        scanner = self._proxy_scanner
        if scanner is not None and time.monotonic() >= self._proxy_deadline:
            # Served means "served, no header" (the opt-in policies after a silent deadline).
            self._proxy_decided(scanner.expire(), b"", immediate=False)
        return bool(super().readable())

    def handle_close(self) -> None:
        scanner = self._proxy_scanner
        if scanner is not None:  # the peer closed (or the socket failed) before the header was decided
            self._proxy_decided(scanner.eof(), b"", immediate=False)
        self._proxy_shared.parking.discard(self)
        super().handle_close()

    # -- the decision ----------------------------------------------------------------

    def _proxy_decided(self, outcome: Outcome, rest: bytes, *, immediate: bool = True) -> bool:
        """Apply the policy table's cell to the scanner's ``outcome``; serve ``rest`` to waitress, or close.

        ``immediate`` closes the socket now (inside ``handle_read``); otherwise
        the channel is marked to close on the loop's next pass, as waitress's
        own maintenance does (``readable()`` runs while the loop walks its map).
        """
        settings = self._proxy_shared.settings
        policy = self._proxy_policy
        scanner = self._proxy_scanner
        assert scanner is not None
        verdict = decide(policy, outcome)
        if not verdict.serve:
            hooked = settings.policy_for is not None
            reason = refusal_line(settings, policy, outcome, scanner, self._proxy_trusted, hooked, self.proxy_peername)
            self._proxy_refuse(verdict.level, f"closed: {reason}", immediate=immediate, kind=kind_of(outcome))
            return False
        self._proxy_scanner = None
        self._proxy_shared.parking.discard(self)
        address = served_address(policy, self.proxy_header, self.proxy_peername, self._proxy_family)
        if isinstance(address, tuple):  # a UNIX source on a UNIX listener keeps waitress's ("localhost", None)
            self.addr = address
        if rest:
            return bool(super().received(rest))
        return True

    def _proxy_refuse(self, level: int, message: str, *, kind: str, immediate: bool = False) -> None:
        """Close without a response, after one log line naming the peer."""
        self._proxy_scanner = None
        self._proxy_shared.parking.discard(self)
        self._proxy_shared.log.log(level, "%s: %s", peer_text(self.proxy_peername), message, kind=kind)
        if immediate:
            self.handle_close()
        else:
            self.will_close = True


def create_server(
    application: Any, *, settings: Settings | None = None, trusted_proxy_over_header: bool = False, **kw: Any
) -> Any:
    """``waitress.create_server`` whose connections start with a PROXY header.

    The proxy knobs are docs/configuration.rst's, as keywords or as one
    :class:`~proxyproto.settings.Settings` (``settings=``, keywords on
    top); ``trusted`` defaults to ``"127.0.0.1,::1"`` (loopback only) and
    takes networks, single addresses, ``"10.0.0.0/8,127.0.0.1"`` strings,
    ``"*"`` for every peer or ``""`` for none (None is refused); a
    ``policy_for`` hook that raises closes that connection, logged.  Every
    other keyword goes to waitress (``listen=``, ``threads=``, ``map=``,
    ...).  Returns waitress's server object (call ``run()``); each of its
    listeners uses :class:`ProxyHTTPChannel`.  Invalid knobs raise
    ``ValueError`` before anything is bound.

    waitress's ``trusted_proxy`` is not applied on connections whose client
    the PROXY protocol pins (:func:`~proxyproto.policy.pins_the_client`),
    unless ``trusted_proxy_over_header``: then it is applied on every
    connection, to the address it is served with (the header's source, or
    the proxy's own for a LOCAL or UNKNOWN header).  ``max_pending`` is at
    most half of waitress's ``connection_limit`` (see
    :meth:`ProxySettings.fit_connection_limit`).
    """
    knobs, kw = split_knobs({"settings": settings, **kw})
    shared = ProxySettings(**knobs)
    socket_map = kw.pop("map", None)
    if socket_map is None:
        socket_map = {}
    server = _waitress_create_server(application, map=socket_map, **kw)
    # The listeners are already listening, but nothing is accepted before the
    # loop runs, so no connection can get waitress's own channel class.
    listeners = [d for d in socket_map.values() if isinstance(d, BaseWSGIServer)]
    adj = listeners[0].adj if listeners else getattr(server, "adj", None)
    limit = getattr(adj, "connection_limit", None)
    if isinstance(limit, int):
        shared.fit_connection_limit(limit)
    shared.log.listener = listener_text(*[d.socket.getsockname() for d in listeners])
    for dispatcher in listeners:
        dispatcher.proxy_settings = shared
        dispatcher.channel_class = ProxyHTTPChannel
        dispatcher.readable = _flushing(shared.log, dispatcher.readable)
    if adj is not None and adj.trusted_proxy and not trusted_proxy_over_header:
        _without_trusted_proxy_when_pinned(shared, listeners, application, adj)
    log_policy(shared.settings, False)
    return server


def _without_trusted_proxy_when_pinned(shared: ProxySettings, listeners: list[Any], application: Any, adj: Any) -> None:
    """Serve the pinned connections of ``listeners`` as waitress serves a peer that is not its ``trusted_proxy``."""
    for dispatcher in listeners:
        pinned = proxy_headers_middleware(
            application,
            trusted_proxy=None,
            clear_untrusted=adj.clear_untrusted_proxy_headers,
            log_untrusted=adj.log_untrusted_proxy_headers,
            logger=dispatcher.logger,
        )
        dispatcher.application = _ForwardedLinesUnlessPinned(dispatcher.application, pinned)
    shared.marks_pinned = True
    logger.info(
        "waitress's trusted_proxy is not applied on connections from peers trusted to send the PROXY header: "
        "the header gives their client (trusted_proxy_over_header=True applies it)"
    )


def _flushing(log: RefusalLog, readable: Any) -> Any:
    """A listener's ``readable`` that first writes the refusal summary once its window is over.

    waitress's loop asks every dispatcher ``readable()`` on each pass, and
    passes at least every ``asyncore_loop_timeout`` seconds (1 by default)
    even without traffic: the summary comes within that much of its window's end.
    """

    def flushing_readable() -> bool:
        if log.suppressed:
            log.flush()
        return bool(readable())

    return flushing_readable


def serve(application: Any, **kw: Any) -> None:
    """``waitress.serve`` whose connections start with a PROXY header (knobs as :func:`create_server`)."""
    logging.basicConfig()  # as waitress.serve does: idempotent when logging is set up
    server = create_server(application, **kw)
    server.print_listen("Serving on http://{}:{} (PROXY protocol)")
    server.run()
