"""``demo_echo_server.py`` as a user starts it: IPv6 hosts, and one-line errors.

The real script runs in a subprocess on loopback (port 0, or a port this test holds busy);
its log goes to a file read while it runs, and it is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import proxyproto

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_echo_server.py"
WAIT = 10.0


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    """The demo to completion (it must exit by itself: a startup error)."""
    return subprocess.run(
        [sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
    )


@contextlib.contextmanager
def demo(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """The demo serving in the background; yields it, its log file and its port."""
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(DEMO), *args], stdout=out, stderr=out, cwd=ROOT)
    try:
        deadline = time.monotonic() + WAIT
        while not (match := re.search(r"listening on \S+:(\d+)", log.read_text())):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield proc, log, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def session(address: tuple[str, int], data: bytes) -> bytes:
    """Connect, send ``data``, half-close, return everything the demo answered."""
    with socket.create_connection(address, timeout=WAIT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_demo_on_ipv6_loopback_answers_with_and_without_header(tmp_path: Path) -> None:
    with demo(tmp_path, "--host", "::1", "--port", "0") as (_, log, port):
        assert f"listening on [::1]:{port}" in log.read_text()
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
            client.bind(("::1", 0))
            client.settimeout(WAIT)
            client.connect(("::1", port))
            own_port = client.getsockname()[1]
            client.sendall(b"inkel\n")
            client.shutdown(socket.SHUT_WR)
            direct = b""
            while chunk := client.recv(4096):
                direct += chunk
        assert direct == f"Your remote address is [::1]:{own_port}\n".encode()
        v1 = session(("::1", port), b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 7654\r\ninkel\n")
        assert v1 == b"Your remote address is [2001:db8::7]:4242\n"
        header = proxyproto.encode_v2(("192.0.2.10", 51234), ("198.51.100.20", 7654))
        assert session(("::1", port), header + b"inkel\n") == b"Your remote address is 192.0.2.10:51234\n"
        deadline = time.monotonic() + WAIT
        while log.read_text().count('client sent 6 bytes: "inkel\\n"') < 3:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        text = log.read_text()
    assert "handling connection from [2001:db8::7]:4242" in text
    assert "Traceback" not in text


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_demo_accepts_a_bracketed_ipv6_host(tmp_path: Path) -> None:
    with demo(tmp_path, "--host", "[::1]", "--port", "0") as (_, _, port):
        assert session(("::1", port), b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nx") == (
            b"Your remote address is 192.0.2.1:1\n"
        )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 2 and exactly one line on stderr, no traceback; that line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("demo_echo_server.py: error: ")
    return lines[0]


def test_demo_busy_port_is_one_line_and_exit_2() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        line = one_line_error(run_demo("--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trusted", "10.0.0.0/33"], "--trusted: cannot read '10.0.0.0/33'"),
        (["--trusted", "127.0.0.1", "--trusted", "not-a-network"], "--trusted: cannot read 'not-a-network'"),
        (["--header-timeout", "0"], "--header-timeout: must be a number of seconds from 0.001 to 3600"),
        (["--host", "::1%no-such-interface"], "--host '::1%no-such-interface': cannot resolve it"),
    ],
)
def test_demo_bad_option_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    line = one_line_error(run_demo(*args, "--port", "0"))
    assert expected in line


def test_demo_default_still_ipv4_with_the_article_output(tmp_path: Path) -> None:
    """No --host: 127.0.0.1 as before, the article's lines unchanged (SEED-NOTES)."""
    with demo(tmp_path, "--port", "0") as (_, log, port):
        answer = session(("127.0.0.1", port), b"PROXY TCP4 192.168.1.12 192.168.1.20 58472 27654\r\ninkel\n")
        assert answer == b"Your remote address is 192.168.1.12:58472\n"
        deadline = time.monotonic() + WAIT
        while 'client sent 6 bytes: "inkel\\n"' not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        text = log.read_text()
    assert f"listening on 127.0.0.1:{port} (threading server, policy USE)" in text
    assert "handling connection from 192.168.1.12:58472" in text


def test_demo_subclasses_the_server_class_and_leaves_the_librarys_alone() -> None:
    spec = importlib.util.spec_from_file_location("demo_echo_server_under_test", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(
        host="127.0.0.1", port=0, mode="threading", policy="USE", trusted=["127.0.0.1"], header_timeout=3.0
    )
    server = module.build_server(args)
    try:
        assert isinstance(server, proxyproto.ThreadingProxyTCPServer) and server.allow_reuse_address
        assert proxyproto.ThreadingProxyTCPServer.allow_reuse_address is False
    finally:
        server.server_close()


def test_demo_help_states_its_trust_default() -> None:
    result = run_demo("--help")
    assert result.returncode == 0
    assert "default: 127.0.0.1 and ::1, loopback only" in " ".join(result.stdout.split())


def test_demo_trusts_loopback_only_by_default_and_logs_it(tmp_path: Path) -> None:
    """From 127.0.0.1 the article's header is used; from 127.0.0.2 (not trusted) it is payload."""
    line = b"PROXY TCP4 192.168.1.12 192.168.1.20 58472 27654\r\n"
    with demo(tmp_path, "--port", "0") as (_, log, port):
        assert session(("127.0.0.1", port), line + b"inkel\n") == b"Your remote address is 192.168.1.12:58472\n"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.bind(("127.0.0.2", 0))
            client.settimeout(WAIT)
            client.connect(("127.0.0.1", port))
            own_port = client.getsockname()[1]
            client.sendall(line + b"inkel\n")
            client.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
        assert answer == f"Your remote address is 127.0.0.2:{own_port}\n".encode()
        deadline = time.monotonic() + WAIT
        while "client sent 56 bytes" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        text = log.read_text()
    assert "PROXY headers trusted from 127.0.0.1, ::1" in text
    assert "any client can claim any address" not in text


def test_demo_warns_when_told_to_trust_every_peer(tmp_path: Path) -> None:
    with demo(tmp_path, "--port", "0", "--trusted", "*") as (_, log, _port):
        deadline = time.monotonic() + WAIT
        while "any client can claim any address" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
