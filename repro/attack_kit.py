"""A hostile client against a real server on loopback: each case returns what the app reported.

Used by repro/attack_*.py.  Every socket has a timeout; nothing runs unbounded.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

TIMEOUT = 8.0
V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n"
V1_OTHER = b"PROXY TCP4 198.51.100.9 192.0.2.1 6666 80\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(
    src: str = "203.0.113.7", dst: str = "192.0.2.1", sport: int = 5555, dport: int = 80, local: bool = False
) -> bytes:
    if local:
        return SIG + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def request(keep_alive: bool = False, extra: str = "") -> bytes:
    conn = "" if keep_alive else "Connection: close\r\n"
    return f"GET / HTTP/1.1\r\nHost: test\r\n{conn}{extra}\r\n".encode()


def connect(address: tuple[str, int], local: str | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    sock.settimeout(TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if local:
        sock.bind((local, 0))
    sock.connect(address)
    return sock


def read_response(sock: socket.socket) -> tuple[Any, Any]:
    """(status, report) or ('closed', data) or ('timeout', data)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return "closed", data[:200]
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next((int(x.split(":", 1)[1]) for x in lines[1:] if x.lower().startswith("content-length")), 0)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        try:
            return status, json.loads(rest[:length])
        except ValueError:
            return status, rest[:length][:200]
    except socket.timeout:
        return "timeout", data[:200]
    except ConnectionResetError:
        return "reset", data[:200]


def one(address: tuple[str, int], chunks: list[bytes], local: str | None = None, gap: float = 0.0) -> tuple[Any, Any]:
    sock = connect(address, local)
    try:
        for i, chunk in enumerate(chunks):
            if i and gap:
                time.sleep(gap)
            try:
                sock.sendall(chunk)
            except OSError as exc:
                return "send-failed", repr(exc)
        return read_response(sock)
    finally:
        sock.close()


def client_of(result: tuple[Any, Any]) -> Any:
    report = result[1]
    return report.get("client") if isinstance(report, dict) else None


def battery(address: tuple[str, int], *, extra_checks: bool = True) -> dict[str, Any]:
    """Every single-connection case; the values are (status, what the app saw)."""
    out: dict[str, Any] = {}
    out["A trusted v1"] = one(address, [V1 + request()])
    out["B untrusted v1 (127.0.0.2)"] = one(address, [V1 + request()], local="127.0.0.2")
    out["C untrusted v2 (127.0.0.2)"] = one(address, [v2() + request()], local="127.0.0.2")
    out["C2 untrusted v2 + XFF"] = one(
        address,
        [v2() + request(extra="X-Forwarded-For: 203.0.113.99\r\nX-Real-Ip: 203.0.113.99\r\n")],
        local="127.0.0.2",
    )
    out["D trusted v1 in 1-byte writes"] = one(address, [bytes([b]) for b in V1] + [request()], gap=0.003)
    h2 = v2()
    out["E trusted v2, first chunk 10 bytes"] = one(address, [h2[:10], h2[10:] + request()], gap=0.1)
    out["F trusted, second header after first"] = one(address, [V1 + V1_OTHER + request()])
    out["H trusted v2 LOCAL"] = one(address, [v2(local=True) + request()])
    out["I trusted v1 UNKNOWN"] = one(address, [V1_UNKNOWN + request()])
    out["M trusted v1 + XFF/X-Real-Ip"] = one(
        address, [V1 + request(extra="X-Forwarded-For: 203.0.113.99\r\nX-Real-Ip: 203.0.113.99\r\n")]
    )
    out["M2 trusted LOCAL + XFF"] = one(
        address, [v2(local=True) + request(extra="X-Forwarded-For: 203.0.113.99\r\nX-Real-Ip: 203.0.113.99\r\n")]
    )
    # keep-alive: a header on the second request must be payload
    sock = connect(address)
    try:
        sock.sendall(V1 + request(keep_alive=True))
        first = read_response(sock)
        sock.sendall(V1_OTHER + request())
        second = read_response(sock)
    finally:
        sock.close()
    out["G keep-alive, header on 2nd request"] = (first, second)
    # huge v2 length
    big = SIG + bytes([0x21, 0x11]) + struct.pack("!H", 0xFFFF) + b"\x00" * 100
    start = time.monotonic()
    res = one(address, [big])
    out["J v2 length 65535"] = (res, round(time.monotonic() - start, 2))
    # reset mid-header
    sock = connect(address)
    sock.sendall(V1[:10])
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    out["K reset mid-header"] = "sent"
    return out


def slowloris(
    address: tuple[str, int], count: int, local: str | None = None, probe_local: str | None = None
) -> dict[str, Any]:
    """``count`` silent connections; then one good request: how long it took and what it got."""
    silent = []
    try:
        for _ in range(count):
            try:
                silent.append(connect(address, local))
            except OSError:
                break
        time.sleep(0.3)
        start = time.monotonic()
        res = one(address, [V1 + request()], local=probe_local)
        took = round(time.monotonic() - start, 2)
        still_open = 0
        for s in silent:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    continue  # closed by the server
            except BlockingIOError:
                still_open += 1
            except OSError:
                continue
        return {"opened": len(silent), "probe": res, "probe_seconds": took, "silent_still_open": still_open}
    finally:
        for s in silent:
            s.close()


def show(results: dict[str, Any]) -> None:
    for name, value in results.items():
        print(f"  {name}: {value}")
