"""Version 2 (binary) receiver rules, SPEC-NOTES section 3.

Headers are built byte by byte here (not with the library's encoder), so the
parser is checked against the spec rather than against itself.  The table
``MALFORMED_V2`` lists structurally invalid headers; malformed TLV contents
live in ``test_tlv.py``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import proxyproto
from proxyproto import (
    TLV,
    ChecksumError,
    Command,
    Family,
    InvalidHeader,
    NoProxyHeader,
    Protocol,
)
from proxyproto.crc32c import crc32c

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
ADDR4 = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + (56324).to_bytes(2, "big") + (443).to_bytes(2, "big")
ADDR6 = bytes.fromhex("20010db8000000000000000000000001") + bytes.fromhex("20010db8000000000000000000000002") + (
    56324
).to_bytes(2, "big") + (443).to_bytes(2, "big")

VERSION = r"(?i)version"
COMMAND = r"(?i)command"
FAMILY = r"(?i)family|protocol|transport|fam"
LENGTH = r"(?i)length|len\b|short|address block|too small"
TLVMSG = r"(?i)TLV|truncat|length|cross|exceed|beyond"
SIZE = r"(?i)size|large|long|max|limit|exceed"


def v2(ver_cmd: int = 0x21, fam: int = 0x11, body: bytes = ADDR4, length: int | None = None) -> bytes:
    """A v2 header: signature, version/command byte, family byte, length, body."""
    n = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + n.to_bytes(2, "big") + body


def tlv(tlv_type: int, value: bytes) -> bytes:
    """One TLV on the wire."""
    return bytes([tlv_type]) + len(value).to_bytes(2, "big") + value


def with_crc(header: bytes) -> bytes:
    """Fill the (first) CRC32C TLV of a header built with a zeroed CRC field."""
    pos = header.index(b"\x03\x00\x04\x00\x00\x00\x00", 16)
    value = crc32c(header).to_bytes(4, "big")
    return header[: pos + 3] + value + header[pos + 7 :]


def refuse(data: bytes, cls: type[Exception], pattern: str, **opts: Any) -> None:
    """Assert ``parse`` refuses ``data`` with exactly the class ``cls`` and a telling message."""
    with pytest.raises(proxyproto.ProxyProtocolError) as info:
        proxyproto.parse(data, **opts)
    exc = info.value
    assert isinstance(exc, cls), f"{type(exc).__name__}: {exc}"
    if cls is InvalidHeader:
        assert not isinstance(exc, (NoProxyHeader, ChecksumError)), f"{type(exc).__name__}: {exc}"
    assert re.search(pattern.replace("(?i)", ""), str(exc), re.IGNORECASE), f"vague message for {data!r}: {exc!r}"


MALFORMED_V2: list[tuple[str, bytes, type[Exception], str]] = [
    ("version-1", v2(ver_cmd=0x11), InvalidHeader, VERSION),
    ("version-3", v2(ver_cmd=0x31), InvalidHeader, VERSION),
    ("version-0", v2(ver_cmd=0x01), InvalidHeader, VERSION),
    ("version-15", v2(ver_cmd=0xF1), InvalidHeader, VERSION),
    *[(f"command-{c}", v2(ver_cmd=0x20 | c), InvalidHeader, COMMAND) for c in range(2, 16)],
    ("family-0x13", v2(fam=0x13), InvalidHeader, FAMILY),
    ("family-0x41", v2(fam=0x41), InvalidHeader, FAMILY),
    ("family-0x01", v2(fam=0x01), InvalidHeader, FAMILY),
    ("family-0x02", v2(fam=0x02), InvalidHeader, FAMILY),
    ("family-0x10", v2(fam=0x10), InvalidHeader, FAMILY),
    ("family-0x33", v2(fam=0x33), InvalidHeader, FAMILY),
    ("family-0xff", v2(fam=0xFF), InvalidHeader, FAMILY),
    ("local-family-0x13", v2(ver_cmd=0x20, fam=0x13), InvalidHeader, FAMILY),
    ("tcp4-len-11", v2(body=ADDR4[:11]), InvalidHeader, LENGTH),
    ("tcp4-len-0", v2(body=b""), InvalidHeader, LENGTH),
    ("udp4-len-11", v2(fam=0x12, body=ADDR4[:11]), InvalidHeader, LENGTH),
    ("tcp6-len-35", v2(fam=0x21, body=ADDR6[:35]), InvalidHeader, LENGTH),
    ("tcp6-len-12", v2(fam=0x21, body=ADDR4), InvalidHeader, LENGTH),
    ("unix-len-215", v2(fam=0x31, body=b"/a".ljust(215, b"\x00")), InvalidHeader, LENGTH),
    ("tlv-crossing-end", v2(body=ADDR4 + b"\x04\x00\x05ab"), InvalidHeader, TLVMSG),
    ("tlv-header-1-byte", v2(body=ADDR4 + b"\x04"), InvalidHeader, TLVMSG),
    ("tlv-header-2-bytes", v2(body=ADDR4 + b"\x04\x00"), InvalidHeader, TLVMSG),
    ("tlv-after-good-tlv-truncated", v2(body=ADDR4 + tlv(4, b"xy") + b"\xe0\x00"), InvalidHeader, TLVMSG),
    ("tlv-length-65535-short", v2(body=ADDR4 + b"\x04\xff\xff" + bytes(10)), InvalidHeader, TLVMSG),
    ("local-tlv-crossing-end", v2(ver_cmd=0x20, fam=0x00, body=b"\x04\x00\x09abc"), InvalidHeader, TLVMSG),
    ("unspec-proxy-tlv-crossing-end", v2(fam=0x00, body=b"\x05\x00\x09abc"), InvalidHeader, TLVMSG),
]


@pytest.mark.parametrize(
    ("data", "cls", "pattern"),
    [pytest.param(d, c, p, id=i) for i, d, c, p in MALFORMED_V2],
)
def test_v2_refuses_malformed_header(data: bytes, cls: type[Exception], pattern: str) -> None:
    """Structurally invalid v2 headers are refused with the right class and a telling message."""
    refuse(data, cls, pattern)
    refuse(data + b"payload", cls, pattern)


def test_v2_implements_binary_format_G3() -> None:
    """A receiver implements the binary format: TCP4 with payload after it."""
    data = v2() + b"hello"
    h = proxyproto.parse(data)
    assert h is not None
    assert (h.version, h.command, h.family, h.protocol) == (2, Command.PROXY, Family.INET, Protocol.STREAM)
    assert h.source == ("192.0.2.1", 56324)
    assert h.destination == ("198.51.100.2", 443)
    assert h.length == 28
    assert data[h.length :] == b"hello"


def test_v2_every_strict_prefix_is_incomplete_G5_V2_R7() -> None:
    """Partial headers are tolerated (G5/T2): each strict prefix, down to b'', gives None."""
    headers = [
        v2(),
        v2(fam=0x21, body=ADDR6 + tlv(4, b"pad")),
        v2(ver_cmd=0x20, fam=0x11, body=ADDR4),
        v2(fam=0x31, body=b"/tmp/a".ljust(108, b"\x00") + b"/tmp/b".ljust(108, b"\x00")),
    ]
    for header in headers:
        for i in range(len(header)):
            assert proxyproto.parse(header[:i]) is None, (header, i)


def test_v2_needs_whole_address_block_V2_R7() -> None:
    """An address is not decoded before the whole block (and header) is there."""
    header = v2()
    assert proxyproto.parse(header[:27]) is None
    h = proxyproto.parse(header)
    assert h is not None and h.source == ("192.0.2.1", 56324)


def test_v2_local_discards_address_block_V2_R1() -> None:
    """LOCAL with a TCP4 block and len 12 (AWS NLB health check): block skipped, no addresses."""
    data = v2(ver_cmd=0x20, fam=0x11, body=ADDR4) + b"after"
    h = proxyproto.parse(data)
    assert h is not None
    assert h.command == Command.LOCAL
    assert h.family == Family.INET  # as on the wire
    assert h.source is None and h.destination is None
    assert h.tlvs == ()
    assert h.length == 28
    assert data[h.length :] == b"after"


def test_v2_local_plain_16_bytes_V2_R1() -> None:
    """haproxy's health check: LOCAL, fam 0x00, len 0."""
    h = proxyproto.parse(SIG + b"\x20\x00\x00\x00")
    assert h is not None
    assert (h.command, h.family, h.protocol) == (Command.LOCAL, Family.UNSPEC, Protocol.UNSPEC)
    assert h.source is None and h.length == 16


def test_v2_local_walks_tlvs_after_block_V2_R1() -> None:
    """haproxy check with proxy-v2-options: LOCAL fam 0x00 with CRC, UNIQUE_ID(0), SSL TLVs."""
    body = tlv(3, bytes(4)) + tlv(5, b"") + tlv(0x20, bytes(5))
    header = with_crc(v2(ver_cmd=0x20, fam=0x00, body=body))
    assert len(header) == 16 + 18
    h = proxyproto.parse(header)
    assert h is not None
    assert h.command == Command.LOCAL
    assert [t.type for t in h.tlvs] == [3, 5, 0x20]
    assert h.unique_id == b""
    assert h.ssl is not None and h.ssl.client == 0 and h.ssl.verified is False
    # The CRC of a LOCAL header is verified too.
    bad = bytearray(header)
    bad[-1] ^= 0x01
    refuse(bytes(bad), ChecksumError, r"(?i)checksum|CRC")


def test_v2_local_with_inet_block_then_tlvs_V2_R1() -> None:
    """LOCAL with fam 0x11 and len covering the block plus TLVs: block skipped, TLVs walked."""
    h = proxyproto.parse(v2(ver_cmd=0x20, fam=0x11, body=ADDR4 + tlv(0x02, b"example.com")))
    assert h is not None
    assert h.source is None
    assert h.tlvs == (TLV(2, b"example.com"),)
    assert h.authority == "example.com"


@pytest.mark.parametrize(
    ("fam", "body"),
    [(0x21, ADDR4), (0x11, b"\x01\x02\x03\x04\x05"), (0x31, bytes(200)), (0x22, b"\xff" * 35)],
)
def test_v2_local_short_block_is_opaque_V2_R3(fam: int, body: bytes) -> None:
    """LOCAL whose len does not cover the family's block: skip len bytes, body opaque, no TLVs."""
    data = v2(ver_cmd=0x20, fam=fam, body=body) + b"payload"
    h = proxyproto.parse(data)
    assert h is not None
    assert h.command == Command.LOCAL
    assert h.source is None and h.destination is None
    assert h.tlvs == ()
    assert h.length == 16 + len(body)
    assert data[h.length :] == b"payload"
    assert h.to_bytes() == data[: h.length]


def test_v2_proxy_uses_address_block_V2_R2() -> None:
    """PROXY: the addresses of the block are the connection's."""
    h = proxyproto.parse(v2(fam=0x21, body=ADDR6))
    assert h is not None
    assert h.family == Family.INET6
    assert h.source == ("2001:db8::1", 56324)
    assert h.destination == ("2001:db8::2", 443)


def test_v2_length_field_is_always_honoured_V2_R3() -> None:
    """16 + len bytes are the header, whatever the family says (AWS pads to len 84)."""
    body = ADDR4 + tlv(4, bytes(84 - 12 - 3))
    data = v2(body=body) + b"GET /"
    assert int.from_bytes(data[14:16], "big") == 84
    h = proxyproto.parse(data)
    assert h is not None
    assert h.length == 100
    assert data[h.length :] == b"GET /"
    assert h.tlvs == (TLV(4, bytes(69)),)


def test_v2_proxy_unspec_has_no_addresses_V2_R4() -> None:
    """PROXY with UNSPEC is accepted and carries no addresses (the real endpoints are used)."""
    h = proxyproto.parse(v2(fam=0x00, body=b""))
    assert h is not None
    assert (h.command, h.family, h.protocol) == (Command.PROXY, Family.UNSPEC, Protocol.UNSPEC)
    assert h.source is None and h.destination is None
    h = proxyproto.parse(v2(fam=0x00, body=tlv(4, b"xyz")))
    assert h is not None and h.tlvs == (TLV(4, b"xyz"),)


def test_v2_proxy_len_smaller_than_block_is_invalid_V2_R5() -> None:
    """PROXY with INET/INET6/UNIX and len below the address block is invalid."""
    refuse(v2(body=ADDR4[:11]), InvalidHeader, LENGTH)
    refuse(v2(fam=0x21, body=ADDR6[:35]), InvalidHeader, LENGTH)
    refuse(v2(fam=0x32, body=bytes(215)), InvalidHeader, LENGTH)


def test_v2_local_reports_family_as_on_the_wire_V2_R6() -> None:
    """A receiver may log the address information of a LOCAL/UNSPEC header: the family byte is kept."""
    h = proxyproto.parse(v2(ver_cmd=0x20, fam=0x21, body=ADDR6))
    assert h is not None
    assert (h.family, h.protocol) == (Family.INET6, Protocol.STREAM)
    assert h.source is None


@pytest.mark.parametrize(
    "header",
    [
        v2(),
        v2(ver_cmd=0x20, fam=0x00, body=b""),
        v2(fam=0x21, body=ADDR6 + tlv(4, bytes(5))),
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        b"PROXY UNKNOWN\r\n",
    ],
)
def test_length_is_exactly_the_header_T3(header: bytes) -> None:
    """The reader consumes exactly the header: length stops at 16 + len or at the CRLF.

    The payload here starts like another header, so a parser reading past the
    end (or scanning for the next CRLF) would be caught.
    """
    for payload in (b"", b"\r\n", SIG, b"PROXY UNKNOWN\r\n", v2()):
        h = proxyproto.parse(header + payload)
        assert h is not None
        assert h.length == len(header)


def test_v2_udp_families() -> None:
    """DGRAM transports decode like their STREAM twins with protocol DGRAM."""
    h4 = proxyproto.parse(v2(fam=0x12))
    h6 = proxyproto.parse(v2(fam=0x22, body=ADDR6))
    assert h4 is not None and h4.protocol == Protocol.DGRAM and h4.family == Family.INET
    assert h6 is not None and h6.protocol == Protocol.DGRAM and h6.family == Family.INET6


def test_v2_detection_by_signature_and_version_V2_R8() -> None:
    """(a) 12-byte signature + version 2 is v2; (b) 'PROXY' is v1; (c) anything else is dropped."""
    h = proxyproto.parse(v2())
    assert h is not None and h.version == 2
    h = proxyproto.parse(b"PROXY UNKNOWN\r\n")
    assert h is not None and h.version == 1
    refuse(b"SSH-2.0-OpenSSH\r\n", NoProxyHeader, r"(?i)signature|header|PROXY")
    refuse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", NoProxyHeader, r"(?i)signature|header|PROXY")
    refuse(SIG[:11] + b"X", NoProxyHeader, r"(?i)signature|header|PROXY")


@pytest.mark.parametrize("ver_cmd", [0x11, 0x31, 0x01, 0xA1])
def test_v2_bad_version_refused_at_13_bytes_V2_R8(ver_cmd: int) -> None:
    """A signature followed by a version nibble other than 2 is refused at once, not after waiting."""
    refuse(SIG + bytes([ver_cmd]), InvalidHeader, VERSION)


def test_v2_bad_command_and_family_refused_early() -> None:
    """A bad command or family byte is refused as soon as it has arrived."""
    refuse(SIG + b"\x22", InvalidHeader, COMMAND)
    refuse(SIG + b"\x21\x13", InvalidHeader, FAMILY)


def test_v2_tlvs_after_block_V2_R9() -> None:
    """Bytes after the address block are TLVs, kept in wire order, unknown types included."""
    body = ADDR4 + tlv(0xF0, b"exp") + tlv(4, b"") + tlv(0x99, b"\x00\x01") + tlv(1, b"h2")
    h = proxyproto.parse(v2(body=body))
    assert h is not None
    assert h.tlvs == (TLV(0xF0, b"exp"), TLV(4, b""), TLV(0x99, b"\x00\x01"), TLV(1, b"h2"))
    assert h.tlv(0x99) == b"\x00\x01"
    assert h.tlv(0x42) is None
    assert h.alpn == b"h2"


def test_v2_ipv4_mapped_in_inet6_stays_ipv6() -> None:
    """An IPv4 client on a dual-stack bind arrives as fam 0x21 with ::ffff:; it is not unmapped."""
    block = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 2]) + bytes(15) + b"\x01" + b"\x9c\x40\x1f\x90"
    h = proxyproto.parse(v2(fam=0x21, body=block))
    assert h is not None
    assert h.source == ("::ffff:127.0.0.2", 40000)
    assert h.destination == ("::1", 8080)


def test_v2_unix_pathname_decodes_to_str() -> None:
    """AF_UNIX pathnames are os.fsdecode'd up to the first NUL, as the socket module gives them."""
    src = b"/run/haproxy.sock".ljust(108, b"\x00")
    dst = b"/tmp/x\x00garbage".ljust(108, b"\x00")
    h = proxyproto.parse(v2(fam=0x31, body=src + dst))
    assert h is not None
    assert h.family == Family.UNIX and h.protocol == Protocol.STREAM
    assert h.source == "/run/haproxy.sock"
    assert h.destination == "/tmp/x"


def test_v2_unix_non_utf8_pathname_uses_fsdecode() -> None:
    """A pathname that is not UTF-8 round-trips like os.fsdecode does (surrogateescape)."""
    import os

    raw = b"/tmp/\xff\xfe"
    h = proxyproto.parse(v2(fam=0x31, body=raw.ljust(108, b"\x00") + b"/d".ljust(108, b"\x00")))
    assert h is not None
    assert h.source == os.fsdecode(raw)


def test_v2_unix_abstract_name_decodes_to_bytes() -> None:
    """An abstract name (first byte NUL) is bytes with trailing NULs removed."""
    src = b"\x00abstract\x00name".ljust(108, b"\x00")
    dst = b"/d".ljust(108, b"\x00")
    h = proxyproto.parse(v2(fam=0x32, body=src + dst))
    assert h is not None
    assert h.protocol == Protocol.DGRAM
    assert h.source == b"\x00abstract\x00name"
    assert h.destination == "/d"


def test_v2_max_size_caps_whole_header() -> None:
    """max_size caps 16 + len: equal is accepted, one more is refused, already at 16 bytes."""
    body = ADDR4 + tlv(4, bytes(100))
    header = v2(body=body)
    h = proxyproto.parse(header, max_size=len(header))
    assert h is not None
    refuse(header, InvalidHeader, SIZE, max_size=len(header) - 1)
    refuse(header[:16], InvalidHeader, SIZE, max_size=len(header) - 1)


def test_v2_largest_header_accepted_by_default() -> None:
    """len 65535 (65 551 bytes in all) is the spec's maximum and parses without max_size."""
    body = ADDR4 + tlv(4, bytes(65535 - 12 - 3))
    header = v2(body=body)
    assert len(header) == 65551
    h = proxyproto.parse(header)
    assert h is not None and h.length == 65551


def test_v2_second_header_is_payload() -> None:
    """AWS may forward a client's own header: only the first one is parsed."""
    first = v2()
    second = v2(fam=0x21, body=ADDR6)
    h = proxyproto.parse(first + second)
    assert h is not None
    assert h.length == len(first)
    assert (first + second)[h.length :] == second


def test_v2_to_bytes_returns_parsed_bytes() -> None:
    """A parsed header gives back exactly its bytes, padding and odd TLV orders included."""
    for header in (
        v2(body=ADDR4 + tlv(4, bytes(30)) + tlv(0xE0, b"12345678")),
        v2(ver_cmd=0x20, fam=0x21, body=b"opaque"),
        v2(fam=0x00, body=b""),
    ):
        h = proxyproto.parse(header + b"xx")
        assert h is not None
        assert h.to_bytes() == header
