"""Every real capture in ``tests/vectors/`` decodes to exactly what its ``.json`` says.

The captures are what haproxy, nginx and curl really wrote on loopback; the
``expected`` block of each JSON file was checked independently of the bytes
(client sockets, haproxy logs).  The test is parametrised over the files found
by glob, so a new capture dropped into the folder is tested without editing
this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import proxyproto
from proxyproto import Command, Family, Protocol, SSLClient
from proxyproto.crc32c import crc32c

VECTORS = Path(__file__).parent / "vectors"
BINS = sorted(VECTORS.glob("*.bin"))

FAMILIES = {
    "AF_UNSPEC": Family.UNSPEC,
    "AF_INET": Family.INET,
    "AF_INET6": Family.INET6,
    "AF_UNIX": Family.UNIX,
}
CLIENT_FLAGS = {
    "PP2_CLIENT_SSL": SSLClient.SSL,
    "PP2_CLIENT_CERT_CONN": SSLClient.CERT_CONN,
    "PP2_CLIENT_CERT_SESS": SSLClient.CERT_SESS,
}
# SSL sub-TLV type -> SSLInfo attribute (SPEC-NOTES section 3, TLV registry).
SSL_SUB_ATTRS = {
    0x21: "version",
    0x22: "cn",
    0x23: "cipher",
    0x24: "sig_alg",
    0x25: "key_alg",
    0x26: "group",
    0x27: "sig_scheme",
    0x28: "client_cert",
}
# Top-level TLV type -> ProxyHeader view and how the value decodes.
TLV_VIEWS = {
    0x01: ("alpn", lambda v: v),
    0x02: ("authority", lambda v: v.decode("utf-8")),
    0x03: ("crc32c", lambda v: int.from_bytes(v, "big")),
    0x05: ("unique_id", lambda v: v),
    0x30: ("netns", lambda v: v.decode("ascii")),
}


def _load(path: Path) -> tuple[bytes, dict[str, Any]]:
    """Return the capture bytes and the ``expected`` block of its JSON twin."""
    data = path.read_bytes()
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return data, meta["expected"]


def _walk(block: bytes) -> list[tuple[int, int, bytes]]:
    """Independent TLV walk: (offset in block, type, value), for cross-checking."""
    out = []
    pos = 0
    while pos < len(block):
        length = int.from_bytes(block[pos + 1 : pos + 3], "big")
        out.append((pos, block[pos], block[pos + 3 : pos + 3 + length]))
        pos += 3 + length
    assert pos == len(block), "test helper: TLVs do not tile the block"
    return out


def test_vector_folder_is_complete() -> None:
    """Every capture has its JSON twin, and the captures named in the README are all here."""
    names = {p.stem for p in BINS}
    assert names >= {
        "curl_v1_tcp4",
        "haproxy_v1_tcp4",
        "haproxy_v1_tcp6",
        "haproxy_v1_unix",
        "nginx_v1_tcp6",
        "haproxy_v2_tcp4",
        "haproxy_v2_tcp6",
        "haproxy_v2_check_local",
        "haproxy_v2_tls_full",
        "haproxy_v2_tls_alpn_only",
        "haproxy_v2_alloptions_plain",
    }
    for p in BINS:
        assert p.with_suffix(".json").exists(), p


@pytest.mark.parametrize("path", BINS, ids=[p.stem for p in BINS])
def test_vector_decodes_as_expected(path: Path) -> None:
    """Version, command, family, protocol, addresses, ports and length match the capture notes."""
    data, exp = _load(path)
    h = proxyproto.parse(data)
    assert isinstance(h, proxyproto.ProxyHeader)
    assert h.version == exp["version"]
    assert h.command == Command[exp["command"]]
    assert h.family == FAMILIES[exp["family"]]
    assert h.protocol == Protocol[exp["protocol"]]
    assert h.length == exp["header_length"]
    if exp["src_addr"] is None:
        assert h.source is None
        assert h.destination is None
    elif exp["family"] == "AF_UNIX":
        assert h.source == exp["src_addr"]
        assert h.destination == exp["dst_addr"]
    else:
        assert h.source == (exp["src_addr"], exp["src_port"])
        assert h.destination == (exp["dst_addr"], exp["dst_port"])
    if "v1_line" in exp:
        assert data[: h.length] == exp["v1_line"].encode("ascii")
    if "ver_cmd_hex" in exp:
        assert data[12] == int(exp["ver_cmd_hex"], 16)
        assert data[13] == int(exp["fam_hex"], 16)
        assert int.from_bytes(data[14:16], "big") == exp["v2_length_field"]


@pytest.mark.parametrize("path", BINS, ids=[p.stem for p in BINS])
def test_vector_payload_and_round_trip(path: Path) -> None:
    """The payload is ``bin[h.length:]`` and ``to_bytes()`` gives back the header bytes."""
    data, exp = _load(path)
    h = proxyproto.parse(data)
    assert h is not None
    header = bytes.fromhex(exp["header_hex"])
    assert data[: h.length] == header
    assert data[h.length :] == bytes.fromhex(exp["payload_hex"])
    assert len(data) - h.length == exp["payload_length"]
    assert h.to_bytes() == header
    # The header alone (payload not yet arrived) parses to the same header.
    alone = proxyproto.parse(header)
    assert alone == h
    assert alone is not None and alone.length == h.length


@pytest.mark.parametrize("path", BINS, ids=[p.stem for p in BINS])
def test_vector_tlvs_in_wire_order(path: Path) -> None:
    """Every TLV: type, offset, value, in wire order (never re-sorted), with its typed view."""
    data, exp = _load(path)
    h = proxyproto.parse(data)
    assert h is not None
    header = data[: h.length]
    assert len(h.tlvs) == len(exp["tlvs"])
    for got, want in zip(h.tlvs, exp["tlvs"]):
        value = bytes.fromhex(want["value_hex"])
        assert isinstance(got, proxyproto.TLV)
        assert got.type == want["type"]
        assert got.value == value
        assert len(value) == want["length"]
        if "offset" in want:
            off = want["offset"]
            assert header[off] == want["type"]
            assert int.from_bytes(header[off + 1 : off + 3], "big") == want["length"]
            assert header[off + 3 : off + 3 + want["length"]] == value
    for type_hex, values in exp.get("tlvs_by_type", {}).items():
        assert h.tlv(int(type_hex, 16)) == bytes.fromhex(values[0])
    present = {t["type"] for t in exp["tlvs"]}
    for tlv_type, (attr, decode) in TLV_VIEWS.items():
        if tlv_type in present:
            first = next(t for t in exp["tlvs"] if t["type"] == tlv_type)
            assert getattr(h, attr) == decode(bytes.fromhex(first["value_hex"]))
        else:
            assert getattr(h, attr) is None
    if 0x20 not in present:
        assert h.ssl is None


@pytest.mark.parametrize("path", BINS, ids=[p.stem for p in BINS])
def test_vector_ssl_fields(path: Path) -> None:
    """SSL client flags, verify and every sub-TLV (in wire order) decode as captured."""
    data, exp = _load(path)
    ssl_tlvs = [t for t in exp["tlvs"] if "ssl" in t]
    if not ssl_tlvs:
        pytest.skip("capture carries no SSL TLV")
    h = proxyproto.parse(data)
    assert h is not None and h.ssl is not None
    want = ssl_tlvs[0]["ssl"]
    assert h.ssl.client == want["client"]
    flags = SSLClient(0)
    for name in want["client_flags"]:
        flags |= CLIENT_FLAGS[name]
    assert h.ssl.client == flags
    assert h.ssl.verify == want["verify"]
    cert = bool(flags & (SSLClient.CERT_CONN | SSLClient.CERT_SESS))
    assert h.ssl.verified == (cert and want["verify"] == 0)
    header = data[: h.length]
    value = bytes.fromhex(ssl_tlvs[0]["value_hex"])
    walked = _walk(value[5:])
    assert [(t, v.hex()) for _, t, v in walked] == [
        (s["type"], s["value_hex"]) for s in want["sub_tlvs"]
    ]
    seen = set()
    for sub in want["sub_tlvs"]:
        sub_value = bytes.fromhex(sub["value_hex"])
        off = sub["offset"]
        assert header[off] == sub["type"]
        assert header[off + 3 : off + 3 + sub["length"]] == sub_value
        attr = SSL_SUB_ATTRS[sub["type"]]
        if sub["type"] in seen:
            continue
        seen.add(sub["type"])
        expected = sub_value if attr == "client_cert" else sub_value.decode("utf-8")
        assert getattr(h.ssl, attr) == expected
    for sub_type, attr in SSL_SUB_ATTRS.items():
        if sub_type not in seen:
            assert getattr(h.ssl, attr) is None


@pytest.mark.parametrize("path", BINS, ids=[p.stem for p in BINS])
def test_vector_crc32c_verifies_CRC_R3(path: Path) -> None:
    """A capture with a CRC TLV: value as captured, recomputed over the header with the field zeroed."""
    data, exp = _load(path)
    if "crc32c" not in exp:
        pytest.skip("capture carries no CRC32C TLV")
    h = proxyproto.parse(data)
    assert h is not None
    stored = int(exp["crc32c"]["value_hex"], 16)
    assert h.crc32c == stored
    crc_tlv = next(t for t in exp["tlvs"] if t["type"] == 3)
    header = bytearray(data[: h.length])
    start = crc_tlv["offset"] + 3
    header[start : start + 4] = bytes(4)
    assert crc32c(bytes(header)) == stored


@pytest.mark.parametrize("path", BINS, ids=[p.stem for p in BINS])
def test_vector_every_strict_prefix_is_incomplete_G5_T2(path: Path) -> None:
    """Each strict prefix of a real header is a valid incomplete header: None, never an error."""
    data, exp = _load(path)
    for i in range(exp["header_length"]):
        assert proxyproto.parse(data[:i]) is None, i
