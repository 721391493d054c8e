"""Helpers for the command-line tests: run ``python -m proxyproto``, the demo server, haproxy, UDP servers.

Every process is started here on loopback with ports picked at run time, and stopped by PID.
Output goes to files, read while the process runs (no pipe can fill up and stall it).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import listening, require_haproxy

import proxyproto
from proxyproto import udp

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo_echo_server.py"
VECTORS = ROOT / "tests" / "vectors"
RUN_TIMEOUT = 30.0
WAIT = 10.0


def cli(*args: str, stdin: bytes = b"", timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """``python -m proxyproto ARGS`` to completion, stdin given, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "proxyproto", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def capture_send(*options: str, stdin: bytes = b"") -> tuple[int, bytes]:
    """Run ``proxyproto send`` against a listener that records every byte; (exit status, bytes)."""
    received = bytearray()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def accept() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                while chunk := conn.recv(65536):
                    received.extend(chunk)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        result = cli("send", "127.0.0.1", str(port), *options, stdin=stdin)
        thread.join(10)
    return result.returncode, bytes(received)


class HeaderReporter(socketserver.BaseRequestHandler):
    """A TCP handler behind the mixin: answers one JSON line, the header's family, source and destination."""

    def handle(self) -> None:
        header = self.request.proxy_header
        report = {
            "client_address": list(self.client_address[:2]),
            "family": None if header is None else header.family.name,
            "source": None if header is None else list(header.source[:2]),
            "destination": None if header is None else list(header.destination[:2]),
        }
        self.request.sendall(json.dumps(report).encode() + b"\n")


@contextlib.contextmanager
def tcp_header_server(host: str = "127.0.0.1") -> Iterator[Any]:
    """``proxyproto.ThreadingProxyTCPServer`` (policy REQUIRE, loopback trusted) with :class:`HeaderReporter`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    attrs = {"address_family": family, "daemon_threads": True, "proxy_policy": proxyproto.Policy.REQUIRE}
    server = type("CLITCPServer", (proxyproto.ThreadingProxyTCPServer,), attrs)((host, 0), HeaderReporter)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


class Process:
    """A background process whose stdout and stderr go to one file."""

    def __init__(self, argv: Sequence[str], workdir: Path, name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, cwd=ROOT
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fail (with the output) after ``timeout``."""
        found: list[re.Match[str]] = []

        def check() -> bool:
            match = re.search(pattern, self.output())
            if match:
                found.append(match)
                return True
            assert self.popen.poll() is None, f"process exited {self.popen.returncode}:\n{self.output()}"
            return False

        assert wait_until(check, timeout), f"no {pattern!r} within {timeout}s:\n{self.output()}"
        return found[0]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal this PID, kill it after a bounded wait, reap it; return its exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return int(self.popen.returncode)


@contextlib.contextmanager
def demo_server(workdir: Path, *extra: str) -> Iterator[tuple[Process, int]]:
    """``demo_echo_server.py --port 0`` (policy USE by default); yields it and its port."""
    if not DEMO.exists():
        pytest.fail(f"{DEMO} is missing (written by the lead)")
    proc = Process([sys.executable, str(DEMO), "--host", "127.0.0.1", "--port", "0", *extra], workdir, "demo")
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        yield proc, port
    finally:
        proc.stop()


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def require_ipv6() -> None:
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) here")


class Reporter(udp.ProxyDatagramRequestHandler):
    """Answers each datagram (to the proxy, as the library does) with what its handler saw, as JSON + newline."""

    def handle(self) -> None:
        header = self.request.proxy_header
        report = {
            "client_address": list(self.client_address[:2]),
            "proxy_address": list(self.request.proxy_address[:2]),
            "payload": self.rfile.read().decode("latin-1"),
            "header": None
            if header is None
            else {
                "command": header.command.name,
                "family": header.family.name,
                "protocol": header.protocol.name,
                "destination": list(header.destination[:2]) if isinstance(header.destination, tuple) else None,
            },
        }
        self.server.reports.append(report)  # type: ignore[attr-defined]
        self.wfile.write(json.dumps(report).encode() + b"\n")


@contextlib.contextmanager
def udp_server(host: str = "127.0.0.1") -> Iterator[Any]:
    """``proxyproto.udp.ThreadingProxyUDPServer`` with :class:`Reporter` on ``host``, port 0 (loopback trusted).

    ``server.reports`` lists what each handler saw, in arrival order.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    cls = type("CLIUDPServer", (udp.ThreadingProxyUDPServer,), {"address_family": family, "daemon_threads": True})
    server = cls((host, 0), Reporter)
    server.reports = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def relay(workdir: Path, upstream_port: int, *extra: str) -> Iterator[tuple[Process, int]]:
    """``python -m proxyproto relay --listen 127.0.0.1:0``; yields it and the port it listens on."""
    proc = Process(
        [
            sys.executable,
            "-m",
            "proxyproto",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{upstream_port}",
            *extra,
        ],
        workdir,
        "relay",
    )
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        yield proc, port
    finally:
        proc.stop()


@contextlib.contextmanager
def cli_background(workdir: Path, *args: str, name: str = "cli") -> Iterator[tuple[Process, int]]:
    """``python -m proxyproto ARGS`` in the background (a relay); yields it and the port of its "listening on" line."""
    proc = Process([sys.executable, "-m", "proxyproto", *args], workdir, name)
    try:
        port = int(proc.wait_for(r"listening on (?:\[[^\]]*\]|[\d.]+):(\d+)").group(1))
        yield proc, port
    finally:
        proc.stop()


@contextlib.contextmanager
def haproxy(workdir: Path, body: str, port: int) -> Iterator[Process]:
    """``haproxy -db`` with a generated config (logging to stdout); stopped by PID at exit."""
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
    proc = Process([exe, "-f", str(cfg), "-db"], workdir, "haproxy")
    try:
        assert wait_until(lambda: listening(port) or proc.popen.poll() is not None), proc.output()
        assert proc.popen.poll() is None, proc.output()
        yield proc
    finally:
        proc.stop()
