"""Real gunicorn (1 worker) with each proxyproto worker class, attacked by repro/attack_kit.battery.

Usage: python repro/attack_gunicorn.py [sync|gthread|uvicorn|uvicorn-h11] [extra gunicorn flags...]
Prints what each case returned and the server log's proxyproto / Traceback lines.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import attack_kit  # noqa: E402
import gunicorn_kit  # noqa: E402
from support import free_port  # noqa: E402

worker = sys.argv[1] if len(sys.argv) > 1 else "sync"
flags = sys.argv[2:]
env = {"PROXYPROTO_HEADER_TIMEOUT": "2"}
with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    args = gunicorn_kit.gunicorn_args(worker, port, "--timeout", "20", *flags, workers=1)
    with gunicorn_kit.running_command(args, port, Path(tmp), env=env, workers=1) as server:
        address = ("127.0.0.1", port)
        attack_kit.show(attack_kit.battery(address))
        print("  N slowloris 200 trusted:", attack_kit.slowloris(address, 200))
        print("  N2 slowloris 50 untrusted (127.0.0.2):", attack_kit.slowloris(address, 50, local="127.0.0.2"))
        log = server.log()
    print("--- log (proxyproto / error lines) ---")
    for line in log.splitlines():
        if "proxyproto" in line or "Traceback" in line or "Error" in line or "error" in line.lower():
            print("  ", line[:300])
