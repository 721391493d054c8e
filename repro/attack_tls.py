"""TLS after the header, attacked: ClientHello first from a trusted peer, a stalled handshake after the header.

Usage: python repro/attack_tls.py [tornado|daphne|sync|gthread|uvicorn]...
Each server runs with header_timeout 2 s; a probe (header + TLS + request) runs while 20 stalled handshakes wait.
"""

from __future__ import annotations

import ssl
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "web"), str(ROOT / "repro")]

import gunicorn_kit  # noqa: E402
from attack_kit import V1, connect, read_response, request  # noqa: E402
from support import free_port  # noqa: E402
from web_kit import command, python, self_signed  # noqa: E402

CLIENT = ssl.create_default_context()
CLIENT.check_hostname = False
CLIENT.verify_mode = ssl.CERT_NONE


def tls_request(address, header: bytes, local: str | None = None):
    sock = connect(address, local)
    try:
        if header:
            sock.sendall(header)
        try:
            tls = CLIENT.wrap_socket(sock, server_hostname="localhost")
        except (OSError, ssl.SSLError) as exc:
            return "handshake failed", type(exc).__name__
        tls.sendall(request())
        return read_response(tls)  # type: ignore[arg-type]
    finally:
        sock.close()


def cases(address) -> None:
    print("   T2 trusted: header, then TLS:", tls_request(address, V1))
    print("   T1 trusted: ClientHello first, no header:", tls_request(address, b""))
    print("   T5 untrusted 127.0.0.2: TLS, no header:", tls_request(address, b"", local="127.0.0.2"))
    stalled = []
    for i in range(20):
        s = connect(address)
        s.sendall(V1 + (b"\x16\x03\x01" if i % 2 else b""))  # header, then nothing or 3 bytes of a record
        stalled.append(s)
    untrusted_stalled = [connect(address, "127.0.0.2") for _ in range(5)]
    time.sleep(0.3)
    start = time.monotonic()
    print(
        "   T3 probe while 20 header-then-stall + 5 untrusted silent:",
        tls_request(address, V1),
        f"{time.monotonic() - start:.2f}s",
    )
    time.sleep(3.0)  # past header_timeout (2 s): the stalled handshakes must be closed
    closed = 0
    for s in stalled + untrusted_stalled:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    print(
        f"   T3 after 3.3 s: {closed} of 25 (20 header-then-stalled handshakes + 5 untrusted silent) closed by the server"
    )


def main() -> None:
    which = sys.argv[1:] or ["tornado", "daphne", "gthread", "sync", "uvicorn"]
    with tempfile.TemporaryDirectory() as tmp:
        cert = self_signed(Path(tmp))
        assert cert is not None
        env = {"PROXYPROTO_HEADER_TIMEOUT": "2"}
        for name in which:
            port = free_port()
            print(name)
            if name == "tornado":
                args = python(
                    str(ROOT / "repro" / "tornado_server.py"),
                    str(port),
                    f"tls={cert.cert},{cert.key}",
                    "header_timeout=2",
                )
                with command(args, port, workdir=Path(tmp)):
                    cases(("127.0.0.1", port))
                out = Path(tmp) / f"server-{port}.out"
            elif name == "daphne":
                endpoint = f"proxyproto:ssl:{port}:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}"
                args = [sys.executable, "-m", "daphne", "-e", endpoint, "gunicorn_kit:asgi_app"]
                with command(args, port, env=env, workdir=Path(tmp)):
                    cases(("127.0.0.1", port))
                out = Path(tmp) / f"server-{port}.out"
            else:
                args = gunicorn_kit.gunicorn_args(
                    name, port, "--certfile", str(cert.cert), "--keyfile", str(cert.key), "--timeout", "30", workers=1
                )
                with gunicorn_kit.running_command(args, port, Path(tmp), env=env, workers=1) as server:
                    cases(server.address)
                out = Path(tmp) / f"server-{port}.out"
            for line in out.read_text(errors="replace").splitlines():
                if "proxyproto" in line or "Traceback" in line or "rror" in line:
                    print("     log:", line[:260])


if __name__ == "__main__":
    main()
