"""The examples of the README's UDP, asyncio and CLI sections run.

Python blocks are executed as the README test executes them; ``console`` blocks whose
commands are all ``proxyproto decode`` are run through bash (``proxyproto`` replaced by
``python -m proxyproto``) and must print exactly what the page shows.  The ``send`` and
``relay`` sessions need a server on fixed ports and are not run here: ``test_cli_commands.py``
runs the same commands against the demo server on free ports.
"""

from __future__ import annotations

import re
import shlex
import socketserver
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "README.rst"
_BLOCK = re.compile(r"^\.\. code-block:: (python|console)\n\n((?:(?:    .*)?\n)+)", re.MULTILINE)


def section() -> str:
    """The README from its "Beyond stream servers" section to the next top-level one."""
    text = DOC.read_text()
    start = text.index("Beyond stream servers: UDP, asyncio and the command line\n")
    end = text.index("\nPlatform notes\n", start)
    return text[start:end]


def blocks(kind: str) -> list[str]:
    found = []
    for match in _BLOCK.finditer(section()):
        if match.group(1) == kind:
            lines = match.group(2).splitlines()
            found.append("\n".join(line[4:] for line in lines).strip() + "\n")
    return found


def test_beyond_doc_has_examples_for_udp_asyncio_and_cli() -> None:
    python = "".join(blocks("python"))
    assert "udp." in python and "aio.start_server" in python and "aio.read_header" in python
    console = "".join(blocks("console"))
    assert all(f"proxyproto {command}" in console for command in ("decode", "send", "relay"))


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_beyond_python_block_runs(index: int) -> None:
    source = blocks("python")[index]
    namespace: dict[str, object] = {"__name__": "beyond_example"}
    exec(compile(source, f"README.rst python block {index}", "exec"), namespace)
    for value in namespace.values():
        if isinstance(value, socketserver.BaseServer):
            value.server_close()


DECODE_SESSIONS = [
    block for block in blocks("console") if all("proxyproto decode" in c for c in re.findall(r"^\$ (.*)", block, re.M))
]


@pytest.mark.parametrize("index", range(len(DECODE_SESSIONS)))
def test_beyond_decode_session_prints_what_the_page_shows(index: int) -> None:
    session = DECODE_SESSIONS[index]
    command, _, expected = session.partition("\n")
    assert command.startswith("$ ")
    runnable = command[2:].replace("proxyproto decode", f"{shlex.quote(sys.executable)} -m proxyproto decode")
    result = subprocess.run(["bash", "-c", runnable], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
