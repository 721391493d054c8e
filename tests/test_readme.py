"""The README's examples run: doctest blocks are executed, every Python block compiles and imports.

Python blocks that start servers stop short of ``serve_forever()`` (it is
commented out or inside a function), so executing them builds real servers on
loopback (port 0 instead of the README's fixed ports) and proves the names
they use exist.
"""

from __future__ import annotations

import doctest
import re
import socketserver
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.rst"
_BLOCK = re.compile(r"^\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", re.MULTILINE)


def python_blocks() -> list[str]:
    """Python blocks before the UDP/asyncio/CLI section (tests/cli/test_cli_beyond_docs.py runs those)."""
    text = README.read_text()
    text = text[: text.index("Beyond stream servers: UDP, asyncio and the command line\n")]
    blocks = []
    for match in _BLOCK.finditer(text):
        lines = match.group(1).splitlines()
        blocks.append("\n".join(line[4:] for line in lines).strip() + "\n")
    return blocks


def test_readme_doctests_pass() -> None:
    """Every ``>>>`` example in the README gives the output shown."""
    failures, attempted = doctest.testfile(str(README), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert attempted >= 8
    assert failures == 0


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index: int) -> None:
    """Each plain Python block executes (servers are built on loopback, then closed)."""
    source = python_blocks()[index]
    if source.startswith(">>>"):
        return  # covered by the doctest run
    if "self.request.proxy_header" in source and "class " not in source:
        # A handler fragment: run it as the body of a handler method.
        source = "def handle(self):\n" + "\n".join("    " + line for line in source.splitlines()) + "\n"
    source = re.sub(r'\("127\.0\.0\.1", \d+\)', '("127.0.0.1", 0)', source)  # no fixed ports in tests
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(source, f"README.rst block {index}", "exec"), namespace)
    for value in namespace.values():
        if isinstance(value, socketserver.BaseServer):
            value.server_close()
