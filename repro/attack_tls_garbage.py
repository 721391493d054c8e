"""TLS listeners: a trusted peer sends the header, then plain HTTP (not a ClientHello): how many log lines, any traceback?

Usage: python repro/attack_tls_garbage.py [tornado|daphne|sync|gthread|uvicorn]...
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import V1, one, request  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python, self_signed  # noqa: E402


def main() -> None:
    which = sys.argv[1:] or ["tornado", "daphne", "sync", "gthread", "uvicorn"]
    env = {"PROXYPROTO_HEADER_TIMEOUT": "2"}
    with tempfile.TemporaryDirectory() as tmp:
        cert = self_signed(Path(tmp))
        assert cert is not None
        for name in which:
            port = free_port()
            if name == "tornado":
                ctx = command(
                    python(str(ROOT / "repro" / "tornado_server.py"), str(port), f"tls={cert.cert},{cert.key}"),
                    port,
                    workdir=Path(tmp),
                )
            elif name == "daphne":
                endpoint = f"proxyproto:ssl:{port}:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}"
                ctx = command(
                    [sys.executable, "-m", "daphne", "-e", endpoint, "gunicorn_kit:asgi_app"],
                    port,
                    env=env,
                    workdir=Path(tmp),
                )
            else:
                args = gunicorn_kit.gunicorn_args(
                    name, port, "--certfile", str(cert.cert), "--keyfile", str(cert.key), workers=1
                )
                ctx = gunicorn_kit.running_command(args, port, Path(tmp), env=env, workers=1)
            out = Path(tmp) / f"server-{port}.out"
            with ctx:
                before = len(out.read_text(errors="replace").splitlines())
                print(
                    name, "header + plain HTTP on the TLS port:", str(one(("127.0.0.1", port), [V1 + request()]))[:80]
                )
                time.sleep(0.5)
                lines = out.read_text(errors="replace").splitlines()[before:]
            print(f"   {len(lines)} log line(s):")
            for line in lines[:12]:
                print("     ", line[:220])


if __name__ == "__main__":
    main()
