"""gunicorn + UvicornWorker (stock, then proxyproto's): after some traffic, SIGTERM; does the log say
"Error while closing socket [Errno 9] Bad file descriptor" (a descriptor closed twice)?
(SIGTERM, as gunicorn_kit stops gunicorn.)

Usage: python repro/check_uvicorn_worker_close.py
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

from attack_kit import V1, one, request  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    for worker, head in (("uvicorn.workers.UvicornWorker", b""), ("proxyproto.gunicorn.UvicornWorker", V1)):
        for traffic in (False, True):
            port = free_port()
            args = python("-m", "gunicorn", "--no-control-socket", "-k", worker, "--workers", "1", "-b",
                          f"127.0.0.1:{port}", "gunicorn_kit:asgi_app")
            with command(args, port, workdir=Path(tmp)) as proc:
                time.sleep(1.5)
                if traffic:
                    one(("127.0.0.1", port), [head + request()])
                proc.send_signal(signal.SIGTERM)  # gunicorn's graceful stop, as gunicorn_kit does
                proc.wait(20)
            log = (Path(tmp) / f"server-{port}.out").read_text(errors="replace")
            print(f"{worker:36} traffic={traffic!s:5}: 'Bad file descriptor' in log: {'Bad file descriptor' in log}")
