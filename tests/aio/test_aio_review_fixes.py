"""The security review's findings in the asyncio layers: a user's policy hook can fail or answer
an opt-in policy with ``ssl=``, and neither may leave a connection open without a deadline, lose
bytes silently, or take the server down."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import pytest
from aio_kit import DEST_V4, REAL_V4, async_test
from test_aio_protocol import serve

import proxyproto
from proxyproto import Policy, aio

HEADER = proxyproto.encode_v1(REAL_V4, DEST_V4)


async def closed_without_answer(address: Any, data: bytes) -> bool:
    """Send ``data``; True when the server closes (or resets) without writing a byte."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:
        return True
    finally:
        writer.close()


def failing_hook(peer: Any, local: Any) -> Policy:
    return Policy.REQUIRE if peer[0][0] == "x" else Policy.SKIP[0]  # type: ignore[index]  # TypeError


@async_test
async def test_failing_hook_closes_the_wrapped_connection_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")
    server, address, sinks, factory = await serve("plain", policy_for=failing_hook)
    async with server:
        for _ in range(3):
            assert await closed_without_answer(address, HEADER + b"payload")
        assert factory.pending == 0 and sinks == []
    errors = [r.getMessage() for r in caplog.records if r.name == "proxyproto" and r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("TypeError" in e for e in errors)


@async_test
async def test_hook_answering_an_opt_in_policy_with_ssl_is_refused_not_half_served(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    """Built without a hook, USE/IGNORE/REJECT with ``ssl=`` is a ValueError; a hook can still
    answer one per connection, whose sniffed bytes TLS would never see: closed, logged."""
    caplog.set_level(logging.INFO, logger="proxyproto")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server, address, sinks, _ = await serve("plain", policy_for=lambda peer, local: Policy.USE, ssl=context)
    async with server:
        assert await closed_without_answer(address, HEADER + b"payload")
        assert sinks == []
    errors = [r.getMessage() for r in caplog.records if r.name == "proxyproto" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "only REQUIRE or SKIP" in errors[0]


@async_test
async def test_failing_hook_closes_the_stream_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")
    served: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(writer.get_extra_info("peername"))
        writer.close()

    server = await aio.start_server(handler, "127.0.0.1", 0, policy_for=failing_hook)
    address = server.sockets[0].getsockname()[:2]
    async with server:
        assert await closed_without_answer(address, HEADER + b"payload")
    assert served == []
    assert any("TypeError" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
