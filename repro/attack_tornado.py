"""Real proxyproto.tornado server (subprocess), attacked by repro/attack_kit.battery.

Usage: python repro/attack_tornado.py [xheaders]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import attack_kit  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python  # noqa: E402

extra = sys.argv[1:]
with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    with command(
        python(str(ROOT / "repro" / "tornado_server.py"), str(port), "header_timeout=2", *extra),
        port,
        workdir=Path(tmp),
    ):
        address = ("127.0.0.1", port)
        attack_kit.show(attack_kit.battery(address))
        print("  N slowloris 200 trusted:", attack_kit.slowloris(address, 200))
        print("  N2 slowloris 50 untrusted (127.0.0.2):", attack_kit.slowloris(address, 50, local="127.0.0.2"))
    log = (Path(tmp) / f"server-{port}.out").read_text()
    print("--- log ---")
    for line in log.splitlines()[:60]:
        print("  ", line[:300])
