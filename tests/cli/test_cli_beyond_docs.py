"""The examples of docs/udp-asyncio-cli.rst run and show what the page says.

Python blocks are executed as they stand (they pick their ports at run time).
``console`` sessions are run through bash, ``proxyproto`` replaced by
``python -m proxyproto`` and the page's fixed ports (7654, 37654) by free
ones: the ``decode`` sessions must print exactly what the page shows; the
``send`` and ``relay`` sessions start the demo server (and the relay) in the
background, as the page does, and must print the page's answer (a loopback
client's own port, which the page cannot know, matches any port).
"""

from __future__ import annotations

import shlex

import pytest
from doc_examples import (
    DOCS,
    Background,
    Session,
    assert_output,
    background,  # noqa: F401  (fixture)
    code_blocks,
    exec_block,
    rendering_warnings,
    require_nc,
    run_foreground,
    substitute_ports,
)
from support import free_port

DOC = DOCS / "udp-asyncio-cli.rst"


def blocks(kind: str) -> list[str]:
    return [b.source for b in code_blocks(DOC, kind)]


def test_beyond_doc_has_examples_for_udp_asyncio_and_cli() -> None:
    python = "".join(blocks("python"))
    assert "udp." in python and "aio.start_server" in python and "aio.read_header" in python
    console = "".join(blocks("console"))
    assert all(f"proxyproto {command}" in console for command in ("decode", "send", "relay"))


def test_beyond_doc_renders_without_docutils_warnings() -> None:
    assert rendering_warnings(DOC) == ""


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_beyond_python_block_runs(index: int) -> None:
    exec_block(blocks("python")[index], f"udp-asyncio-cli.rst python block {index}")


def sessions() -> list[Session]:
    return [Session.parse(block) for block in blocks("console")]


DECODE_SESSIONS = [s for s in sessions() if all("proxyproto decode" in c for c, _ in s.steps)]
SERVER_SESSIONS = [s for s in sessions() if s not in DECODE_SESSIONS]


def test_every_console_session_is_run() -> None:
    assert len(DECODE_SESSIONS) >= 3
    assert [any("proxyproto send" in c for c, _ in s.steps) for s in SERVER_SESSIONS] == [True, False]
    assert any("proxyproto relay" in c for c, _ in SERVER_SESSIONS[1].steps)


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
