"""Helpers shared by the test directories that run real programs (aio, cli).

``tests/`` is on ``sys.path`` for every test module (pytest puts the
directory of ``tests/conftest.py`` there), so ``from support import ...``
works from any subdirectory.
"""

from __future__ import annotations

import os
import shutil
import socket

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
