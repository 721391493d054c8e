"""ProxyHeader: what a PROXY protocol header says, as plain data.

A header parsed from the wire remembers its exact bytes (``to_bytes()`` gives
them back, CRC and TLV order intact); the parsers build it through
:func:`from_wire` (or the same steps inlined on their hottest paths), without
validating again what they just checked.  A header built in code is
validated once, in ``__init__``, and encodes canonically.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, Union

from . import addresses
from .tlv import TLV, SSLInfo, TLVType, aws_vpce_id, azure_linkid, check_tlv, gcp_psc_id

__all__ = ["Command", "Family", "Protocol", "ProxyHeader"]

#: ``(host, port)`` for INET and INET6; a path (str) or abstract name (bytes) for UNIX.
Address = Union[tuple[str, int], str, bytes]

#: What the encoders and ``ProxyHeader()`` take as an address: what ``parse`` gives
#: (:data:`Address`), or the socket module's IPv6 4-tuple ``(host, port, flowinfo, scope_id)``
#: as ``accept()`` and ``getpeername()`` return it, so a peer can be passed as it came.
AddressInput = Union[tuple[str, int], tuple[str, int, int, int], str, bytes]


class Command(enum.IntEnum):
    """Low nibble of the v2 version-command byte; every v1 header is PROXY."""

    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    """High nibble of the v2 family byte (``TCP4`` is INET, ``TCP6`` INET6 in v1)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Protocol(enum.IntEnum):
    """Low nibble of the v2 family byte (every v1 TCP line is STREAM)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


_UNSET: Any = object()
_ENCODERS: list[Callable[[ProxyHeader], bytes]] = []


class ProxyHeader:
    """One PROXY protocol header, v1 or v2.

    ``source`` and ``destination`` are ``(host, port)`` for INET and INET6
    (host in ``inet_ntop`` form), the name as the socket module gives it for
    UNIX, and None for LOCAL, UNSPEC and v1 UNKNOWN.  ``tlvs`` holds every
    TLV in wire order, NOOP included.  ``length`` is the number of bytes the
    header occupies on the wire (0 for a header built in code, until encoded).
    """

    # version, command, family and protocol live in one shared tuple, ``_kind``:
    # a parser hands out one of a few prebuilt kinds instead of setting four
    # attributes per header (construction is a large share of parsing: bench/README.md).
    __slots__ = ("_kind", "_raw", "destination", "length", "source", "tlvs")

    _kind: tuple[int, Command, Family, Protocol]
    tlvs: tuple[TLV, ...]
    length: int
    source: Address | None
    destination: Address | None
    _raw: bytes | None

    def __init__(
        self,
        version: int,
        command: int,
        family: int,
        protocol: int,
        source: AddressInput | None = None,
        destination: AddressInput | None = None,
        tlvs: Iterable[tuple[int, bytes]] = (),
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"version: must be 1 or 2, got {version!r}")
        command = Command(command)
        family = Family(family)
        protocol = Protocol(protocol)
        if version == 1 and command is not Command.PROXY:
            raise ValueError("command: every v1 header is PROXY")
        if family is Family.UNSPEC and protocol is not Protocol.UNSPEC:
            raise ValueError(f"protocol: family UNSPEC requires protocol UNSPEC, got {protocol.name}")
        if (source is None) != (destination is None):
            missing = "destination" if destination is None else "source"
            raise ValueError(f"{missing}: both addresses or neither are required")
        if source is not None and (command is Command.LOCAL or family is Family.UNSPEC):
            raise ValueError("source: a LOCAL or UNSPEC header carries no addresses")
        if source is None and command is Command.PROXY and family is not Family.UNSPEC:
            raise ValueError(f"source: family {family.name} requires addresses")
        records = tuple(_as_tlv(record) for record in tlvs)
        if version == 1 and records:
            raise ValueError("tlvs: a v1 header carries no TLVs")
        for record in records:
            try:
                check_tlv(record.type, record.value)
            except ValueError as exc:  # an InvalidHeader: say it about the argument, not a stream offset
                raise ValueError(f"tlvs: {getattr(exc, 'message', exc)}".replace("v2: ", "")) from None
        self._kind = (version, command, family, protocol)
        self.tlvs = records
        self.length = 0
        self.source = _canonical_address(family, source, "source")
        self.destination = _canonical_address(family, destination, "destination")
        self._raw = None

    @property
    def version(self) -> int:
        """1 or 2."""
        return self._kind[0]

    @property
    def command(self) -> Command:
        """LOCAL or PROXY (every v1 header is PROXY)."""
        return self._kind[1]

    @property
    def family(self) -> Family:
        """The address family as on the wire (a LOCAL header may say INET)."""
        return self._kind[2]

    @property
    def protocol(self) -> Protocol:
        """UNSPEC, STREAM or DGRAM."""
        return self._kind[3]

    @property
    def source_address(self) -> tuple[str, int] | None:
        """``source`` when it is an IP ``(host, port)`` (INET or INET6), else None (UNIX, or no addresses).

        ``source`` is typed as every family's address (:data:`Address`), so
        ``host, port = header.source`` needs a check or a cast under a type
        checker; this is the same value, typed for the common IP case.
        """
        source = self.source
        return source if type(source) is tuple else None

    @property
    def destination_address(self) -> tuple[str, int] | None:
        """``destination`` when it is an IP ``(host, port)``, else None (as :attr:`source_address`)."""
        destination = self.destination
        return destination if type(destination) is tuple else None

    def to_bytes(self) -> bytes:
        """The wire form: the exact bytes a parsed header came from, else canonical."""
        if self._raw is None:
            if not _ENCODERS:  # v1 and v2 import this module: look them up once, on first use
                from . import v1, v2

                _ENCODERS.extend((v1.encode_header, v2.encode_header))
            self._raw = _ENCODERS[self.version - 1](self)
            self.length = len(self._raw)
        return self._raw

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def tlv(self, tlv_type: int) -> bytes | None:
        """First value of that TLV type, or None."""
        for record in self.tlvs:
            if record[0] == tlv_type:
                return record[1]
        return None

    def _text_tlv(self, tlv_type: int) -> str | None:
        value = self.tlv(tlv_type)
        return None if value is None else value.decode("utf-8")

    @property
    def alpn(self) -> bytes | None:
        """PP2_TYPE_ALPN: the negotiated protocol, e.g. ``b"h2"``."""
        return self.tlv(TLVType.ALPN)

    @property
    def authority(self) -> str | None:
        """PP2_TYPE_AUTHORITY: the host name the client asked for (TLS SNI)."""
        return self._text_tlv(TLVType.AUTHORITY)

    @property
    def unique_id(self) -> bytes | None:
        """PP2_TYPE_UNIQUE_ID: the proxy's opaque connection id."""
        return self.tlv(TLVType.UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """PP2_TYPE_NETNS: the network namespace name."""
        return self._text_tlv(TLVType.NETNS)

    @property
    def crc32c(self) -> int | None:
        """PP2_TYPE_CRC32C as received (verified by ``parse`` unless told not to)."""
        value = self.tlv(TLVType.CRC32C)
        return None if value is None or len(value) != 4 else int.from_bytes(value, "big")

    @property
    def ssl(self) -> SSLInfo | None:
        """PP2_TYPE_SSL as an :class:`SSLInfo`, or None."""
        value = self.tlv(TLVType.SSL)
        return None if value is None else SSLInfo(value)

    @property
    def aws_vpce_id(self) -> str | None:
        """AWS PrivateLink VPC endpoint id (TLV 0xEA), None when absent or malformed."""
        value = self.tlv(TLVType.AWS)
        return None if value is None else aws_vpce_id(value)

    @property
    def azure_linkid(self) -> int | None:
        """Azure Private Link LINKID (TLV 0xEE), None when absent or malformed."""
        value = self.tlv(TLVType.AZURE)
        return None if value is None else azure_linkid(value)

    @property
    def gcp_psc_id(self) -> int | None:
        """GCP Private Service Connect connection id (TLV 0xE0), None when absent or malformed."""
        value = self.tlv(TLVType.GCP)
        return None if value is None else gcp_psc_id(value)

    def _key(self) -> tuple[object, ...]:
        return (
            self.version,
            self.command,
            self.family,
            self.protocol,
            self.source,
            self.destination,
            self.tlvs,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProxyHeader):
            return NotImplemented
        return self._key() == other._key()

    #: Headers compare by value but are not hashable: their attributes are plain slots, written
    #: by the parsers and read at full speed, and a hash must never change while a header is a
    #: key.  Use ``header.to_bytes()`` as a key where one is needed.
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"ProxyHeader(version={self.version}, command={self.command.name}, "
            f"family={self.family.name}, protocol={self.protocol.name}, "
            f"source={self.source!r}, destination={self.destination!r}, tlvs={self.tlvs!r})"
        )


def _as_tlv(record: tuple[int, bytes]) -> TLV:
    tlv_type, value = record
    if not isinstance(tlv_type, int) or not 0 <= tlv_type <= 255:
        raise ValueError(f"tlvs: type must be an int in 0..255, got {tlv_type!r}")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"tlvs: value of type 0x{tlv_type:02x} must be bytes, got {value!r}")
    value = bytes(value)
    if len(value) > 65535:
        raise ValueError(f"tlvs: value of type 0x{tlv_type:02x} exceeds 65535 bytes")
    return TLV(int(tlv_type), value)


def _canonical_address(family: Family, address: AddressInput | None, field: str) -> Address | None:
    """Validate an address for ``family`` and return it in the form ``parse`` gives."""
    if address is None:
        return None
    if family is Family.UNIX:
        if not isinstance(address, (str, bytes)):
            raise ValueError(f"{field}: a UNIX address is a str path or bytes, got {address!r}")
        return addresses.unix_name(addresses.pack_unix(address, field))
    host, port = addresses.split_host_port(address, field)
    if family is Family.INET:
        packed = addresses.pack_ipv4(host)
        if packed is None:
            raise ValueError(f"{field}: {host!r} is not an IPv4 address")
        return (host, port)
    packed = addresses.pack_ipv6(host)
    if packed is None:
        raise ValueError(f"{field}: {host!r} is not an IPv6 address")
    return (addresses.ipv6_text(packed), port)


_NEW = object.__new__

#: The kinds of header a parser hands out, by version, command and family-protocol byte.
KINDS: dict[tuple[int, int, int], tuple[int, Command, Family, Protocol]] = {
    (version, command, family << 4 | protocol): (version, Command(command), Family(family), Protocol(protocol))
    for version in (1, 2)
    for command in (0, 1)
    for family in range(4)
    for protocol in range(3)
}


def from_wire(
    kind: tuple[int, Command, Family, Protocol],
    source: Address | None,
    destination: Address | None,
    tlvs: tuple[TLV, ...],
    raw: bytes,
) -> ProxyHeader:
    """A parsed header from parts the parsers already validated (their fast path, no checks).

    ``kind`` is one of :data:`KINDS`.
    """
    header: ProxyHeader = _NEW(ProxyHeader)
    header._kind = kind
    header.source = source
    header.destination = destination
    header.tlvs = tlvs
    header.length = len(raw)
    header._raw = raw
    return header
