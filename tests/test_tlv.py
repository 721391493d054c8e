"""TLVs: typed views, the SSL TLV and its sub-TLVs, vendor TLVs, and malformed standard TLVs.

SPEC-NOTES section 3 (TLV registry, vendor TLVs).  A malformed *standard* TLV
makes the header invalid; a malformed *custom-range* TLV (0xE0-0xEF) never does,
its typed view is simply None.  Unknown types are kept, not refused.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import proxyproto
from proxyproto import (
    TLV,
    ChecksumError,
    InvalidHeader,
    NoProxyHeader,
    SSLClient,
    TLVType,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
ADDR4 = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + (1234).to_bytes(2, "big") + (80).to_bytes(2, "big")

SSLMSG = r"(?i)SSL|sub"


def tlv(tlv_type: int, value: bytes) -> bytes:
    """One TLV (or SSL sub-TLV) on the wire."""
    return bytes([tlv_type]) + len(value).to_bytes(2, "big") + value


def header(*tlvs: bytes) -> bytes:
    """A v2 PROXY TCP4 header carrying the given TLVs."""
    body = ADDR4 + b"".join(tlvs)
    return SIG + b"\x21\x11" + len(body).to_bytes(2, "big") + body


def ssl_value(client: int = 0, verify: int = 0, *subs: bytes) -> bytes:
    """The value of a PP2_TYPE_SSL TLV: client byte, verify (uint32 big-endian), sub-TLVs."""
    return bytes([client]) + verify.to_bytes(4, "big") + b"".join(subs)


def parsed(*tlvs: bytes) -> proxyproto.ProxyHeader:
    """Parse a header with these TLVs; it must be complete and valid."""
    h = proxyproto.parse(header(*tlvs))
    assert h is not None
    return h


def refuse(data: bytes, cls: type[Exception], pattern: str, **opts: Any) -> None:
    """Assert ``parse`` refuses ``data`` with exactly the class ``cls`` and a telling message."""
    with pytest.raises(proxyproto.ProxyProtocolError) as info:
        proxyproto.parse(data, **opts)
    exc = info.value
    assert isinstance(exc, cls), f"{type(exc).__name__}: {exc}"
    if cls is InvalidHeader:
        assert not isinstance(exc, (NoProxyHeader, ChecksumError)), f"{type(exc).__name__}: {exc}"
    assert re.search(pattern.replace("(?i)", ""), str(exc), re.IGNORECASE), f"vague message for {data!r}: {exc!r}"


MALFORMED_TLV: list[tuple[str, bytes, str]] = [
    ("crc-length-3", header(tlv(0x03, b"\x00\x00\x00")), r"(?i)CRC|checksum"),
    ("crc-length-5", header(tlv(0x03, bytes(5))), r"(?i)CRC|checksum"),
    ("crc-length-0", header(tlv(0x03, b"")), r"(?i)CRC|checksum"),
    ("unique-id-129", header(tlv(0x05, b"u" * 129)), r"(?i)UNIQUE|unique"),
    ("unique-id-1000", header(tlv(0x05, b"u" * 1000)), r"(?i)UNIQUE|unique"),
    ("authority-bad-utf8", header(tlv(0x02, b"exa\xffmple.com")), r"(?i)AUTHORITY|UTF-?8"),
    ("authority-truncated-utf8", header(tlv(0x02, "é".encode()[:1])), r"(?i)AUTHORITY|UTF-?8"),
    ("ssl-empty", header(tlv(0x20, b"")), SSLMSG),
    ("ssl-4-bytes", header(tlv(0x20, bytes(4))), SSLMSG),
    ("ssl-sub-crossing-parent", header(tlv(0x20, ssl_value(1, 0, b"\x21\x00\x09TLSv1.3"))), SSLMSG),
    ("ssl-sub-header-truncated", header(tlv(0x20, ssl_value(1, 0, b"\x21\x00"))), SSLMSG),
    ("ssl-sub-one-byte", header(tlv(0x20, ssl_value(1, 0, b"\x23"))), SSLMSG),
    (
        "ssl-second-sub-crossing",
        header(tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLSv1.3") + b"\x23\x00\x30AES"))),
        SSLMSG,
    ),
]


@pytest.mark.parametrize(("data", "pattern"), [pytest.param(d, p, id=i) for i, d, p in MALFORMED_TLV])
def test_tlv_malformed_standard_tlv_is_invalid(data: bytes, pattern: str) -> None:
    """A malformed standard TLV is InvalidHeader (not a checksum error, not ignored)."""
    refuse(data, InvalidHeader, pattern)


def test_tlv_unique_id_up_to_128_bytes() -> None:
    """UNIQUE_ID is opaque and may be 0..128 bytes."""
    assert parsed(tlv(0x05, b"u" * 128)).unique_id == b"u" * 128
    assert parsed(tlv(0x05, b"")).unique_id == b""


def test_tlv_views_decode_values() -> None:
    """ALPN bytes, AUTHORITY UTF-8 text, NETNS ASCII text, NOOP kept, first value wins."""
    h = parsed(
        tlv(0x01, b"h2"),
        tlv(0x02, "bücher.example".encode()),
        tlv(0x04, b"\x00\x00"),
        tlv(0x30, b"blue"),
        tlv(0x01, b"http/1.1"),
    )
    assert h.alpn == b"h2"
    assert h.authority == "bücher.example"
    assert h.netns == "blue"
    assert h.tlv(0x01) == b"h2"
    assert h.tlv(TLVType(0x04)) == b"\x00\x00"
    assert [t.type for t in h.tlvs] == [1, 2, 4, 0x30, 1]
    assert h.unique_id is None and h.crc32c is None and h.ssl is None
    assert h.aws_vpce_id is None and h.azure_linkid is None and h.gcp_psc_id is None


def test_tlv_type_enum_matches_registry() -> None:
    """TLVType is an IntEnum of the registry codes; TLV compares by type and value."""
    for code in (0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x30):
        assert int(TLVType(code)) == code
    assert TLV(1, b"h2") == TLV(TLVType(1), b"h2")
    assert TLV(1, b"h2") != TLV(1, b"h3")
    assert TLV(1, b"h2").type == 1 and TLV(1, b"h2").value == b"h2"


def test_tlv_unknown_types_are_kept() -> None:
    """Experimental, future and unassigned types are kept in order, never refused."""
    h = parsed(tlv(0xF0, b"a"), tlv(0xF8, b""), tlv(0x06, b"zz"), tlv(0x21, b"top-level sub code"))
    assert h.tlvs == (TLV(0xF0, b"a"), TLV(0xF8, b""), TLV(0x06, b"zz"), TLV(0x21, b"top-level sub code"))


def test_tlv_ssl_all_sub_tlvs() -> None:
    """Every SSL sub-TLV 0x21-0x28 has its view; text ones are str, the client cert is bytes."""
    subs = [
        tlv(0x21, b"TLSv1.3"),
        tlv(0x22, "Jürgen".encode()),
        tlv(0x23, b"TLS_AES_128_GCM_SHA256"),
        tlv(0x24, b"RSA-SHA256"),
        tlv(0x25, b"EC256"),
        tlv(0x26, b"X25519"),
        tlv(0x27, b"rsa_pss_rsae_sha256"),
        tlv(0x28, b"\x30\x82\x01\x0a" + bytes(20)),
    ]
    flags = SSLClient.SSL | SSLClient.CERT_CONN | SSLClient.CERT_SESS
    h = parsed(tlv(0x20, ssl_value(int(flags), 0, *subs)))
    ssl = h.ssl
    assert ssl is not None
    assert ssl.client == flags
    assert ssl.verify == 0
    assert ssl.verified is True
    assert ssl.version == "TLSv1.3"
    assert ssl.cn == "Jürgen"
    assert ssl.cipher == "TLS_AES_128_GCM_SHA256"
    assert ssl.sig_alg == "RSA-SHA256"
    assert ssl.key_alg == "EC256"
    assert ssl.group == "X25519"
    assert ssl.sig_scheme == "rsa_pss_rsae_sha256"
    assert ssl.client_cert == b"\x30\x82\x01\x0a" + bytes(20)


@pytest.mark.parametrize(
    ("client", "verify", "verified"),
    [
        (0, 0, False),  # haproxy's "ssl" option on plain TCP: no TLS, no cert
        (SSLClient.SSL, 0, False),  # TLS but no client certificate: verify 0 means nothing
        (SSLClient.SSL | SSLClient.CERT_CONN, 0, True),
        (SSLClient.SSL | SSLClient.CERT_SESS, 0, True),
        (SSLClient.SSL | SSLClient.CERT_CONN, 1, False),
        (SSLClient.SSL | SSLClient.CERT_CONN | SSLClient.CERT_SESS, 0x12345678, False),
    ],
)
def test_tlv_ssl_verified_needs_certificate(client: int, verify: int, verified: bool) -> None:
    """``verified`` is true only when a certificate was presented and verify == 0 (big-endian)."""
    h = parsed(tlv(0x20, ssl_value(int(client), verify)))
    assert h.ssl is not None
    assert h.ssl.client == client
    assert h.ssl.verify == verify
    assert h.ssl.verified is verified
    assert h.ssl.version is None and h.ssl.cn is None and h.ssl.client_cert is None


def test_tlv_aws_vpce_id() -> None:
    """AWS 0xEA subtype 0x01 carries the VPC endpoint id."""
    assert parsed(tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")).aws_vpce_id == "vpce-08d2bf15fac5001c9"


def test_tlv_azure_linkid_is_little_endian() -> None:
    """Azure 0xEE: subtype 0x01 and a uint32 link id, little-endian."""
    h = parsed(tlv(0xEE, b"\x01" + (0x12345678).to_bytes(4, "little")))
    assert h.azure_linkid == 0x12345678


def test_tlv_gcp_psc_id_is_big_endian() -> None:
    """GCP 0xE0: an 8-byte uint64 PSC connection id, big-endian."""
    h = parsed(tlv(0xE0, (0x0102030405060708).to_bytes(8, "big")))
    assert h.gcp_psc_id == 0x0102030405060708


@pytest.mark.parametrize(
    ("raw", "attr"),
    [
        (tlv(0xEE, b"\x01\x02\x03"), "azure_linkid"),
        (tlv(0xEE, b""), "azure_linkid"),
        (tlv(0xEE, b"\x02" + bytes(4)), "azure_linkid"),
        (tlv(0xEE, b"\x01" + bytes(5)), "azure_linkid"),
        (tlv(0xE0, bytes(7)), "gcp_psc_id"),
        (tlv(0xE0, bytes(9)), "gcp_psc_id"),
        (tlv(0xEA, b""), "aws_vpce_id"),
        (tlv(0xEA, b"\x02vpce-123"), "aws_vpce_id"),
        (tlv(0xEA, b"\x01\xff\xfe\x80"), "aws_vpce_id"),
    ],
)
def test_tlv_malformed_custom_tlv_never_invalidates(raw: bytes, attr: str) -> None:
    """Custom-range TLVs that do not fit the vendor layout give None; the header stays valid."""
    h = parsed(raw)
    assert getattr(h, attr) is None
    assert len(h.tlvs) == 1 and h.tlvs[0].type == raw[0]


def test_tlv_noop_any_length_is_kept() -> None:
    """NOOP is 'ignored when parsed' but kept in tlvs (so to_bytes and the CRC stay exact)."""
    h = parsed(tlv(0x04, b""), tlv(0x04, bytes(36)), tlv(0x04, b"garbage"))
    assert h.tlvs == (TLV(4, b""), TLV(4, bytes(36)), TLV(4, b"garbage"))


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        pytest.param(header(tlv(0x02, b"exa\xffmple.com")), 31 + 3, id="authority-bad-byte"),
        pytest.param(header(tlv(0x03, b"abc")), 31, id="crc-value"),
        pytest.param(header(tlv(0x04, b"ok"), b"\x04\x00\x09ab"), 33, id="tlv-crossing-end"),
        pytest.param(
            header(tlv(0x20, ssl_value(1, 0, b"\x21\x00\x09TLSv1.3"))),
            31 + 5,
            id="ssl-sub-crossing",
        ),
        pytest.param(
            header(tlv(0x20, ssl_value(1, 0, tlv(0x21, b"TLSv1.3"), b"\x23\x00\x30AES"))),
            31 + 5 + 10,
            id="ssl-second-sub-crossing",
        ),
    ],
)
def test_tlv_error_offset_points_into_stream(data: bytes, offset: int) -> None:
    """Errors say where (DESIGN.md, h11 style): ``offset`` is a byte offset into the stream."""
    with pytest.raises(InvalidHeader) as info:
        proxyproto.parse(data)
    assert info.value.offset == offset, str(info.value)
