"""Daphne on ``proxyproto:unix:PATH`` with Twisted's default mode (0666: anyone may connect) and with
mode=660: is the header's client used only for the restricted socket?

Usage: python repro/attack_daphne_unix.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n"
GET = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"


def ask(path: str) -> tuple[str, object]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(8)
        sock.connect(path)
        sock.sendall(V1 + GET)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if head else "closed"
    try:
        return status, json.loads(body)["client"]
    except ValueError:
        return status, body[:60]


with tempfile.TemporaryDirectory() as tmp:
    for option in ("", ":mode=660"):
        path = os.path.join(tmp, f"app{len(option)}.sock")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "web")])}
        with open(os.path.join(tmp, "out"), "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "daphne", "-e", f"proxyproto:unix:{path}{option}",
                                     "gunicorn_kit:asgi_app"], stdout=out, stderr=out, env=env,
                                    stdin=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 20
                while not os.path.exists(path) and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.3)
                mode = oct(os.stat(path).st_mode & 0o777)
                print(f"unix socket mode {mode}: header + request ->", ask(path))
            finally:
                proc.terminate()
                proc.wait(10)
