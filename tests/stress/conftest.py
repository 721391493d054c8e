"""Stress, fault and fuzz tests (issue 5): marker registration and the descriptor limit.

Every test here is bounded in count and time, uses loopback or UNIX sockets
only, and finishes by itself.  The load tests hold several hundred sockets at
once, so the soft RLIMIT_NOFILE of the test process is raised to its hard limit.
"""

from __future__ import annotations

import pytest
from stress_kit import raise_nofile


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a heavy stress test (the whole directory still runs in CI)")
    raise_nofile()
