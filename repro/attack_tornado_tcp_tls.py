"""ProxyTCPServerMixin + ssl_options: 20 connections send the header and then stall the TLS handshake.

ProxyHTTPServer closes such connections header_timeout after the header; does the plain TCPServer mixin?
Usage: python repro/attack_tornado_tcp_tls.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

from attack_kit import V1, connect  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python, self_signed  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    cert = self_signed(Path(tmp))
    port = free_port()
    args = python(str(ROOT / "repro" / "tornado_tcp_tls_server.py"), str(port), str(cert.cert), str(cert.key))
    with command(args, port, workdir=Path(tmp)):
        stalled = []
        for _ in range(20):
            s = connect(("127.0.0.1", port))
            s.sendall(V1)
            stalled.append(s)
        time.sleep(5.0)  # header_timeout is 2 s
        closed = 0
        for s in stalled:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
            s.close()
        print(f"after 5 s: {closed} of 20 header-then-stalled TLS handshakes closed by the server (header_timeout 2 s)")
