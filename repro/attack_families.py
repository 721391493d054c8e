"""Header families on an IPv4 listener: TCP6 source, TCP6 with an IPv4-mapped source, v2 UNIX, v1 TCP4 with a
TCP6-looking line: what does the app see?

Usage: python repro/attack_families.py [tornado|daphne|sync|uvicorn]...
"""

from __future__ import annotations

import socket
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import SIG, client_of, one, request  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python  # noqa: E402


def v2_unix(src: bytes = b"/run/client.sock", dst: bytes = b"/run/server.sock") -> bytes:
    body = src.ljust(108, b"\0") + dst.ljust(108, b"\0")
    return SIG + bytes([0x21, 0x31]) + struct.pack("!H", len(body)) + body


def v2_tcp6(src: str, dst: str = "2001:db8::1") -> bytes:
    body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + struct.pack("!HH", 7, 80)
    return SIG + bytes([0x21, 0x21]) + struct.pack("!H", len(body)) + body


CASES = {
    "v1 TCP6 2001:db8::7": b"PROXY TCP6 2001:db8::7 2001:db8::1 7 80\r\n",
    "v1 TCP6 ::ffff:203.0.113.7 (mapped)": b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:192.0.2.1 7 80\r\n",
    "v2 TCP6 ::ffff:203.0.113.7 (mapped)": v2_tcp6("::ffff:203.0.113.7", "::ffff:192.0.2.1"),
    "v1 TCP4 with IPv6 addresses": b"PROXY TCP4 2001:db8::7 2001:db8::1 7 80\r\n",
    "v2 UNIX": v2_unix(),
}

which = sys.argv[1:] or ["tornado", "daphne", "sync", "uvicorn"]
with tempfile.TemporaryDirectory() as tmp:
    for name in which:
        port = free_port()
        if name == "tornado":
            ctx = command(python(str(ROOT / "repro" / "tornado_server.py"), str(port)), port, workdir=Path(tmp))
        elif name == "daphne":
            ctx = command(
                [
                    sys.executable,
                    "-m",
                    "daphne",
                    "-e",
                    f"proxyproto:tcp:{port}:interface=127.0.0.1",
                    "gunicorn_kit:asgi_app",
                ],
                port,
                workdir=Path(tmp),
            )
        else:
            ctx = gunicorn_kit.running_command(
                gunicorn_kit.gunicorn_args(name, port, workers=1), port, Path(tmp), workers=1
            )
        with ctx:
            print(name)
            for label, head in CASES.items():
                result = one(("127.0.0.1", port), [head + request()])
                print(f"   {label:38}: {result[0]} client={client_of(result)}")
        log = (Path(tmp) / f"server-{port}.out").read_text(errors="replace")
        print("   tracebacks:", log.count("Traceback"))
