"""A peer that closes mid-header is refused as a truncated header, by every reader on the scanner (T2).

The blocking ``read_header`` and the asyncio one, on real loopback TCP
sockets: bytes consumed under REQUIRE, bytes left in the kernel under USE
(an ambiguous prefix), and nothing at all; the wording comes from the core
scanner alone.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

import proxyproto
from proxyproto import aio
from proxyproto.errors import InvalidHeader, NoProxyHeader


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _send_then_close(client: socket.socket, data: bytes) -> None:
    if data:
        client.sendall(data)
    client.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize(
    ("policy", "sent"),
    [("REQUIRE", b"PROXY TCP4 1.2"), ("REQUIRE", b"PR"), ("USE", b"PR"), ("USE", b"\r\n\r\n\x00")],
)
def test_blocking_read_header_refuses_a_header_cut_by_eof(policy: str, sent: bytes) -> None:
    client, server = _pair()
    with client, server:
        threading.Timer(0.05, _send_then_close, (client, sent)).start()
        with pytest.raises(InvalidHeader) as info:
            proxyproto.read_header(server, timeout=5.0, policy=policy)
    assert type(info.value) is InvalidHeader
    assert str(info.value).startswith(f"header truncated by EOF after {len(sent)} byte(s)")


def test_blocking_read_header_eof_before_any_byte_is_no_header_under_require() -> None:
    client, server = _pair()
    with client, server:
        _send_then_close(client, b"")
        with pytest.raises(NoProxyHeader, match="closed before sending a PROXY header"):
            proxyproto.read_header(server, timeout=5.0)
        assert proxyproto.read_header(server, timeout=5.0, policy="USE") is None


@pytest.mark.parametrize(("policy", "sent"), [("REQUIRE", b"PROXY TCP4 1.2"), ("USE", b"PR")])
def test_asyncio_read_header_refuses_a_header_cut_by_eof(policy: str, sent: bytes) -> None:
    async def main() -> None:
        got: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await aio.read_header(reader, timeout=5.0, policy=policy)
            except Exception as exc:  # the refusal under test
                got.set_result(exc)
            else:
                got.set_result(None)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            writer.write(sent)
            await writer.drain()
            writer.write_eof()
            error = await asyncio.wait_for(got, 5.0)
            writer.close()
        assert type(error) is InvalidHeader
        assert str(error).startswith(f"header truncated by EOF after {len(sent)} byte(s)")

    asyncio.run(main())
