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

Configuration is by class attribute, with the names and meanings of
:class:`proxyproto.ProxyProtocolMixin`; policies and trust apply per
datagram, by the datagram's source.  A datagram the policy refuses is
dropped, and logged in one line on the ``proxyproto`` logger.
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
from .header import ProxyHeader
from .policy import Outcome, Policy, TrustedNetworks, client_address_of, decide, describe, peer_text, uses_addresses

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


class ProxyDatagram(tuple[Any, ...]):
    """``(payload, socket)`` as ``socketserver`` gives datagram handlers, plus where it came from.

    ``proxy_header``: the parsed :class:`ProxyHeader` whenever one was parsed
    (also under IGNORE, and for LOCAL), else None.  ``proxy_address``: the
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

    Put it first among the bases.  Overrides only ``get_request`` (and
    ``serve_forever``, to check the configuration when serving starts).
    """

    #: What a datagram from a trusted source must do (the spec's mode: REQUIRE).
    proxy_policy: Policy | str = Policy.REQUIRE
    #: None: every source is trusted; else IP networks allowed to send headers.
    proxy_trusted: Any | None = None
    #: What sources outside ``proxy_trusted`` get (SKIP, IGNORE or REJECT).
    proxy_untrusted_policy: Policy | str = Policy.SKIP
    #: Cap on a v2 header's 16 + len; larger ones are refused.
    proxy_max_header_size: int = 4096
    #: Verify a CRC-32C TLV when present.
    proxy_verify_checksum: bool = True
    #: Receive buffer per datagram: large enough never to truncate one.
    max_packet_size = MAX_DATAGRAM

    _ppd_trusted: TrustedNetworks | None = None
    _ppd_started = False

    socket: socket.socket

    def proxy_policy_for(self, peer: Address, local: Address | None) -> Policy:
        """The policy for a datagram from ``peer`` received on ``local``.

        The default applies ``proxy_trusted``: trusted sources (all, when it is
        None; non-IP sources always) get ``proxy_policy``, the others
        ``proxy_untrusted_policy``.  ``local`` is the socket's own address
        (``getsockname()``), passed only when the method is overridden.
        """
        trusted = self._ppd_trusted
        if trusted is None or not isinstance(peer, tuple) or peer[0] in trusted:
            return Policy(self.proxy_policy)
        return Policy(self.proxy_untrusted_policy)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Check the configuration, then serve as ``socketserver`` does."""
        self._ppd_start()
        super().serve_forever(poll_interval)  # type: ignore[misc]

    def _ppd_start(self) -> None:
        """Validate the policies and parse ``proxy_trusted`` once, when serving starts."""
        if self._ppd_started:
            return
        for name in ("proxy_policy", "proxy_untrusted_policy"):
            Policy(getattr(self, name))  # ValueError for an unknown policy
        if Policy(self.proxy_untrusted_policy) in (Policy.USE, Policy.REQUIRE):
            raise ValueError(
                "proxy_untrusted_policy: USE and REQUIRE would let untrusted sources set their address; "
                "use SKIP, IGNORE or REJECT"
            )
        self._ppd_trusted = None if self.proxy_trusted is None else TrustedNetworks(self.proxy_trusted)
        self._ppd_started = True

    def get_request(self) -> tuple[Any, Address]:  # (ProxyDatagram, address); Any keeps mypy's base checks quiet
        """Receive one datagram; return it without its header, with the address it is served with.

        A refused datagram is logged and dropped: ``OSError`` tells
        ``socketserver`` there is nothing to serve this time.
        """
        self._ppd_start()
        sock = self.socket
        data, peer = sock.recvfrom(self.max_packet_size)
        overridden = type(self).proxy_policy_for is not ProxyDatagramMixin.proxy_policy_for
        policy = Policy(self.proxy_policy_for(peer, sock.getsockname() if overridden else None))
        if policy is Policy.SKIP:
            return ProxyDatagram(data, sock, None, peer), peer
        header, outcome, error = self._ppd_parse(data)
        verdict = decide(policy, outcome)
        if not verdict.serve:
            reason = describe(policy, outcome, error, len(data), 0.0)
            logger.log(verdict.level, "%s: dropped datagram: %s", peer_text(peer), reason)
            raise OSError("proxyproto: datagram dropped")
        if header is None:
            return ProxyDatagram(data, sock, None, peer), peer
        address = client_address_of(header) if uses_addresses(policy, header) else peer
        return ProxyDatagram(data[header.length :], sock, header, peer), address

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
