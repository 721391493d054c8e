"""Helpers for the asyncio tests: a runner with a ceiling, readers on real sockets, haproxy.

No pytest plugin is needed: :func:`async_test` and :func:`run_on` (from ``support``) run the
coroutine under a generous ceiling, so a bug can fail a test but never hang the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from support import async_test as async_test  # re-exported: the aio tests import them from here
from support import listening, require_haproxy
from support import run_on as run_on

from proxyproto import Policy

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)

T = TypeVar("T")


@contextlib.asynccontextmanager
async def stream_pair() -> Any:
    """``(reader, peer)``: an asyncio StreamReader on one end of a real TCP connection, and the
    other end as a plain non-blocking socket the test writes to."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    peer = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    listener.close()
    peer.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=conn)
    try:
        yield reader, peer
    finally:
        writer.close()
        peer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def send_slowly(sock: socket.socket, data: bytes, delay: float) -> None:
    """Write ``data`` one byte at a time, ``delay`` seconds apart (a slow client)."""
    for i in range(len(data)):
        sock.send(data[i : i + 1])
        await asyncio.sleep(delay)


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
    """A ``policy_for`` hook that raises (TypeError) on every peer."""
    return Policy.REQUIRE if peer[0][0] == "x" else Policy.SKIP[0]  # type: ignore[index]  # TypeError


# -- haproxy ---------------------------------------------------------------------------------


@contextlib.contextmanager
def haproxy(workdir: Path, body: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``haproxy -db`` with a generated config until the block ends; stop it by PID."""
    exe = require_haproxy()
    config = (
        "global\n    log stdout format raw local0 info\n    nbthread 1\n"
        "defaults\n    mode tcp\n    log global\n    timeout connect 2s\n"
        "    timeout client 5s\n    timeout server 5s\n\n" + body
    )
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(config)
    check = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, f"haproxy rejected the config:\n{config}\n{check.stderr}"
    out = open(workdir / "haproxy.out", "wb")
    proc = subprocess.Popen([exe, "-f", str(cfg), "-db"], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            assert proc.poll() is None, (workdir / "haproxy.out").read_text()
            assert time.monotonic() < deadline, "haproxy did not start listening"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        out.close()
