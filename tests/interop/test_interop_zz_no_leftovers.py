"""Runs last in the interop directory: no haproxy or nginx started by the suite survives.

The session finaliser in ``conftest.py`` makes the same check after every test
has been torn down; this test reports it as a test result too (issue 4,
acceptance 3), after every test module collected before it.
"""

from __future__ import annotations

from interop_support import STARTED, leftover_processes


def test_no_interop_process_left_behind() -> None:
    """Every proxy process started so far has exited and been reaped."""
    assert leftover_processes() == [], [p.pid for p in STARTED]
