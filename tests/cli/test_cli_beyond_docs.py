"""The examples of docs/udp-asyncio-cli.rst run and show what the page says.

Python blocks are executed as they stand (they pick their ports at run time).
``console`` sessions are run through bash, ``proxyproto`` replaced by
``python -m proxyproto`` and the page's fixed ports (7654, 37654) by free
ones: the ``decode`` sessions must print exactly what the page shows; the
``send`` and ``relay`` sessions start the demo server (and the relay) in the
background, as the page does, and must print the page's answer (a loopback
client's own port, which the page cannot know, matches any port).  The
``--udp`` session runs against the server the page names: the UDP section's
``Echo`` handler on a ``ThreadingProxyUDPServer``, started here on a free port
in place of 5353; its relay (port 35353 on the page) is started as the page
starts it, and waited for until it says it is listening.  The usage errors the
page quotes (its ``text`` block) are what the commands print, line for line.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from doc_examples import (
    DOCS,
    ROOT,
    Background,
    Session,
    assert_output,
    background,  # noqa: F401  (fixture)
    code_blocks,
    exec_block,
    rendering_warnings,
    require_nc,
    run_foreground,
    runnable,
    substitute_ports,
)
from support import free_port

from proxyproto import udp

DOC = DOCS / "udp-asyncio-cli.rst"


def blocks(kind: str) -> list[str]:
    return [b.source for b in code_blocks(DOC, kind)]


def test_beyond_doc_has_examples_for_udp_asyncio_and_cli() -> None:
    python = "".join(blocks("python"))
    assert "udp." in python and "aio.start_server" in python and "aio.read_header" in python
    console = "".join(blocks("console"))
    assert all(f"proxyproto {command}" in console for command in ("decode", "send", "relay"))


#: Commands that print the usage errors the page shows (its one ``text`` block), one line each.
USAGE_ERROR_COMMANDS = [
    ["send", "127.0.0.1", "70000"],
    ["send", "--udp", "--v1", "127.0.0.1", "9"],
    ["relay", "--listen", "192.0.2.1:0", "--upstream", "127.0.0.1:9"],
]


def test_beyond_doc_usage_errors_are_what_the_cli_prints() -> None:
    (block,) = blocks("text")
    printed = []
    for args in USAGE_ERROR_COMMANDS:
        result = subprocess.run(
            [sys.executable, "-m", "proxyproto", *args], capture_output=True, text=True, cwd=ROOT, timeout=30
        )
        assert result.returncode == 2, result.stderr
        printed.append(result.stderr)
    assert "".join(printed) == block


def test_beyond_doc_renders_without_docutils_warnings() -> None:
    assert rendering_warnings(DOC) == ""


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_beyond_python_block_runs(index: int) -> None:
    exec_block(blocks("python")[index], f"udp-asyncio-cli.rst python block {index}")


def sessions() -> list[Session]:
    return [Session.parse(block) for block in blocks("console")]


DECODE_SESSIONS = [s for s in sessions() if all("proxyproto decode" in c for c, _ in s.steps)]
UDP_SESSIONS = [s for s in sessions() if any("--udp" in c for c, _ in s.steps)]
SERVER_SESSIONS = [s for s in sessions() if s not in DECODE_SESSIONS and s not in UDP_SESSIONS]


def test_every_console_session_is_run() -> None:
    assert len(DECODE_SESSIONS) >= 3
    assert [any("proxyproto send" in c for c, _ in s.steps) for s in SERVER_SESSIONS] == [True, False]
    assert any("proxyproto relay" in c for c, _ in SERVER_SESSIONS[1].steps)
    assert len(UDP_SESSIONS) == 1
    commands = " ".join(c for c, _ in UDP_SESSIONS[0].steps)
    assert "proxyproto send --udp" in commands and "proxyproto relay --udp" in commands


@pytest.mark.parametrize("index", range(len(DECODE_SESSIONS)))
def test_beyond_decode_session_prints_what_the_page_shows(index: int) -> None:
    for command, expected in DECODE_SESSIONS[index].steps:
        assert run_foreground(command, {}) == expected


@pytest.mark.parametrize("index", range(len(SERVER_SESSIONS)))
def test_beyond_server_session_prints_what_the_page_shows(index: int, background: Background) -> None:  # noqa: F811
    """``send`` against the demo; ``relay`` in front of the demo (which the page says is running)."""
    session = SERVER_SESSIONS[index]
    ports = {7654: free_port(), 37654: free_port()}
    demo_started = False
    for command, expected in session.steps:
        if command.endswith(" &"):
            argv = shlex.split(command[:-2])
            if "demo_echo_server.py" in command:
                demo_started = True
                background.start(substitute_ports(command[:-2], ports), listen=ports[7654])
                continue
            if not demo_started:  # "again with the demo running"
                background.start(f"python3 demo_echo_server.py --port {ports[7654]}", listen=ports[7654])
                demo_started = True
            listen = int(argv[argv.index("--listen") + 1].rsplit(":", 1)[1])
            background.start(substitute_ports(command[:-2], ports), listen=ports[listen])
            continue
        if command.split()[0] == "echo" and "| nc " in command:
            require_nc()
        assert_output(command, expected, run_foreground(command, ports), ports)


class Echo(udp.ProxyDatagramRequestHandler):
    """The ``Echo`` of the page's UDP section, as the ``--udp`` session says to run it."""

    def handle(self) -> None:
        data = self.rfile.read()
        host, port = self.client_address[:2]
        self.wfile.write(f"{host}:{port} sent {data!r}".encode())


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def echo_server(port: int) -> Iterator[None]:
    server = udp.ThreadingProxyUDPServer(("127.0.0.1", port), Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def started(command: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A session's ``... &`` command, until its "listening on" line; stopped by PID at exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            shlex.split(runnable(command)), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 15
        while "listening on" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
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


def test_beyond_udp_session_prints_what_the_page_shows(tmp_path: Path) -> None:
    """``send --udp`` to the Echo server, then a plain UDP client (nc -u) through ``relay --udp`` in front of it."""
    require_nc()
    ports = {5353: free_udp_port(), 35353: free_udp_port()}
    with contextlib.ExitStack() as stack:
        stack.enter_context(echo_server(ports[5353]))
        for index, (command, expected) in enumerate(UDP_SESSIONS[0].steps):
            if command.endswith(" &"):
                stack.enter_context(started(substitute_ports(command[:-2], ports), tmp_path / f"bg{index}.log"))
                continue
            assert_output(command, expected, run_foreground(command, ports), ports)
