"""150 trusted connections each send part of a header (v1 "PROXY TCP4 2", or 10 bytes of v2) and stall; a probe must be served at once.

Usage: python repro/attack_partial_slowloris.py [tornado|daphne|sync|gthread|uvicorn]...
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import V1, connect, one, request, v2  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python  # noqa: E402


def attack(address) -> None:
    held = []
    for i in range(150):
        s = connect(address)
        s.sendall(V1[:12] if i % 2 else v2()[:10])
        held.append(s)
    time.sleep(0.5)
    start = time.monotonic()
    print("   probe:", str(one(address, [V1 + request()]))[:70], f"{time.monotonic() - start:.2f}s")
    time.sleep(3.0)
    closed = 0
    for s in held:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    print(f"   after 3.5 s (header_timeout 2): {closed} of 150 closed by the server")


which = sys.argv[1:] or ["tornado", "daphne", "sync", "gthread", "uvicorn"]
env = {"PROXYPROTO_HEADER_TIMEOUT": "2"}
with tempfile.TemporaryDirectory() as tmp:
    for name in which:
        port = free_port()
        print(name)
        if name == "tornado":
            with command(
                python(str(ROOT / "repro" / "tornado_server.py"), str(port), "header_timeout=2"),
                port,
                workdir=Path(tmp),
            ):
                attack(("127.0.0.1", port))
        elif name == "daphne":
            args = [
                sys.executable,
                "-m",
                "daphne",
                "-e",
                f"proxyproto:tcp:{port}:interface=127.0.0.1:backlog=256",
                "gunicorn_kit:asgi_app",
            ]
            with command(args, port, env=env, workdir=Path(tmp)):
                attack(("127.0.0.1", port))
        else:
            with gunicorn_kit.running_command(
                gunicorn_kit.gunicorn_args(name, port, workers=1), port, Path(tmp), env=env, workers=1
            ) as server:
                attack(server.address)
        log = (Path(tmp) / f"server-{port}.out").read_text(errors="replace")
        print("   tracebacks in log:", log.count("Traceback"))
