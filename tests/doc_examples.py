"""Helpers that run the examples of README.rst and docs/*.rst as a reader would.

Used by tests/test_readme.py, tests/test_docs.py, tests/cli/test_cli_beyond_docs.py
and tests/interop/test_interop_readme_walkthrough.py.  ``tests/`` is on
``sys.path`` for every test module, so ``from doc_examples import ...`` works
from any subdirectory.

A page's fixed ports (8000, 7654, 17654, 27654, 37654) are replaced by free
ones; programs started in the background are stopped by PID.
"""

from __future__ import annotations

import doctest
import io
import re
import shlex
import shutil
import socketserver
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import IN_CI, listening, require_module

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.rst"
DOCS = ROOT / "docs"

_BLOCK = re.compile(r"^\.\. code-block:: (\w+)\n\n((?:(?:    .*)?\n)+)", re.MULTILINE)
_LITERAL = re.compile(r"::\n\n((?:(?:    .*)?\n)+)", re.MULTILINE)


@dataclass
class Block:
    kind: str  # python, console, sh, text
    source: str  # dedented
    line: int  # 1-based line of the directive

    @property
    def name(self) -> str:
        return f"{self.kind} block at line {self.line}"


def code_blocks(path: Path, kind: str | None = None) -> list[Block]:
    """The ``.. code-block::`` bodies of a page, dedented, in page order."""
    text = path.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        if kind is None or match.group(1) == kind:
            body = "\n".join(line[4:] for line in match.group(2).splitlines()).strip("\n") + "\n"
            found.append(Block(match.group(1), body, text.count("\n", 0, match.start()) + 1))
    return found


def literal_blocks(path: Path) -> list[str]:
    """The ``::`` literal blocks of a page, dedented."""
    return [
        "\n".join(line[4:] for line in m.group(1).splitlines()).strip("\n") + "\n"
        for m in _LITERAL.finditer(path.read_text())
    ]


def rendering_warnings(path: Path) -> str:
    """What docutils reports at WARNING or above while parsing the page ('' when clean).

    With pygments installed (as on PyPI's renderer) every code block's language
    must also be one pygments knows.
    """
    core = require_module("docutils.core")
    try:
        import pygments  # noqa: F401

        highlight = "long"
    except ImportError:
        highlight = "none"
    stream = io.StringIO()
    core.publish_doctree(  # type: ignore[attr-defined]
        path.read_text(),
        source_path=str(path),
        settings_overrides={
            "report_level": 2,
            "halt_level": 5,
            "warning_stream": stream,
            "syntax_highlight": highlight,
        },
    )
    return stream.getvalue()


def relative_links(path: Path) -> list[str]:
    """Targets of the page's links that are not URLs (``docs/x.rst``, ``x.rst#anchor``)."""
    targets = re.findall(r"`[^`<]*<([^<>`\s]+)>`__?", path.read_text())
    return [t for t in targets if "://" not in t and not t.startswith("mailto:")]


def missing_link_targets(path: Path) -> list[str]:
    return [t for t in relative_links(path) if not (path.parent / t.split("#")[0]).resolve().exists()]


def run_doctests(path: Path) -> doctest.TestResults:
    return doctest.testfile(str(path), module_relative=False, optionflags=doctest.ELLIPSIS)


def exec_block(source: str, name: str) -> dict[str, object]:
    """Execute a Python block; close any server it built."""
    namespace: dict[str, object] = {"__name__": "doc_example"}
    try:
        exec(compile(source, name, "exec"), namespace)
    finally:
        for value in namespace.values():
            if isinstance(value, socketserver.BaseServer):
                value.server_close()
    return namespace


# --- shell sessions ----------------------------------------------------------------------


def require_nc() -> str:
    """Debian's netcat-openbsd; skip locally, fail under CI=true when missing."""
    path = shutil.which("nc")
    if path is None:
        if IN_CI:
            pytest.fail("nc (netcat-openbsd) is not installed (CI=true: a missing program is a failure)", pytrace=False)
        pytest.skip("nc (netcat-openbsd) is not installed")
    return path


def substitute_ports(text: str, ports: Mapping[int, int]) -> str:
    """Replace each of the page's fixed ports by its free stand-in (whole numbers only)."""
    if not ports:
        return text
    pattern = re.compile(r"(?<![\d.])(" + "|".join(str(p) for p in sorted(ports, reverse=True)) + r")(?!\d)")
    return pattern.sub(lambda m: str(ports[int(m.group(1))]), text)


def runnable(command: str) -> str:
    """A shell command of a page, run with this interpreter and this checkout's package."""
    command = re.sub(r"^python3 ", shlex.quote(sys.executable) + " ", command)
    module = shlex.quote(sys.executable) + " -m proxyproto "
    command = re.sub(r"(^|\| |; do )proxyproto ", lambda m: m.group(1) + module, command)
    return command


@dataclass
class Session:
    """A ``console`` block: ``$`` commands, each followed by the output it shows."""

    steps: list[tuple[str, str]]  # (command, expected output)

    @classmethod
    def parse(cls, block: str) -> Session:
        steps: list[tuple[str, str]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], ""))
            else:
                command, output = steps[-1]
                steps[-1] = (command, output + line + "\n")
        return cls(steps)


def output_pattern(expected: str, fixed: Mapping[int, int]) -> re.Pattern[str]:
    """The expected output as a regex: a loopback client's port, which the page cannot know, matches any port."""
    pattern = ""
    pos = 0
    for m in re.finditer(r"127\.0\.0\.\d+:(\d+)", expected):
        pattern += re.escape(expected[pos : m.start(1)])
        shown = int(m.group(1))
        pattern += str(fixed[shown]) if shown in fixed else r"\d+"
        pos = m.end(1)
    pattern += re.escape(expected[pos:])
    return re.compile(pattern)


class Background:
    """Programs a session starts with ``&``, stopped by PID at the end."""

    def __init__(self, cwd: Path, logdir: Path) -> None:
        self.cwd = cwd
        self.logdir = logdir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, command: str, listen: int) -> subprocess.Popen[bytes]:
        argv = shlex.split(runnable(command))
        log = self.logdir / f"bg{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        deadline = time.monotonic() + 15
        while not listening(listen):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{command!r} is not listening on {listen}:\n{log.read_text(errors='replace')}")
            time.sleep(0.02)
        return proc

    def log(self, index: int) -> str:
        return self.procs[index][1].read_text(errors="replace")

    def stop_one(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop(self) -> None:
        for proc, _ in self.procs:
            self.stop_one(proc)


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Background]:
    bg = Background(ROOT, tmp_path)
    yield bg
    bg.stop()


def run_foreground(command: str, ports: Mapping[int, int], cwd: Path = ROOT) -> str:
    result = subprocess.run(
        ["bash", "-c", runnable(substitute_ports(command, ports))],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{command!r} exited {result.returncode}: {result.stderr}"
    return result.stdout


def assert_output(command: str, expected: str, actual: str, ports: Mapping[int, int]) -> None:
    pattern = output_pattern(substitute_ports(expected, {}), ports)
    assert pattern.fullmatch(actual), f"{command!r} printed:\n{actual}\nthe page shows:\n{expected}"


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False
