"""Tornado: an untrusted peer whose PROXY header arrives 100 ms after the connection: is the WARNING written?

(proxyproto.tornado peeks once, at accept; Twisted looks at the first bytes that arrive.)
Usage: python repro/attack_tornado_untrusted_late_header.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

from attack_kit import V1, connect, read_response, request  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    with command(python(str(ROOT / "repro" / "tornado_server.py"), str(port)), port, workdir=Path(tmp)):
        for delay in (0.0, 0.1):
            sock = connect(("127.0.0.1", port), "127.0.0.2")
            time.sleep(delay)
            sock.sendall(V1 + request())
            print(f"header sent {delay} s after connect:", read_response(sock)[0])
            sock.close()
            time.sleep(0.3)
    log = (Path(tmp) / f"server-{port}.out").read_text()
    print("WARNING lines 'sent a PROXY header but is not trusted':", log.count("is not trusted"), "(2 expected)")
