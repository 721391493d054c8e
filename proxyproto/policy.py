"""What a receiver does with what arrived: the policy table, as data.

The spec (G9, section 5) asks a receiver never to guess: REQUIRE and SKIP are
its two modes.  USE, IGNORE and REJECT (named as in pires/go-proxyproto) are
opt-ins that look at the first bytes.  Every I/O adapter reduces what
happened on a connection to an :class:`Outcome` (the core's
:class:`~proxyproto.reader.HeaderScanner` does) and asks :func:`decide`, so
the socketserver mixin, ``read_header`` and any other adapter agree cell for
cell.  Trust (which peers may send a header at all) lives here too.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Iterable
from typing import Any, NamedTuple, Union

from .addresses import AF_INET, AF_INET6
from .errors import HeaderRejected, HeaderTimeout, NoProxyHeader, ProxyProtocolError
from .header import Family, ProxyHeader
from .reader import HeaderScanner, Outcome  # Outcome is the core's, named here too

__all__ = ["Outcome", "Policy"]

#: What ``socket.accept()`` or ``recvfrom()`` gives: a tuple for IP families, str or bytes for AF_UNIX.
Address = Any


class Policy(enum.Enum):
    """What a connection must do about the PROXY header."""

    #: A valid header is mandatory; anything else is closed (the spec's mode).
    REQUIRE = "REQUIRE"
    #: Use a header when one is there, serve streams without one (opt-in sniffing).
    USE = "USE"
    #: Read and remove a header when one is there, but keep the socket's address.
    IGNORE = "IGNORE"
    #: Refuse connections that send a header; serve the others (spoof detection).
    REJECT = "REJECT"
    #: Never look: every byte is payload (the spec's mode for untrusted peers).
    SKIP = "SKIP"


class Verdict(NamedTuple):
    """``serve`` or close; when closing, the ``level`` of the log line (:func:`refusal` gives the exception)."""

    serve: bool
    level: int = logging.WARNING


_SERVE = Verdict(True)
_OPT_IN = (Policy.USE, Policy.IGNORE, Policy.REJECT)


def decide(policy: Policy, outcome: Outcome) -> Verdict:
    """The cell of DESIGN.md's policy table for ``policy`` and ``outcome``."""
    if policy is Policy.SKIP:
        return _SERVE
    if outcome is Outcome.HEADER:
        if policy is Policy.REJECT:
            return Verdict(False, logging.WARNING)
        return _SERVE
    if outcome is Outcome.INVALID:
        return Verdict(False, logging.WARNING)
    if outcome is Outcome.PARTIAL:
        return Verdict(False, logging.WARNING)
    if policy in _OPT_IN:  # NO_HEADER, SILENT, EOF: served as if no proxy were there
        return _SERVE
    if outcome is Outcome.NO_HEADER:
        return Verdict(False, logging.WARNING)
    if outcome is Outcome.SILENT:
        return Verdict(False, logging.INFO)
    return Verdict(False, logging.DEBUG)  # EOF under REQUIRE


#: The policies under which a complete, valid header is served: those an adapter's fast path (a
#: header taken whole at accept, no per-connection state) may serve at once.  SKIP is among them,
#: though it reads nothing.
SERVES_A_HEADER = frozenset(policy for policy in Policy if decide(policy, Outcome.HEADER).serve)

#: The policies under which a connection's header is read (SKIP reads nothing, REJECT refuses one).
READS_A_HEADER = frozenset((Policy.REQUIRE, Policy.USE, Policy.IGNORE))


def pins_the_client(policy: Policy, trusted: bool) -> bool:
    """Whether a connection's client and scheme are the PROXY protocol's alone, never its requests' lines.

    True for a trusted peer under a policy that reads its header (REQUIRE,
    USE, IGNORE), whatever the header says (addresses, LOCAL, UNKNOWN, or
    none under USE): that peer is a proxy speaking PROXY, so the
    ``X-Forwarded-*``, ``X-Real-Ip`` or ``Forwarded`` lines of its requests
    are what it relayed from its client.  Servers that believe such lines
    from the proxy's own address (uvicorn's and gunicorn's default
    ``forwarded_allow_ips``, Tornado's ``xheaders``) are told to ignore them
    on these connections, unless the operator chose otherwise.  Under SKIP or
    REJECT no header is taken, and the server's own forwarded-header rules
    apply as they would without this library.  (Daphne's ``--proxy-headers``
    is one setting for its whole server: the Twisted endpoint turns it off
    for every connection.)
    """
    return trusted and policy in READS_A_HEADER


def uses_addresses(policy: Policy, header: ProxyHeader | None) -> bool:
    """Whether a served connection takes its address from ``header``.

    Only a PROXY header with INET, INET6 or UNIX addresses, under REQUIRE or
    USE, replaces the socket's own peer address; LOCAL, UNKNOWN and UNSPEC
    keep it (V2-R1, V1-R6).
    """
    # A header has a source exactly when it is PROXY with a family other than UNSPEC:
    # parsers give LOCAL, UNSPEC and UNKNOWN none, and ProxyHeader() refuses one there.
    return header is not None and header.source is not None and (policy is Policy.REQUIRE or policy is Policy.USE)


def client_address_of(header: ProxyHeader) -> Address:
    """The header's source in the shape the socket module gives for its family."""
    source = header.source
    if header.family is Family.INET6:
        assert isinstance(source, tuple)
        return (source[0], source[1], 0, 0)
    return source


_IP_FAMILIES = (AF_INET, AF_INET6)


def served_address(policy: Policy, header: ProxyHeader | None, peer: Address, listener_family: int) -> Address:
    """The address a served connection (or datagram) is served with.

    The header's source when the policy uses it (:func:`uses_addresses`),
    else the socket's own ``peer``.  On an IP listener (``listener_family``
    AF_INET or AF_INET6) the result is always an IP tuple, because the
    handlers written for one (``http.server``'s ``address_string()``,
    ``host, port = self.client_address[:2]``) assume so: a header whose
    source is a UNIX address is served with the socket's own peer, as LOCAL
    is, the header still on ``proxy_header`` (DESIGN.md, "What a handler sees").
    """
    if header is None or not uses_addresses(policy, header):
        return peer
    if header.family is Family.UNIX and listener_family in _IP_FAMILIES:
        return peer
    return client_address_of(header)


def peer_text(peer: Address) -> str:
    """A peer address for a log line: ``host:port``, ``[v6]:port`` or ``unix:path``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    return f"unix:{peer!r}" if peer else "unix:(unnamed)"


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


#: ``TrustedNetworks.unix``: every UNIX-socket peer is trusted (the ``unix`` token, or ``"*"``).
UNIX_ANY = "any"
#: ``TrustedNetworks.unix``, and :func:`proxyproto.peers.unix_access`'s answer: the peers of a UNIX
#: socket whose permissions restrict who can connect (a socket file that is not world-writable).
UNIX_RESTRICTED = "restricted"
#: ``TrustedNetworks.unix``: no UNIX-socket peer is trusted (``""``).
UNIX_NONE = "none"
#: :func:`proxyproto.peers.unix_access`'s answer for a UNIX socket anyone on the host may connect to
#: (world-writable, abstract, unnamed).
UNIX_OPEN = "open"

#: Peers whose trust verdict is remembered before the memory starts over.
_VERDICT_CACHE_SIZE = 1024

_SINGLE = (str, bytes, ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Address, ipaddress.IPv6Address)


class TrustedNetworks:
    """A set of IP networks allowed to send headers (G10).

    Accepts network strings (``"10.0.0.0/8"``), single addresses,
    ``ipaddress`` objects, an iterable of those, and the comma-separated
    strings gunicorn's ``proxy_allow_ips`` and uvicorn's
    ``--forwarded-allow-ips`` take (``"10.0.0.0/8, 127.0.0.1"``); ``"*"``
    means every peer.  An empty string trusts no one.  An IPv4-mapped peer
    (``::ffff:10.1.2.3``, as a dual-stack socket reports IPv4 clients)
    matches its IPv4 network.  Anything unreadable raises ``ValueError``.

    UNIX-socket peers (``unix``): :data:`UNIX_ANY` when the list holds the
    token ``unix`` or ``"*"`` (every peer of every UNIX socket);
    :data:`UNIX_NONE` when the list is empty (``""``: no one, UNIX peers
    included); else :data:`UNIX_RESTRICTED`, the default: the peers of a
    UNIX socket whose permissions restrict who can connect
    (:meth:`proxyproto.settings.Settings.trust`).
    """

    __slots__ = ("networks", "unix", "verdicts")

    def __init__(
        self,
        networks: Iterable[object] | str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address,
    ) -> None:
        if isinstance(networks, bytes):
            networks = networks.decode("ascii", "replace")
        if isinstance(networks, str):
            networks = [part for part in networks.replace(",", " ").split() if part]
        elif isinstance(networks, _SINGLE):
            networks = [networks]
        parsed: list[Network] = []
        unix = UNIX_NONE
        for network in networks:
            if isinstance(network, str) and network.strip().lower() == "unix":
                unix = UNIX_ANY
                continue
            if isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                parsed.append(network)
            elif isinstance(network, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                parsed.append(ipaddress.ip_network(network))
            elif network == "*":
                parsed.extend((ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))
                unix = UNIX_ANY
            elif isinstance(network, str):
                try:
                    parsed.append(ipaddress.ip_network(network.strip(), strict=False))
                except ValueError as exc:
                    raise ValueError(f"cannot read {network!r} as an IP network: {exc}") from None
            else:
                raise ValueError(f"cannot read {network!r} as an IP network")
        self.networks = tuple(parsed)
        if unix == UNIX_NONE and parsed:
            unix = UNIX_RESTRICTED
        #: Which UNIX-socket peers are trusted: UNIX_ANY, UNIX_RESTRICTED or UNIX_NONE.
        self.unix: str = unix
        self.verdicts: dict[str, bool] = {}

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str):
            return False
        verdicts = self.verdicts
        verdict = verdicts.get(host)
        if verdict is None:
            # A backend sees few distinct peers (its proxies): remember each answer, so the
            # ipaddress parse and network walk run once per peer, not per connection.
            # Bounded, so a scan from many addresses cannot grow it without limit.
            verdict = self._match(host)
            if len(verdicts) >= _VERDICT_CACHE_SIZE:
                verdicts.clear()
            verdicts[host] = verdict
        return verdict

    def _match(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            mapped = address.ipv4_mapped
            if any(mapped in network for network in self.networks):
                return True
        return any(address in network for network in self.networks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustedNetworks):
            return NotImplemented
        return self.networks == other.networks and self.unix == other.unix

    def __hash__(self) -> int:
        return hash((self.networks, self.unix))

    def names(self) -> list[str]:
        """The networks as text, and ``unix`` when every UNIX-socket peer is trusted."""
        return [str(network) for network in self.networks] + (["unix"] if self.unix == UNIX_ANY else [])

    def describe(self) -> str:
        """The list for a log line: ``127.0.0.1/32, ::1/128``, ``every peer`` or ``no peer``."""
        names = self.names()
        if {"0.0.0.0/0", "::/0", "unix"} <= set(names):
            return "every peer"
        return ", ".join(names) or "no peer"

    def __repr__(self) -> str:
        return f"TrustedNetworks({self.names()!r})"


class Trust(NamedTuple):
    """The trust decision for one connection (or datagram): its policy, and whether its peer is trusted.

    ``trusted`` says whether a header the connection sends may reach the
    application (as ``proxy_header``, ``get_extra_info("proxy_header")``,
    ``environ["proxyproto.header"]``): a header from an untrusted peer never
    does, under any policy (DESIGN.md); its TLVs are claims anyone can write.
    """

    policy: Policy
    trusted: bool


def describe(policy: Policy, outcome: Outcome, error: ProxyProtocolError | None, held: int, timeout: float) -> str:
    """One line saying what happened on a connection, for the log line and the exception.

    ``held`` is how many header bytes had arrived, ``timeout`` the header deadline.
    """
    if error is not None:
        return str(error)
    if outcome is Outcome.HEADER:
        return f"sent a PROXY header, which policy {policy.name} refuses"
    if outcome is Outcome.SILENT:
        return f"no PROXY header within {timeout:g} s"
    if outcome is Outcome.PARTIAL:
        return f"incomplete PROXY header ({held} byte(s)) after {timeout:g} s"
    return "closed before sending a PROXY header"


def refusal(
    policy: Policy, outcome: Outcome, error: ProxyProtocolError | None, held: int, timeout: float
) -> ProxyProtocolError:
    """The exception a blocking or async ``read_header`` raises where the policy closes."""
    if error is not None and outcome is not Outcome.HEADER:
        return error
    message = describe(policy, outcome, error, held, timeout)
    if outcome is Outcome.HEADER:
        return HeaderRejected(message)
    if outcome is Outcome.EOF:
        return NoProxyHeader(message, offset=0)
    return HeaderTimeout(message, offset=held)


class Attempt:
    """One header read under a policy: the policy, and the core's scanner that says what arrived.

    The I/O adapters' attempts (:class:`proxyproto.sock.HeaderAttempt`,
    the streams adapter's) are this plus the reading.  Once the scanner has
    an outcome, :meth:`describe` gives the refusal line and :meth:`exception`
    what a ``read_header`` raises.
    """

    __slots__ = ("policy", "scanner")

    def __init__(self, policy: Policy, scanner: HeaderScanner) -> None:
        self.policy = policy
        self.scanner = scanner

    @property
    def outcome(self) -> Outcome | None:
        """What arrived, once known (None before)."""
        return self.scanner.outcome

    @property
    def header(self) -> ProxyHeader | None:
        """The header, for the outcome HEADER."""
        return self.scanner.header

    @property
    def error(self) -> ProxyProtocolError | None:
        """What was wrong, for the outcomes NO_HEADER and INVALID."""
        return self.scanner.error

    def timed_out(self) -> None:
        """The deadline passed before the outcome was known."""
        self.scanner.expire()

    def describe(self, timeout: float) -> str:
        """One line saying what happened, for logs and exceptions (``timeout``: the header deadline)."""
        scanner = self.scanner
        assert scanner.outcome is not None
        return describe(self.policy, scanner.outcome, scanner.error, scanner.seen, timeout)

    def exception(self, timeout: float) -> ProxyProtocolError:
        """The exception a ``read_header`` raises for a closing verdict."""
        scanner = self.scanner
        assert scanner.outcome is not None
        return refusal(self.policy, scanner.outcome, scanner.error, scanner.seen, timeout)
