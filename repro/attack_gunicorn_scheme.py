"""gunicorn WSGI workers: can a client behind a TCP-mode proxy set wsgi.url_scheme with X-Forwarded-Proto?

docs/gunicorn.rst says --forwarded-allow-ips "is checked against that real client, so a header line a
TCP-mode proxy relayed from the client is not believed".  Checked for a PROXY header with addresses, and
for PROXY UNKNOWN / LOCAL / policy USE without a header, where the served address is the proxy's own.
Usage: python repro/attack_gunicorn_scheme.py [sync|gthread]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import V1, V1_UNKNOWN, one, request, v2  # noqa: E402
from support import free_port  # noqa: E402

SPOOF = "X-Forwarded-Proto: https\r\n"
worker = sys.argv[1] if len(sys.argv) > 1 else "sync"
with tempfile.TemporaryDirectory() as tmp:
    port = free_port()
    args = gunicorn_kit.gunicorn_args(worker, port, "--proxy-protocol", "auto", workers=1)
    with gunicorn_kit.running_command(args, port, Path(tmp), workers=1) as server:
        a = server.address
        for name, head in [
            ("PROXY TCP4", V1),
            ("PROXY UNKNOWN", V1_UNKNOWN),
            ("v2 LOCAL", v2(local=True)),
            ("no header (policy USE)", b""),
        ]:
            status, report = one(a, [head + request(extra=SPOOF)])
            print(
                f"  {name} + client's X-Forwarded-Proto: https ->",
                status,
                report.get("client") if isinstance(report, dict) else report,
                "scheme:",
                report.get("scheme") if isinstance(report, dict) else None,
            )
