"""Encoding: encode_v1, encode_v2 and ProxyHeader.to_bytes(), per DESIGN.md "Public names".

Expected bytes are written out by hand from SPEC-NOTES (sections 2 and 3), so
the encoder is checked against the spec and not only against the parser.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import proxyproto
from proxyproto import TLV, Command, Family, Protocol, ProxyHeader, encode_v1, encode_v2
from proxyproto.crc32c import crc32c

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def port_bytes(*ports: int) -> bytes:
    """Ports in network byte order."""
    return b"".join(p.to_bytes(2, "big") for p in ports)


# --- v1 ------------------------------------------------------------------------------------


def test_encode_v1_tcp4_matches_curl_capture() -> None:
    """The TCP4 line is exactly what curl sent in the capture."""
    assert encode_v1(("127.0.0.2", 54820), ("127.0.0.1", 47100)) == b"PROXY TCP4 127.0.0.2 127.0.0.1 54820 47100\r\n"


def test_encode_v1_tcp6_matches_haproxy_capture() -> None:
    """The TCP6 line is exactly what haproxy sent; socket 4-tuples are accepted."""
    assert encode_v1(("::1", 46160), ("::1", 47202)) == b"PROXY TCP6 ::1 ::1 46160 47202\r\n"
    assert encode_v1(("::1", 46160, 0, 0), ("::1", 47202, 0, 0)) == b"PROXY TCP6 ::1 ::1 46160 47202\r\n"


def test_encode_v1_canonicalises_ipv6() -> None:
    """IPv6 text is written in inet_ntop form whatever form it was given in."""
    line = encode_v1(("2001:0DB8:0:0:0:0:0:7", 1), ("FE80::1", 2))
    assert line == b"PROXY TCP6 2001:db8::7 fe80::1 1 2\r\n"


@pytest.mark.parametrize(
    ("source", "destination", "line"),
    [
        (("192.0.2.1", 1), ("2001:db8::1", 2), b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1 2\r\n"),
        (("2001:db8::1", 1), ("192.0.2.1", 2), b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 1 2\r\n"),
    ],
)
def test_encode_v1_mixed_families_become_tcp6_V1_S4(
    source: tuple[str, int], destination: tuple[str, int], line: bytes
) -> None:
    """haproxy's practice: any IPv6 side gives TCP6, the IPv4 side as ::ffff:a.b.c.d."""
    assert encode_v1(source, destination) == line


def test_encode_v1_unknown_V1_S4() -> None:
    """No addresses: the short form every real sender emits."""
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"


def test_encode_v1_unix_is_unknown_V1_S4() -> None:
    """Non-INET families cannot be expressed in v1: PROXY UNKNOWN."""
    assert encode_v1("/tmp/a.sock", "/tmp/b.sock") == b"PROXY UNKNOWN\r\n"
    h = ProxyHeader(1, Command.PROXY, Family.UNIX, Protocol.STREAM, "/tmp/a.sock", "/tmp/b.sock")
    assert h.to_bytes() == b"PROXY UNKNOWN\r\n"


def test_encode_v1_longest_line_fits_G4() -> None:
    """Without TLVs a header fits in 536 bytes; the longest TCP6 line is 104."""
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    assert len(encode_v1((full, 65535), (full, 65535))) == 104


# --- v2 ------------------------------------------------------------------------------------


def test_encode_v2_tcp4_exact_bytes() -> None:
    """PROXY TCP4: 0x21 0x11, len 12, addresses then ports."""
    got = encode_v2(("192.0.2.1", 56324), ("198.51.100.2", 443))
    want = SIG + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 2]) + port_bytes(56324, 443)
    assert got == want


def test_encode_v2_tcp6_from_socket_4_tuples() -> None:
    """socket-module IPv6 addresses (host, port, flowinfo, scope_id) are accepted."""
    got = encode_v2(("::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0))
    dst = bytes.fromhex("20010db8" + "00" * 11 + "02")
    want = SIG + b"\x21\x21\x00\x24" + bytes(15) + b"\x01" + dst + port_bytes(1, 2)
    assert got == want


def test_encode_v2_udp() -> None:
    """protocol=DGRAM gives the UDP family bytes."""
    assert encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), protocol=Protocol.DGRAM)[13] == 0x12
    assert encode_v2(("::1", 1), ("::1", 2), protocol=Protocol.DGRAM)[13] == 0x22


def test_encode_v2_mixed_families_become_inet6() -> None:
    """Mixed IPv4/IPv6 become INET6 with the IPv4 side ::ffff:-mapped."""
    data = encode_v2(("192.0.2.1", 1), ("2001:db8::1", 2))
    assert data[13] == 0x21
    h = proxyproto.parse(data)
    assert h is not None
    assert h.source == ("::ffff:192.0.2.1", 1)
    assert h.destination == ("2001:db8::1", 2)


def test_encode_v2_local_has_family_zero_V2_S2() -> None:
    """LOCAL presents no address: family byte 0x00, len 0."""
    assert encode_v2(command=Command.LOCAL) == SIG + b"\x20\x00\x00\x00"
    with_tlv = encode_v2(command=Command.LOCAL, tlvs=(TLV(5, b""),))
    assert with_tlv == SIG + b"\x20\x00\x00\x03\x05\x00\x00"


def test_encode_v2_proxy_without_addresses_is_unspec() -> None:
    """PROXY without addresses encodes UNSPEC (family byte 0x00)."""
    assert encode_v2() == SIG + b"\x21\x00\x00\x00"


def test_encode_v2_unix_pathname_and_abstract() -> None:
    """UNIX names are NUL-padded to 108 bytes; pathnames and abstract names round-trip."""
    data = encode_v2("/run/a.sock", b"\x00abstract")
    assert data[12:16] == b"\x21\x31\x00\xd8"
    assert data[16:124] == b"/run/a.sock".ljust(108, b"\x00")
    assert data[124:232] == b"\x00abstract".ljust(108, b"\x00")
    h = proxyproto.parse(data)
    assert h is not None
    assert h.source == "/run/a.sock"
    assert h.destination == b"\x00abstract"


def test_encode_v2_largest_address_header_fits_G4() -> None:
    """Without TLVs the largest v2 header (UNIX, 232 bytes) fits in 536 bytes."""
    assert len(encode_v2("/" + "a" * 100, "/" + "b" * 100)) == 232 <= 536


def test_encode_v2_tlvs_in_given_order() -> None:
    """TLVs are written in the order given (no sorting)."""
    data = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=(TLV(0x20, bytes(5)), TLV(1, b"h2")))
    assert data[28:] == b"\x20\x00\x05" + bytes(5) + b"\x01\x00\x02h2"
    assert int.from_bytes(data[14:16], "big") == 12 + 8 + 5


def test_encode_v2_checksum_verifies_independently_CRC_S2() -> None:
    """checksum=True: a CRC TLV whose value, recomputed with the field zeroed, matches."""
    data = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=(TLV(1, b"h2"),), checksum=True)
    pos = 28
    found = None
    while pos < len(data):
        length = int.from_bytes(data[pos + 1 : pos + 3], "big")
        if data[pos] == 0x03:
            assert length == 4
            found = pos + 3
        pos += 3 + length
    assert pos == len(data) and found is not None
    stored = int.from_bytes(data[found : found + 4], "big")
    assert crc32c(data[:found] + bytes(4) + data[found + 4 :]) == stored
    h = proxyproto.parse(data)
    assert h is not None and h.alpn == b"h2" and h.crc32c == stored


# --- impossible input ----------------------------------------------------------------------


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
@pytest.mark.parametrize(
    ("source", "destination", "field", "what"),
    [
        (("192.0.2.1", 70000), ("192.0.2.2", 2), "source", "port"),
        (("192.0.2.1", 1), ("192.0.2.2", -1), "destination", "port"),
        (("999.1.1.1", 1), ("192.0.2.2", 2), "source", ""),
        (("192.0.2.1", 1), ("fe80::1%eth0", 2), "destination", ""),
        (("192.0.2.1", 1), None, "destination", ""),
        (None, ("192.0.2.1", 1), "source", ""),
    ],
)
def test_encode_refuses_impossible_input_naming_field(
    encode: object, source: object, destination: object, field: str, what: str
) -> None:
    """Impossible input raises ValueError whose message names the field at fault."""
    assert callable(encode)
    with pytest.raises(ValueError) as info:
        encode(source, destination)
    message = str(info.value).lower()
    assert field in message, message
    assert what in message, message


def test_encode_v2_refuses_addresses_on_local() -> None:
    """LOCAL carries no addresses; giving some is a ValueError that says so."""
    with pytest.raises(ValueError, match=r"(?i)LOCAL|command"):
        encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), command=Command.LOCAL)


def test_encode_v2_refuses_unix_name_over_108_bytes() -> None:
    """An AF_UNIX name longer than the 108-byte field cannot be encoded."""
    with pytest.raises(ValueError, match=r"(?i)source"):
        encode_v2("/" + "a" * 200, "/b")


# --- ProxyHeader.to_bytes ------------------------------------------------------------------


def test_built_header_encodes_canonically() -> None:
    """A header built in code encodes like encode_v1/encode_v2, and its length is 0 until then."""
    src, dst = ("192.0.2.1", 1), ("192.0.2.2", 2)
    h2 = ProxyHeader(2, Command.PROXY, Family.INET, Protocol.STREAM, src, dst, (TLV(1, b"h2"),))
    assert h2.length == 0
    assert h2.to_bytes() == encode_v2(src, dst, tlvs=(TLV(1, b"h2"),))
    h1 = ProxyHeader(1, Command.PROXY, Family.INET, Protocol.STREAM, src, dst)
    assert h1.to_bytes() == encode_v1(src, dst)


def test_built_header_without_addresses_encodes_family_zero() -> None:
    """A built LOCAL header encodes family byte 0x00 even if it says INET."""
    h = ProxyHeader(2, Command.LOCAL, Family.INET, Protocol.STREAM)
    assert h.to_bytes() == SIG + b"\x20\x00\x00\x00"


def test_header_refuses_unspec_with_a_protocol() -> None:
    """ProxyHeader refuses UNSPEC with another protocol (DESIGN.md)."""
    with pytest.raises(ValueError):
        ProxyHeader(2, Command.PROXY, Family.UNSPEC, Protocol.STREAM)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP6 2001:0DB8::0007 ::FFFF:7F00:2 1 2\r\n",
        b"PROXY UNKNOWN anything here\r\n",
        SIG + b"\x20\x11\x00\x0c" + bytes(12),
        SIG + b"\x21\x11\x00\x54" + bytes(12) + b"\x04\x00\x45" + bytes(69),
        SIG + b"\x21\x31\x00\xd8" + b"/a\x00junk".ljust(108, b"\x00") + b"/b".ljust(108, b"\xff"),
    ],
)
def test_parsed_header_to_bytes_is_exact(data: bytes) -> None:
    """A parsed header returns exactly the bytes it was parsed from, canonical or not."""
    h = proxyproto.parse(data + b"tail")
    assert h is not None
    assert h.to_bytes() == data


# --- the fast path of encode_v2 -------------------------------------------------------------

_ipv4_text = st.ip_addresses(v=4).map(str)
_ipv6_text = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 65535)


@given(st.one_of(st.tuples(_ipv4_text, _ipv4_text), st.tuples(_ipv6_text, _ipv6_text)), _port, _port)
def test_encode_v2_fast_path_equals_the_general_path(hosts: tuple[str, str], sport: int, dport: int) -> None:
    """Two (host, port) pairs of one family take a one-pack path; its bytes are the canonical encoding."""
    family = Family.INET if "." in hosts[0] and ":" not in hosts[0] else Family.INET6
    built = ProxyHeader(2, Command.PROXY, family, Protocol.STREAM, (hosts[0], sport), (hosts[1], dport))
    assert encode_v2((hosts[0], sport), (hosts[1], dport)) == built.to_bytes()


@pytest.mark.parametrize(
    ("source", "destination", "message"),
    [
        (("192.0.2.1", True), ("192.0.2.2", 2), "port"),
        (("192.0.2.1", 1), ("192.0.2.2", 65536), "port"),
        (("192.0.2.1", -1), ("192.0.2.2", 2), "port"),
        ((b"192.0.2.1", 1), ("192.0.2.2", 2), "host"),
        (("192.0.2.01", 1), ("192.0.2.2", 2), "192.0.2.01"),
        (("fe80::1%eth0", 1), ("fe80::2", 2), "fe80::1%eth0"),
    ],
)
def test_encode_v2_refusals_are_not_short_circuited(source: object, destination: object, message: str) -> None:
    """Input the fast path does not take still gets the general path's ValueError naming the field."""
    with pytest.raises(ValueError, match=message):
        encode_v2(source, destination)


def test_encode_v2_mixed_and_socket_tuples_take_the_general_path() -> None:
    """A mixed pair is mapped to INET6; socket 4-tuples are accepted (neither is the fast path's shape)."""
    mixed = proxyproto.parse(encode_v2(("192.0.2.1", 1), ("2001:db8::2", 2)))
    assert mixed is not None and mixed.source == ("::ffff:192.0.2.1", 1)
    six = proxyproto.parse(encode_v2(("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0)))
    assert six is not None and six.family is Family.INET6


@pytest.mark.parametrize(
    "header",
    [
        proxyproto.parse(encode_v2(("192.0.2.1", 1), ("198.51.100.2", 2), tlvs=[(0x02, b"example.com")])),
        proxyproto.parse(encode_v1(("192.0.2.1", 1), ("198.51.100.2", 2))),
        ProxyHeader(2, Command.PROXY, Family.INET, Protocol.STREAM, ("192.0.2.1", 1), ("198.51.100.2", 2)),
    ],
    ids=["parsed v2", "parsed v1", "built"],
)
def test_header_is_unhashable_because_its_attributes_are_writable(header: ProxyHeader) -> None:
    with pytest.raises(TypeError):
        hash(header)
    with pytest.raises(TypeError):
        {header}  # noqa: B018
    ssl = proxyproto.SSLInfo(bytes([proxyproto.SSLClient.SSL]) + bytes(4))
    with pytest.raises(TypeError):
        hash(ssl)
    assert header == proxyproto.parse(header.to_bytes()) and {header.to_bytes(): 1}[header.to_bytes()] == 1


def test_header_length_is_set_by_encoding_a_built_header() -> None:
    header = ProxyHeader(2, Command.PROXY, Family.INET, Protocol.STREAM, ("192.0.2.1", 1), ("198.51.100.2", 2))
    assert header.length == 0
    assert len(header.to_bytes()) == 28 and header.length == 28
