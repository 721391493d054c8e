"""Version 2: the binary header (SPEC-NOTES section 3).

Layout: 12-byte signature, version-command byte (0x20 LOCAL, 0x21 PROXY),
family-protocol byte (one of seven), big-endian ``len``, then ``len`` bytes:
the address block of the family and TLVs tiling the rest exactly.

Parsing runs in the order the checksum demands: the structure is walked
first (so the CRC TLV can be found), the CRC-32C is verified over the bytes as
received with its field zeroed in place, and only then are the standard TLV
values checked, so that a flipped bit anywhere in a checksummed header is
reported as a :class:`ChecksumError`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from . import addresses
from .addresses import AF_INET, AF_INET6, inet_ntop, inet_pton
from .crc32c import crc32c
from .errors import ChecksumError, InvalidHeader, NoProxyHeader
from .header import KINDS, Address, AddressInput, Command, Family, Protocol, ProxyHeader
from .tlv import TLV, TLVType, check_tlv

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: 16 + the largest ``len``.
MAX_LENGTH = 16 + 0xFFFF

#: Address block size per family-protocol byte; -1 marks the bytes the spec forbids.
BLOCK_SIZE = [-1] * 256
for _byte, _size in ((0x00, 0), (0x11, 12), (0x12, 12), (0x21, 36), (0x22, 36), (0x31, 216), (0x32, 216)):
    BLOCK_SIZE[_byte] = _size
del _byte, _size

#: Header kinds by ``ver_cmd << 8 | fam``.
_KINDS = {(0x20 | command) << 8 | fam: kind for (version, command, fam), kind in KINDS.items() if version == 2}
_NEW = object.__new__
_TCP4 = _KINDS[0x2111]
_UDP4 = _KINDS[0x2112]
_UNPACK_INET_HEADER = struct.Struct(">12sBBH4BIHH").unpack_from
_DECIMAL = tuple(str(octet) for octet in range(256))
#: Destination hosts already formatted, by their address as an integer.  A server sees few of
#: them (the addresses its proxies accept on), so a lookup replaces the formatting; sources vary
#: per client and are always formatted.  Bounded: emptied when full.
_DESTINATIONS: dict[int, str] = {}
_DESTINATIONS_MAX = 256
_INET6_BLOCK = struct.Struct(">16s16sHH").unpack_from
_NEW_TLV = tuple.__new__
_ZERO_CRC = b"\0\0\0\0"
_PREFIX = struct.Struct(">12sBBH")
_UNPACK_PREFIX = _PREFIX.unpack_from


def measure(data: bytes, max_size: int) -> int:
    """Size of the v2 header ``data`` starts with: ``> 0`` when complete, ``-n`` when n more bytes are needed.

    Each fixed field is checked as soon as it has arrived, so a bad version,
    command or family, or an oversize length, is refused without waiting.
    """
    have = len(data)
    if not SIGNATURE.startswith(data[:12]):
        raise NoProxyHeader(f"stream starts with {data[:12]!r}, not a PROXY protocol signature", offset=0)
    if have < 13:
        return have - 16
    ver_cmd = data[12]
    if ver_cmd >> 4 != 2:
        raise InvalidHeader(
            f"v2: version {ver_cmd >> 4} in byte 0x{ver_cmd:02x}, only version 2 exists",
            field="version",
            offset=12,
        )
    if ver_cmd & 0x0F > 1:
        raise InvalidHeader(
            f"v2: command 0x{ver_cmd & 0x0F:x} is neither LOCAL (0) nor PROXY (1)", field="command", offset=12
        )
    if have < 14:
        return have - 16
    block = BLOCK_SIZE[data[13]]
    if block < 0:
        raise InvalidHeader(
            f"v2: family-protocol byte 0x{data[13]:02x} is not one of the seven the spec defines",
            field="family",
            offset=13,
        )
    if have < 16:
        return have - 16
    total = 16 + (data[14] << 8 | data[15])
    if total > max_size:
        raise InvalidHeader(f"v2: header of {total} bytes exceeds the limit of {max_size}", field="length", offset=14)
    if ver_cmd == 0x21 and total - 16 < block:
        raise InvalidHeader(
            f"v2: len {total - 16} is shorter than the {block}-byte address block of family byte 0x{data[13]:02x}",
            field="length",
            offset=14,
        )
    if have < total:
        return have - total
    return total


def _dotted(address: int) -> str:
    """The dotted quad of an IPv4 address given as an integer, remembered in :data:`_DESTINATIONS`."""
    host = f"{address >> 24}.{address >> 16 & 255}.{address >> 8 & 255}.{address & 255}"
    if len(_DESTINATIONS) >= _DESTINATIONS_MAX:
        _DESTINATIONS.clear()
    _DESTINATIONS[address] = host
    return host


def match(data: bytes, max_size: int | None, verify_checksum: bool = True) -> ProxyHeader | None:
    """The header ``data`` starts with when it is a complete v2 header of a valid shape, else None.

    The fast path of :func:`proxyproto.parse`: one ``unpack_from`` reads the
    fixed fields, and anything it does not accept (an incomplete header, a
    bad byte) is left to :func:`measure`, which says what is wrong.  A
    complete header's TLVs are still checked, and raise, here.
    """
    size = len(data)
    if size >= 28:  # room for an INET block: read it with the fixed fields, in one call
        signature, ver_cmd, fam, length, s1, s2, s3, s4, dst, sport, dport = _UNPACK_INET_HEADER(data)
    elif size >= 16:
        signature, ver_cmd, fam, length = _UNPACK_PREFIX(data)
    else:
        return None
    total = 16 + length
    if signature != SIGNATURE or total > size or (max_size is not None and total > max_size):
        return None
    raw = data if size == total else data[:total]
    if ver_cmd == 0x21:
        if (fam == 0x11 or fam == 0x12) and length >= 12:
            # total <= size, so size >= 28: the block was read with the fixed fields.  Dotted
            # quads from a table cost less than inet_ntop (glibc goes through sprintf; bench/README.md).
            source: Address | None = (f"{_DECIMAL[s1]}.{_DECIMAL[s2]}.{_DECIMAL[s3]}.{_DECIMAL[s4]}", sport)
            host = _DESTINATIONS.get(dst)
            if host is None:
                host = _dotted(dst)
            destination: Address | None = (host, dport)
            tlv_start = 28
            kind = _TCP4 if fam == 0x11 else _UDP4
        elif (fam == 0x21 or fam == 0x22) and length >= 36:
            src, dst, sport, dport = _INET6_BLOCK(raw, 16)
            source = (inet_ntop(AF_INET6, src), sport)
            destination = (inet_ntop(AF_INET6, dst), dport)
            tlv_start = 52
            kind = _KINDS[0x2100 | fam]
        elif (fam == 0x31 or fam == 0x32) and length >= 216:
            source = addresses.unix_name(raw[16:124])
            destination = addresses.unix_name(raw[124:232])
            tlv_start = 232
            kind = _KINDS[0x2100 | fam]
        elif fam == 0x00:
            source = destination = None
            tlv_start = 16
            kind = _KINDS[0x2100]
        else:
            return None
    elif ver_cmd == 0x20:
        block = BLOCK_SIZE[fam]
        if block < 0:
            return None
        source = destination = None
        # LOCAL: skip the block and walk what follows (V2-R1, V2-R3); when
        # len does not even cover the block, the body is opaque.
        tlv_start = 16 + block if length >= block else total
        kind = _KINDS[0x2000 | fam]
    else:
        return None
    header: ProxyHeader = _NEW(ProxyHeader)  # from_wire, inlined on the hottest path: one call fewer per header
    header._kind = kind
    header.source = source
    header.destination = destination
    header.tlvs = _walk_tlvs(raw, tlv_start, total, verify_checksum) if tlv_start < total else ()
    header.length = total
    header._raw = raw
    return header


def decode(data: bytes, total: int, verify_checksum: bool = True) -> ProxyHeader:
    """Decode the complete header ``data[:total]`` that :func:`measure` accepted."""
    header = match(data, total, verify_checksum)
    assert header is not None, "measure() accepted a header that match() does not"
    return header


def _walk_tlvs(raw: bytes, offset: int, total: int, verify_checksum: bool) -> tuple[TLV, ...]:
    """The TLVs tiling ``raw[offset:total]``: structure first, then the CRC, then the contents."""
    records: list[TLV] = []
    append = records.append
    crc_at = -1
    checked: list[tuple[int, bytes, int]] = []
    while offset < total:
        if offset + 3 > total:
            raise InvalidHeader(
                f"v2: TLV header truncated: {total - offset} byte(s) left, 3 needed", field="TLV", offset=offset
            )
        tlv_type = raw[offset]
        start = offset + 3
        end = start + (raw[offset + 1] << 8 | raw[offset + 2])
        if end > total:
            raise InvalidHeader(
                f"v2: TLV 0x{tlv_type:02x} value of {end - start} bytes crosses the end "
                f"of the header by {end - total} byte(s)",
                field="TLV",
                offset=offset,
            )
        value = raw[start:end]
        if tlv_type == 0x03:
            if end - start != 4:
                check_tlv(tlv_type, value, start)
            if crc_at >= 0:
                raise InvalidHeader("v2: more than one CRC32C TLV", field="CRC32C", offset=offset)
            crc_at = start
        elif tlv_type in _CHECKED_TYPES:
            checked.append((tlv_type, value, start))
        append(_NEW_TLV(TLV, (tlv_type, value)))
        offset = end
    if crc_at >= 0 and verify_checksum:
        _verify_crc(raw, crc_at)
    for tlv_type, value, start in checked:
        check_tlv(tlv_type, value, start)
    return tuple(records)


# Plain ints: membership of an IntEnum member costs more than the check.
_CHECKED_TYPES = frozenset(int(t) for t in (TLVType.AUTHORITY, TLVType.UNIQUE_ID, TLVType.SSL, TLVType.NETNS))


def _verify_crc(raw: bytes, crc_at: int) -> None:
    """CRC-R1..R4: compare with the CRC of the header, its field zeroed in place."""
    received = int.from_bytes(raw[crc_at : crc_at + 4], "big")
    computed = crc32c(raw[:crc_at] + _ZERO_CRC + raw[crc_at + 4 :])
    if received != computed:
        raise ChecksumError(
            f"v2: CRC32C mismatch: header says 0x{received:08x}, bytes give 0x{computed:08x}",
            field="CRC32C",
            offset=crc_at,
        )


def _address_block(header: ProxyHeader) -> tuple[int, bytes]:
    """The family byte's high nibble and the address block of a built header."""
    source, destination = header.source, header.destination
    family = header.family
    if source is None or destination is None:
        return 0, b""
    if family is Family.UNIX:
        assert isinstance(source, (str, bytes)) and isinstance(destination, (str, bytes))
        return 0x30, addresses.pack_unix(source, "source") + addresses.pack_unix(destination, "destination")
    assert isinstance(source, tuple) and isinstance(destination, tuple)
    if family is Family.INET:
        pack = addresses.pack_ipv4
        nibble = 0x10
    else:
        pack = addresses.pack_ipv6
        nibble = 0x20
    src, dst = pack(source[0]), pack(destination[0])
    assert src is not None and dst is not None
    return nibble, src + dst + struct.pack(">HH", source[1], destination[1])


def encode_header(header: ProxyHeader, checksum: bool = False) -> bytes:
    """Canonical v2 bytes of a header built in code.

    A header without addresses (LOCAL, or PROXY with UNSPEC) encodes family
    byte 0x00.  With ``checksum``, or when the TLVs hold a CRC32C record, the
    CRC is computed over the final bytes (CRC-S1..S3); ``checksum`` adds the
    record first, where haproxy puts it, when there is none.
    """
    nibble, block = _address_block(header)
    fam = nibble | header.protocol if nibble else 0
    tlvs = header.tlvs
    if checksum and not any(record.type == TLVType.CRC32C for record in tlvs):
        tlvs = (TLV(TLVType.CRC32C, _ZERO_CRC), *tlvs)
    parts = [block]
    crc_at = -1
    offset = 16 + len(block)
    for tlv_type, value in tlvs:
        if tlv_type == TLVType.CRC32C and crc_at < 0 and len(value) == 4:
            crc_at = offset + 3
            value = _ZERO_CRC
        parts.append(struct.pack(">BH", tlv_type, len(value)))
        parts.append(value)
        offset += 3 + len(value)
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise ValueError(f"tlvs: address block and TLVs of {len(body)} bytes exceed 65535")
    raw = _PREFIX.pack(SIGNATURE, 0x20 | header.command, fam, len(body)) + body
    if crc_at >= 0:
        crc = crc32c(raw)
        raw = raw[:crc_at] + crc.to_bytes(4, "big") + raw[crc_at + 4 :]
    return raw


def _infer(source: object, destination: object) -> tuple[Family, Address | None, Address | None]:
    """Family and canonical addresses from what the caller gave, mapping mixed IPv4/IPv6."""
    if source is None and destination is None:
        return Family.UNSPEC, None, None
    if source is None or destination is None:
        missing = "source" if source is None else "destination"
        raise ValueError(f"{missing}: both addresses or neither are required")
    if isinstance(source, (str, bytes)) or isinstance(destination, (str, bytes)):
        if not isinstance(source, (str, bytes)) or not isinstance(destination, (str, bytes)):
            raise ValueError("destination: cannot mix a UNIX name with an IP address")
        return Family.UNIX, source, destination
    src_host, src_port = addresses.split_host_port(source, "source")
    dst_host, dst_port = addresses.split_host_port(destination, "destination")
    src4 = addresses.pack_ipv4(src_host)
    dst4 = addresses.pack_ipv4(dst_host)
    if src4 is not None and dst4 is not None:
        return Family.INET, (src_host, src_port), (dst_host, dst_port)
    if src4 is not None:
        src_host = "::ffff:" + src_host
    elif addresses.pack_ipv6(src_host) is None:
        raise ValueError(f"source: {src_host!r} is neither an IPv4 nor an IPv6 address")
    if dst4 is not None:
        dst_host = "::ffff:" + dst_host
    elif addresses.pack_ipv6(dst_host) is None:
        raise ValueError(f"destination: {dst_host!r} is neither an IPv4 nor an IPv6 address")
    return Family.INET6, (src_host, src_port), (dst_host, dst_port)


def encode(
    source: AddressInput | None = None,
    destination: AddressInput | None = None,
    *,
    command: int = Command.PROXY,
    protocol: int = Protocol.STREAM,
    tlvs: Sequence[tuple[int, bytes]] = (),
    checksum: bool = False,
) -> bytes:
    """A v2 header for two addresses as ``parse`` gives them (or socket 4-tuples, UNIX names).

    The family is inferred; a mixed IPv4/IPv6 pair becomes INET6 with the
    IPv4 side mapped to ``::ffff:a.b.c.d``.  ``None, None`` gives a header
    without addresses (family byte 0x00).  Impossible input raises
    ``ValueError`` naming the field.
    """
    if not tlvs and not checksum and command == Command.PROXY and protocol == Protocol.STREAM:
        raw = _encode_tcp(source, destination)
        if raw is not None:
            return raw
    command = Command(command)
    if command is Command.LOCAL and (source is not None or destination is not None):
        raise ValueError("source: a LOCAL header carries no addresses")
    family, src, dst = _infer(source, destination)
    if family is Family.UNSPEC:
        protocol = Protocol.UNSPEC
    header = ProxyHeader(2, command, family, protocol, src, dst, tlvs)
    return encode_header(header, checksum)


_PACK_TCP4 = struct.Struct(">12sBBH4s4sHH").pack
_PACK_TCP6 = struct.Struct(">12sBBH16s16sHH").pack


def _encode_tcp(source: object, destination: object) -> bytes | None:
    """The header of two valid ``(host, port)`` pairs of one IP family, in one pack; else None.

    The fast path of :func:`encode` for what senders pass per connection;
    anything else (a mixed pair, UNIX names, 4-tuples, invalid input) takes
    the general path, which maps, validates and says what is wrong.
    """
    if type(source) is not tuple or type(destination) is not tuple or len(source) != 2 or len(destination) != 2:
        return None
    src_host, src_port = source
    dst_host, dst_port = destination
    if type(src_port) is not int or type(dst_port) is not int:  # bool is refused by the general path
        return None
    if not (0 <= src_port <= 65535 and 0 <= dst_port <= 65535):
        return None
    try:
        return _PACK_TCP4(
            SIGNATURE, 0x21, 0x11, 12, inet_pton(AF_INET, src_host), inet_pton(AF_INET, dst_host), src_port, dst_port
        )
    except (OSError, TypeError, ValueError):
        pass
    try:
        return _PACK_TCP6(
            SIGNATURE, 0x21, 0x21, 36, inet_pton(AF_INET6, src_host), inet_pton(AF_INET6, dst_host), src_port, dst_port
        )
    except (OSError, TypeError, ValueError):
        return None
