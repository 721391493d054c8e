"""Version 1: the human-readable line (SPEC-NOTES section 2).

``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n``, ``TCP6`` likewise, or
``PROXY UNKNOWN[ anything]\\r\\n``.  Exactly one space between fields, CRLF
only, at most 107 bytes, addresses and ports without leading zeros or signs.
Valid lines take a fast path (split on spaces, check each field);
anything else goes through a slower diagnosis that says which field is wrong
and where.
"""

from __future__ import annotations

import re
from typing import TypeVar

from . import addresses
from .addresses import AF_INET, AF_INET6, inet_ntop, inet_pton
from .errors import InvalidHeader, NoProxyHeader
from .header import KINDS, AddressInput, Command, Family, Protocol, ProxyHeader, from_wire

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

#: The longest valid line, CRLF included (UNKNOWN followed by full IPv6 fields).
MAX_LENGTH = 107

_NEW = object.__new__
_TCP4 = KINDS[1, 1, 0x11]
_TCP6 = KINDS[1, 1, 0x21]
_UNKNOWN = KINDS[1, 1, 0x00]
_T = TypeVar("_T")


# A line cut short is refused as soon as no completion could be valid: wrong
# tokens, stray characters, doubled or missing spaces.
def _viable(address: bytes) -> bytes:
    """Expression for every prefix of ``PROTO <address> <address> <port> <port>\r``."""
    port = rb"[0-9]{1,5}"
    return rb"(?:" + address + rb"(?: (?:" + address + rb"(?: (?:" + port + rb"(?: (?:" + port + rb"\r?)?)?)?)?)?)?)?"


_VIABLE_PREFIX = re.compile(
    rb"PROXY (?:UNKNOWN(?: [^\r\n]*)?\r?"
    rb"|TCP4 " + _viable(rb"[0-9.]{1,15}") + rb"|TCP6 " + _viable(rb"[0-9A-Fa-f:.]{1,45}") + rb")\Z"
)
_TOKEN_PREFIXES = (b"PROXY UNKNOWN", b"PROXY TCP4 ", b"PROXY TCP6 ")


def check_prefix(data: bytes) -> None:
    """Refuse an incomplete line (no LF yet) that no completion could make valid.

    ``data`` starts with ``P`` and holds fewer than 107 bytes and no LF.
    """
    if (len(data) <= 13 and any(token.startswith(data) for token in _TOKEN_PREFIXES)) or _VIABLE_PREFIX.match(data):
        return
    # Find the first offending byte for the message.
    good = 0
    for size in range(len(data), 0, -1):
        prefix = data[:size]
        if any(token.startswith(prefix) for token in _TOKEN_PREFIXES) or _VIABLE_PREFIX.match(prefix):
            good = size
            break
    if good < 5:
        raise NoProxyHeader(f"stream starts with {data[:8]!r}, not a PROXY protocol signature", offset=good)
    raise InvalidHeader(
        f"v1: unexpected byte {data[good : good + 1]!r} after {data[:good]!r}",
        field=_field_at(data, good),
        offset=good,
    )


def _field_at(data: bytes, offset: int) -> str:
    names = ("signature", "protocol", "source address", "destination address", "source port", "destination port")
    return names[min(data.count(b" ", 0, offset), 5)]


def decode(data: bytes, end: int, allow_v4_in_tcp6: bool = False) -> ProxyHeader:
    """Decode the line ``data[:end]`` (``end`` is just past its CRLF); refuse it precisely when wrong."""
    header = match_line(data, end, allow_v4_in_tcp6)
    if header is None:
        raise _diagnose(data[: end - 2], allow_v4_in_tcp6)
    return header


def match_line(data: bytes, end: int, allow_v4_in_tcp6: bool = False) -> ProxyHeader | None:
    """The header of a valid line ``data[:end]``, or None when it is not one (no diagnosis: the fast path).

    ``end`` is just past the first CRLF.  Splitting on single spaces and
    checking each field costs less than one regular expression over the
    line; a doubled space makes an empty field, which no check accepts.  The checks run inline, in one ``try``: a
    function per field would cost more than the checks themselves.

    * addresses: ``inet_pton`` is exactly as strict as the grammar (dotted
      quads without leading zeros; IPv6 without zone ids), and a TCP6
      address comes back through ``inet_ntop`` in canonical form;
    * ports: ``int`` alone would accept signs, spaces, underscores and
      leading zeros, so the digits are checked first;
    * the destination's address and port (a server sees few) are looked up
      among those that passed these checks before (``_DESTINATIONS4``,
      ``_DESTINATIONS6``, ``_PORTS``); a source is checked every time, as a
      cache of sources would only flatter a one-client benchmark.
    """
    if end == 15:  # the only valid 15-byte line, and what every real sender emits for UNKNOWN
        return from_wire(_UNKNOWN, None, None, (), data[:15]) if data[:13] == b"PROXY UNKNOWN" else None
    fields = data[: end - 2].split(b" ")  # the signature is a field: no separate check of data[:6]
    if len(fields) != 6 or fields[0] != b"PROXY":
        return _long_unknown(data, end)
    _, protocol, source, destination, source_port, destination_port = fields
    try:
        if protocol == b"TCP4":
            kind = _TCP4
            src = source.decode()
            inet_pton(AF_INET, src)
            dst = _DESTINATIONS4.get(destination)
            if dst is None:
                dst = destination.decode()
                inet_pton(AF_INET, dst)
                _remember(_DESTINATIONS4, destination, dst)
        elif protocol == b"TCP6":
            kind = _TCP6
            src = inet_ntop(AF_INET6, inet_pton(AF_INET6, source.decode()))
            dst = _DESTINATIONS6.get(destination)
            if dst is None:
                dst = inet_ntop(AF_INET6, inet_pton(AF_INET6, destination.decode()))
                _remember(_DESTINATIONS6, destination, dst)
        else:
            return _long_unknown(data, end)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        if protocol == b"TCP6" and allow_v4_in_tcp6:
            return _mixed_tcp6(data, end, fields)
        return None
    dport = _PORTS.get(destination_port)
    if dport is None:
        dport = _port(destination_port)
        if dport < 0:
            return None
        _remember(_PORTS, destination_port, dport)
    # Decimal digits only (no sign, space or underscore, which int() takes), no leading zero.
    if source_port.isdigit() and (source_port[0] != 0x30 or len(source_port) == 1):
        sport = int(source_port)
        if sport <= 65535:
            header = _NEW(ProxyHeader)  # from_wire, inlined on the hottest path: one call fewer per header
            header._kind = kind
            header.source = (src, sport)
            header.destination = (dst, dport)
            header.tlvs = ()
            header.length = end
            header._raw = data[:end]
            return header
    return None


# Destination fields already checked, with their value: a TCP4 address, a TCP6 address (in
# canonical form), a port.  Only what passed the same checks as a source enters them, and a
# field is looked up in the table of its own kind (an IPv4 text is no TCP6 address).
_DESTINATIONS4: dict[bytes, str] = {}
_DESTINATIONS6: dict[bytes, str] = {}
_PORTS: dict[bytes, int] = {}
_REMEMBERED_MAX = 256


def _remember(table: dict[bytes, _T], field: bytes, value: _T) -> None:
    """Keep a checked destination field's value (the table starts again when full)."""
    if len(table) >= _REMEMBERED_MAX:
        table.clear()
    table[field] = value


def _long_unknown(data: bytes, end: int) -> ProxyHeader | None:
    """``PROXY UNKNOWN`` followed by a space and anything but CR or LF (V1-R6), else None."""
    if data[:14] == b"PROXY UNKNOWN " and data.find(b"\r", 14, end - 2) < 0 and data.find(b"\n", 14, end - 2) < 0:
        return from_wire(_UNKNOWN, None, None, (), data[:end])
    return None


def _mixed_tcp6(data: bytes, end: int, fields: list[bytes]) -> ProxyHeader | None:
    """A TCP6 line with an IPv4 side, as nginx writes it (accepted only under ``allow_v4_in_tcp6``)."""
    source = _ipv6_host(fields[2], True)
    destination = _ipv6_host(fields[3], True)
    source_port = _port(fields[4])
    destination_port = _port(fields[5])
    if source is None or destination is None or source_port < 0 or destination_port < 0:
        return None
    return from_wire(_TCP6, (source, source_port), (destination, destination_port), (), data[:end])


def _port(text: bytes) -> int:
    """A port field as an int, or -1: decimal ASCII, 0..65535, no sign and no leading zero."""
    if 0 < len(text) <= 5 and text.isdigit() and (text[0] != 0x30 or len(text) == 1):
        value = int(text)
        if value <= 65535:
            return value
    return -1


def _ipv6_host(text: bytes, allow_v4: bool) -> str | None:
    try:
        host = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    packed = addresses.pack_ipv6(host)
    if packed is not None:
        return addresses.ipv6_text(packed)
    if allow_v4 and addresses.pack_ipv4(host) is not None:
        return "::ffff:" + host
    return None


def _diagnose(line: bytes, allow_v4_in_tcp6: bool) -> InvalidHeader:
    """Say exactly what is wrong with a complete line the fast path refused."""
    fields = line.split(b" ")
    offsets: list[int] = []
    position = 0
    for field in fields:
        offsets.append(position)
        position += len(field) + 1
    if fields[0] != b"PROXY":
        return InvalidHeader(f"v1: expected 'PROXY ' at the start, got {line[:6]!r}", field="signature", offset=5)
    if len(fields) < 2:
        return InvalidHeader("v1: line ends after 'PROXY'", field="protocol", offset=5)
    protocol = fields[1]
    if protocol == b"UNKNOWN":  # only a stray byte after the token can get here
        return InvalidHeader("v1: UNKNOWN must be followed by a space or CRLF", field="protocol", offset=13)
    if b"" in fields:
        index = fields.index(b"")
        return InvalidHeader(
            "v1: fields must be separated by exactly one space", field="separator", offset=offsets[index]
        )
    if protocol not in (b"TCP4", b"TCP6"):
        return InvalidHeader(
            f"v1: unknown protocol {protocol!r} (expected TCP4, TCP6 or UNKNOWN)", field="protocol", offset=6
        )
    if len(fields) != 6:
        return InvalidHeader(
            f"v1: {protocol.decode()} needs 4 fields after it, got {len(fields) - 2}",
            field="fields",
            offset=len(line),
        )
    names: tuple[str, ...] = ("source address", "destination address", "source port", "destination port")
    for index, name in enumerate(names, start=2):
        value = fields[index]
        offset = offsets[index]
        if index >= 4:
            if _port(value) < 0:
                return InvalidHeader(
                    f"v1: {name} {value!r} is not a decimal 0..65535 without sign or leading zero",
                    field=name,
                    offset=offset,
                )
            continue
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if protocol == b"TCP4":
            if addresses.pack_ipv4(text) is None:
                return InvalidHeader(
                    f"v1: {name} {value!r} is not a dotted-quad IPv4 address (0..255, no leading zeros)",
                    field=name,
                    offset=offset,
                )
        elif not text or _ipv6_host(value, allow_v4_in_tcp6) is None:
            hint = " (IPv4 in TCP6 needs allow_v4_in_tcp6)" if addresses.pack_ipv4(text) else ""
            return InvalidHeader(f"v1: {name} {value!r} is not an IPv6 address{hint}", field=name, offset=offset)
    return InvalidHeader(f"v1: malformed line {line!r}", field="line", offset=0)  # pragma: no cover


def encode(source: AddressInput | None, destination: AddressInput | None) -> bytes:
    """The v1 line for two addresses as ``parse`` gives them (or socket 4-tuples).

    Two IPv4 addresses give TCP4; any IPv6 side gives TCP6 with the IPv4 side
    mapped to ``::ffff:a.b.c.d`` (HAProxy's practice, V1-S4); ``None, None``
    and UNIX names give ``PROXY UNKNOWN\\r\\n``, the short form every real
    sender uses.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        missing = "source" if source is None else "destination"
        raise ValueError(f"{missing}: both addresses or neither are required")
    if isinstance(source, (str, bytes)) and isinstance(destination, (str, bytes)):
        return b"PROXY UNKNOWN\r\n"
    (src_host, src_port), (dst_host, dst_port) = (
        addresses.split_host_port(source, "source"),
        addresses.split_host_port(destination, "destination"),
    )
    src4 = addresses.pack_ipv4(src_host)
    dst4 = addresses.pack_ipv4(dst_host)
    if src4 is not None and dst4 is not None:
        return b"PROXY TCP4 %s %s %d %d\r\n" % (src_host.encode(), dst_host.encode(), src_port, dst_port)
    src6 = _v6_text(src_host, src4, "source")
    dst6 = _v6_text(dst_host, dst4, "destination")
    return b"PROXY TCP6 %s %s %d %d\r\n" % (src6.encode(), dst6.encode(), src_port, dst_port)


def _v6_text(host: str, packed4: bytes | None, field: str) -> str:
    if packed4 is not None:
        return "::ffff:" + host
    packed = addresses.pack_ipv6(host)
    if packed is None:
        raise ValueError(f"{field}: {host!r} is neither an IPv4 nor an IPv6 address")
    return addresses.ipv6_text(packed)


def encode_header(header: ProxyHeader) -> bytes:
    """Canonical v1 line of a header built in code (UNKNOWN when v1 cannot say it)."""
    if (
        header.command is Command.PROXY
        and header.protocol is Protocol.STREAM
        and header.family in (Family.INET, Family.INET6)
    ):
        return encode(header.source, header.destination)
    return b"PROXY UNKNOWN\r\n"
