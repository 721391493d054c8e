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

Replies must go back to ``proxy_address``, never to ``client_address``:
sending straight to the header's source would bypass the proxy, and with a
forged header reflect traffic at a third party.
``socketserver.DatagramRequestHandler`` replies to ``client_address``, so use
:class:`ProxyDatagramRequestHandler`, or ``sendto(..., self.request.proxy_address)``
in a ``BaseRequestHandler``.

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
settings are re-read for every datagram (:class:`proxyproto.settings.TrustSettings`),
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
import logging
import os
import socket
import socketserver
from typing import Any

from . import reader
from .errors import InvalidHeader, NoProxyHeader, ProxyProtocolError
from .header import Command, Family, Protocol, ProxyHeader
from .peers import socket_family, unix_access
from .policy import Outcome, Policy, Trust, decide, describe, hook_trust, peer_text, served_address
from .refusal_log import DEFAULT_LOG_RATE, KIND_POLICY_FOR, RefusalLog, kind_of
from .settings import DEFAULT_TRUSTED, TrustSettings, check_setting, check_settings

__all__ = [
    "ForkingProxyUDPServer",
    "ProxyDatagram",
    "ProxyDatagramMixin",
    "ProxyDatagramRequestHandler",
    "ProxyUDPServer",
    "ThreadingProxyUDPServer",
]

logger = logging.getLogger("proxyproto")

Address = Any

#: Largest UDP payload over IPv4 is 65507 bytes, over IPv6 (without jumbograms) 65527:
#: receive buffers of this size never truncate a datagram.
MAX_DATAGRAM = 65535

#: The settings checked when the server is activated and when serving starts.
SETTINGS = ("proxy_policy", "proxy_trusted", "proxy_untrusted_policy", "proxy_max_header_size", "proxy_log_rate")

_PROTOCOL_NAMES = {Protocol.STREAM: "STREAM (TCP)", Protocol.DGRAM: "DGRAM (UDP)", Protocol.UNSPEC: "UNSPEC"}


class ProxyDatagram(tuple[Any, ...]):
    """``(payload, socket)`` as ``socketserver`` gives datagram handlers, plus where it came from.

    ``proxy_header``: the parsed :class:`ProxyHeader` whenever one was parsed
    from a trusted source (also under IGNORE, and for LOCAL), else None: an
    untrusted source's header is stripped and never handed on.  ``proxy_address``: the
    datagram's source, i.e. the proxy: the only address a reply may go to.
    """

    proxy_header: ProxyHeader | None
    proxy_address: Address

    def __new__(
        cls, payload: bytes, sock: socket.socket, proxy_header: ProxyHeader | None, proxy_address: Address
    ) -> ProxyDatagram:
        self = super().__new__(cls, (payload, sock))
        self.proxy_header = proxy_header
        self.proxy_address = proxy_address
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # keeps copy and pickle working
        return (self[0], self[1], self.proxy_header, self.proxy_address)


class ProxyDatagramMixin:
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

    _ppd_settings: TrustSettings | None = None
    _ppd_log: RefusalLog | None = None

    socket: socket.socket

    def proxy_policy_for(self, peer: Address, local: Address | None) -> Policy:
        """The policy for a datagram from ``peer`` received on ``local``.

        The default applies ``proxy_trusted``: trusted sources (loopback,
        unless it says otherwise) get ``proxy_policy``, the others
        ``proxy_untrusted_policy``; on a UNIX datagram socket a source is
        trusted when the socket's file is not world-writable, or when
        ``proxy_trusted`` says ``unix`` or ``"*"``
        (:func:`proxyproto.policy.trust_for`).  ``local`` is the socket's own
        address (``getsockname()``), passed only when the method is
        overridden.  An override's source counts as trusted (its header
        reaches the handler) when it answers REQUIRE or USE.
        """
        settings = self._ppd_settings or TrustSettings()
        settings.refresh(self)
        if settings.error is not None:
            raise settings.error
        return self._ppd_default_trust(settings, peer).policy

    def _ppd_default_trust(self, settings: TrustSettings, peer: Address) -> Trust:
        """``proxy_trusted``'s decision for ``peer``: on a UNIX socket it asks the socket file's mode."""
        return settings.trust(peer, None if type(peer) is tuple else unix_access(self.socket))

    # -- configuration ---------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse an invalid ``proxy_*`` value where it is set (ValueError naming the setting)."""
        if name.startswith("proxy_"):
            check_setting(name, value)
        super().__setattr__(name, value)

    def server_activate(self) -> None:
        """Check the ``proxy_*`` settings in the constructor, so a mistake surfaces there."""
        check_settings(self, SETTINGS)
        super().server_activate()  # type: ignore[misc]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Check the configuration, then serve as ``socketserver`` does.

        When the check fails, ``shutdown()`` must still return: socketserver's
        waits for an event that only a loop which ran sets, so it is set here.
        """
        try:
            self._ppd_start()
        except BaseException:
            shut_down = getattr(self, "_BaseServer__is_shut_down", None)
            if shut_down is not None:
                shut_down.set()
            raise
        super().serve_forever(poll_interval)  # type: ignore[misc]

    def service_actions(self) -> None:
        """Write the summary of suppressed refusal lines once their second is over, then the base's actions."""
        super().service_actions()  # type: ignore[misc]
        log = self._ppd_log
        if log is not None and log.suppressed:
            log.rate = self.proxy_log_rate
            log.flush()

    def handle_timeout(self) -> None:
        """``handle_request()`` timed out (it never calls ``service_actions``): the summary is due here too."""
        log = self._ppd_log
        if log is not None and log.suppressed:
            log.flush()
        super().handle_timeout()  # type: ignore[misc]

    def _ppd_start(self) -> TrustSettings:
        """Validate the settings when serving starts (ValueError naming the setting); set up trust and the log."""
        settings = self._ppd_settings
        if settings is not None:
            return settings
        check_settings(self, SETTINGS)
        settings = TrustSettings()
        settings.refresh(self)
        self._ppd_log = RefusalLog(logger, self.proxy_log_rate)
        self._ppd_settings = settings
        return settings

    def _ppd_refuse(self, level: int, peer: Address, reason: str, kind: str) -> OSError:
        """Log one rate-limited refusal line; the OSError tells ``socketserver`` there is nothing to serve."""
        log = self._ppd_log
        if log is None:
            logger.log(level, "%s: dropped datagram: %s", peer_text(peer), reason)
        else:
            log.rate = self.proxy_log_rate
            log.log(level, "%s: dropped datagram: %s", peer_text(peer), reason, kind=kind)
        return OSError("proxyproto: datagram dropped")

    # -- the datagram path -------------------------------------------------------------------

    def get_request(self) -> tuple[Any, Address]:  # (ProxyDatagram, address); Any keeps mypy's base checks quiet
        """Receive one datagram; return it without its header, with the address it is served with.

        A refused datagram is logged and dropped: ``OSError`` tells
        ``socketserver`` there is nothing to serve this time.
        """
        settings = self._ppd_settings or self._ppd_start()
        sock = self.socket
        data, peer = sock.recvfrom(self.max_packet_size)
        if (settings.refresh(self) or settings.reported) and not settings.usable(
            "dropping every datagram", "serving datagrams"
        ):
            raise OSError("proxyproto: datagram dropped (invalid proxy_* setting)")
        cls = type(self)
        if cls.proxy_policy_for is not ProxyDatagramMixin.proxy_policy_for or "proxy_policy_for" in vars(self):
            try:
                trust = hook_trust(self.proxy_policy_for(peer, sock.getsockname()))
            except Exception as exc:  # a user's hook: its failure drops this datagram, never the loop
                reason = f"proxy_policy_for failed: {type(exc).__name__}: {exc}"
                raise self._ppd_refuse(logging.ERROR, peer, reason, KIND_POLICY_FOR) from None
        else:
            trust = self._ppd_default_trust(settings, peer)
        policy = trust.policy
        if policy is Policy.SKIP:
            return ProxyDatagram(data, sock, None, peer), peer
        header, outcome, error = self._ppd_parse(data)
        verdict = decide(policy, outcome)
        if not verdict.serve:
            reason = describe(policy, outcome, error, len(data), 0.0)
            raise self._ppd_refuse(verdict.level, peer, reason, kind_of(outcome))
        if header is None:
            return ProxyDatagram(data, sock, None, peer), peer
        # The listener's family matters only for a UNIX-family header: then ask the socket itself.
        family = socket_family(sock) if header.family is Family.UNIX else sock.family
        address = served_address(policy, header, peer, family)
        # An untrusted source's header is stripped, never handed on (its TLVs are anyone's claims).
        return ProxyDatagram(data[header.length :], sock, header if trust.trusted else None, peer), address

    def _ppd_parse(self, data: bytes) -> tuple[ProxyHeader | None, Outcome, ProxyProtocolError | None]:
        """What one datagram starts with (G8: on its own, never joined with another)."""
        if not data:
            return None, Outcome.NO_HEADER, NoProxyHeader("empty datagram", offset=0)
        try:
            header = reader.parse(data, max_size=self.proxy_max_header_size, verify_checksum=self.proxy_verify_checksum)
        except NoProxyHeader as exc:
            return None, Outcome.NO_HEADER, exc
        except InvalidHeader as exc:
            return None, Outcome.INVALID, exc
        if header is None:
            return (
                None,
                Outcome.INVALID,
                InvalidHeader(
                    f"PROXY header incomplete in a datagram of {len(data)} byte(s) (G8: never split across datagrams)",
                    offset=len(data),
                ),
            )
        if header.version != 2:
            return None, Outcome.INVALID, InvalidHeader("v1 header in a datagram: only v2 applies to UDP (G8)")
        if header.protocol is Protocol.STREAM and header.command is Command.PROXY:
            byte = header.family << 4 | header.protocol
            return (
                None,
                Outcome.INVALID,
                InvalidHeader(
                    f"PROXY header for a {_PROTOCOL_NAMES[header.protocol]} connection "
                    f"(family/protocol byte 0x{byte:02x}) in a datagram: a datagram server takes "
                    "DGRAM (UDP) or UNSPEC headers only (G8)",
                    offset=13,
                ),
            )
        return header, Outcome.HEADER, None


class ProxyDatagramRequestHandler(socketserver.DatagramRequestHandler):
    """``DatagramRequestHandler`` whose reply goes to the proxy that sent the datagram.

    ``socketserver.DatagramRequestHandler.finish()`` sends ``wfile`` to
    ``client_address``, which behind a proxy is the header's source: that
    would bypass the proxy, and with a forged header reflect traffic at a third
    party.  This one sends to ``self.request.proxy_address`` (the datagram's
    source), without a header, and sends nothing when nothing was written.
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
