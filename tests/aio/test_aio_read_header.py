"""``proxyproto.aio.read_header``: the blocking ``read_header``'s outcomes, on a StreamReader.

The parity test runs the same bytes through both functions, under every policy, and demands
the same answer: the same header or the same exception class, and the same bytes left for the
application (T3).  The other tests pin down what only asyncio can get wrong.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest
from aio_kit import DEST_V4, DEST_V6, REAL_V4, REAL_V6, async_test, send_slowly, stream_pair

import proxyproto
from proxyproto import Policy, aio

V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)
V2_6 = proxyproto.encode_v2(REAL_V6, DEST_V6)
V1 = b"PROXY TCP4 192.0.2.10 198.51.100.20 51234 443\r\n"
LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
CRC_BAD = bytearray(proxyproto.encode_v2(REAL_V4, DEST_V4, checksum=True))
CRC_BAD[17] ^= 0x04
PAYLOAD = b"GET / HTTP/1.0\r\n\r\n"
TIMEOUT = 0.25

# name -> (bytes sent, whether the sender then closes its side)
CASES: dict[str, tuple[bytes, bool]] = {
    "v2 header + payload": (V2 + PAYLOAD, True),
    "v2 IPv6 header + payload": (V2_6 + PAYLOAD, True),
    "v1 header + payload": (V1 + PAYLOAD, True),
    "LOCAL + payload": (LOCAL + PAYLOAD, True),
    "no header": (PAYLOAD, True),
    "no header, starts like one": (b"PRINT me\n", True),
    "malformed v1": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n" + PAYLOAD, True),
    "v2 version nibble 1": (V2[:12] + b"\x11" + V2[13:] + PAYLOAD, True),
    "checksum mismatch": (bytes(CRC_BAD) + PAYLOAD, True),
    "EOF before any byte": (b"", True),
    "silent": (b"", False),
    "partial v2, then silence": (V2[:20], False),
    "partial v2, then EOF": (V2[:20], True),
    "ambiguous prefix, then silence": (b"PR", False),
}


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(server side, client side) of a real loopback TCP connection, as the async side uses."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def blocking_outcome(data: bytes, close: bool, policy: Policy) -> tuple[Any, bytes]:
    a, b = tcp_pair()
    with a, b:
        b.sendall(data)
        if close:
            b.shutdown(socket.SHUT_WR)
        try:
            result: Any = proxyproto.read_header(a, timeout=TIMEOUT, policy=policy)
        except proxyproto.ProxyProtocolError as exc:
            return type(exc).__name__, b""
        b.shutdown(socket.SHUT_WR) if not close else None
        rest = b""
        while chunk := a.recv(65536):
            rest += chunk
        return result, rest


async def async_outcome(data: bytes, close: bool, policy: Policy) -> tuple[Any, bytes]:
    async with stream_pair() as (reader, peer):
        peer.sendall(data)
        if close:
            peer.shutdown(socket.SHUT_WR)
        try:
            result: Any = await aio.read_header(reader, timeout=TIMEOUT, policy=policy)
        except proxyproto.ProxyProtocolError as exc:
            return type(exc).__name__, b""
        if not close:
            peer.shutdown(socket.SHUT_WR)
        return result, await reader.read()


def parity_params() -> list[Any]:
    params = []
    for case in CASES:
        for policy in Policy:
            params.append(pytest.param(case, policy, id=f"{case}-{policy.name}"))
    return params


@pytest.mark.parametrize(("case", "policy"), parity_params())
def test_aio_read_header_agrees_with_blocking_read_header_cell_for_cell(case: str, policy: Policy) -> None:
    data, close = CASES[case]

    async def both() -> tuple[Any, Any]:
        # Side by side (each on its own connection): the silent cells wait out TIMEOUT once, not twice.
        blocking = asyncio.to_thread(blocking_outcome, data, close, policy)
        expected, got = await asyncio.gather(blocking, async_outcome(data, close, policy))
        return expected, got

    expected, got = asyncio.run(asyncio.wait_for(both(), 10))
    assert got == expected


@async_test
async def test_aio_read_header_leaves_payload_in_the_reader_T3() -> None:
    async with stream_pair() as (reader, peer):
        peer.sendall(V2 + PAYLOAD)
        header = await aio.read_header(reader)
        assert header is not None and header.source == REAL_V4 and header.length == len(V2)
        assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD


@async_test
async def test_aio_read_header_byte_by_byte_T1() -> None:
    async with stream_pair() as (reader, peer):
        task = asyncio.ensure_future(aio.read_header(reader, timeout=5))
        await send_slowly(peer, V1, 0.002)
        peer.sendall(b"after")
        header = await task
        assert header is not None and header.version == 1 and header.source == REAL_V4
        assert await reader.readexactly(5) == b"after"


@async_test
async def test_aio_read_header_under_use_keeps_every_byte_of_a_stream_without_header() -> None:
    async with stream_pair() as (reader, peer):
        task = asyncio.ensure_future(aio.read_header(reader, timeout=5, policy=Policy.USE))
        await send_slowly(peer, b"PRI", 0.01)  # ambiguous "PR", then proof it is no header
        assert await task is None
        peer.sendall(b" * HTTP/2.0\r\n")
        assert await reader.readexactly(16) == b"PRI * HTTP/2.0\r\n"


@async_test
async def test_aio_read_header_timeout_is_for_the_whole_header_not_per_read() -> None:
    async with stream_pair() as (reader, peer):
        loop = asyncio.get_running_loop()
        start = loop.time()
        trickle = asyncio.ensure_future(send_slowly(peer, V2, 0.05))  # 28 bytes over 1.4 s
        with pytest.raises(proxyproto.HeaderTimeout):
            await aio.read_header(reader, timeout=0.4)
        elapsed = loop.time() - start
        trickle.cancel()
        assert 0.35 <= elapsed < 1.2


@async_test
async def test_aio_read_header_max_size_and_checksum_options() -> None:
    big = proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=[(0x04, bytes(3000))])
    async with stream_pair() as (reader, peer):
        peer.sendall(big)
        with pytest.raises(proxyproto.InvalidHeader):
            await aio.read_header(reader, max_size=1024)
    async with stream_pair() as (reader, peer):
        peer.sendall(big + b"x")
        header = await aio.read_header(reader, max_size=4096)
        assert header is not None and await reader.readexactly(1) == b"x"
    async with stream_pair() as (reader, peer):
        peer.sendall(bytes(CRC_BAD))
        with pytest.raises(proxyproto.ChecksumError):
            await aio.read_header(reader)
    async with stream_pair() as (reader, peer):
        peer.sendall(bytes(CRC_BAD))
        assert await aio.read_header(reader, verify_checksum=False) is not None


@async_test
async def test_aio_read_header_largest_v2_header_fits_the_reader_buffer() -> None:
    body = struct.pack(">BH", 0x04, 65535 - 12 - 3) + bytes(65535 - 12 - 3)
    huge = proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=[(0x04, body[3:])])
    assert len(huge) == 16 + 65535
    async with stream_pair() as (reader, peer):
        sender = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(peer, huge + b"tail"))
        header = await aio.read_header(reader, max_size=None)
        await sender
        assert header is not None and header.length == len(huge)
        assert await reader.readexactly(4) == b"tail"


@async_test
async def test_aio_read_header_reset_mid_header_raises_oserror() -> None:
    async with stream_pair() as (reader, peer):
        peer.sendall(V2[:10])
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # RST
        with pytest.raises(OSError):
            await aio.read_header(reader, timeout=5)


@async_test
async def test_aio_read_header_skip_never_reads() -> None:
    async with stream_pair() as (reader, peer):
        peer.sendall(V2)
        assert await aio.read_header(reader, policy="SKIP") is None
        assert await reader.readexactly(len(V2)) == V2


def test_stream_reader_private_members_read_header_relies_on_exist() -> None:
    """Peeking needs StreamReader._buffer, ._eof and ._wait_for_data; fail loudly if Python drops them."""

    async def probe() -> None:
        reader = asyncio.StreamReader()
        assert isinstance(reader._buffer, bytearray)
        assert reader._eof is False
        assert asyncio.iscoroutinefunction(reader._wait_for_data)

    asyncio.run(probe())


def test_blocking_read_header_sees_eof_after_partial_header_on_unix_socket_T2() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(V2[:20])
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(proxyproto.InvalidHeader):
            proxyproto.read_header(a, timeout=1.0, policy=Policy.USE)


@pytest.mark.parametrize("policy", [Policy.REQUIRE, Policy.USE, Policy.IGNORE, Policy.REJECT], ids=lambda p: p.name)
@async_test
async def test_aio_read_header_partial_header_by_the_deadline_is_header_timeout(policy: Policy) -> None:
    """DESIGN's table: "part of a header by the deadline" closes, and read_header raises HeaderTimeout."""
    async with stream_pair() as (reader, peer):
        peer.sendall(V2[:20])
        with pytest.raises(proxyproto.HeaderTimeout):
            await aio.read_header(reader, timeout=TIMEOUT, policy=policy)
