"""IPv4 clients (127.0.0.1 trusted, 127.0.0.2 not) reaching a dual-stack [::] listener as IPv4-mapped peers.

Usage: python repro/attack_mapped_peers.py   (gunicorn Sync and GThread on [::], daphne on tcp6 ::)
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import V1, one, request, v2  # noqa: E402
from web_kit import command  # noqa: E402


def six_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def cases(port: int) -> None:
    a = ("127.0.0.1", port)
    print("   trusted mapped 127.0.0.1, v1 TCP4:", one(a, [V1 + request()]))
    print("   trusted mapped 127.0.0.1, v2 TCP4:", one(a, [v2() + request()]))
    print("   untrusted mapped 127.0.0.2, v1:", one(a, [V1 + request()], local="127.0.0.2"))
    print("   trusted ::1, v1 TCP4:", one(("::1", port), [V1 + request()]))


with tempfile.TemporaryDirectory() as tmp:
    for worker in ("sync", "gthread"):
        port = six_port()
        args = gunicorn_kit.gunicorn_args(worker, port, host="::", workers=1)
        with gunicorn_kit.running_command(args, port, Path(tmp), workers=1, host="::"):
            print(f"gunicorn {worker} on [::]:")
            cases(port)
    port = six_port()
    args = [sys.executable, "-m", "daphne", "-e", rf"proxyproto:tcp6:{port}:interface=\:\:", "gunicorn_kit:asgi_app"]
    with command(args, port, workdir=Path(tmp)):
        print("daphne proxyproto:tcp6 on :::")
        cases(port)
