"""``daphne --proxy-headers -e proxyproto:tcp:...``: does a client's X-Forwarded-For replace the PROXY header's address?

Usage: python repro/attack_daphne_proxy_headers.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

from attack_kit import V1, one, request  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command  # noqa: E402

SPOOF = "X-Forwarded-For: 198.51.100.66\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: 1\r\n"
with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "daphne",
        "--proxy-headers",
        "-e",
        f"proxyproto:tcp:{port}:interface=127.0.0.1",
        "gunicorn_kit:asgi_app",
    ]
    with command(args, port, workdir=Path(tmp)):
        a = ("127.0.0.1", port)
        print(
            "trusted PROXY header (client 203.0.113.7) + client's X-Forwarded-*:", one(a, [V1 + request(extra=SPOOF)])
        )
        print("untrusted peer, no header, X-Forwarded-*:", one(a, [request(extra=SPOOF)], local="127.0.0.2"))
