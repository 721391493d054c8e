"""Property tests (hypothesis) for the sans-I/O core.

- Round trip: ``parse(h.to_bytes()) == h`` for generated headers of every
  version, command, family, protocol and TLV mix, with and without a checksum.
- Every strict prefix of a valid encoded header is ``None`` (tolerance to
  fragmentation, G5/T2).
- Random and mutated bytes give a header, ``None`` or a ``ProxyProtocolError``,
  never another exception.

The number of examples comes from the profile in ``conftest.py`` (10,000 under
``CI=true``); nothing here sets ``max_examples``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

import proxyproto
from proxyproto import TLV, Command, Family, Protocol, ProxyHeader

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

ports = st.integers(0, 65535)
ipv4 = st.binary(min_size=4, max_size=4).map(lambda b: socket.inet_ntop(socket.AF_INET, b))
# Bias towards the interesting IPv6 shapes (mapped, loopback, compressible) as well as random ones.
ipv6 = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=4, max_size=4).map(lambda b: bytes(10) + b"\xff\xff" + b),
    st.binary(min_size=1, max_size=4).map(lambda b: bytes(16 - len(b)) + b),
    st.binary(min_size=1, max_size=4).map(lambda b: b + bytes(16 - len(b))),
).map(lambda b: socket.inet_ntop(socket.AF_INET6, b))
# AF_UNIX: a pathname is str (os.fsdecode of bytes without NUL); an abstract name is bytes
# starting with NUL and not ending with one (trailing NULs are padding on the wire).
unix_path = (
    st.binary(min_size=1, max_size=107)
    .filter(lambda b: b"\x00" not in b)
    .map(os.fsdecode)
)
unix_abstract = st.builds(
    lambda mid, last: b"\x00" + mid + bytes([last]),
    st.binary(max_size=60),
    st.integers(1, 255),
)
unix_name = st.one_of(unix_path, unix_abstract)

ascii_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)
utf8_text = st.text(max_size=16)


def _tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes([tlv_type]) + len(value).to_bytes(2, "big") + value


ssl_sub = st.one_of(
    st.builds(
        lambda t, s: _tlv(t, s.encode("ascii")),
        st.sampled_from([0x21, 0x23, 0x24, 0x25, 0x26, 0x27]),
        ascii_text,
    ),
    utf8_text.map(lambda s: _tlv(0x22, s.encode("utf-8"))),
    st.binary(max_size=40).map(lambda b: _tlv(0x28, b)),
)
ssl_value = st.builds(
    lambda client, verify, subs: bytes([client]) + verify.to_bytes(4, "big") + b"".join(subs),
    st.integers(0, 7),
    st.integers(0, 2**32 - 1),
    st.lists(ssl_sub, max_size=4),
)
STANDARD = {0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x30}
other_types = st.integers(0, 255).filter(lambda t: t not in STANDARD)
tlv_strategy = st.one_of(
    st.builds(TLV, st.just(0x01), st.binary(max_size=16)),
    st.builds(TLV, st.just(0x02), utf8_text.map(lambda s: s.encode("utf-8"))),
    st.builds(TLV, st.just(0x04), st.binary(max_size=24)),
    st.builds(TLV, st.just(0x05), st.binary(max_size=128)),
    st.builds(TLV, st.just(0x20), ssl_value),
    st.builds(TLV, st.just(0x30), ascii_text.map(lambda s: s.encode("ascii"))),
    st.builds(TLV, st.integers(0xE0, 0xEF), st.binary(max_size=16)),  # custom, any shape
    st.builds(TLV, other_types, st.binary(max_size=16)),
)
tlv_lists = st.lists(tlv_strategy, max_size=5).map(tuple)


@st.composite
def v1_headers(draw: st.DrawFn) -> ProxyHeader:
    """Every header v1 can express: TCP4, TCP6 and UNKNOWN."""
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC, Protocol.UNSPEC)
    host = ipv4 if kind == "TCP4" else ipv6
    family = Family.INET if kind == "TCP4" else Family.INET6
    src = (draw(host), draw(ports))
    dst = (draw(host), draw(ports))
    return ProxyHeader(1, Command.PROXY, family, Protocol.STREAM, src, dst)


def _addresses(draw: st.DrawFn, family: Family) -> tuple[Any, Any]:
    if family == Family.INET:
        return (draw(ipv4), draw(ports)), (draw(ipv4), draw(ports))
    if family == Family.INET6:
        return (draw(ipv6), draw(ports)), (draw(ipv6), draw(ports))
    if family == Family.UNIX:
        return draw(unix_name), draw(unix_name)
    return None, None


@st.composite
def v2_headers(draw: st.DrawFn) -> ProxyHeader:
    """Every v2 command, family and protocol, with a random TLV mix."""
    command = draw(st.sampled_from([Command.LOCAL, Command.PROXY]))
    tlvs = draw(tlv_lists)
    if command == Command.LOCAL:
        # Built in code, a LOCAL header always encodes family byte 0x00.
        return ProxyHeader(2, command, Family.UNSPEC, Protocol.UNSPEC, tlvs=tlvs)
    family = draw(st.sampled_from([Family.UNSPEC, Family.INET, Family.INET6, Family.UNIX]))
    if family == Family.UNSPEC:
        return ProxyHeader(2, command, family, Protocol.UNSPEC, tlvs=tlvs)
    protocol = draw(st.sampled_from([Protocol.STREAM, Protocol.DGRAM]))
    src, dst = _addresses(draw, family)
    return ProxyHeader(2, command, family, protocol, src, dst, tlvs)


headers = st.one_of(v1_headers(), v2_headers())


def _checksummed(h: ProxyHeader) -> bytes:
    """The same v2 header encoded by ``encode_v2(checksum=True)``."""
    return proxyproto.encode_v2(
        h.source, h.destination, command=h.command, protocol=h.protocol, tlvs=h.tlvs, checksum=True
    )


@st.composite
def encoded_headers(draw: st.DrawFn) -> bytes:
    """Valid header bytes: canonical encodings, with and without a CRC32C TLV."""
    h = draw(headers)
    if h.version == 2 and draw(st.booleans()):
        return _checksummed(h)
    return h.to_bytes()


def _safe_parse(data: bytes, **opts: Any) -> ProxyHeader | None:
    """Parse and check the result's invariants; only ProxyProtocolError may escape."""
    try:
        h = proxyproto.parse(data, **opts)
    except proxyproto.ProxyProtocolError:
        return None
    if h is not None:
        assert 0 < h.length <= len(data)
        assert h.to_bytes() == data[: h.length]
    return h


@given(headers)
def test_round_trip_parse_of_to_bytes(h: ProxyHeader) -> None:
    """A built header survives encoding and parsing; the parsed one gives back the same bytes."""
    data = h.to_bytes()
    parsed = proxyproto.parse(data)
    assert parsed == h
    assert parsed is not None
    assert parsed.length == len(data)
    assert parsed.to_bytes() == data


@given(v2_headers())
def test_round_trip_with_checksum_CRC_S2(h: ProxyHeader) -> None:
    """encode_v2(checksum=True) gives a header whose CRC verifies and whose other fields survive."""
    data = _checksummed(h)
    parsed = proxyproto.parse(data)
    assert parsed is not None
    assert parsed.length == len(data)
    assert parsed.crc32c is not None
    assert (parsed.version, parsed.command, parsed.family, parsed.protocol) == (
        h.version,
        h.command,
        h.family,
        h.protocol,
    )
    assert (parsed.source, parsed.destination) == (h.source, h.destination)
    assert tuple(t for t in parsed.tlvs if t.type != 0x03) == h.tlvs
    assert parsed.to_bytes() == data


@given(encoded_headers())
def test_every_strict_prefix_is_none_G5_T2(data: bytes) -> None:
    """Every strict prefix of a valid header, b'' included, is a valid incomplete header."""
    for i in range(len(data)):
        assert proxyproto.parse(data[:i]) is None, (data, i)


@given(encoded_headers(), st.binary(max_size=64))
def test_header_then_payload_has_exact_length(data: bytes, payload: bytes) -> None:
    """With payload after it, the header's length is its own, and the payload is untouched."""
    h = proxyproto.parse(data + payload)
    assert h is not None
    assert h.length == len(data)
    assert (data + payload)[h.length :] == payload


PREFIXES = [
    b"",
    b"PROXY ",
    b"PROXY TCP4 ",
    b"PROXY TCP6 ",
    b"PROXY UNKNOWN",
    SIG,
    SIG + b"\x21",
    SIG + b"\x20",
    SIG + b"\x21\x11\x00\x0c",
    SIG + b"\x21\x21",
    SIG + b"\x21\x31",
]
options = st.fixed_dictionaries(
    {},
    optional={
        "verify_checksum": st.booleans(),
        "allow_v4_in_tcp6": st.booleans(),
        "max_size": st.integers(16, 70000),
    },
)


@given(st.sampled_from(PREFIXES), st.binary(max_size=300), options)
def test_random_bytes_never_raise_other_exceptions(prefix: bytes, tail: bytes, opts: dict[str, Any]) -> None:
    """Arbitrary bytes (often behind a signature) give a header, None or ProxyProtocolError."""
    _safe_parse(prefix + tail, **opts)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid header with bit flips, insertions, deletions or a truncation."""
    data = bytearray(draw(encoded_headers()) + draw(st.binary(max_size=8)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x0A, 0x0D, 0x20, 0x3A, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@given(mutated(), options)
def test_mutated_headers_never_raise_other_exceptions(data: bytes, opts: dict[str, Any]) -> None:
    """Mutations of valid headers give a header, None or ProxyProtocolError, nothing else."""
    _safe_parse(data, **opts)


@st.composite
def ipv6_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """(some valid spelling of an IPv6 address, its inet_ntop form)."""
    import ipaddress

    packed = draw(st.binary(min_size=16, max_size=16))
    addr = ipaddress.IPv6Address(packed)
    spelling = draw(st.sampled_from([addr.exploded, addr.compressed, addr.exploded.upper(), addr.compressed.upper()]))
    return spelling, socket.inet_ntop(socket.AF_INET6, packed)


@given(ipv6_spellings(), ipv6_spellings(), ports, ports)
def test_v1_any_ipv6_spelling_is_canonicalised(
    src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int
) -> None:
    """Exploded, compressed, upper or lower case: addresses come out in inet_ntop form."""
    line = f"PROXY TCP6 {src[0]} {dst[0]} {sport} {dport}\r\n".encode("ascii")
    h = proxyproto.parse(line)
    assert h is not None
    assert h.source == (src[1], sport)
    assert h.destination == (dst[1], dport)
    assert h.to_bytes() == line


@given(ipv4, ipv6, ports, ports, st.booleans())
def test_v1_mixed_tcp6_maps_ipv4_under_opt_in(v4: str, v6: str, p1: int, p2: int, v4_first: bool) -> None:
    """Under allow_v4_in_tcp6 the IPv4 side of a TCP6 line becomes ::ffff:a.b.c.d."""
    a, b = (v4, v6) if v4_first else (v6, v4)
    line = f"PROXY TCP6 {a} {b} {p1} {p2}\r\n".encode("ascii")
    h = proxyproto.parse(line, allow_v4_in_tcp6=True)
    assert h is not None and h.family == Family.INET6
    mapped = socket.inet_ntop(socket.AF_INET6, bytes(10) + b"\xff\xff" + socket.inet_pton(socket.AF_INET, v4))
    assert h.source == ((mapped if v4_first else v6), p1)
    assert h.destination == ((v6 if v4_first else mapped), p2)
