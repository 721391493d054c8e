"""CRC-32C: the function itself, the public vectors of SPEC-NOTES section 4, and rules CRC-S/CRC-R.

A flipped bit anywhere in the address block or in any TLV value of a
checksummed header must be a ``ChecksumError`` (DESIGN.md: walk the TLV
structure, verify the CRC, then validate TLV contents), and with
``verify_checksum=False`` the same header is accepted when it is otherwise valid.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import proxyproto
from proxyproto import TLV, ChecksumError, InvalidHeader
from proxyproto.crc32c import crc32c, crc32c_native, crc32c_python

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
VECTORS = Path(__file__).parent / "vectors"

AWS_NLB = bytes.fromhex(
    "0d0a0d0a000d0a515549540a21110054ac1f0771ac1f0a1fc8f20050030004e8d6892d"
    "ea001701767063652d3038643262663135666163353030316339040024"
) + bytes(36)
MAILGUN_TCP6 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a2121002b0000000000000000000000000000000100000000"
    "000000000000000000000001cf8f0401030004fd16ee60"
)

IMPLEMENTATIONS = [pytest.param(crc32c_python, id="python"), pytest.param(crc32c, id="default")]
if crc32c_native is not None:
    IMPLEMENTATIONS.append(pytest.param(crc32c_native, id="native"))


# --- the function -------------------------------------------------------------------------


@pytest.mark.parametrize("fn", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"123456789", 0xE3069283),
        (b"", 0),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),  # RFC 3720 B.4 incrementing bytes
    ],
)
def test_crc32c_known_vectors(fn: object, data: bytes, expected: int) -> None:
    """Standard CRC-32C check values (RFC 3720 appendix B.4 and the catalogue check value)."""
    assert callable(fn)
    assert fn(data) == expected


@pytest.mark.parametrize("fn", IMPLEMENTATIONS)
def test_crc32c_value_chaining(fn: object) -> None:
    """``value`` continues a running CRC: crc(a + b) == crc(b, crc(a))."""
    assert callable(fn)
    data = bytes(random.Random(7).getrandbits(8) for _ in range(1000))
    for cut in (0, 1, 9, 500, 999, 1000):
        assert fn(data[cut:], fn(data[:cut])) == fn(data)
    assert fn(b"56789", fn(b"1234")) == 0xE3069283


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_checksummed_header_parses_from_bytes_like(kind: type) -> None:
    """``parse`` takes any bytes-like object, also when it has a CRC to verify."""
    for header in (AWS_NLB, MAILGUN_TCP6):
        h = proxyproto.parse(kind(header))
        assert h is not None and h == proxyproto.parse(header)
        bad = bytearray(header)
        bad[20] ^= 1
        with pytest.raises(ChecksumError):
            proxyproto.parse(kind(bad))


@pytest.mark.skipif(crc32c_native is None, reason="google_crc32c (extra 'fast') is not installed")
@given(st.binary(max_size=2048), st.integers(0, 2**32 - 1))
def test_crc32c_native_matches_python(data: bytes, value: int) -> None:
    """The C implementation and the table fallback give identical results."""
    assert crc32c_native is not None
    assert crc32c_native(data, value) == crc32c_python(data, value)
    assert crc32c_native(data) == crc32c_python(data)


# --- public vectors, SPEC-NOTES section 4 -------------------------------------------------


def test_aws_nlb_vector_verifies_CRC_R3() -> None:
    """AWS NLB real header (100 bytes): CRC e8d6892d, VPCE id, NOOP padding to len 84."""
    assert len(AWS_NLB) == 100
    h = proxyproto.parse(AWS_NLB + b"GET / HTTP/1.1\r\n")
    assert h is not None
    assert h.length == 100
    assert h.source == ("172.31.7.113", 51442)
    assert h.destination == ("172.31.10.31", 80)
    assert h.crc32c == 0xE8D6892D
    assert h.aws_vpce_id == "vpce-08d2bf15fac5001c9"
    assert [t.type for t in h.tlvs] == [0x03, 0xEA, 0x04]
    assert h.tlvs[2] == TLV(4, bytes(36))
    assert h.to_bytes() == AWS_NLB


def test_mailgun_tcp6_vector_verifies_CRC_R3() -> None:
    """TCP6 ::1:53135 -> ::1:1025 with a CRC TLV (59 bytes, CRC fd16ee60)."""
    assert len(MAILGUN_TCP6) == 59
    h = proxyproto.parse(MAILGUN_TCP6)
    assert h is not None
    assert h.source == ("::1", 53135)
    assert h.destination == ("::1", 1025)
    assert h.crc32c == 0xFD16EE60


def _tlv_value_ranges(header: bytes, start: int) -> list[tuple[int, int]]:
    """(start, end) of every top-level TLV value, by an independent walk from ``start``."""
    out = []
    pos = start
    while pos < len(header):
        length = int.from_bytes(header[pos + 1 : pos + 3], "big")
        out.append((pos + 3, pos + 3 + length))
        pos += 3 + length
    return out


def _capture(name: str) -> tuple[bytes, int]:
    """Header bytes of a capture and its address block length, from its JSON."""
    meta = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))["expected"]
    return bytes.fromhex(meta["header_hex"]), meta["address_block_length"]


def _crc_captures() -> list[str]:
    """Every capture whose JSON says it carries a CRC32C TLV."""
    names = []
    for path in sorted(VECTORS.glob("*.json")):
        if "crc32c" in json.loads(path.read_text(encoding="utf-8"))["expected"]:
            names.append(path.stem)
    return names


CRC_HEADERS = [
    pytest.param(AWS_NLB, 12, True, id="aws_nlb"),
    pytest.param(MAILGUN_TCP6, 36, True, id="mailgun_tcp6"),
    *[pytest.param(*_capture(n), False, id=n) for n in _crc_captures()],
]


def test_crc_captures_found() -> None:
    """The real captures with a CRC are found (haproxy's all-options captures)."""
    assert {"haproxy_v2_tls_full", "haproxy_v2_alloptions_plain"} <= set(_crc_captures())


@pytest.mark.parametrize(("header", "block", "plain_values"), CRC_HEADERS)
def test_every_flipped_bit_is_checksum_error_CRC_R4(header: bytes, block: int, plain_values: bool) -> None:
    """Any single bit flipped in the address block or in any TLV value gives ChecksumError.

    With ``verify_checksum=False`` the flipped header is accepted whenever it is
    otherwise valid: always for address bits and for the values of the public
    vectors (CRC, AWS, NOOP); for the captures' standard TLVs (SSL, AUTHORITY) a
    flip may break their contents, which is then an InvalidHeader, never a ChecksumError.
    """
    assert proxyproto.parse(header) is not None
    regions = [(16, 16 + block), *_tlv_value_ranges(header, 16 + block)]
    crc_start = header.index(b"\x03\x00\x04", 16 + block) + 3
    checked = 0
    for start, end in regions:
        always_valid = plain_values or start in (16, crc_start)
        for pos in range(start, end):
            for bit in range(8):
                bad = bytearray(header)
                bad[pos] ^= 1 << bit
                data = bytes(bad)
                with pytest.raises(ChecksumError, match=r"(?i)checksum|CRC"):
                    proxyproto.parse(data)
                try:
                    h = proxyproto.parse(data, verify_checksum=False)
                except ChecksumError:  # pragma: no cover - reported by the assert below
                    pytest.fail(f"ChecksumError despite verify_checksum=False at byte {pos} bit {bit}")
                except InvalidHeader:
                    assert not always_valid, f"flip at byte {pos} bit {bit} refused without verification"
                    continue
                assert h is not None and h.length == len(header)
                assert h.to_bytes() == data
                checked += 1
    assert checked > 0


def test_checksum_tlv_not_first_and_tlvs_unsorted_CRC_R2() -> None:
    """The CRC is checked over the bytes as received: TLV order is never changed."""
    body = (
        bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 0, 10])
        + b"\x20\x00\x05" + bytes(5)
        + b"\x04\x00\x02zz"
        + b"\x03\x00\x04" + bytes(4)
        + b"\x01\x00\x02h2"
    )
    header = bytearray(SIG + b"\x21\x11" + len(body).to_bytes(2, "big") + body)
    crc_at = header.index(b"\x03\x00\x04") + 3
    header[crc_at : crc_at + 4] = crc32c(bytes(header)).to_bytes(4, "big")
    h = proxyproto.parse(bytes(header))
    assert h is not None
    assert [t.type for t in h.tlvs] == [0x20, 0x04, 0x03, 0x01]


def test_saved_value_is_reported_CRC_R1() -> None:
    """The received value is what ``.crc32c`` gives, even when verification is off and it is wrong."""
    bad = bytearray(MAILGUN_TCP6)
    bad[-1] ^= 0xFF
    h = proxyproto.parse(bytes(bad), verify_checksum=False)
    assert h is not None
    assert h.crc32c == 0xFD16EE60 ^ 0xFF


def test_crc_covers_header_only_CRC_R3() -> None:
    """The CRC covers exactly 16 + len bytes: the payload after it does not matter."""
    for payload in (b"", b"x", b"\x03\x00\x04\x00\x00\x00\x00", bytes(1000)):
        h = proxyproto.parse(MAILGUN_TCP6 + payload)
        assert h is not None and h.length == 59


def test_wrong_crc_is_checksum_error_CRC_R4() -> None:
    """A mismatch is ChecksumError (an InvalidHeader), and its message says so."""
    bad = bytearray(AWS_NLB)
    bad[31] ^= 0x80  # inside the stored CRC value (its TLV starts at 28)
    with pytest.raises(ChecksumError, match=r"(?i)checksum|CRC") as info:
        proxyproto.parse(bytes(bad))
    assert isinstance(info.value, InvalidHeader)
    h = proxyproto.parse(bytes(bad), verify_checksum=False)
    assert h is not None and h.aws_vpce_id == "vpce-08d2bf15fac5001c9"


def _zeroed(header: bytes) -> tuple[bytes, int]:
    """Header with its CRC field zeroed, and the stored value (independent TLV walk)."""
    fam = header[13] >> 4
    block = {0: 0, 1: 12, 2: 36, 3: 216}[fam] if header[12] == 0x21 else 0
    for start, end in _tlv_value_ranges(header, 16 + block):
        if header[start - 3] == 0x03:
            stored = int.from_bytes(header[start:end], "big")
            return header[:start] + bytes(4) + header[end:], stored
    raise AssertionError("no CRC32C TLV")


@pytest.mark.parametrize(
    ("source", "destination", "tlvs"),
    [
        (("192.0.2.1", 1), ("198.51.100.2", 2), ()),
        (("2001:db8::1", 1), ("2001:db8::2", 2), (TLV(1, b"h2"), TLV(4, bytes(7)))),
        ("/tmp/a.sock", "/tmp/b.sock", (TLV(0xE0, bytes(8)),)),
        (None, None, (TLV(5, b"id"),)),
    ],
)
def test_sender_fills_crc_over_whole_header_CRC_S1_S2_S3(
    source: object, destination: object, tlvs: tuple[TLV, ...]
) -> None:
    """encode_v2(checksum=True): the field, zeroed, gives the stored CRC over all 16 + len bytes."""
    header = proxyproto.encode_v2(source, destination, tlvs=tlvs, checksum=True)  # type: ignore[arg-type]
    assert int.from_bytes(header[14:16], "big") + 16 == len(header)
    zeroed, stored = _zeroed(header)
    assert crc32c(zeroed) == stored
    h = proxyproto.parse(header)
    assert h is not None and h.crc32c == stored


def test_sender_checksum_on_local_header_CRC_S2() -> None:
    """A LOCAL header may carry TLVs and a CRC (haproxy checks with options do)."""
    header = proxyproto.encode_v2(command=proxyproto.Command.LOCAL, tlvs=(TLV(5, b""),), checksum=True)
    assert header[12:14] == b"\x20\x00"
    zeroed, stored = _zeroed(header)
    assert crc32c(zeroed) == stored
    assert proxyproto.parse(header) is not None
