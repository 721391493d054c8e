"""``proxyproto.aio.start_server`` / ``start_unix_server``: the mixin's cases, on asyncio.

Policies, trust, refusals closed and logged as the mixin logs them, slow and silent clients
never delaying anyone else, exact payloads; and one end-to-end run through a real haproxy
``send-proxy-v2`` (and ``send-proxy``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aio_kit import (
    DEST_V4,
    DEST_V6,
    REAL_V4,
    REAL_V6,
    async_test,
    closed_without_answer,
    failing_hook,
    haproxy,
    send_slowly,
)
from support import free_port

import proxyproto
from proxyproto import Policy, aio

V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)


@pytest.fixture
def proxy_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    return caplog


def closed_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxyproto" and ": closed: " in r.getMessage()]


class Recorder:
    """A client_connected_cb that records what it saw and answers with the peer it was given."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        entry = {
            "peername": writer.get_extra_info("peername"),
            "proxy_header": writer.get_extra_info("proxy_header"),
            "proxy_peername": writer.get_extra_info("proxy_peername"),
            "sockname": writer.get_extra_info("sockname"),
            "data": data,
            "is_stream_writer": isinstance(writer, asyncio.StreamWriter),
        }
        self.seen.append(entry)
        writer.write(f"{entry['peername']!r} {hashlib.sha256(data).hexdigest()}".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()


async def serve(recorder: Recorder, **options: Any) -> tuple[asyncio.AbstractServer, tuple[str, int]]:
    server = await aio.start_server(recorder, "127.0.0.1", 0, **options)
    return server, server.sockets[0].getsockname()[:2]


async def talk(address: Any, data: bytes, local: str | None = None, close: bool = True) -> bytes:
    """Connect (optionally from ``local``), send ``data``, half-close, return all of the answer."""
    kwargs = {"local_addr": (local, 0)} if local else {}
    reader, writer = await asyncio.open_connection(*address, **kwargs)
    writer.write(data)
    if close:
        writer.write_eof()
    answer = await reader.read()
    writer.close()
    return answer


@async_test
async def test_aio_server_require_serves_real_client_with_header_and_exact_payload() -> None:
    recorder = Recorder()
    server, address = await serve(recorder)
    async with server:
        answer = await talk(address, V2 + b"hello\x00world")
    (entry,) = recorder.seen
    assert entry["peername"] == REAL_V4
    assert entry["proxy_header"] == proxyproto.parse(V2)
    assert entry["proxy_peername"][0] == "127.0.0.1"
    assert entry["data"] == b"hello\x00world"
    assert entry["is_stream_writer"]
    assert answer.startswith(repr(REAL_V4).encode())


@async_test
async def test_aio_server_ipv6_header_gives_4_tuple_peername() -> None:
    recorder = Recorder()
    server, address = await serve(recorder)
    async with server:
        await talk(address, proxyproto.encode_v2(REAL_V6, DEST_V6) + b"x")
    assert recorder.seen[0]["peername"] == (REAL_V6[0], REAL_V6[1], 0, 0)


@async_test
async def test_aio_server_v1_and_local_headers() -> None:
    recorder = Recorder()
    server, address = await serve(recorder)
    async with server:
        await talk(address, b"PROXY TCP4 192.0.2.10 198.51.100.20 51234 443\r\nv1")
        await talk(address, b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00local")
    v1, local = recorder.seen
    assert v1["peername"] == REAL_V4 and v1["data"] == b"v1"
    assert local["peername"] == local["proxy_peername"] and local["peername"][0] == "127.0.0.1"
    assert local["proxy_header"].command is proxyproto.Command.LOCAL and local["data"] == b"local"


@async_test
async def test_aio_server_exact_payload_one_mebibyte() -> None:
    recorder = Recorder()
    payload = os.urandom(1 << 20)
    server, address = await serve(recorder)
    async with server:
        answer = await talk(address, V2 + payload)
    assert recorder.seen[0]["data"] == payload
    assert answer.endswith(hashlib.sha256(payload).hexdigest().encode())


REFUSED = {
    "no header": b"GET / HTTP/1.0\r\n\r\n",
    "malformed": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "bad checksum": bytes(
        b if i != 17 else b ^ 1 for i, b in enumerate(proxyproto.encode_v2(REAL_V4, DEST_V4, checksum=True))
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@async_test
async def test_aio_server_require_closes_and_logs_one_warning(case: str, proxy_log: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    server, address = await serve(recorder)
    async with server:
        answer = await talk(address, REFUSED[case] + b"payload")
    assert answer == b"" and recorder.seen == []
    (line,) = closed_lines(proxy_log)
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert line.getMessage().startswith("127.0.0.1:")


@async_test
async def test_aio_server_require_silent_client_closed_at_deadline_info(proxy_log: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    server, address = await serve(recorder, header_timeout=0.3)
    async with server:
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = await talk(address, b"", close=False)
        elapsed = loop.time() - start
    assert answer == b"" and recorder.seen == []
    assert 0.25 <= elapsed < 2.0
    (line,) = closed_lines(proxy_log)
    assert line.levelno == logging.INFO and "no PROXY header within 0.3 s" in line.getMessage()


@async_test
async def test_aio_server_require_eof_before_first_byte_is_debug(proxy_log: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    server, address = await serve(recorder)
    async with server:
        await talk(address, b"")
    assert recorder.seen == []
    (line,) = closed_lines(proxy_log)
    assert line.levelno == logging.DEBUG


@async_test
async def test_aio_server_use_serves_streams_without_header_with_socket_address() -> None:
    recorder = Recorder()
    server, address = await serve(recorder, policy=Policy.USE)
    async with server:
        await talk(address, b"PRI * HTTP/2.0\r\n")
        await talk(address, V2 + b"proxied")
    plain, proxied = recorder.seen
    assert plain["peername"] == plain["proxy_peername"] and plain["proxy_header"] is None
    assert plain["data"] == b"PRI * HTTP/2.0\r\n"
    assert proxied["peername"] == REAL_V4 and proxied["data"] == b"proxied"


@async_test
async def test_aio_server_use_serves_silent_client_after_the_deadline() -> None:
    """Server-speaks-first protocols keep working under USE: served, no header, after the deadline."""
    served = asyncio.Event()

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await writer.drain()
        served.set()
        writer.close()

    server = await aio.start_server(banner, "127.0.0.1", 0, policy="USE", header_timeout=0.2)
    async with server:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        assert await asyncio.wait_for(reader.readline(), 5) == b"220 hello\r\n"
        writer.close()


@async_test
async def test_aio_server_ignore_strips_header_keeps_socket_address() -> None:
    recorder = Recorder()
    server, address = await serve(recorder, policy=Policy.IGNORE)
    async with server:
        await talk(address, V2 + b"payload")
    (entry,) = recorder.seen
    assert entry["peername"] == entry["proxy_peername"]
    assert entry["proxy_header"] is not None and entry["data"] == b"payload"


@async_test
async def test_aio_server_reject_closes_header_serves_the_rest(proxy_log: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    server, address = await serve(recorder, policy="REJECT")
    async with server:
        assert await talk(address, V2 + b"spoof") == b""
        await talk(address, b"honest")
    assert [e["data"] for e in recorder.seen] == [b"honest"]
    (line,) = closed_lines(proxy_log)
    assert "REJECT" in line.getMessage() and line.levelno == logging.WARNING


@async_test
async def test_aio_server_skip_passes_header_bytes_as_payload() -> None:
    recorder = Recorder()
    server, address = await serve(recorder, policy="SKIP")
    async with server:
        await talk(address, V2 + b"x")
    assert recorder.seen[0]["data"] == V2 + b"x" and recorder.seen[0]["proxy_header"] is None


@async_test
async def test_aio_server_untrusted_peer_is_skipped_trusted_peer_is_used_G10() -> None:
    recorder = Recorder()
    server, address = await serve(recorder, trusted=["127.0.0.1/32"])
    async with server:
        await talk(address, V2 + b"x", local="127.0.0.3")
        await talk(address, V2 + b"y", local="127.0.0.1")
    stranger, proxy = recorder.seen
    assert stranger["peername"][0] == "127.0.0.3" and stranger["data"] == V2 + b"x"
    assert proxy["peername"] == REAL_V4 and proxy["data"] == b"y"


@async_test
async def test_aio_server_untrusted_reject_closes_spoof_attempts(proxy_log: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    server, address = await serve(recorder, trusted="127.0.0.1", untrusted_policy=Policy.REJECT)
    async with server:
        assert await talk(address, V2 + b"x", local="127.0.0.3") == b""
    assert recorder.seen == []
    assert "127.0.0.3" in closed_lines(proxy_log)[0].getMessage()


@pytest.mark.parametrize("bad", [Policy.USE, "REQUIRE"])
@async_test
async def test_aio_server_refuses_untrusted_policy_use_or_require(bad: Any) -> None:
    with pytest.raises(ValueError, match="untrusted_policy"):
        await aio.start_server(Recorder(), "127.0.0.1", 0, untrusted_policy=bad)
    with pytest.raises(ValueError, match="untrusted_policy"):
        await aio.start_unix_server(Recorder(), "/nonexistent/never-bound", untrusted_policy=bad)


@async_test
async def test_aio_server_slow_and_silent_clients_never_delay_others() -> None:
    recorder = Recorder()
    server, address = await serve(recorder, header_timeout=5.0)
    async with server:
        silent = [await asyncio.open_connection(*address) for _ in range(20)]
        slow_sock = socket.create_connection(address)
        slow_sock.setblocking(False)
        trickle = asyncio.ensure_future(send_slowly(slow_sock, V2, 0.1))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = await talk(address, V2 + b"prompt")
        elapsed = loop.time() - start
        assert answer.startswith(repr(REAL_V4).encode())
        assert elapsed < 0.5, f"a well-behaved client waited {elapsed:.3f} s"
        trickle.cancel()
        slow_sock.close()
        for _, writer in silent:
            writer.close()
    assert [e["data"] for e in recorder.seen] == [b"prompt"]


@async_test
async def test_aio_unix_server_uses_header_and_always_trusts_unix_peers() -> None:
    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="ppa-") as tmp:
        path = str(Path(tmp) / "s.sock")
        server = await aio.start_unix_server(recorder, path, trusted=["10.0.0.0/8"])
        async with server:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(V2 + b"over unix")
            writer.write_eof()
            await reader.read()
            writer.close()
    (entry,) = recorder.seen
    assert entry["peername"] == REAL_V4 and entry["data"] == b"over unix"


@async_test
async def test_aio_server_plain_function_callback_is_supported() -> None:
    got: list[Any] = []

    def callback(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(writer.get_extra_info("peername"))
        writer.close()

    server = await aio.start_server(callback, "127.0.0.1", 0)
    async with server:
        await talk(server.sockets[0].getsockname()[:2], V2)
    assert got == [REAL_V4]


# -- end to end through a real haproxy -------------------------------------------------------


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_aio_server_behind_real_haproxy_sees_the_client_address(send_proxy: str, tmp_path: Path) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], tuple[str, int], bytes]:
        recorder = Recorder()
        server, backend = await serve(recorder)
        async with server:
            front = free_port()
            body = f"listen fe\n    bind 127.0.0.1:{front}\n    server app {backend[0]}:{backend[1]} {send_proxy}\n"
            with haproxy(tmp_path, body, front):
                reader, writer = await asyncio.open_connection("127.0.0.1", front, local_addr=("127.0.0.2", 0))
                own = writer.get_extra_info("sockname")
                writer.write(b"hello through haproxy\n")
                writer.write_eof()
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
        return recorder.seen, own, answer

    seen, own, answer = asyncio.run(asyncio.wait_for(scenario(), 30))
    (entry,) = seen
    assert entry["peername"] == tuple(own[:2])
    assert entry["peername"][0] == "127.0.0.2"
    assert entry["proxy_peername"][0] == "127.0.0.1"
    assert entry["proxy_header"].version == (2 if send_proxy.endswith("v2") else 1)
    assert entry["data"] == b"hello through haproxy\n"
    assert answer.startswith(repr(tuple(own[:2])).encode())


@async_test
async def test_aio_server_policy_for_hook_decides_per_connection() -> None:
    calls: list[tuple[Any, Any]] = []

    def policy_for(peer: Any, local: Any) -> str:
        calls.append((peer, local))
        return "REQUIRE" if peer[0] == "127.0.0.1" else "SKIP"

    recorder = Recorder()
    server, address = await serve(recorder, policy_for=policy_for)
    async with server:
        await talk(address, V2 + b"a", local="127.0.0.1")
        await talk(address, V2 + b"b", local="127.0.0.4")
    used, skipped = recorder.seen
    assert used["peername"] == REAL_V4 and used["data"] == b"a"
    assert skipped["peername"][0] == "127.0.0.4" and skipped["data"] == V2 + b"b"
    assert [local[:2] for _, local in calls] == [address, address]


@async_test
async def test_aio_server_failing_policy_for_hook_closes_the_connection_not_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")
    served: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(writer.get_extra_info("peername"))
        writer.close()

    server = await aio.start_server(handler, "127.0.0.1", 0, policy_for=failing_hook)
    address = server.sockets[0].getsockname()[:2]
    async with server:
        assert await closed_without_answer(address, proxyproto.encode_v1(REAL_V4, DEST_V4) + b"payload")
    assert served == []
    assert any("TypeError" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
