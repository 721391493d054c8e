"""A connection waiting for its header holds the bytes its peer sent, not ``max_header_size``.

Through uvicorn's real command line at the largest accepted ``PROXYPROTO_MAX_HEADER_SIZE``
(65551, the protocol's maximum): 60 silent connections, then 60 that send the start of a v2
header announcing the largest length and stop. The process stays under 100 MB, and grows by
less than a buffer of the cap per connection would take (120 x 64 KiB, zero-filled: 7.5 MiB).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from support import free_port, require_module
from web_kit import command, python

import proxyproto.reader as core

CONNECTIONS = 60


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def settle(pid: int) -> int:
    """The process's RSS once it stops moving (bounded: 2 s)."""
    last, deadline = rss_kib(pid), time.monotonic() + 2
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_kib(pid)
        if now == last:
            break
        last = now
    return last


def test_waiting_connections_hold_only_what_they_sent_at_the_largest_header_cap(tmp_path: Path) -> None:
    require_module("uvicorn")
    port = free_port()
    args = python("-m", "uvicorn", "web_kit:app", "--port", str(port), "--http", "proxyproto.uvicorn:H11")
    env = {"PROXYPROTO_MAX_HEADER_SIZE": str(core.MAX_V2_LENGTH), "PROXYPROTO_HEADER_TIMEOUT": "30"}
    # The start of a v2 header announcing 65535 bytes: valid so far, so the server waits for the rest.
    announcing = core.V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]) + b"\x7f\x00\x00\x01"
    clients: list[socket.socket] = []
    with command(args, port, env=env, workdir=tmp_path) as server:
        try:
            baseline = settle(server.pid)
            for _ in range(CONNECTIONS):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            for _ in range(CONNECTIONS):
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                client.sendall(announcing)
                clients.append(client)
            loaded = settle(server.pid)
        finally:
            for client in clients:
                client.close()
    assert loaded < 100 * 1024, f"uvicorn's RSS with {2 * CONNECTIONS} waiting connections: {loaded} KiB"
    # A buffer of the cap per waiting connection would be 120 x 64 KiB, zero-filled: 7.5 MiB.
    assert loaded - baseline < 3 * 1024, f"RSS grew by {loaded - baseline} KiB (from {baseline} KiB)"
