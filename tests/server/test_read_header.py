"""proxyproto.read_header and proxyproto.create_connection on plain sockets.

read_header is the blocking exact-read helper for code that owns a socket: it consumes exactly
the header (T3), applies one deadline to the whole header (T2), restores the socket's timeout,
and maps each cell of the policy table to a return value or an exception.  Every test runs on
both an AF_UNIX socketpair and a real loopback TCP pair.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from server_kit import (
    DEST_V4,
    DEST_V6,
    REAL_V4,
    REAL_V6,
    V1_UNKNOWN,
    V2_SIGNATURE,
    tlv,
    v1_header,
    v2_header,
)

import proxyproto
from proxyproto import (
    ChecksumError,
    HeaderRejected,
    HeaderTimeout,
    InvalidHeader,
    NoProxyHeader,
    Policy,
    ProxyProtocolError,
)

PAYLOAD = b"after the header\r\n\x00PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n"


@pytest.fixture(params=["socketpair", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple]:
    """(sender, receiver): connected stream sockets."""
    if request.param == "socketpair":
        a, b = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def recv_exactly(sock: socket.socket, n: int, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def send_later(sock: socket.socket, chunks: list, delay: float) -> threading.Thread:
    """Send ``chunks`` from another thread, ``delay`` seconds apart (first one after ``delay``)."""

    def run() -> None:
        for chunk in chunks:
            time.sleep(delay)
            try:
                sock.sendall(chunk)
            except OSError:
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


HEADERS = {
    "v1_tcp4": v1_header(REAL_V4, DEST_V4),
    "v1_tcp6": v1_header(REAL_V6, DEST_V6),
    "v1_unknown": V1_UNKNOWN,
    "v2_tcp4": v2_header(REAL_V4, DEST_V4),
    "v2_tcp6_crc": v2_header(REAL_V6, DEST_V6, crc="good"),
    "v2_local": v2_header(local=True),
    "v2_unix": v2_header("/run/a.sock", "/run/b.sock"),
    "v2_noop_tlv": v2_header(REAL_V4, DEST_V4, tlvs=tlv(0x04, b"\0" * 40)),
}


@pytest.mark.parametrize("kind", sorted(HEADERS))
def test_read_header_consumes_exactly_the_header_T3(pair: tuple, kind: str) -> None:
    a, b = pair
    a.sendall(HEADERS[kind] + PAYLOAD)
    header = proxyproto.read_header(b, timeout=2.0)
    assert header is not None
    assert header.length == len(HEADERS[kind])
    assert header.to_bytes() == HEADERS[kind]
    assert recv_exactly(b, len(PAYLOAD)) == PAYLOAD


def test_read_header_returns_the_addresses(pair: tuple) -> None:
    a, b = pair
    a.sendall(HEADERS["v2_tcp4"])
    header = proxyproto.read_header(b, timeout=2.0)
    assert header is not None
    assert header.source == REAL_V4 and header.destination == DEST_V4


@pytest.mark.parametrize("kind", ["v1_tcp4", "v2_tcp6_crc"])
def test_read_header_waits_for_a_fragmented_header_T2(pair: tuple, kind: str) -> None:
    a, b = pair
    data = HEADERS[kind] + PAYLOAD
    cut = len(HEADERS[kind]) // 2
    send_later(a, [data[:cut], data[cut:cut + 3], data[cut + 3:]], 0.05)
    header = proxyproto.read_header(b, timeout=3.0)
    assert header is not None and header.length == len(HEADERS[kind])
    assert recv_exactly(b, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("before", [None, 4.5, 0.0])
def test_read_header_restores_the_sockets_timeout(pair: tuple, before: object) -> None:
    a, b = pair
    b.settimeout(before)  # type: ignore[arg-type]
    a.sendall(HEADERS["v1_tcp4"])
    proxyproto.read_header(b, timeout=2.0)
    assert b.gettimeout() == before


@pytest.mark.parametrize("before", [None, 4.5])
def test_read_header_restores_the_timeout_when_it_raises(pair: tuple, before: object) -> None:
    a, b = pair
    b.settimeout(before)  # type: ignore[arg-type]
    with pytest.raises(HeaderTimeout):
        proxyproto.read_header(b, timeout=0.2)
    assert b.gettimeout() == before
    a.sendall(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(NoProxyHeader):
        proxyproto.read_header(b, timeout=1.0)
    assert b.gettimeout() == before


def test_read_header_raises_header_timeout_on_silence_G7(pair: tuple) -> None:
    _, b = pair
    start = time.monotonic()
    cpu = time.thread_time()
    with pytest.raises(HeaderTimeout) as info:
        proxyproto.read_header(b, timeout=0.3)
    took = time.monotonic() - start
    assert 0.25 <= took < 1.5
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, ProxyProtocolError)
    assert time.thread_time() - cpu < 0.1, "waiting must not spin"


def test_read_header_deadline_is_for_the_whole_header_T2(pair: tuple) -> None:
    """One byte every 0.1 s must not extend a 0.5 s deadline (never per read)."""
    a, b = pair
    header = HEADERS["v1_tcp4"]
    send_later(a, [header[i:i + 1] for i in range(len(header))], 0.1)
    start = time.monotonic()
    with pytest.raises(HeaderTimeout):
        proxyproto.read_header(b, timeout=0.5)
    assert time.monotonic() - start < 1.2


@pytest.mark.parametrize("policy", [Policy.REQUIRE, Policy.USE, Policy.IGNORE, Policy.REJECT])
def test_partial_header_at_the_deadline_raises_T2(pair: tuple, policy: Policy) -> None:
    a, b = pair
    a.sendall(HEADERS["v1_tcp4"][:20])
    with pytest.raises((HeaderTimeout, InvalidHeader)):
        proxyproto.read_header(b, timeout=0.3, policy=policy)


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"SSH-2.0-x\r\n"],
    ids=["http", "tls", "ssh"],
)
def test_require_raises_no_proxy_header_on_a_plain_stream_section_7(
    pair: tuple, data: bytes
) -> None:
    a, b = pair
    a.sendall(data)
    with pytest.raises(NoProxyHeader):
        proxyproto.read_header(b, timeout=1.0, policy=Policy.REQUIRE)


def test_require_raises_no_proxy_header_on_eof_before_any_byte(pair: tuple) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(NoProxyHeader):
        proxyproto.read_header(b, timeout=1.0)


def test_eof_in_the_middle_of_a_header_is_invalid_T2(pair: tuple) -> None:
    a, b = pair
    a.sendall(HEADERS["v2_tcp4"][:20])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(InvalidHeader) as info:
        proxyproto.read_header(b, timeout=1.0)
    assert not isinstance(info.value, NoProxyHeader)


MALFORMED = {
    "v1_tcp5_V1_R5": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1_lone_lf_V1_R4": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "v1_no_crlf_V1_R2": b"PROXY UNKNOWN " + b"y" * 110,
    "v2_version_1_V2_R8": V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\0" * 12,
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
@pytest.mark.parametrize("policy", [Policy.REQUIRE, Policy.USE, Policy.IGNORE, Policy.REJECT])
def test_malformed_header_raises_invalid_header_V1_R5(
    pair: tuple, policy: Policy, kind: str
) -> None:
    a, b = pair
    a.sendall(MALFORMED[kind] + PAYLOAD)
    with pytest.raises(InvalidHeader) as info:
        proxyproto.read_header(b, timeout=1.0, policy=policy)
    assert not isinstance(info.value, NoProxyHeader)


def test_bad_checksum_raises_checksum_error_CRC_R4(pair: tuple) -> None:
    a, b = pair
    a.sendall(v2_header(REAL_V4, DEST_V4, crc="bad"))
    with pytest.raises(ChecksumError):
        proxyproto.read_header(b, timeout=1.0)


def test_verify_checksum_false_is_passed_to_the_parser(pair: tuple) -> None:
    a, b = pair
    a.sendall(v2_header(REAL_V4, DEST_V4, crc="bad") + PAYLOAD)
    header = proxyproto.read_header(b, timeout=1.0, verify_checksum=False)
    assert header is not None and header.source == REAL_V4
    assert recv_exactly(b, len(PAYLOAD)) == PAYLOAD


def test_max_size_is_passed_to_the_parser(pair: tuple) -> None:
    a, b = pair
    a.sendall(v2_header(REAL_V4, DEST_V4, tlvs=tlv(0x04, b"\0" * 200)))
    with pytest.raises(InvalidHeader):
        proxyproto.read_header(b, timeout=1.0, max_size=100)


def test_allow_v4_in_tcp6_is_passed_to_the_parser(pair: tuple) -> None:
    a, b = pair
    a.sendall(b"PROXY TCP6 2001:db8::1 192.0.2.1 1000 80\r\n" + PAYLOAD)
    header = proxyproto.read_header(b, timeout=1.0, allow_v4_in_tcp6=True)
    assert header is not None
    assert recv_exactly(b, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("kind", ["v1_tcp4", "v2_tcp4", "v2_local", "v1_unknown"])
def test_reject_raises_header_rejected_for_any_header(pair: tuple, kind: str) -> None:
    a, b = pair
    a.sendall(HEADERS[kind])
    with pytest.raises(HeaderRejected):
        proxyproto.read_header(b, timeout=1.0, policy=Policy.REJECT)


@pytest.mark.parametrize("policy", [Policy.USE, Policy.IGNORE, Policy.REJECT])
def test_opt_in_policies_return_none_and_consume_nothing_without_header(
    pair: tuple, policy: Policy
) -> None:
    a, b = pair
    data = b"EHLO example.org\r\n"
    a.sendall(data)
    assert proxyproto.read_header(b, timeout=1.0, policy=policy) is None
    assert recv_exactly(b, len(data)) == data


@pytest.mark.parametrize("policy", [Policy.USE, Policy.IGNORE, Policy.REJECT])
def test_opt_in_policies_wait_on_an_ambiguous_prefix_without_spinning(
    pair: tuple, policy: Policy
) -> None:
    """"PR" may start "PROXY": read_header waits for the next byte (SO_RCVLOWAT or a timer),
    it does not loop on peeks, and then gives every byte back."""
    a, b = pair
    a.sendall(b"PR")
    send_later(a, [b"IVMSG #c :hi\r\n"], 0.4)
    cpu = time.thread_time()
    assert proxyproto.read_header(b, timeout=2.0, policy=policy) is None
    assert time.thread_time() - cpu < 0.15, "waiting on a prefix must not spin"
    assert recv_exactly(b, 16) == b"PRIVMSG #c :hi\r\n"


@pytest.mark.parametrize("policy", [Policy.USE, Policy.IGNORE, Policy.REJECT])
def test_opt_in_policies_return_none_on_silence_at_the_deadline(
    pair: tuple, policy: Policy
) -> None:
    _, b = pair
    start = time.monotonic()
    assert proxyproto.read_header(b, timeout=0.3, policy=policy) is None
    assert 0.25 <= time.monotonic() - start < 1.5


@pytest.mark.parametrize("policy", [Policy.USE, Policy.IGNORE, Policy.REJECT])
def test_opt_in_policies_return_none_on_eof_before_any_byte(pair: tuple, policy: Policy) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert proxyproto.read_header(b, timeout=1.0, policy=policy) is None


def test_use_returns_the_header_when_there_is_one(pair: tuple) -> None:
    a, b = pair
    a.sendall(HEADERS["v1_tcp4"] + PAYLOAD)
    header = proxyproto.read_header(b, timeout=1.0, policy=Policy.USE)
    assert header is not None and header.source == REAL_V4
    assert recv_exactly(b, len(PAYLOAD)) == PAYLOAD


def test_ignore_consumes_a_header(pair: tuple) -> None:
    a, b = pair
    a.sendall(HEADERS["v2_tcp4"] + PAYLOAD)
    proxyproto.read_header(b, timeout=1.0, policy=Policy.IGNORE)
    assert recv_exactly(b, len(PAYLOAD)) == PAYLOAD


def test_skip_returns_none_at_once_and_reads_nothing_G9(pair: tuple) -> None:
    a, b = pair
    a.sendall(HEADERS["v1_tcp4"])
    start = time.monotonic()
    assert proxyproto.read_header(b, timeout=5.0, policy=Policy.SKIP) is None
    assert time.monotonic() - start < 0.5
    assert recv_exactly(b, len(HEADERS["v1_tcp4"])) == HEADERS["v1_tcp4"]


def test_skip_does_not_wait_for_a_silent_peer(pair: tuple) -> None:
    _, b = pair
    start = time.monotonic()
    assert proxyproto.read_header(b, timeout=5.0, policy=Policy.SKIP) is None
    assert time.monotonic() - start < 0.5


def test_connection_reset_mid_header_passes_through_as_oserror() -> None:
    """"OSError from the socket (a reset mid-header, say) passes through unchanged"."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
        with a, b:
            a.sendall(HEADERS["v2_tcp4"][:10])
            time.sleep(0.05)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            a.close()
            time.sleep(0.05)
            with pytest.raises(OSError) as info:
                proxyproto.read_header(b, timeout=1.0)
            assert not isinstance(info.value, ProxyProtocolError)


# --------------------------------------------------------------------------- create_connection


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        lst.settimeout(5)
        yield lst


@pytest.mark.parametrize(
    "version,source,destination,expected",
    [
        (1, REAL_V4, DEST_V4, v1_header(REAL_V4, DEST_V4)),
        (1, REAL_V6, DEST_V6, v1_header(REAL_V6, DEST_V6)),
        (2, REAL_V4, DEST_V4, v2_header(REAL_V4, DEST_V4)),
        (2, REAL_V6, DEST_V6, v2_header(REAL_V6, DEST_V6)),
    ],
    ids=["v1_tcp4", "v1_tcp6", "v2_tcp4", "v2_tcp6"],
)
def test_create_connection_sends_the_header_first(
    listener: socket.socket, version: int, source: tuple, destination: tuple, expected: bytes
) -> None:
    with proxyproto.create_connection(
        listener.getsockname(), source=source, destination=destination, version=version
    ) as client:
        conn, _ = listener.accept()
        with conn:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            assert recv_exactly(conn, len(expected) + 5 + 1) == expected + b"hello"


def test_create_connection_default_version_is_2(listener: socket.socket) -> None:
    with proxyproto.create_connection(
        listener.getsockname(), source=REAL_V4, destination=DEST_V4
    ) as client:
        conn, _ = listener.accept()
        with conn:
            client.shutdown(socket.SHUT_WR)
            assert recv_exactly(conn, 100) == v2_header(REAL_V4, DEST_V4)


def test_create_connection_sets_the_timeout(listener: socket.socket) -> None:
    with proxyproto.create_connection(
        listener.getsockname(), source=REAL_V4, destination=DEST_V4, timeout=3.5
    ) as client:
        assert client.gettimeout() == 3.5
        listener.accept()[0].close()


def test_create_connection_and_read_header_round_trip(listener: socket.socket) -> None:
    with proxyproto.create_connection(
        listener.getsockname(), source=REAL_V6, destination=DEST_V6, version=2,
        tlvs=[proxyproto.TLV(0x02, b"example.org")],
    ) as client:
        conn, _ = listener.accept()
        with conn:
            client.sendall(PAYLOAD)
            header = proxyproto.read_header(conn, timeout=2.0)
            assert header is not None
            assert header.source == REAL_V6 and header.destination == DEST_V6
            assert header.authority == "example.org"
            assert recv_exactly(conn, len(PAYLOAD)) == PAYLOAD
