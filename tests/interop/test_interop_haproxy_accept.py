"""Sending: headers made by proxyproto, judged by a real receiver (haproxy ``accept-proxy``).

haproxy's log line is the independent truth: ``%ci %cp`` is the source it took
from the header, ``%fi %fp`` the destination, ``fc_pp_authority`` and
``fc_pp_unique_id`` the TLVs it decoded (haproxy 2.6 has no fetch for ALPN or
arbitrary TLVs; those are proven accepted, not decoded).  The backend behind
haproxy proves the payload after the header arrived intact and alone.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from interop_support import (
    ProcessRunner,
    RecordingBackend,
    exchange,
    flip_crc_bit,
    free_port,
    haproxy_config,
    require_ipv6,
    v2_crc_is_valid,
    v2_tlv_offsets,
    wait_until,
)

import proxyproto
from proxyproto import TLV, Command, TLVType

PAYLOAD = b"hello through haproxy\n"
MARK = "PPLOG"


def start_accepting_haproxy(procs: ProcessRunner, backend: RecordingBackend) -> tuple[str, int]:
    """A haproxy frontend with ``accept-proxy`` that logs what it decoded, forwarding to ``backend``."""
    port = free_port()
    cfg = haproxy_config(
        f"""
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    log-format "{MARK} %ci %cp %fi %fp %[fc_pp_authority] %[fc_pp_unique_id,hex]"
    default_backend be

backend be
    server s1 {backend.address[0]!s}:{backend.address[1]}
"""
    )
    procs.haproxy(cfg, listen=[port])
    return "127.0.0.1", port


def logged(procs: ProcessRunner) -> list[list[str]]:
    """The decoded fields of every access-log line haproxy wrote so far."""
    return [line.split()[1:] for proc in procs.processes for line in proc.log_lines() if line.startswith(MARK)]


def send_and_read_log(
    procs: ProcessRunner,
    backend: RecordingBackend,
    header: bytes,
    source: Any = ("127.0.0.2", 0),
) -> tuple[Any, list[str]]:
    """Send ``header + PAYLOAD`` through haproxy; return our socket address and haproxy's log fields."""
    frontend = start_accepting_haproxy(procs, backend)
    own, reply = exchange(frontend, header + PAYLOAD, source=source)
    assert reply == b"ok:" + PAYLOAD, f"haproxy did not forward the payload intact: {reply!r}"
    assert [c.data for c in backend.connections] == [PAYLOAD]
    assert wait_until(lambda: len(logged(procs)) == 1, 5.0), procs.processes[0].output()
    return own, logged(procs)[0]


ADDRESS_CASES = {
    "tcp4": (("192.0.2.10", 40000), ("198.51.100.20", 443)),
    "tcp6": (("2001:db8::7", 1), ("2001:db8:0:1::ff", 65535)),
    "tcp6_loopback": (("::1", 54321), ("::1", 80)),
}


@pytest.mark.parametrize("case", sorted(ADDRESS_CASES))
def test_haproxy_logs_addresses_from_encode_v1_V1_S(procs: ProcessRunner, backend: RecordingBackend, case: str) -> None:
    """haproxy takes exactly the encoded v1 source and destination as the connection's addresses."""
    src, dst = ADDRESS_CASES[case]
    _, fields = send_and_read_log(procs, backend, proxyproto.encode_v1(src, dst))
    assert fields == [src[0], str(src[1]), dst[0], str(dst[1]), "-", "-"]


def test_haproxy_uses_real_addresses_for_encode_v1_unknown_V1(procs: ProcessRunner, backend: RecordingBackend) -> None:
    """``PROXY UNKNOWN`` makes haproxy keep the socket's own addresses (our 127.0.0.2 source)."""
    header = proxyproto.encode_v1(None, None)
    assert header == b"PROXY UNKNOWN\r\n"
    own, fields = send_and_read_log(procs, backend, header)
    assert fields[:2] == [own[0], str(own[1])]
    assert fields[2] == "127.0.0.1"


@pytest.mark.parametrize("case", sorted(ADDRESS_CASES))
def test_haproxy_logs_addresses_from_encode_v2_V2_S(procs: ProcessRunner, backend: RecordingBackend, case: str) -> None:
    """haproxy takes exactly the encoded v2 source and destination as the connection's addresses."""
    src, dst = ADDRESS_CASES[case]
    _, fields = send_and_read_log(procs, backend, proxyproto.encode_v2(src, dst))
    assert fields == [src[0], str(src[1]), dst[0], str(dst[1]), "-", "-"]


def test_haproxy_logs_mixed_families_as_mapped_ipv6_from_encode_v2(
    procs: ProcessRunner, backend: RecordingBackend
) -> None:
    """A mixed IPv4/IPv6 pair is encoded as INET6 with the IPv4 side mapped; haproxy agrees."""
    header = proxyproto.encode_v2(("192.0.2.10", 1234), ("2001:db8::1", 443))
    assert header[13] == 0x21, "mixed families must be sent as TCP over IPv6"
    _, fields = send_and_read_log(procs, backend, header)
    assert fields[:4] == ["::ffff:192.0.2.10", "1234", "2001:db8::1", "443"]


def test_haproxy_uses_real_addresses_for_encode_v2_local_V2_R1(procs: ProcessRunner, backend: RecordingBackend) -> None:
    """A LOCAL header (no addresses) makes haproxy keep the connection's real endpoints."""
    header = proxyproto.encode_v2(command=Command.LOCAL)
    assert header[12] == 0x20 and header[13] == 0x00
    own, fields = send_and_read_log(procs, backend, header)
    assert fields[:2] == [own[0], str(own[1])]


def test_haproxy_accepts_encode_v2_ipv6_over_ipv6_socket(procs: ProcessRunner, backend: RecordingBackend) -> None:
    """Sent over an IPv6 connection as well: the header, not the socket, decides the addresses."""
    require_ipv6()
    port = free_port()
    cfg = haproxy_config(
        f"""
frontend fe
    bind [::1]:{port} accept-proxy
    log-format "{MARK} %ci %cp %fi %fp %[fc_pp_authority] %[fc_pp_unique_id,hex]"
    default_backend be

backend be
    server s1 {backend.address[0]!s}:{backend.address[1]}
"""
    )
    procs.haproxy(cfg, listen=[port])
    header = proxyproto.encode_v2(("192.0.2.33", 3333), ("192.0.2.44", 4444))
    _, reply = exchange(("::1", port), header + PAYLOAD)
    assert reply == b"ok:" + PAYLOAD
    assert wait_until(lambda: len(logged(procs)) == 1, 5.0)
    assert logged(procs)[0][:4] == ["192.0.2.33", "3333", "192.0.2.44", "4444"]


TLVS = (
    TLV(TLVType.ALPN, b"h2"),
    TLV(TLVType.AUTHORITY, b"api.example.test"),
    TLV(TLVType.UNIQUE_ID, b"req-0123456789abcdef"),
    TLV(TLVType.NOOP, b"\x00" * 5),
)


@pytest.mark.parametrize("checksum", [False, True], ids=["no_crc", "crc32c"])
def test_haproxy_decodes_tlvs_from_encode_v2_V2_TLV(
    procs: ProcessRunner, backend: RecordingBackend, checksum: bool
) -> None:
    """AUTHORITY and UNIQUE_ID come out of haproxy as encoded; ALPN and NOOP are accepted."""
    src, dst = ("192.0.2.1", 50000), ("192.0.2.2", 8443)
    header = proxyproto.encode_v2(src, dst, tlvs=TLVS, checksum=checksum)
    types = [t for t, _off, _len in v2_tlv_offsets(header)]
    assert set(types) == {0x01, 0x02, 0x05, 0x04} | ({0x03} if checksum else set())
    if checksum:
        assert v2_crc_is_valid(header), "encode_v2(checksum=True) stored a wrong CRC32C (CRC-S2)"
    _, fields = send_and_read_log(procs, backend, header)
    assert fields == [
        src[0],
        str(src[1]),
        dst[0],
        str(dst[1]),
        "api.example.test",
        b"req-0123456789abcdef".hex().upper(),
    ]


@pytest.mark.parametrize("family", ["tcp4", "tcp6"])
def test_haproxy_accepts_correct_crc32c_from_encode_v2_CRC_S2(
    procs: ProcessRunner, backend: RecordingBackend, family: str
) -> None:
    """haproxy verifies CRC32C (CRC-R1..R4): a header from ``checksum=True`` passes."""
    src, dst = ADDRESS_CASES[family]
    header = proxyproto.encode_v2(src, dst, checksum=True)
    assert v2_crc_is_valid(header)
    _, fields = send_and_read_log(procs, backend, header)
    assert fields[:4] == [src[0], str(src[1]), dst[0], str(dst[1])]


@pytest.mark.parametrize("with_tlvs", [False, True], ids=["crc_only", "crc_and_tlvs"])
def test_haproxy_refuses_flipped_crc32c_bit_CRC_R4(
    procs: ProcessRunner, backend: RecordingBackend, with_tlvs: bool
) -> None:
    """One flipped bit in the CRC32C value: haproxy aborts the connection and forwards nothing."""
    header = proxyproto.encode_v2(
        ("192.0.2.50", 5050),
        ("192.0.2.60", 6060),
        tlvs=TLVS if with_tlvs else (),
        checksum=True,
    )
    bad = flip_crc_bit(header)
    assert not v2_crc_is_valid(bad)
    frontend = start_accepting_haproxy(procs, backend)
    _, reply = exchange(frontend, bad + PAYLOAD, source=("127.0.0.2", 0))
    assert reply == b"", f"haproxy answered a header with a wrong CRC: {reply!r}"
    line = procs.processes[0].wait_for_log(lambda s: "PROXY protocol" in s)
    assert "invalid PROXY protocol header" in line
    # Give a (wrongly) forwarded connection ample time to show up at the backend.
    assert not wait_until(lambda: bool(backend.connections), 0.5)
    assert logged(procs) == []


@pytest.mark.parametrize("version", [1, 2])
def test_haproxy_accepts_create_connection(procs: ProcessRunner, backend: RecordingBackend, version: int) -> None:
    """``create_connection`` sends the header first, then the caller's bytes, on one socket."""
    frontend = start_accepting_haproxy(procs, backend)
    src, dst = ("203.0.113.5", 61000), ("203.0.113.6", 25)
    tlvs = (TLV(TLVType.AUTHORITY, b"mail.example.test"),) if version == 2 else ()
    sock = proxyproto.create_connection(frontend, source=src, destination=dst, version=version, tlvs=tlvs, timeout=5.0)
    assert isinstance(sock, socket.socket)
    _, reply = exchange(frontend, PAYLOAD, sock=sock)
    assert reply == b"ok:" + PAYLOAD
    assert [c.data for c in backend.connections] == [PAYLOAD]
    assert wait_until(lambda: len(logged(procs)) == 1, 5.0)
    authority = "mail.example.test" if version == 2 else "-"
    assert logged(procs)[0] == [
        src[0],
        str(src[1]),
        dst[0],
        str(dst[1]),
        authority,
        "-",
    ]


def test_haproxy_accepts_create_connection_ipv6(procs: ProcessRunner, backend: RecordingBackend) -> None:
    """``create_connection`` with IPv6 addresses in a v2 header."""
    frontend = start_accepting_haproxy(procs, backend)
    src, dst = ("2001:db8::10", 1010), ("2001:db8::20", 2020)
    sock = proxyproto.create_connection(frontend, source=src, destination=dst, timeout=5.0)
    _, reply = exchange(frontend, PAYLOAD, sock=sock)
    assert reply == b"ok:" + PAYLOAD
    assert wait_until(lambda: len(logged(procs)) == 1, 5.0)
    assert logged(procs)[0][:4] == [src[0], str(src[1]), dst[0], str(dst[1])]
