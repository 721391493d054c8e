"""Real ``daphne -e proxyproto:...`` (Twisted endpoint), attacked by repro/attack_kit.battery.

Usage: python repro/attack_daphne.py [extra endpoint options, e.g. ':untrusted_policy=IGNORE'] [daphne flags...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import attack_kit  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command  # noqa: E402

options = sys.argv[1] if len(sys.argv) > 1 else ""
flags = sys.argv[2:]
with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "daphne",
        *flags,
        "-e",
        f"proxyproto:tcp:{port}:interface=127.0.0.1{options}",
        "gunicorn_kit:asgi_app",
    ]
    with command(args, port, env={"PROXYPROTO_HEADER_TIMEOUT": "2"}, workdir=Path(tmp)):
        address = ("127.0.0.1", port)
        attack_kit.show(attack_kit.battery(address))
        print("  N slowloris 200 trusted:", attack_kit.slowloris(address, 200))
        print("  N2 slowloris 50 untrusted (127.0.0.2):", attack_kit.slowloris(address, 50, local="127.0.0.2"))
    log = (Path(tmp) / f"server-{port}.out").read_text()
    print("--- log ---")
    for line in log.splitlines()[:60]:
        print("  ", line[:300])
