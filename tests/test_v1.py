"""Version 1 (text) receiver rules, SPEC-NOTES section 2, and the general rules G3/G5.

Each rule id of SPEC-NOTES that applies to the text parser has a test named
after it; the table ``MALFORMED_V1`` lists lines that must be refused, each with
the exception class DESIGN.md's ``parse`` docstring assigns and a pattern the
message must match (the message has to say what is wrong).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import proxyproto
from proxyproto import (
    ChecksumError,
    Command,
    Family,
    InvalidHeader,
    NoProxyHeader,
    Protocol,
    ProxyHeader,
)

LINE4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
LINE6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n"

SIG = r"(?i)PROXY|signature|space|separator"
PROTO = r"(?i)protocol|family|TCP|UDP|UNKNOWN|token|transport"
SPACE = r"(?i)space|separator|field|empty|protocol|token"
ADDR = r"(?i)address|IPv4|IPv6|\bIP\b"
PORT = r"(?i)port"
CRLF = r"(?i)CRLF|\bCR\b|\bLF\b|line|newline|terminat|carriage|feed"
FIELDS = r"(?i)field|missing|extra|too (many|few)|expected|number|count"


def refuse(data: bytes, cls: type[Exception], pattern: str, **opts: Any) -> None:
    """Assert ``parse`` refuses ``data`` with exactly the class ``cls`` and a telling message."""
    with pytest.raises(proxyproto.ProxyProtocolError) as info:
        proxyproto.parse(data, **opts)
    exc = info.value
    assert isinstance(exc, cls), f"{type(exc).__name__}: {exc}"
    if cls is InvalidHeader:
        assert not isinstance(exc, (NoProxyHeader, ChecksumError)), f"{type(exc).__name__}: {exc}"
    assert re.search(pattern.replace("(?i)", ""), str(exc), re.IGNORECASE), f"vague message for {data!r}: {exc!r}"


def v1_line(src: str, dst: str, sport: str = "56324", dport: str = "443", proto: str = "TCP4") -> bytes:
    """A v1 line with the given fields, CRLF-terminated (UTF-8 so non-ASCII digits can be tried)."""
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


# (id, data, exception class, message pattern)
MALFORMED_V1: list[tuple[str, bytes, type[Exception], str]] = [
    ("proxyz", b"PROXYZ TCP4 192.0.2.1 198.51.100.2 1 2\r\n", InvalidHeader, SIG),
    ("lowercase-proxy", b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n", NoProxyHeader, r"(?i)signature|header|PROXY"),
    ("http-request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", NoProxyHeader, r"(?i)signature|header|PROXY"),
    ("tcp5", v1_line("192.0.2.1", "198.51.100.2", proto="TCP5"), InvalidHeader, PROTO),
    ("udp4", v1_line("192.0.2.1", "198.51.100.2", proto="UDP4"), InvalidHeader, PROTO),
    ("udp6", v1_line("::1", "::1", proto="UDP6"), InvalidHeader, PROTO),
    ("lowercase-tcp4", v1_line("192.0.2.1", "198.51.100.2", proto="tcp4"), InvalidHeader, PROTO),
    ("unknownx", b"PROXY UNKNOWNX\r\n", InvalidHeader, PROTO),
    ("double-space-after-proxy", b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n", InvalidHeader, SPACE),
    ("double-space-between-addrs", b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n", InvalidHeader, SPACE + "|" + ADDR),
    ("double-space-between-ports", b"PROXY TCP4 192.0.2.1 198.51.100.2 1  2\r\n", InvalidHeader, SPACE + "|" + PORT),
    ("tab-after-proxy", b"PROXY\tTCP4 192.0.2.1 198.51.100.2 1 2\r\n", InvalidHeader, SIG),
    ("tab-between-fields", b"PROXY TCP4\t192.0.2.1 198.51.100.2 1 2\r\n", InvalidHeader, SPACE + "|" + PROTO),
    ("trailing-space", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n", InvalidHeader, FIELDS + "|" + SPACE + "|" + PORT),
    ("leading-zero-octet", v1_line("01.2.3.4", "198.51.100.2"), InvalidHeader, ADDR),
    ("leading-zero-last-octet", v1_line("192.0.2.01", "198.51.100.2"), InvalidHeader, ADDR),
    ("octet-256", v1_line("256.1.1.1", "198.51.100.2"), InvalidHeader, ADDR),
    ("octet-999", v1_line("999.1.1.1", "198.51.100.2"), InvalidHeader, ADDR),
    ("three-octets", v1_line("192.0.2", "198.51.100.2"), InvalidHeader, ADDR),
    ("five-octets", v1_line("192.0.2.1.5", "198.51.100.2"), InvalidHeader, ADDR),
    ("empty-octet", v1_line("192..2.1", "198.51.100.2"), InvalidHeader, ADDR),
    ("fullwidth-digit-in-ipv4", v1_line("\uff1192.0.2.1", "198.51.100.2"), InvalidHeader, ADDR + "|ASCII"),
    ("bad-destination-ipv4", v1_line("192.0.2.1", "198.51.100.300"), InvalidHeader, ADDR),
    ("port-65536", v1_line("192.0.2.1", "198.51.100.2", sport="65536"), InvalidHeader, PORT),
    ("port-99999", v1_line("192.0.2.1", "198.51.100.2", dport="99999"), InvalidHeader, PORT),
    ("port-plus-sign", v1_line("192.0.2.1", "198.51.100.2", sport="+80"), InvalidHeader, PORT),
    ("port-minus-sign", v1_line("192.0.2.1", "198.51.100.2", sport="-1"), InvalidHeader, PORT),
    ("port-leading-zero", v1_line("192.0.2.1", "198.51.100.2", dport="080"), InvalidHeader, PORT),
    ("port-underscore", v1_line("192.0.2.1", "198.51.100.2", dport="8_0"), InvalidHeader, PORT),
    ("port-arabic-indic", v1_line("192.0.2.1", "198.51.100.2", dport="٨٠"), InvalidHeader, PORT + "|ASCII"),
    ("port-hex", v1_line("192.0.2.1", "198.51.100.2", dport="0x50"), InvalidHeader, PORT),
    ("port-empty", v1_line("192.0.2.1", "198.51.100.2", dport=""), InvalidHeader, f"{PORT}|{FIELDS}|{SPACE}"),
    ("lone-lf", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n", InvalidHeader, CRLF),
    ("lone-cr-then-byte", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX\r\n", InvalidHeader, CRLF),
    ("unknown-lone-lf", b"PROXY UNKNOWN\n", InvalidHeader, CRLF),
    ("unknown-lone-cr", b"PROXY UNKNOWN\r\r\n", InvalidHeader, CRLF),
    ("unknown-cr-inside", b"PROXY UNKNOWN a\rb\r\n", InvalidHeader, CRLF),
    ("unknown-lf-inside", b"PROXY UNKNOWN a\nb\r\n", InvalidHeader, CRLF),
    ("missing-dport", b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", InvalidHeader, FIELDS + "|" + PORT),
    ("missing-all-fields", b"PROXY TCP4\r\n", InvalidHeader, FIELDS + "|" + ADDR),
    ("missing-protocol", b"PROXY\r\n", InvalidHeader, PROTO + "|" + FIELDS + "|" + SIG),
    ("missing-protocol-space", b"PROXY \r\n", InvalidHeader, PROTO + "|" + FIELDS),
    ("extra-field", b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", InvalidHeader, FIELDS),
    ("tcp4-with-ipv6", v1_line("::1", "::1", proto="TCP4"), InvalidHeader, ADDR),
    ("tcp4-with-one-ipv6", v1_line("192.0.2.1", "::1", proto="TCP4"), InvalidHeader, ADDR),
    ("tcp6-with-ipv4", v1_line("192.0.2.1", "198.51.100.2", proto="TCP6"), InvalidHeader, ADDR),
    ("tcp6-mixed-nginx", v1_line("2001:db8::1", "192.0.2.1", proto="TCP6"), InvalidHeader, ADDR),
    ("ipv6-zone-id", v1_line("fe80::1%eth0", "::1", proto="TCP6"), InvalidHeader, ADDR + "|zone|scope"),
    ("ipv6-numeric-zone-id", v1_line("fe80::1%2", "::1", proto="TCP6"), InvalidHeader, ADDR + "|zone|scope"),
    ("ipv6-bad-hex", v1_line("2001:db8::g1", "::1", proto="TCP6"), InvalidHeader, ADDR),
    ("ipv6-triple-colon", v1_line("2001:::1", "::1", proto="TCP6"), InvalidHeader, ADDR),
    ("ipv6-two-double-colons", v1_line("1::2::3", "::1", proto="TCP6"), InvalidHeader, ADDR),
    ("ipv6-nine-groups", v1_line("1:2:3:4:5:6:7:8:9", "::1", proto="TCP6"), InvalidHeader, ADDR),
    ("ipv6-seven-groups", v1_line("1:2:3:4:5:6:7", "::1", proto="TCP6"), InvalidHeader, ADDR),
    ("ipv6-five-hex-digits", v1_line("12345::1", "::1", proto="TCP6"), InvalidHeader, ADDR),
    ("ipv6-bad-embedded-ipv4", v1_line("::ffff:1.2.3.256", "::1", proto="TCP6"), InvalidHeader, ADDR),
    ("ipv6-brackets", v1_line("[::1]", "::1", proto="TCP6"), InvalidHeader, ADDR),
    ("nul-in-line", b"PROXY TCP4 192.0.2.1\x00 198.51.100.2 1 2\r\n", InvalidHeader, ADDR),
]


@pytest.mark.parametrize(
    ("data", "cls", "pattern"),
    [pytest.param(d, c, p, id=i) for i, d, c, p in MALFORMED_V1],
)
def test_v1_refuses_malformed_line_V1_R5(data: bytes, cls: type[Exception], pattern: str) -> None:
    """Any sequence that does not exactly match the grammar is refused with a telling message."""
    refuse(data, cls, pattern)


def test_v1_malformed_table_is_large_enough() -> None:
    """The acceptance asks for at least 40 malformed inputs overall; this table alone has them."""
    assert len(MALFORMED_V1) >= 40


def test_v1_implements_text_format_G3() -> None:
    """A receiver implements the human-readable format (and the binary one, see test_v2)."""
    h = proxyproto.parse(LINE4)
    assert h is not None
    assert (h.version, h.command, h.family, h.protocol) == (1, Command.PROXY, Family.INET, Protocol.STREAM)
    assert h.source == ("192.0.2.1", 56324)
    assert h.destination == ("198.51.100.2", 443)
    assert h.length == len(LINE4)
    assert h.tlvs == ()


def test_v1_tolerates_partial_line_G5_T2() -> None:
    """Every strict prefix of a valid line is a valid incomplete header: None."""
    for line in (LINE4, LINE6, b"PROXY UNKNOWN\r\n", b"PROXY TCP6 ::ffff:127.0.0.2 ::1 1 0\r\n"):
        for i in range(len(line)):
            assert proxyproto.parse(line[:i]) is None, line[:i]


@pytest.mark.parametrize(
    "prefix",
    [
        b"PROXY TCP4 192.0.2.1 ",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 ",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 ",
        b"PROXY TCP6 ::1 ",
        b"PROXY TCP6 ::1 ::1 1 ",
    ],
)
def test_v1_prefix_ending_in_separator_is_incomplete_G5_T2(prefix: bytes) -> None:
    """A line cut right after a separator space is a valid incomplete header (None)."""
    assert proxyproto.parse(prefix) is None


def test_v1_waits_for_crlf_V1_R1() -> None:
    """No header before the CRLF: the line without its LF is still incomplete."""
    assert proxyproto.parse(LINE4[:-1]) is None
    assert proxyproto.parse(LINE4[:-2]) is None
    h = proxyproto.parse(LINE4)
    assert h is not None and h.length == len(LINE4)


def test_v1_refuses_line_without_crlf_in_107_bytes_V1_R2() -> None:
    """107 bytes without CRLF can never become a valid line: refused now, not None."""
    long_unknown = b"PROXY UNKNOWN " + b"a" * 200
    for n in (107, 108, 150):
        refuse(long_unknown[:n], InvalidHeader, CRLF + r"|long|107|length|size")
    # 108 bytes that end in CRLF are one byte too long.
    line108 = b"PROXY UNKNOWN " + b"a" * (108 - 16) + b"\r\n"
    assert len(line108) == 108
    refuse(line108, InvalidHeader, CRLF + r"|long|107|length|size")


def test_v1_accepts_longest_line_of_107_bytes_V1_R2() -> None:
    """The longest legal line (107 bytes, CRLF included) is accepted."""
    line = b"PROXY UNKNOWN " + b"a" * (107 - 16) + b"\r\n"
    assert len(line) == 107
    h = proxyproto.parse(line)
    assert h is not None and h.length == 107
    full6 = (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    )
    assert len(full6) == 104
    h = proxyproto.parse(full6)
    assert h is not None and h.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)


def test_v1_tolerates_fragmented_line_V1_R3() -> None:
    """Rejecting a line not complete in the first read is allowed, not required: the core is tolerant."""
    assert proxyproto.parse(LINE4[:20]) is None
    h = proxyproto.parse(LINE4 + b"payload")
    assert h is not None and h.length == len(LINE4)


def test_v1_refuses_lone_cr_or_lf_V1_R4() -> None:
    """A single CR or LF never ends the line."""
    body = LINE4[:-2]
    refuse(body + b"\n", InvalidHeader, CRLF)
    refuse(body + b"\rX", InvalidHeader, CRLF)
    refuse(body + b"\r\r\n", InvalidHeader, CRLF)
    refuse(b"PROXY UNKNOWN\n", InvalidHeader, CRLF)
    # A CR as the last byte so far is a valid prefix of CRLF.
    assert proxyproto.parse(body + b"\r") is None


@pytest.mark.parametrize(
    "prefix",
    [
        b"PROXYZ",
        b"PROXY\t",
        b"PROXY  ",
        b"PROXY TCP5",
        b"PROXY TCP5 ",
        b"PROXY UDP4 ",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
        b"PROXY UNKNOWN\n",
    ],
)
def test_v1_refuses_as_early_as_the_bytes_show_V1_R5(prefix: bytes) -> None:
    """Invalid input is refused before the CRLF when the bytes so far already rule out a header."""
    with pytest.raises(InvalidHeader) as info:
        proxyproto.parse(prefix)
    assert not isinstance(info.value, NoProxyHeader)


@pytest.mark.parametrize(
    "prefix", [b"p", b"GET ", b"X", b"PRoXY", b"\r\n\r\n\x00\r\nQUIX"]
)
def test_v1_not_a_header_as_soon_as_first_bytes_differ(prefix: bytes) -> None:
    """A stream whose first bytes differ from both signatures is NoProxyHeader, without waiting."""
    with pytest.raises(NoProxyHeader):
        proxyproto.parse(prefix)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN anything here\r\n",
        b"PROXY UNKNOWN 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY UNKNOWN ffff:: 999.999.999.999 99999 -1\r\n",
        b"PROXY UNKNOWN \r\n",
    ],
)
def test_v1_unknown_ignores_rest_and_has_no_addresses_V1_R6(line: bytes) -> None:
    """UNKNOWN: the receiver ignores everything up to CRLF and uses the real connection's addresses."""
    h = proxyproto.parse(line + b"payload")
    assert h is not None
    assert h.version == 1
    assert h.command == Command.PROXY
    assert h.family == Family.UNSPEC
    assert h.protocol == Protocol.UNSPEC
    assert h.source is None and h.destination is None
    assert h.length == len(line)
    assert h.to_bytes() == line


def test_v1_ipv6_addresses_come_out_canonical() -> None:
    """Any valid IPv6 text (upper case, leading zeros, uncompressed) comes out in inet_ntop form."""
    line = b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0007 FE80:0:0:0:0:0:0:1 0 65535\r\n"
    h = proxyproto.parse(line)
    assert h is not None
    assert h.source == ("2001:db8::7", 0)
    assert h.destination == ("fe80::1", 65535)
    assert h.to_bytes() == line  # a parsed header returns the bytes it came from


def test_v1_ipv4_mapped_stays_ipv6() -> None:
    """haproxy's dual-stack form ``::ffff:a.b.c.d`` is accepted and not unmapped."""
    h = proxyproto.parse(b"PROXY TCP6 ::ffff:127.0.0.2 ::1 40000 8080\r\n")
    assert h is not None
    assert h.family == Family.INET6
    assert h.source == ("::ffff:127.0.0.2", 40000)
    assert h.destination == ("::1", 8080)


def test_v1_ipv4_extremes_and_port_extremes() -> None:
    """0.0.0.0, 255.255.255.255, port 0 and port 65535 are all legal."""
    h = proxyproto.parse(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n")
    assert h is not None
    assert h.source == ("0.0.0.0", 0)
    assert h.destination == ("255.255.255.255", 65535)


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (b"PROXY TCP6 2001:db8::1 192.0.2.1 1 2\r\n", ("2001:db8::1", 1), ("::ffff:192.0.2.1", 2)),
        (b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n", ("::ffff:192.0.2.1", 1), ("::1", 2)),
    ],
)
def test_v1_mixed_tcp6_only_with_opt_in(line: bytes, source: tuple[str, int], destination: tuple[str, int]) -> None:
    """nginx's mixed TCP6 lines are refused by default and mapped to ``::ffff:`` under the opt-in."""
    refuse(line, InvalidHeader, ADDR)
    h = proxyproto.parse(line, allow_v4_in_tcp6=True)
    assert h is not None
    assert h.family == Family.INET6
    assert h.source == source
    assert h.destination == destination


def test_v1_opt_in_does_not_allow_ipv6_in_tcp4() -> None:
    """The nginx opt-in is about IPv4 in TCP6 only; IPv6 in TCP4 stays invalid."""
    refuse(b"PROXY TCP4 ::1 192.0.2.1 1 2\r\n", InvalidHeader, ADDR, allow_v4_in_tcp6=True)


def test_v1_second_header_is_payload() -> None:
    """Only the first header is parsed; a second one (AWS NLB may forward one) is payload."""
    data = LINE4 + LINE6
    h = proxyproto.parse(data)
    assert h is not None
    assert h.length == len(LINE4)
    assert data[h.length :] == LINE6


def test_v1_header_equality_ignores_length() -> None:
    """A parsed header equals the same header built in code (length is not compared)."""
    h = proxyproto.parse(LINE4)
    built = ProxyHeader(1, Command.PROXY, Family.INET, Protocol.STREAM, ("192.0.2.1", 56324), ("198.51.100.2", 443))
    assert h == built
    assert built.length == 0


def test_v1_accepts_memoryview_and_bytearray() -> None:
    """``data`` is bytes-like: bytearray and memoryview give the same header."""
    assert proxyproto.parse(bytearray(LINE4)) == proxyproto.parse(LINE4)
    assert proxyproto.parse(memoryview(LINE4)) == proxyproto.parse(LINE4)
