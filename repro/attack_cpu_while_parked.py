"""Does any server spin while connections are parked? 50 trusted connections send an ambiguous prefix (b"PR",
policy USE) or a partial header (policy REQUIRE) and stall; the server processes' CPU time over 1.5 s is measured.

Usage: python repro/attack_cpu_while_parked.py [tornado|daphne|sync|gthread|uvicorn]...
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import V1, connect  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its children (gunicorn's workers)."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def measure(pid: int, address, prefix: bytes) -> float:
    held = [connect(address) for _ in range(50)]
    for s in held:
        s.sendall(prefix)
    time.sleep(0.3)
    before = cpu_seconds(pid)
    time.sleep(1.5)
    used = cpu_seconds(pid) - before
    for s in held:
        s.close()
    return used


which = sys.argv[1:] or ["tornado", "daphne", "sync", "gthread", "uvicorn"]
with tempfile.TemporaryDirectory() as tmp:
    for name in which:
        for policy, prefix in (("USE", b"PR"), ("REQUIRE", V1[:12])):
            port = free_port()
            env = {"PROXYPROTO_HEADER_TIMEOUT": "5", "PROXYPROTO_POLICY": policy}
            if name == "tornado":
                ctx = command(
                    python(
                        str(ROOT / "repro" / "tornado_server.py"), str(port), "header_timeout=5", f"policy={policy}"
                    ),
                    port,
                    workdir=Path(tmp),
                )
            elif name == "daphne":
                ctx = command(
                    [
                        sys.executable,
                        "-m",
                        "daphne",
                        "-e",
                        f"proxyproto:tcp:{port}:interface=127.0.0.1",
                        "gunicorn_kit:asgi_app",
                    ],
                    port,
                    env=env,
                    workdir=Path(tmp),
                )
            else:
                ctx = gunicorn_kit.running_command(
                    gunicorn_kit.gunicorn_args(name, port, workers=1), port, Path(tmp), env=env, workers=1
                )
            with ctx as running:
                proc = getattr(running, "proc", running)
                used = measure(proc.pid, ("127.0.0.1", port), prefix)
            print(f"{name:8} policy {policy:7} 50 x {prefix!r:16}: server CPU {used:.2f} s in 1.5 s")
