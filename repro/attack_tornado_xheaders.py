"""Tornado ProxyHTTPServer(xheaders=True): which forwarded headers a client behind a TCP-mode proxy can set.

Usage: python repro/attack_tornado_xheaders.py [policy=IGNORE ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

from attack_kit import V1, V1_UNKNOWN, one, request, v2  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python  # noqa: E402

SPOOF = "X-Forwarded-For: 198.51.100.66\r\nX-Real-Ip: 198.51.100.66\r\nX-Forwarded-Proto: https\r\n"
with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    with command(
        python(str(ROOT / "repro" / "tornado_server.py"), str(port), "xheaders", *sys.argv[1:]), port, workdir=Path(tmp)
    ):
        a = ("127.0.0.1", port)
        print("trusted PROXY header + client's X-* lines:", one(a, [V1 + request(extra=SPOOF)]))
        print("trusted UNKNOWN header + client's X-* lines:", one(a, [V1_UNKNOWN + request(extra=SPOOF)]))
        print("trusted LOCAL header + client's X-* lines:", one(a, [v2(local=True) + request(extra=SPOOF)]))
        print("untrusted, no header, X-* lines:", one(a, [request(extra=SPOOF)], local="127.0.0.2"))
