"""What a receiver does with what arrived: the policy table, as data.

The spec (G9, section 5) asks a receiver never to guess: REQUIRE and SKIP are
its two modes.  USE, IGNORE and REJECT (named as in pires/go-proxyproto) are
opt-ins that look at the first bytes.  Every I/O adapter reduces what
happened on a connection to an :class:`Outcome` and asks :func:`decide`, so
the socketserver mixin, ``read_header`` and any other adapter agree cell for
cell.  Trust (which peers may send a header at all) lives here too.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Iterable
from typing import NamedTuple, Union

from .errors import HeaderRejected, HeaderTimeout, NoProxyHeader, ProxyProtocolError
from .header import ProxyHeader

__all__ = [
    "Outcome",
    "Policy",
    "TrustedNetworks",
    "Verdict",
    "decide",
    "describe",
    "refusal",
    "uses_addresses",
]


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


class Outcome(enum.Enum):
    """What the first bytes of a connection turned out to be."""

    HEADER = "a valid header"
    NO_HEADER = "no PROXY header"
    INVALID = "malformed header"
    SILENT = "nothing before the deadline"
    PARTIAL = "part of a header before the deadline"
    EOF = "closed before its first byte"


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


def uses_addresses(policy: Policy, header: ProxyHeader | None) -> bool:
    """Whether a served connection takes its address from ``header``.

    Only a PROXY header with INET, INET6 or UNIX addresses, under REQUIRE or
    USE, replaces the socket's own peer address; LOCAL, UNKNOWN and UNSPEC
    keep it (V2-R1, V1-R6).
    """
    # A header has a source exactly when it is PROXY with a family other than UNSPEC:
    # parsers give LOCAL, UNSPEC and UNKNOWN none, and ProxyHeader() refuses one there.
    return (
        header is not None
        and header.source is not None
        and (policy is Policy.REQUIRE or policy is Policy.USE)
    )


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


_SINGLE = (str, bytes, ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Address, ipaddress.IPv6Address)


class TrustedNetworks:
    """A set of IP networks allowed to send headers (G10).

    Accepts network strings (``"10.0.0.0/8"``), single addresses and
    ``ipaddress`` objects.  An IPv4-mapped peer (``::ffff:10.1.2.3``, as a
    dual-stack socket reports IPv4 clients) matches its IPv4 network.
    """

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[object]) -> None:
        single = (
            str,
            bytes,
            ipaddress.IPv4Network,
            ipaddress.IPv6Network,
            ipaddress.IPv4Address,
            ipaddress.IPv6Address,
        )
        if isinstance(networks, single):
            networks = [networks]
        parsed: list[Network] = []
        for network in networks:
            if isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                parsed.append(network)
            elif isinstance(network, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                parsed.append(ipaddress.ip_network(network))
            elif isinstance(network, str):
                parsed.append(ipaddress.ip_network(network, strict=False))
            else:
                raise ValueError(f"proxy_trusted: cannot read {network!r} as an IP network")
        self.networks = tuple(parsed)

    def __contains__(self, host: object) -> bool:
        if not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            mapped = address.ipv4_mapped
            if any(mapped in network for network in self.networks):
                return True
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(network) for network in self.networks]!r})"


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
