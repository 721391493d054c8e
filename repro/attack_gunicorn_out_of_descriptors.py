"""gunicorn Sync/GThread under ``ulimit -n 128``: 200 silent connections from a trusted address (any local
user can open them to 127.0.0.1) fill the descriptor table with parked connections; the next accept()
raises EMFILE and the worker dies with a traceback (the arbiter restarts it, dropping everything it held).

Usage: python repro/attack_gunicorn_out_of_descriptors.py [sync|gthread]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import connect  # noqa: E402
from support import free_port  # noqa: E402

worker = sys.argv[1] if len(sys.argv) > 1 else "sync"
with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    args = ["prlimit", "--nofile=128:128", "--", *gunicorn_kit.gunicorn_args(worker, port, workers=1)]
    with gunicorn_kit.running_command(args, port, Path(tmp), env={"PROXYPROTO_HEADER_TIMEOUT": "10"}, workers=1):
        silent = [connect(("127.0.0.1", port)) for _ in range(200)]
        time.sleep(2.0)
        for s in silent:
            s.close()
        log = (Path(tmp) / f"server-{port}.out").read_text(errors="replace")
    print("worker crashed (\"Exception in worker process\"):", "Exception in worker process" in log)
    print("tracebacks:", log.count("Traceback"), "| EMFILE:", "Too many open files" in log)
    print("workers booted:", log.count("Booting worker"))
