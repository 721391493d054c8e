"""Under gunicorn's own logging, proxyproto's lines show with gunicorn's level and prefix, "proxyproto" once.

gunicorn's uvicorn worker, with this library's ``--http`` class (a worker subclass setting
``CONFIG_KWARGS["http"]``, as the docs show), run as the real ``gunicorn`` command: the policy
line comes at start, at INFO, and a trusted peer without a header is refused with one WARNING
line naming the trust variable and ``send-proxy``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

from support import free_port, require_module
from web_kit import HERE, ROOT, command, python

require_module("gunicorn")
require_module("uvicorn")

WORKER = '''
from uvicorn.workers import UvicornWorker


class ProxyWorker(UvicornWorker):
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "http": "proxyproto.uvicorn:H11"}
'''


def test_gunicorn_uvicorn_worker_shows_proxyproto_lines_with_its_level_and_the_policy_at_start(tmp_path: Path) -> None:
    (tmp_path / "proxy_worker.py").write_text(WORKER)
    port = free_port()
    args = python("-m", "gunicorn", "-k", "proxy_worker.ProxyWorker", "-b", f"127.0.0.1:{port}", "web_kit:app")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), str(tmp_path)])}
    with command(args, port, env=env, workdir=tmp_path) as proc:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # a trusted peer (loopback) without a header
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(4096):
                    pass
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    lines = (tmp_path / f"server-{port}.out").read_text().splitlines()
    ours = [line for line in lines if "proxyproto" in line]
    policy_line = "[INFO] proxyproto: PROXY header policy REQUIRE for 127.0.0.1/32, ::1/128"
    assert any(policy_line in line for line in ours), lines
    refusals = [line for line in ours if "send-proxy" in line]
    assert len(refusals) == 1 and "[WARNING] proxyproto: 127.0.0.1:" in refusals[0], lines
    assert refusals[0].count("proxyproto") == 1 and "PROXYPROTO_ALLOW_IPS" in refusals[0]
