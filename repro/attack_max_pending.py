"""max_pending=20, header_timeout=5: 60 silent trusted connections; how many does the server keep, and what does it log?

Usage: python repro/attack_max_pending.py [tornado|daphne|sync|gthread|uvicorn]...
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import V1, connect, one, request  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python  # noqa: E402


def attack(address) -> None:
    silent = [connect(address) for _ in range(60)]
    time.sleep(1.0)
    start = time.monotonic()
    print("   probe:", str(one(address, [V1 + request()]))[:90], f"{time.monotonic() - start:.2f}s")
    open_ = 0
    for s in silent:
        s.setblocking(False)
        try:
            if s.recv(1) != b"":
                open_ += 1
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
        s.close()
    print(f"   still open after 1 s: {open_} of 60 (max_pending 20)")


which = sys.argv[1:] or ["tornado", "daphne", "sync", "gthread", "uvicorn"]
env = {"PROXYPROTO_HEADER_TIMEOUT": "5", "PROXYPROTO_MAX_PENDING": "20"}
with tempfile.TemporaryDirectory() as tmp:
    for name in which:
        port = free_port()
        print(name)
        if name == "tornado":
            args = python(str(ROOT / "repro" / "tornado_server.py"), str(port), "header_timeout=5")
            args.append("max_pending=20")
            # tornado_server passes knobs as text: max_pending must be an int
            with command(args, port, workdir=Path(tmp)):
                attack(("127.0.0.1", port))
        elif name == "daphne":
            args = [
                sys.executable,
                "-m",
                "daphne",
                "-e",
                f"proxyproto:tcp:{port}:interface=127.0.0.1:backlog=200",
                "gunicorn_kit:asgi_app",
            ]
            with command(args, port, env=env, workdir=Path(tmp)):
                attack(("127.0.0.1", port))
        else:
            with gunicorn_kit.running_command(
                gunicorn_kit.gunicorn_args(name, port, workers=1), port, Path(tmp), env=env, workers=1
            ) as server:
                attack(server.address)
        lines = (Path(tmp) / f"server-{port}.out").read_text(errors="replace").splitlines()
        evicted = [line for line in lines if "max_pending" in line or "evict" in line.lower() or "suppressed" in line]
        print(
            f"   {len(evicted)} eviction/summary line(s); first:",
            evicted[:1],
            "tracebacks:",
            sum("Traceback" in line for line in lines),
        )
