"""Helpers for the stress and fault tests: a server in a subprocess, /proc figures, clients.

The server runs in its own process (``stress_server.py``) so that what the
tests measure is the server's alone: CPU from ``/proc/PID/stat`` (its threads,
and its reaped children for the forking classes), descriptors from
``/proc/PID/fd``, children from ``/proc/PID/task/*/children``.  The load is
generated in the test process.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import proxyproto

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "stress_server.py"

CLASS_NAMES = (
    "ProxyTCPServer",
    "ThreadingProxyTCPServer",
    "ForkingProxyTCPServer",
    "ProxyUnixStreamServer",
    "ThreadingProxyUnixStreamServer",
    "ForkingProxyUnixStreamServer",
)

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)
V1_HEADER = proxyproto.encode_v1(REAL_V4, DEST_V4)
V2_HEADER = proxyproto.encode_v2(REAL_V4, DEST_V4)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the tests hold several hundred sockets at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_until(predicate: Callable[[], bool], limit: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``limit`` seconds pass; its last value."""
    end = time.monotonic() + limit
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


def proc_fds(pid: int) -> int:
    """Open descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors of ``pid`` by kind (``socket``, ``pipe``, ``anon_inode:[eventpoll]``, ``file``)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        kind = target.split(":[")[0] if target.startswith(("socket:", "pipe:")) else target
        kind = kind if kind.startswith(("socket", "pipe", "anon_inode")) else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def same_fds(before: dict[str, int], now: dict[str, int]) -> bool:
    """``now`` holds what ``before`` held, allowing the serving loop's wake-up pipe (two pipe ends,
    made once, the first time two connections complete together, and kept until ``server_close``)."""
    extra = {k: now.get(k, 0) - before.get(k, 0) for k in set(before) | set(now)}
    return all(v == 0 for k, v in extra.items() if k != "pipe") and extra.get("pipe", 0) in (0, 2)


def proc_children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (every thread's children)."""
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        children.extend(int(x) for x in text.split())
    return children


def proc_cpu(pid: int) -> float:
    """CPU seconds of ``pid``: user + system of all its threads, plus its reaped children's."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: the figure is a real sample)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, int(-(-pct * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


class ServerProcess:
    """``stress_server.py`` running one class; stop it with :meth:`stop` (or use as a context manager)."""

    def __init__(self, name: str, attrs: dict[str, Any] | None = None, *, rlimit_nofile: int | None = None,
                 poll_interval: float = 0.5) -> None:
        self.name = name
        self.unix = "Unix" in name
        self.tmpdir = tempfile.TemporaryDirectory(prefix="ppstress-")
        config: dict[str, Any] = {"class": name, "attrs": attrs or {}, "poll_interval": poll_interval}
        if rlimit_nofile:
            config["rlimit_nofile"] = rlimit_nofile
        if self.unix:
            config["path"] = os.path.join(self.tmpdir.name, "s")
        self.stderr_path = os.path.join(self.tmpdir.name, "stderr.txt")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if not first:
            self.stop()
            raise RuntimeError(f"server {name} did not start: {self.stderr()}")
        info = json.loads(first)
        self.pid: int = info["pid"]
        self.address: Any = info["address"] if self.unix else tuple(info["address"])
        self.fds_before_server: int = info["fds_before_server"]
        self.family = socket.AF_UNIX if self.unix else socket.AF_INET

    # -- control ----------------------------------------------------------------------

    def command(self, text: str) -> dict[str, Any]:
        """Send one command line; the JSON answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited: {self.stderr()}")
        return json.loads(line)

    def stop(self) -> int | None:
        """Close stdin (the script shuts down), SIGTERM if it lingers, SIGKILL as a last resort."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._stderr.close()
        return self.proc.returncode

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.tmpdir.cleanup()

    # -- measuring ----------------------------------------------------------------------

    def fds(self) -> int:
        return proc_fds(self.pid)

    def fd_kinds(self) -> dict[str, int]:
        return proc_fd_kinds(self.pid)

    def children(self) -> list[int]:
        return proc_children(self.pid)

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    # -- clients --------------------------------------------------------------------------

    def connect(self, timeout: float = 5.0, source: str | None = None) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        # A non-blocking AF_UNIX connect fails with EAGAIN when the backlog is full instead of
        # waiting, so UNIX clients connect in blocking mode (the server drains its backlog).
        sock.settimeout(None if self.unix else timeout)
        try:
            if source is not None:
                sock.bind((source, 0))
            sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        return sock

    def good_request(self, header: bytes = V1_HEADER, line: bytes = b"ping\n", timeout: float = 5.0) -> tuple[
            float, dict[str, Any]]:
        """One well-behaved client: header and a line in one write; (seconds to the answer, the report)."""
        start = time.monotonic()
        with self.connect(timeout) as sock:
            sock.sendall(header + line)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        took = time.monotonic() - start
        if not data.endswith(b"\n"):
            raise AssertionError(f"{self.name}: a good client got {data!r}, not an answer")
        return took, json.loads(data)

    def settle(self, before: dict[str, int], limit: float = 4.0, probe: bytes = V1_HEADER) -> None:
        """Assert the server gets back to the descriptors it held ``before`` and has no children
        (within ``limit``), and still answers a client sending ``probe`` (a header by default; the
        empty string for the opt-in policies, where a header may be refused or its address ignored)."""
        wait_until(lambda: same_fds(before, self.fd_kinds()) and not self.children(), limit)
        now, children = self.fd_kinds(), self.children()
        assert same_fds(before, now), f"{self.name}: descriptors {now}, before the test {before}"
        assert not children, f"{self.name}: children left: {children}"
        _, report = self.good_request(header=probe)
        if probe == V1_HEADER:
            assert report["client"][:2] == list(REAL_V4), report
        wait_until(lambda: same_fds(before, self.fd_kinds()) and not self.children(), limit)

    def warm_up(self, probe: bytes = V1_HEADER) -> dict[str, int]:
        """Serve one request (starting with ``probe``) and settle: the baseline descriptors, by kind."""
        self.good_request(header=probe)
        wait_until(lambda: not self.children(), 3.0)
        time.sleep(0.2)
        return self.fd_kinds()
