"""Helpers for the command-line tests: run ``python -m proxyproto``, the demo server, haproxy.

Every process is started here on loopback with ports picked at run time, and stopped by PID.
Output goes to files, read while the process runs (no pipe can fill up and stall it).
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from support import listening, require_haproxy

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
