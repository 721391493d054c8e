"""PROXY protocol v2 over UDP: socketserver datagram servers (rule G8).

Every datagram carries its own v2 header, parsed independently of every
other (G8): a header split across datagrams is simply an invalid datagram,
never reassembled.  There is no v1 for datagrams (v1 has no ``UDP4``), so a
v1 line is refused as an invalid header.

What a handler sees:

* ``self.client_address``: the real client (``(host, port)`` for IPv4,
  ``(host, port, 0, 0)`` for IPv6, as the socket module gives them) when the
  datagram's header carries addresses and the policy uses them; otherwise the
  datagram's own source, exactly as without the mixin.
* ``self.request``: a :class:`ProxyDatagram`, which *is* the 2-tuple
  ``(payload, socket)`` of ``socketserver`` (header removed), with two more
  attributes: ``proxy_header`` (the parsed header, or None) and
  ``proxy_address`` (the source of the datagram: the proxy that sent it).
  Its socket is a :class:`ReplySocket` on the server's socket.

Replies reach the proxy, never the header's source, whatever the handler.
A PROXY-protocol UDP proxy (dnsdist) sends header + query to the backend and
relays the answer that comes back on the same address pair, without a
header, to its client; an answer sent straight to the header's source would
bypass the proxy and, with a forged header, reflect (and amplify) traffic at
a third party.  Every handler written for plain ``socketserver`` replies to
``client_address`` (``DatagramRequestHandler.finish`` calls
``self.request[1].sendto(reply, self.client_address)``), so the request's
socket is a :class:`ReplySocket`: its ``sendto`` and ``sendmsg`` send a
datagram addressed to the header's source, or to the proxy, to the proxy,
and refuse any other destination with ``PermissionError``.  Such handlers
are therefore served, not refused: they keep ``self.client_address`` as the
real client for logs and ACLs and still cannot aim a datagram at it.
:class:`ProxyDatagramRequestHandler` says the same explicitly (its
``finish`` sends to ``proxy_address``, and nothing when nothing was
written).  The server's own socket, ``self.server.socket``, is not
wrapped: a handler that uses it sends where it says, on purpose.

What the header may describe.  The v2 protocol nibble says what the
header's addresses describe, and every datagram is parsed on its own (G8):

* PROXY with DGRAM (``0x12`` UDP/IPv4, ``0x22`` UDP/IPv6, ``0x32`` UNIX
  dgram): served with the header's source as ``client_address``.
* PROXY with STREAM (``0x11``, ``0x21``, ``0x31``): the header describes a
  TCP connection, which a datagram cannot belong to (a proxy that sends it
  is misconfigured, or the bytes were replayed from a stream): refused as
  an invalid header whose message names the protocol, the datagram dropped
  and logged.
* UNSPEC (``0x00``), with LOCAL or PROXY: served with the datagram's own
  source.  The spec makes the UNSPEC byte the one every receiver must
  implement (V2-R4), and LOCAL health checks (dnsdist's, haproxy's) are
  16-byte LOCAL headers with family and protocol ``0x00``.
* LOCAL with any family and protocol: served with the datagram's own
  source; the spec has the receiver ignore a LOCAL header's family (V2-R1),
  so a LOCAL health check with a TCP family byte (as AWS NLB sends over TCP)
  is not refused either.

Configuration is by class attribute, with the names and meanings of
:class:`proxyproto.ProxyProtocolMixin`; policies and trust apply per
datagram, by the datagram's source.  A ``proxy_*`` attribute may change at
any time, also while ``serve_forever`` runs in another thread: the trust
settings are re-read for every datagram (:class:`proxyproto.settings.LiveSettings`),
an invalid value set on the instance raises ``ValueError`` where it is set,
and an invalid value set on the class is logged once at ERROR and every
datagram dropped until it is fixed.  A datagram the policy refuses is
dropped, and logged in one line on the ``proxyproto`` logger; those lines
are rate-limited (``proxy_log_rate`` lines per second, then one summary of
how many were suppressed), because a datagram costs its sender nothing and
a flood of them must not become a flood of log lines.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import socket
import socketserver
from typing import Any

from .advice import handed_on, note_untrusted_header, refusal_line, starts_with_header, warn_if_every_peer_trusted
from .attributes import LiveSettings, SettingsAttributes, check_attributes
from .header import Family, ProxyHeader
from .peers import socket_family
from .policy import Policy, decide, peer_text, served_address
from .refusal_log import DEFAULT_LOG_RATE, KIND_POLICY_FOR, RefusalLog, kind_of, listener_text
from .settings import DEFAULT_TRUSTED

__all__ = [
    "ForkingProxyUDPServer",
    "ProxyDatagram",
    "ProxyDatagramMixin",
    "ProxyDatagramRequestHandler",
    "ProxyUDPServer",
    "ReplySocket",
    "ThreadingProxyUDPServer",
]

logger = logging.getLogger("proxyproto")

Address = Any

#: Largest UDP payload over IPv4 is 65507 bytes, over IPv6 (without jumbograms) 65527:
#: receive buffers of this size never truncate a datagram.
MAX_DATAGRAM = 65535

#: The knobs the datagram mixin has as ``proxy_*`` attributes (the others keep their defaults).
KNOBS = ("policy", "trusted", "untrusted_policy", "max_header_size", "verify_checksum", "log_rate")


def _endpoint(address: Address) -> Any:
    """``address`` in a form where two spellings of one IP endpoint compare equal.

    ``(host, port)`` and ``(host, port, flowinfo, scope_id)`` of the same host and
    port are one endpoint, and so are ``"192.0.2.1"`` and ``"::ffff:192.0.2.1"``;
    anything else (a UNIX path, a host name) compares as given.
    """
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], str):
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address[0])
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return (ip, address[1])
    return address


class ReplySocket:
    """The socket of a :class:`ProxyDatagram` (``self.request[1]``): its datagrams reach the proxy.

    A handler written for plain ``socketserver`` answers ``client_address``,
    which behind the mixin is the header's source: a claim of the sender's.
    Through this socket, ``sendto`` and ``sendmsg`` send a datagram addressed
    to the header's source (``client_address``, in any spelling of that IP
    and port) or to the proxy (``proxy_address``) to the proxy, i.e. back to
    the datagram's real sender on the server's socket, as a PROXY-protocol
    UDP proxy expects; any other destination raises ``PermissionError``
    (nothing is sent), because a destination derived from what a datagram
    says is how reflection works.  ``sendmsg`` without an address is passed
    on unchanged (an unconnected socket refuses it).  Every other attribute
    (``fileno``, ``getsockname``, ``family``, ...) is the server socket's.
    It is not a ``socket.socket``; ``self.server.socket`` is the socket
    itself, for a handler that means to send elsewhere.
    """

    __slots__ = ("_client", "_proxy", "_sock")

    def __init__(self, sock: socket.socket, proxy_address: Address, client_address: Address) -> None:
        self._sock = sock
        self._proxy = proxy_address
        self._client = client_address

    def sendto(self, data: Any, *args: Any) -> int:
        """``socket.sendto(data[, flags], address)``, sent to the proxy (see the class)."""
        if len(args) == 1:
            flags, address = 0, args[0]
        elif len(args) == 2:
            flags, address = args
        else:
            raise TypeError(f"sendto() takes 2 or 3 arguments ({len(args) + 1} given)")
        return self._sock.sendto(data, flags, self._destination(address))

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Address | None = None) -> int:
        """``socket.sendmsg``, sent to the proxy when it names an address (see the class)."""
        if address is None:
            return self._sock.sendmsg(buffers, ancdata, flags)
        return self._sock.sendmsg(buffers, ancdata, flags, self._destination(address))

    def _destination(self, address: Address) -> Address:
        """The proxy's address for the header's source or the proxy; PermissionError for anything else."""
        wanted = _endpoint(address)
        if wanted == _endpoint(self._proxy) or wanted == _endpoint(self._client):
            return self._proxy
        raise PermissionError(
            f"proxyproto: a reply to this datagram goes to the proxy that sent it ({peer_text(self._proxy)}); "
            f"sending to {address!r} through the request's socket is refused (it could aim traffic at a "
            "third party); send through self.server.socket to send elsewhere on purpose"
        )

    def __getattr__(self, name: str) -> Any:
        if name in ReplySocket.__slots__:  # not set yet (copy makes the object first): no recursion
            raise AttributeError(name)
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"<proxyproto.udp.ReplySocket to {self._proxy!r} on {self._sock!r}>"


class ProxyDatagram(tuple[Any, ...]):
    """``(payload, socket)`` as ``socketserver`` gives datagram handlers, plus where it came from.

    The servers give a :class:`ReplySocket` as the socket, so that no reply
    reaches the header's source.

    ``proxy_header``: the parsed :class:`ProxyHeader` whenever one was parsed
    from a trusted source (also under IGNORE, and for LOCAL), else None: an
    untrusted source's header is stripped and never handed on.  ``proxy_address``: the
    datagram's source, i.e. the proxy: the only address a reply may go to.
    """

    proxy_header: ProxyHeader | None
    proxy_address: Address

    def __new__(
        cls, payload: bytes, sock: socket.socket | ReplySocket, proxy_header: ProxyHeader | None, proxy_address: Address
    ) -> ProxyDatagram:
        self = super().__new__(cls, (payload, sock))
        self.proxy_header = proxy_header
        self.proxy_address = proxy_address
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # keeps copy and pickle working
        return (self[0], self[1], self.proxy_header, self.proxy_address)


class ProxyDatagramMixin(SettingsAttributes):
    """Strip the PROXY v2 header from each datagram of a ``socketserver.UDPServer``.

    Put it first among the bases.  Overrides ``get_request`` (and
    ``serve_forever``, to check the configuration when serving starts;
    ``server_activate``, to check it in the constructor; ``service_actions``
    and ``handle_timeout``, to write the summary of suppressed log lines;
    ``__setattr__``, to refuse an invalid ``proxy_*`` value where it is set).
    """

    #: What a datagram from a trusted source must do (the spec's mode: REQUIRE).
    proxy_policy: Policy | str = Policy.REQUIRE
    #: The sources allowed to send headers: loopback by default; IP networks, the token ``unix``,
    #: ``"*"`` (every source) or ``""`` (none).  None, which used to mean every source, is refused.
    proxy_trusted: Any = DEFAULT_TRUSTED
    #: What sources outside ``proxy_trusted`` get (SKIP, IGNORE or REJECT).
    proxy_untrusted_policy: Policy | str = Policy.SKIP
    #: Cap on a v2 header's 16 + len; larger ones are refused.
    proxy_max_header_size: int = 4096
    #: Verify a CRC-32C TLV when present.
    proxy_verify_checksum: bool = True
    #: Refusal log lines per second for this server; past it they are counted and summarised (None: all).
    proxy_log_rate: float | None = DEFAULT_LOG_RATE
    #: Receive buffer per datagram: large enough never to truncate one.
    max_packet_size = MAX_DATAGRAM

    _ppd_log: RefusalLog | None = None
    _proxy_knobs = KNOBS

    socket: socket.socket
    server_address: Any

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Check the configuration, then serve as ``socketserver`` does."""
        self._proxy_serve_forever(self._ppd_start, poll_interval)

    def service_actions(self) -> None:
        """Write the summary of suppressed refusal lines once their second is over, then the base's actions."""
        super().service_actions()  # type: ignore[misc]
        log, live = self._ppd_log, self._proxy_live
        if log is not None and live is not None and log.suppressed:
            log.rate = live.current.log_rate
            log.flush()

    def handle_timeout(self) -> None:
        """``handle_request()`` timed out (it never calls ``service_actions``): the summary is due here too."""
        log = self._ppd_log
        if log is not None and log.suppressed:
            log.flush()
        super().handle_timeout()  # type: ignore[misc]

    def _ppd_start(self) -> LiveSettings:
        """Validate the settings when serving starts (ValueError naming the attribute); set up the log."""
        live = self._proxy_live
        if live is not None:
            return live
        check_attributes(self, KNOBS)
        live = LiveSettings(KNOBS)
        live.refresh(self)
        warn_if_every_peer_trusted(live.current)
        self._ppd_log = RefusalLog(logger, live.current.log_rate, name_of=live.current.name_of)
        self._ppd_log.listener = listener_text(self.server_address)
        self._proxy_live = live
        return live

    def _ppd_refuse(self, level: int, peer: Address, reason: str, kind: str) -> OSError:
        """Log one rate-limited refusal line; the OSError tells ``socketserver`` there is nothing to serve."""
        log, live = self._ppd_log, self._proxy_live
        if log is None or live is None:
            logger.log(level, "%s: dropped datagram: %s", peer_text(peer), reason)
        else:
            log.rate = live.current.log_rate
            log.log(level, "%s: dropped datagram: %s", peer_text(peer), reason, kind=kind)
        return OSError("proxyproto: datagram dropped")

    # -- the datagram path -------------------------------------------------------------------

    def get_request(self) -> tuple[Any, Address]:  # (ProxyDatagram, address); Any keeps mypy's base checks quiet
        """Receive one datagram; return it without its header, with the address it is served with.

        A refused datagram is logged and dropped: ``OSError`` tells
        ``socketserver`` there is nothing to serve this time.
        """
        live = self._proxy_live or self._ppd_start()
        sock = self.socket
        data, peer = sock.recvfrom(self.max_packet_size)
        if (live.refresh(self) or live.reported) and not live.usable("dropping every datagram", "serving datagrams"):
            raise OSError("proxyproto: datagram dropped (invalid proxy_* setting)")
        settings = live.current
        hook = self._proxy_hook()
        try:
            trust = settings.trust(peer, sock, hook)
        except Exception as exc:  # a user's hook: its failure drops this datagram, never the loop
            reason = f"proxy_policy_for failed: {type(exc).__name__}: {exc}"
            raise self._ppd_refuse(logging.ERROR, peer, reason, KIND_POLICY_FOR) from None
        policy = trust.policy
        if policy is Policy.SKIP:
            if not trust.trusted and hook is None and starts_with_header(data) and self._ppd_log is not None:
                note_untrusted_header(self._ppd_log, settings, peer, policy)
            return ProxyDatagram(data, ReplySocket(sock, peer, peer), None, peer), peer
        scanner = settings.scanner()
        outcome = scanner.datagram(data)  # G8: each datagram on its own, never joined with another
        header = scanner.header
        verdict = decide(policy, outcome)
        if not verdict.serve:
            reason = refusal_line(settings, policy, outcome, scanner, trust.trusted, hook is not None)
            raise self._ppd_refuse(verdict.level, peer, reason, kind_of(outcome))
        if header is None:
            return ProxyDatagram(data, ReplySocket(sock, peer, peer), None, peer), peer
        handed = handed_on(self._ppd_log, settings, peer, policy, header, trust.trusted, hook is not None)
        # The listener's family matters only for a UNIX-family header: then ask the socket itself.
        family = socket_family(sock) if header.family is Family.UNIX else sock.family
        address = served_address(policy, handed, peer, family)
        reply = ReplySocket(sock, peer, address)
        return ProxyDatagram(data[header.length :], reply, handed, peer), address


class ProxyDatagramRequestHandler(socketserver.DatagramRequestHandler):
    """``DatagramRequestHandler`` whose reply goes, by name, to the proxy that sent the datagram.

    ``socketserver.DatagramRequestHandler.finish()`` sends ``wfile`` to
    ``client_address``, which behind a proxy is the header's source; the
    mixin's :class:`ReplySocket` turns that into a reply to the proxy, so the
    plain handler is safe too.  This one says so in its code: it sends to
    ``self.request.proxy_address`` (the datagram's source), without a header,
    and sends nothing when nothing was written (the plain handler sends an
    empty datagram then, as ``socketserver`` does).
    """

    def finish(self) -> None:
        """Send what the handler wrote to ``wfile`` back to the proxy, in one datagram."""
        wfile = self.wfile
        assert isinstance(wfile, io.BytesIO)
        reply = wfile.getvalue()
        if not reply:
            return
        destination: Any = getattr(self.request, "proxy_address", self.client_address)
        self.socket.sendto(reply, destination)


class ProxyUDPServer(ProxyDatagramMixin, socketserver.UDPServer):
    """Synchronous UDP server stripping each datagram's PROXY v2 header."""


class ThreadingProxyUDPServer(ProxyDatagramMixin, socketserver.ThreadingUDPServer):
    """A thread per datagram, each datagram's PROXY v2 header stripped first."""


if hasattr(os, "fork"):

    class ForkingProxyUDPServer(ProxyDatagramMixin, socketserver.ForkingUDPServer):
        """A child process per datagram, each datagram's PROXY v2 header stripped first."""
