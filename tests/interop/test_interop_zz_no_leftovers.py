"""Runs last in the interop directory: no haproxy, nginx or other sender started by the suite survives.

The session finaliser in ``conftest.py`` makes the same check after every test
has been torn down; this test reports it as a test result too (issue 4,
acceptance 3), after every test module collected before it.  The senders of
issue 12 (dnsdist, stunnel, hitch, varnishd, h2o) fork workers, so for them
the whole session each was started in is checked, and ``/proc`` is searched
for any such program still running below this pytest process.
"""

from __future__ import annotations

import os
from pathlib import Path

from interop_support import STARTED, leftover_processes
from senders_support import leftover_senders

#: The senders of issue 12, by executable name.
SENDER_PROGRAMS = (b"dnsdist", b"stunnel", b"hitch", b"varnishd", b"h2o")


def test_no_interop_process_left_behind() -> None:
    """Every proxy process started so far has exited and been reaped."""
    assert leftover_processes() == [], [p.pid for p in STARTED]


def test_no_sender_or_its_children_left_behind() -> None:
    """dnsdist, stunnel, hitch, varnishd and h2o, and everything each of them forked, have exited."""
    assert leftover_senders() == []


def _stat(pid: str) -> tuple[str, int]:
    """(state, parent PID) of a process, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def test_no_sender_running_below_this_test_session() -> None:
    """No live dnsdist, stunnel, hitch, varnishd or h2o descends from this pytest process.

    Descendants only: another engineer's test session on the same machine may
    legitimately be running these programs right now.
    """
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state, parent = _stat(entry.name)
            program = Path(cmdline.split(b"\0", 1)[0].decode(errors="replace")).name.encode()
            if state == "Z" or program not in SENDER_PROGRAMS:
                continue
            while parent not in (0, 1, me):
                parent = _stat(str(parent))[1]
        except (OSError, IndexError):
            continue
        if parent == me:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"pid {entry.name}: {shown}")
    assert found == []
