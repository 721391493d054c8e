"""Type-length-value records of the v2 header: the registry, SSL views, checks.

TLVs are kept as the sender wrote them, in wire order (the CRC-32C is
computed over that order, rule CRC-R2), as plain ``TLV(type, value)`` pairs.
Typed views (:class:`SSLInfo`, the cloud vendors' ids) are computed from those
bytes on demand, so unknown and custom types cost nothing and are never
refused.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from typing import NamedTuple

from .errors import InvalidHeader

__all__ = ["TLV", "SSLClient", "SSLInfo", "TLVType"]


class TLVType(enum.IntEnum):
    """The registry of SPEC-NOTES section 3, plus the cloud vendors' custom types."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    SSL_VERSION = 0x21
    SSL_CN = 0x22
    SSL_CIPHER = 0x23
    SSL_SIG_ALG = 0x24
    SSL_KEY_ALG = 0x25
    SSL_GROUP = 0x26
    SSL_SIG_SCHEME = 0x27
    SSL_CLIENT_CERT = 0x28
    NETNS = 0x30
    GCP = 0xE0
    ALIBABA = 0xE1
    AWS = 0xEA
    AZURE = 0xEE


class TLV(NamedTuple):
    """One record: ``type`` (0-255) and ``value`` (the raw bytes)."""

    type: int
    value: bytes


class SSLClient(enum.IntFlag):
    """The ``client`` bit field of PP2_TYPE_SSL."""

    SSL = 0x01
    CERT_CONN = 0x02
    CERT_SESS = 0x04


def iter_tlvs(data: bytes, start: int, end: int, where: str = "TLV", base: int = 0) -> Iterator[tuple[int, int, int]]:
    """Yield ``(type, value_start, value_end)`` for records tiling ``data[start:end]``.

    Raises :class:`InvalidHeader` when a record's header or value crosses
    ``end``: TLVs must tile the space exactly, as HAProxy requires.  ``base``
    is where ``data`` starts in the stream, so errors give stream offsets.
    """
    offset = start
    while offset < end:
        if offset + 3 > end:
            raise InvalidHeader(
                f"v2: {where} header truncated: {end - offset} byte(s) left, 3 needed",
                field=where,
                offset=base + offset,
            )
        length = data[offset + 1] << 8 | data[offset + 2]
        value_end = offset + 3 + length
        if value_end > end:
            raise InvalidHeader(
                f"v2: {where} 0x{data[offset]:02x} value of {length} bytes crosses the end "
                f"of its container by {value_end - end} byte(s)",
                field=where,
                offset=base + offset,
            )
        yield data[offset], offset + 3, value_end
        offset = value_end


# The checks below compare plain ints: an IntEnum member lookup costs more than the check.
_SSL_SUBTYPE_TEXT: dict[int, tuple[str, str]] = {
    0x21: ("ascii", "SSL version"),
    0x22: ("utf-8", "SSL CN"),
    0x23: ("ascii", "SSL cipher"),
    0x24: ("ascii", "SSL signature algorithm"),
    0x25: ("ascii", "SSL key algorithm"),
    0x26: ("ascii", "SSL group"),
    0x27: ("ascii", "SSL signature scheme"),
}


def _check_text(value: bytes, encoding: str, what: str, offset: int) -> None:
    try:
        value.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InvalidHeader(
            f"v2: {what} is not valid {encoding.upper()} (byte {exc.start})",
            field=what,
            offset=offset + exc.start,
        ) from None


def check_tlv(tlv_type: int, value: bytes, offset: int = 0) -> None:
    """Refuse a standard TLV whose contents break the spec; custom types always pass.

    ``offset`` is where the value starts in the stream, for the error.
    """
    if tlv_type == 0x02:  # AUTHORITY
        if len(value) > 255:
            raise InvalidHeader(f"v2: AUTHORITY of {len(value)} bytes exceeds 255", field="AUTHORITY", offset=offset)
        _check_text(value, "utf-8", "AUTHORITY", offset)
    elif tlv_type == 0x05:  # UNIQUE_ID
        if len(value) > 128:
            raise InvalidHeader(f"v2: UNIQUE_ID of {len(value)} bytes exceeds 128", field="UNIQUE_ID", offset=offset)
    elif tlv_type == 0x03:  # CRC32C
        if len(value) != 4:
            raise InvalidHeader(
                f"v2: CRC32C value is {len(value)} bytes, must be exactly 4",
                field="CRC32C",
                offset=offset,
            )
    elif tlv_type == 0x20:  # SSL
        _check_ssl(value, offset)
    elif tlv_type == 0x30:  # NETNS
        _check_text(value, "ascii", "NETNS", offset)


def _check_ssl(value: bytes, offset: int) -> None:
    """The 5 fixed bytes, then sub-TLVs that tile the rest exactly, with text where text is due.

    A loop over the sub-TLVs, inline for speed: on the first fault, the walk
    or the check that describes it is run again to raise the precise error.
    """
    size = len(value)
    if size < 5:
        raise InvalidHeader(
            f"v2: SSL value of {size} bytes is shorter than its 5 fixed bytes", field="SSL", offset=offset
        )
    position = 5
    while position < size:
        start = position + 3
        end = start + (value[position + 1] << 8 | value[position + 2]) if start <= size else size + 1
        if end > size:
            for _ in iter_tlvs(value, 5, size, "SSL sub-TLV", offset):
                pass
        text = _SSL_SUBTYPE_TEXT.get(value[position])
        if text is not None:
            try:
                value[start:end].decode(text[0])
            except UnicodeDecodeError:
                _check_text(value[start:end], text[0], text[1], offset + start)
        position = end


class SSLInfo:
    """A view of a PP2_TYPE_SSL value: client flags, verify result, sub-TLVs.

    ``verify`` is zero both when a certificate verified and when none was
    sent, so ask :attr:`verified`, which also checks the client flags.
    """

    __slots__ = ("client", "tlvs", "verify")

    def __init__(self, value: bytes) -> None:
        if len(value) < 5:
            raise ValueError("SSL TLV value needs at least 5 bytes")
        self.client = SSLClient(value[0])
        self.verify = int.from_bytes(value[1:5], "big")
        records: list[TLV] = [
            TLV(sub_type, value[start:end]) for sub_type, start, end in iter_tlvs(value, 5, len(value), "SSL sub-TLV")
        ]
        #: The sub-TLVs in wire order.
        self.tlvs: tuple[TLV, ...] = tuple(records)

    def tlv(self, sub_type: int) -> bytes | None:
        """First value of that sub-type, or None."""
        for record in self.tlvs:
            if record.type == sub_type:
                return record.value
        return None

    def _text(self, sub_type: int) -> str | None:
        value = self.tlv(sub_type)
        return None if value is None else value.decode("utf-8", "replace")

    @property
    def verified(self) -> bool:
        """A certificate was presented on this connection or session and verified."""
        presented = self.client & (SSLClient.CERT_CONN | SSLClient.CERT_SESS)
        return bool(presented) and self.verify == 0

    @property
    def version(self) -> str | None:
        return self._text(TLVType.SSL_VERSION)

    @property
    def cn(self) -> str | None:
        return self._text(TLVType.SSL_CN)

    @property
    def cipher(self) -> str | None:
        return self._text(TLVType.SSL_CIPHER)

    @property
    def sig_alg(self) -> str | None:
        return self._text(TLVType.SSL_SIG_ALG)

    @property
    def key_alg(self) -> str | None:
        return self._text(TLVType.SSL_KEY_ALG)

    @property
    def group(self) -> str | None:
        return self._text(TLVType.SSL_GROUP)

    @property
    def sig_scheme(self) -> str | None:
        return self._text(TLVType.SSL_SIG_SCHEME)

    @property
    def client_cert(self) -> bytes | None:
        return self.tlv(TLVType.SSL_CLIENT_CERT)

    def __repr__(self) -> str:
        return f"SSLInfo(client={self.client!r}, verify={self.verify}, tlvs={self.tlvs!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SSLInfo):
            return NotImplemented
        return (self.client, self.verify, self.tlvs) == (other.client, other.verify, other.tlvs)

    #: Unhashable, as :class:`~proxyproto.ProxyHeader` is: its attributes are writable.
    __hash__ = None  # type: ignore[assignment]


_VPCE_ID = re.compile(rb"[A-Za-z0-9-]*")


def aws_vpce_id(value: bytes) -> str | None:
    """AWS 0xEA subtype 0x01: the VPC endpoint id, or None when malformed."""
    if value[:1] != b"\x01" or not _VPCE_ID.fullmatch(value, 1):
        return None
    return value[1:].decode("ascii")


def azure_linkid(value: bytes) -> int | None:
    """Azure 0xEE subtype 0x01: the private endpoint LINKID (little-endian), or None."""
    if len(value) != 5 or value[0] != 0x01:
        return None
    return int.from_bytes(value[1:], "little")


def gcp_psc_id(value: bytes) -> int | None:
    """GCP 0xE0: the Private Service Connect connection id (big-endian uint64), or None."""
    if len(value) != 8:
        return None
    return int.from_bytes(value, "big")
