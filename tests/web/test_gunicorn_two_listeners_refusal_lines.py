"""gunicorn's uvicorn workers with two ``-b``: each refusal line names the listener its connection came to.

One uvicorn config, so one asyncio factory, serves both listeners.  After a TCP
health check on the second listener (connect, close), a malformed header on the
first is named with the first, and one on the second with the second.  The real
``gunicorn`` command on two loopback ports, stopped by PID.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest
from gunicorn_kit import CEILING, NEEDS, gunicorn
from support import free_port, require_module

MALFORMED = b"PROXY TCP4 bogus\r\n"


def exchange(address: tuple[str, int], data: bytes) -> None:
    """``data`` (nothing: connect and close, as a TCP health check does), then read until the server closes."""
    with socket.create_connection(address, timeout=CEILING) as sock:
        if data:
            sock.sendall(data)
        else:
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(CEILING)
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass


@pytest.mark.parametrize("worker", ["uvicorn", "uvicorn-h11"])
def test_refusal_lines_name_the_listener_of_their_own_connection(worker: str, tmp_path: Path) -> None:
    require_module("gunicorn")
    for module in NEEDS[worker]:
        require_module(module)
    other = free_port()
    with gunicorn(worker, tmp_path, "-b", f"127.0.0.1:{other}", workers=1) as server:
        exchange(("127.0.0.1", other), b"")  # the worker's first connection not served at once
        exchange(server.address, MALFORMED)
        exchange(("127.0.0.1", other), MALFORMED)
        deadline = time.monotonic() + CEILING
        while server.log().count("TCP4 needs") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [line for line in server.log().splitlines() if "TCP4 needs" in line]
    assert len(lines) == 2, lines
    assert lines[0].endswith(f"(listener 127.0.0.1:{server.port})"), lines
    assert lines[1].endswith(f"(listener 127.0.0.1:{other})"), lines
