"""Helpers shared by the test directories: real programs, event loops, in-process uvicorn.

``tests/`` is on ``sys.path`` for every test module (pytest puts the
directory of ``tests/conftest.py`` there), so ``from support import ...``
works from any subdirectory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

#: Under CI a missing program is a failure, locally a skip.
IN_CI = os.environ.get("CI") == "true"


def require_haproxy() -> str:
    """haproxy's path; skip locally and fail under CI=true when it is missing."""
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        if IN_CI:
            pytest.fail("haproxy is not installed (CI=true: a missing program is a failure)", pytrace=False)
        pytest.skip("haproxy is not installed")
    return path


#: Set by .ci/run for its run with only the ``[test]`` extra: optional Python
#: packages (uvicorn, aiohttp, google-crc32c, ...) are then expected to be missing.
MINIMAL_INSTALL = os.environ.get("PROXYPROTO_MINIMAL_INSTALL") == "1"


def require_module(name: str) -> object:
    """Import an optional package; skip when missing, but fail under CI=true unless the install is minimal.

    Callable at module level (the whole module is then skipped) or in a test.

    The README offers ``pip install -e '.[test]'`` (every optional package
    missing: the tests that need one skip) and ``bash .ci/run`` (every extra
    installed: a missing one is a broken CI, not a skip).
    """
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        if IN_CI and not MINIMAL_INSTALL:
            pytest.fail(f"{name} is not installed (CI=true: a missing package is a failure)", pytrace=False)
        pytest.skip(f"{name} is not installed (an optional extra)", allow_module_level=True)


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether a TCP port is in LISTEN state, from the kernel's table (no probe connection).

    Connecting to a proxy's frontend to see whether it is up would make it
    open an upstream connection and send a header to the server under test.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


#: Runs the script named next as a terminal would, with Ctrl-C (SIGINT) raising KeyboardInterrupt.
#: A program started in the background by a non-interactive shell inherits SIGINT *ignored*
#: (POSIX, for asynchronous lists without job control), Python keeps that, and ``asyncio.run``
#: then installs no handler of its own: a test that stops an example with SIGINT would wait for
#: its SIGKILL instead (seen with ``bash .ci/run &`` from a script).
CTRL_C_ABLE = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def python_script(path: object) -> list[str]:
    """The command line that runs the Python script ``path`` with Ctrl-C working (:data:`CTRL_C_ABLE`)."""
    import sys

    return [sys.executable, "-c", CTRL_C_ABLE, str(path)]


# -- event loops and in-process uvicorn -----------------------------------------------------

#: How long a scenario may run before it fails: a bug fails a test but never hangs the suite.
CEILING = 30.0


def async_test(func: Callable[..., Awaitable[Any]]) -> Callable[..., None]:
    """Run an ``async def`` test in a fresh event loop, bounded by ``CEILING`` seconds."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(func(*args, **kwargs), CEILING)

        asyncio.run(bounded())

    return wrapper


def run_on(loop: str, scenario: Callable[[], Awaitable[Any]], ceiling: float = CEILING) -> None:
    """Run ``scenario()`` in a fresh asyncio or uvloop event loop, bounded by ``ceiling`` seconds."""

    async def bounded() -> None:
        await asyncio.wait_for(scenario(), ceiling)

    if loop == "uvloop":
        uvloop: Any = require_module("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(bounded())
    else:
        asyncio.run(bounded())


@contextlib.asynccontextmanager
async def uvicorn_server(app: Any, http: Any, **config: Any) -> AsyncIterator[tuple[Any, tuple[str, int]]]:
    """uvicorn serving the ASGI ``app`` on 127.0.0.1 in this loop, with ``http`` as its ``--http``;
    ``(server, address)`` once it listens, stopped (``should_exit``) when the block ends."""
    uvicorn: Any = require_module("uvicorn")
    settings = {"host": "127.0.0.1", "port": 0, "lifespan": "off", "log_level": "warning", **config}
    server = uvicorn.Server(uvicorn.Config(app, http=http, **settings))
    task = asyncio.ensure_future(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield server, server.servers[0].sockets[0].getsockname()[:2]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def self_signed_files(directory: Path) -> tuple[str, str]:
    """(certificate, key) paths for a self-signed localhost/127.0.0.1 certificate made in ``directory``.

    Made with the openssl command line tool (the ssl module cannot make
    one), with an EC key so that generation is instant; the test is skipped
    when the tool is missing.
    """
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return str(cert), str(key)
