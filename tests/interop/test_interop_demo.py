"""The article's demo, reproduced: demo_echo_server.py behind a real haproxy (SEED-NOTES.md).

haproxy gets the article's two listeners, one plain (``wo-send-proxy``) and one
with ``send-proxy`` (``w-send-proxy``); the client runs the article's session,
one connection straight to the server and one through each listener, sending
``inkel\\n``.  The client binds 127.0.0.2 so that its address differs from
haproxy's (127.0.0.1), as 192.168.1.12 differed from 192.168.1.20.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from interop_support import ProcessRunner, free_port, haproxy_config, missing, wait_until

ROOT = Path(__file__).resolve().parents[2]
CLIENT_HOST = "127.0.0.2"


class Demo:
    """demo_echo_server.py in a subprocess, its log in a file, stopped by PID."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = workdir / f"demo-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [sys.executable, str(ROOT / "demo_echo_server.py"), "--port", str(self.port), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        if not wait_until(lambda: "listening on" in self.log(), 10.0):
            self.stop()
            raise AssertionError(f"demo did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, count: int = 1) -> None:
        assert wait_until(lambda: self.log().count(text) >= count, 10.0), f"{text!r} x{count} not in:\n{self.log()}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@pytest.fixture
def demo_factory(workdir: Path) -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.stop()


def start_demo(started: list[Demo], workdir: Path, *args: str) -> Demo:
    demo = Demo(workdir, *args)
    started.append(demo)
    return demo


def article_session(port: int) -> tuple[str, int]:
    """``echo inkel | nc -N 127.0.0.1 PORT`` from 127.0.0.2: the server's answer and our port."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT_HOST, 0)) as sock:
        own_port = sock.getsockname()[1]
        sock.sendall(b"inkel\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode(), own_port


def article_haproxy(procs: ProcessRunner, server_port: int) -> tuple[int, int]:
    plain, proxied = free_port(), free_port()
    config = haproxy_config(
        f"""
listen wo-send-proxy
    bind 127.0.0.1:{plain}
    server app1 127.0.0.1:{server_port}

listen w-send-proxy
    bind 127.0.0.1:{proxied}
    server app1 127.0.0.1:{server_port} send-proxy
"""
    )
    procs.haproxy(config, [("127.0.0.1", plain), ("127.0.0.1", proxied)])
    return plain, proxied


def test_demo_behind_haproxy_reports_real_client_with_send_proxy(
    procs: ProcessRunner, workdir: Path, demo_factory: list[Demo]
) -> None:
    """With PROXY support: direct and send-proxy report the client, the plain listener the proxy."""
    demo = start_demo(demo_factory, workdir)
    plain, proxied = article_haproxy(procs, demo.port)

    direct_answer, direct_port = article_session(demo.port)
    assert direct_answer == f"Your remote address is {CLIENT_HOST}:{direct_port}\n"

    plain_answer, _ = article_session(plain)
    assert plain_answer.startswith("Your remote address is 127.0.0.1:")

    proxied_answer, proxied_port = article_session(proxied)
    assert proxied_answer == f"Your remote address is {CLIENT_HOST}:{proxied_port}\n"

    demo.wait_log('client sent 6 bytes: "inkel\\n"', count=3)
    assert "client sent 56" not in demo.log()
    assert f"handling connection from {CLIENT_HOST}:{proxied_port}" in demo.log()


def test_demo_without_proxy_support_sees_the_header_as_payload(
    procs: ProcessRunner, workdir: Path, demo_factory: list[Demo]
) -> None:
    """With --policy SKIP (no PROXY support) the send-proxy connection logs header + payload, as in the article."""
    demo = start_demo(demo_factory, workdir, "--policy", "SKIP")
    _, proxied = article_haproxy(procs, demo.port)
    answer, own_port = article_session(proxied)
    assert answer.startswith("Your remote address is 127.0.0.1:")
    line = f"PROXY TCP4 {CLIENT_HOST} 127.0.0.1 {own_port} {proxied}\\r\\ninkel\\n"
    size = len(line.replace("\\r", "\r").replace("\\n", "\n"))
    demo.wait_log(f'client sent {size} bytes: "{line}"')


def test_readme_demo_command_with_netcat(workdir: Path, demo_factory: list[Demo]) -> None:
    """The README's session: the article's header piped through Debian's ``nc -N``."""
    if shutil.which("nc") is None:
        missing("nc (netcat-openbsd) is not installed")
    demo = start_demo(demo_factory, workdir)
    header = "PROXY TCP4 192.168.1.12 192.168.1.20 58472 27654\r\ninkel\n"
    result = subprocess.run(
        ["nc", "-N", "127.0.0.1", str(demo.port)],
        input=header.encode(),
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.stdout == b"Your remote address is 192.168.1.12:58472\n"
    demo.wait_log('client sent 6 bytes: "inkel\\n"')
    assert "handling connection from 192.168.1.12:58472" in demo.log()


def test_demo_answers_a_silent_client_after_the_header_timeout(workdir: Path, demo_factory: list[Demo]) -> None:
    """USE serves a client that sends nothing once the (short) header timeout passes (G6 for banners)."""
    demo = start_demo(demo_factory, workdir, "--header-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", demo.port), timeout=10, source_address=(CLIENT_HOST, 0)) as sock:
        own_port = sock.getsockname()[1]
        banner = sock.recv(4096)
    assert banner == f"Your remote address is {CLIENT_HOST}:{own_port}\n".encode()
