"""Control: STOCK gunicorn gthread (no proxyproto) with --certfile, 10 clients that send 3 bytes of a TLS record and stall.

Shows whether a pool thread stays blocked (the same stall as proxyproto.gunicorn.GThread's, attack_tls.py T3).
Usage: python repro/control_stock_gthread_tls.py [proxyproto]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

from attack_kit import V1, connect  # noqa: E402
from attack_tls import tls_request  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python, self_signed  # noqa: E402

ours = "proxyproto" in sys.argv[1:]
with tempfile.TemporaryDirectory() as tmp:
    cert = self_signed(Path(tmp))
    port = free_port()
    worker = "proxyproto.gunicorn.GThread" if ours else "gthread"
    args = python(
        "-m",
        "gunicorn",
        "--no-control-socket",
        "-k",
        worker,
        "--workers",
        "1",
        "-b",
        f"127.0.0.1:{port}",
        "--certfile",
        str(cert.cert),
        "--keyfile",
        str(cert.key),
        "--timeout",
        "30",
        "gunicorn_kit:wsgi_app",
    )
    with command(args, port, env={"PROXYPROTO_HEADER_TIMEOUT": "2"}, workdir=Path(tmp)):
        time.sleep(1.0)
        head = V1 if ours else b""
        stalled = []
        for _ in range(10):
            s = connect(("127.0.0.1", port))
            s.sendall(head + b"\x16\x03\x01")
            stalled.append(s)
        for wait in (1, 12):
            time.sleep(wait)
            start = time.monotonic()
            print(
                f"{worker}: probe after the stalled clients waited {wait} s more:",
                str(tls_request(("127.0.0.1", port), head))[:80],
                f"{time.monotonic() - start:.1f}s",
            )
        for s in stalled:
            s.close()
