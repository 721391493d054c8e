"""Receiving: haproxy health checks with the PROXY protocol.

A ``check send-proxy-v2`` connects, sends a LOCAL header (with TLVs when
``proxy-v2-options`` is set) and resets the connection at once; ``check
send-proxy`` sends a full ``PROXY TCP4`` line with the check's own addresses.
The server must take these quietly (no traceback, nothing above INFO from the
``proxyproto`` logger), haproxy must see the server UP, and a handler must be
able to tell a check (LOCAL) from a client (PROXY) in the same run.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
from interop_support import (
    ProcessRunner,
    exchange,
    free_port,
    haproxy_config,
    wait_until,
)

from proxyproto import Command

PAYLOAD = b"client payload\n"


def show_stat(sock_path: str) -> dict[str, str]:
    """The ``be/s1`` row of haproxy's ``show stat`` over its stats socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        s.connect(sock_path)
        s.sendall(b"show stat\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.decode().splitlines()
    columns = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(columns, line.split(",")))
        if row.get("pxname") == "be" and row.get("svname") == "s1":
            return row
    raise AssertionError(f"no be/s1 row in show stat:\n{data.decode()}")


def start_checked(procs: ProcessRunner, workdir: Path, server_port: int, send: str) -> tuple[int, str]:
    """haproxy with a checked server (``inter 200ms``) and a stats socket."""
    port = free_port()
    stats = str(workdir / "stats.sock")
    cfg = haproxy_config(
        f"""
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{server_port} check {send} inter 200ms fall 2 rise 2
""",
        global_extra=f"    stats socket {stats} mode 600 level admin",
    )
    procs.haproxy(cfg, [port, stats])
    return port, stats


def assert_quiet(server: Any, pp_log: list[logging.LogRecord], capsys: pytest.CaptureFixture[str]) -> None:
    """No handler error, no traceback, no proxyproto record above INFO."""
    assert server.errors == []
    loud = [r for r in pp_log if r.levelno > logging.INFO or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out


def wait_up(stats: str) -> dict[str, str]:
    """Wait until haproxy reports the server UP after successful layer-4 checks."""
    row: dict[str, str] = {}

    def up() -> bool:
        row.update(show_stat(stats))
        return row.get("status") == "UP" and row.get("check_status") == "L4OK"

    assert wait_until(up, 5.0, interval=0.1), f"server not UP by haproxy's checks: {row}"
    return row


@pytest.mark.parametrize("options", ["", "proxy-v2-options crc32c,unique-id,authority,ssl"], ids=["plain", "with_tlvs"])
def test_haproxy_v2_checks_are_local_and_quiet_V2_R1(
    procs: ProcessRunner,
    proxy_server: Callable[..., Any],
    wait_for_records: Callable[..., Any],
    workdir: Path,
    pp_log: list[logging.LogRecord],
    capsys: pytest.CaptureFixture[str],
    options: str,
) -> None:
    """v2 checks arrive as LOCAL (TLVs too with options), are served quietly, and haproxy says UP."""
    server = proxy_server()
    port, stats = start_checked(procs, workdir, server.address[1], f"send-proxy-v2 {options}")
    wait_up(stats)
    assert wait_until(lambda: sum(r.is_check for r in server.records) >= 2, 5.0), server.records
    # A real client through the same haproxy is told apart from the checks.
    own, reply = exchange(("127.0.0.1", port), PAYLOAD, source=("127.0.0.2", 0))
    assert reply == b"client_address=" + repr(own).encode() + b"\n"
    assert wait_until(lambda: any(not r.is_check for r in server.records), 5.0)
    checks = [r for r in server.records if r.is_check]
    clients = [r for r in server.records if not r.is_check]
    assert len(clients) == 1
    assert clients[0].header.command == Command.PROXY
    assert clients[0].client_address == own
    for rec in checks:
        assert rec.header.version == 2
        assert rec.header.source is None
        assert rec.client_address == rec.peer or rec.peer.startswith("getpeername failed")
        assert rec.payload == b""
        if options:
            assert rec.header.crc32c is not None
            assert rec.header.tlvs, "haproxy sends TLVs with LOCAL when proxy-v2-options is set"
        else:
            assert rec.header.tlvs == ()
    assert_quiet(server, pp_log, capsys)


def test_haproxy_v1_checks_send_tcp4_line_and_are_quiet_V1(
    procs: ProcessRunner,
    proxy_server: Callable[..., Any],
    workdir: Path,
    pp_log: list[logging.LogRecord],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """v1 checks send a full TCP4 line with the check connection's addresses; served quietly, UP."""
    server = proxy_server()
    _, stats = start_checked(procs, workdir, server.address[1], "send-proxy")
    wait_up(stats)
    assert wait_until(lambda: len(server.records) >= 2, 5.0), server.records
    for rec in list(server.records):
        assert rec.header.version == 1
        assert rec.header.command == Command.PROXY
        assert rec.header.source[0] == "127.0.0.1"
        assert rec.header.destination == ("127.0.0.1", server.address[1])
        assert rec.client_address == rec.header.source
        assert rec.payload == b""
    assert_quiet(server, pp_log, capsys)
