"""Out of descriptors: each server runs with ``ulimit -n 128`` and header_timeout 10 s; 200 silent trusted
connections arrive; is a probe still served (the parking's descriptor reserve evicts the oldest), and are
there tracebacks?

Usage: python repro/attack_descriptors.py [tornado|daphne|sync|gthread|uvicorn]...
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

LIMIT = ["prlimit", "--nofile=128:128", "--"]


def attack(address) -> None:
    silent = []
    for _ in range(200):
        try:
            silent.append(connect(address))
        except OSError as exc:
            print("   connect failed:", exc)
            break
    time.sleep(1.0)
    start = time.monotonic()
    print("   probe:", str(one(address, [V1 + request()]))[:80], f"{time.monotonic() - start:.2f}s")
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
    print(f"   silent connections still open: {open_} of {len(silent)}")


which = sys.argv[1:] or ["tornado", "daphne", "sync", "gthread", "uvicorn"]
env = {"PROXYPROTO_HEADER_TIMEOUT": "10"}
with tempfile.TemporaryDirectory() as tmp:
    for name in which:
        port = free_port()
        print(name)
        if name == "tornado":
            ctx = command(LIMIT + python(str(ROOT / "repro" / "tornado_server.py"), str(port), "header_timeout=10"),
                          port, workdir=Path(tmp))
        elif name == "daphne":
            ctx = command(LIMIT + [sys.executable, "-m", "daphne", "-e",
                                   f"proxyproto:tcp:{port}:interface=127.0.0.1:backlog=256", "gunicorn_kit:asgi_app"],
                          port, env=env, workdir=Path(tmp))
        else:
            ctx = gunicorn_kit.running_command(LIMIT + gunicorn_kit.gunicorn_args(name, port, workers=1), port,
                                               Path(tmp), env=env, workers=1)
        with ctx:
            attack(("127.0.0.1", port))
        lines = (Path(tmp) / f"server-{port}.out").read_text(errors="replace").splitlines()
        print("   tracebacks:", sum("Traceback" in line for line in lines), "| lines mentioning descriptors:",
              [line[-160:] for line in lines if "descriptor" in line.lower() or "Too many open files" in line][:2])
