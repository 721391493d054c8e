"""``proxyproto relay`` out of descriptors: it rests instead of spinning, and recovers.

The relay runs as a real process whose descriptor limit is lowered (``prlimit`` on its PID)
to exactly what it needs for a handful of relayed connections, so the next ``accept()``
fails with EMFILE while that connection waits in the backlog.  Its CPU time is read from
``/proc/PID/stat`` and its descriptors from ``/proc/PID/fd``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_kit import relay, wait_until

import proxyproto

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses prlimit")

HELD = 5  # relayed connections kept open to use up the limit
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def steady_fd_count(pid: int) -> int:
    """The descriptor count once it stopped changing for 0.3 s (the relay has finished starting)."""
    previous = -1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        count = fd_count(pid)
        if count == previous:
            return count
        previous = count
        time.sleep(0.3)
    raise AssertionError("the relay's descriptor count never settled")


@contextlib.contextmanager
def announcing_upstream() -> Iterator[int]:
    """A server that reads the PROXY header, answers ``CLIENT host:port``, then echoes until EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                header = proxyproto.read_header(conn, timeout=5)
                assert header is not None and header.source is not None
                conn.sendall(f"CLIENT {header.source[0]}:{header.source[1]}\n".encode())
                while data := conn.recv(4096):
                    conn.sendall(data)
            except (OSError, proxyproto.ProxyProtocolError):
                pass

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(10)
            thread = threading.Thread(target=serve_one, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for thread in threads:
            thread.join(5)


def relayed(port: int) -> tuple[socket.socket, bytes]:
    """A client through the relay, and the upstream's first line (which proves both descriptors are open)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    line = sock.recv(100)
    return sock, line


def test_relay_backs_off_on_emfile_and_recovers(tmp_path: Path) -> None:
    with announcing_upstream() as upstream_port, relay(tmp_path, upstream_port) as (proc, port):
        pid = proc.popen.pid
        baseline = steady_fd_count(pid)
        # Exactly enough for HELD relayed connections (a client and an upstream socket each).
        limit = baseline + 2 * HELD
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        held: list[socket.socket] = []
        waiting: socket.socket | None = None
        try:
            for _ in range(HELD):
                sock, line = relayed(port)
                held.append(sock)
                assert line.startswith(b"CLIENT 127.0.0.1:"), line
            assert fd_count(pid) == limit

            # One more client: the kernel completes its handshake, the relay cannot accept it.
            waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert wait_until(lambda: "accept() failed" in proc.output(), timeout=5), proc.output()
            before, start = cpu_seconds(pid), time.monotonic()
            time.sleep(1.0)
            used = (cpu_seconds(pid) - before) / (time.monotonic() - start)
            print(f"CPU {used:.2%}")
            assert used < 0.10, f"relay used {used:.0%} of a core while accept() failed"
            out = proc.output()
            assert out.count("accept() failed") == 1, out
            assert "Too many open files" in out and "pausing the listener" in out
            assert "accept() works again" not in out

            # Free two descriptors: the waiting client is served within a second.
            held.pop().close()
            freed = time.monotonic()
            waiting.settimeout(5)
            assert waiting.recv(100).startswith(b"CLIENT 127.0.0.1:")
            assert time.monotonic() - freed < 1.0
            waiting.sendall(b"ping")
            assert waiting.recv(100) == b"ping"
            assert wait_until(lambda: "accept() works again" in proc.output(), timeout=2), proc.output()
            assert proc.output().count("accept() failed") == 1
        finally:
            for sock in held:
                sock.close()
            if waiting is not None:
                waiting.close()
        assert wait_until(lambda: fd_count(pid) == baseline, timeout=5), (fd_count(pid), baseline)
        assert proc.popen.poll() is None


def vm_size(pid: int) -> int:
    """The process's address space in use (VmSize), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_relay_out_of_threads_closes_those_connections_and_keeps_relaying(tmp_path: Path) -> None:
    """No room for one more thread (a pids limit, TasksMax, memory): that connection closes, the relay goes on."""
    with announcing_upstream() as upstream_port, relay(tmp_path, upstream_port) as (proc, port):
        pid = proc.popen.pid
        steady_fd_count(pid)
        # Room for a few more thread stacks only: each relayed connection takes two threads.
        old = resource.prlimit(pid, resource.RLIMIT_AS, (vm_size(pid) + (48 << 20), resource.RLIM_INFINITY))
        clients: list[socket.socket] = []
        try:
            for _ in range(40):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            assert wait_until(lambda: "cannot start a thread" in proc.output(), timeout=10), proc.output()
            assert proc.popen.poll() is None, proc.output()
        finally:
            resource.prlimit(pid, resource.RLIMIT_AS, old)
            for sock in clients:
                sock.close()
        sock, line = relayed(port)  # the limit back where it was: relayed again
        with sock:
            assert line.startswith(b"CLIENT 127.0.0.1:"), (line, proc.output())
            sock.sendall(b"ping")
            assert sock.recv(100) == b"ping"
        assert proc.popen.poll() is None
        assert "Traceback" not in proc.output(), proc.output()
