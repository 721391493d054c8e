"""Not one payload byte lost, reordered or invented after the header (issue 5, acceptance 2; T3).

2,000 connections carry random payloads of 0 to 256 KiB after a v1 or v2
header (addresses and TLVs drawn at random), written in one piece, in two at a
random split point (which may fall inside the header), or byte by byte (small
payloads only).  Handlers read through ``recv``, ``recv_into`` and ``rfile``
in rotation and answer the SHA-256 and length of what they read; the client
compares them with what it sent.  The server is the threading TCP class in a
thread of this process; a pool of client threads drives it.  Seeded, so a
failure reproduces.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from stress_kit import ServerProcess

import proxyproto

CONNECTIONS = 2000
MAX_PAYLOAD = 256 * 1024
SMALL_PAYLOAD = 1024
SEED = 20261128
READ_MODES = ("recv", "recv_into", "rfile")


class DigestHandler(socketserver.StreamRequestHandler):
    """Reads to EOF through one of three interfaces; answers ``mode length sha256 host port``."""

    timeout = 20.0

    def handle(self) -> None:
        # The rotation follows the header's random source port, not the arrival order, so every
        # read mode meets every write style.
        mode = READ_MODES[self.client_address[1] % 3]
        digest = hashlib.sha256()
        total = 0
        if mode == "recv":
            while chunk := self.request.recv(65536):
                digest.update(chunk)
                total += len(chunk)
        elif mode == "recv_into":
            buffer = bytearray(32768)
            view = memoryview(buffer)
            while n := self.request.recv_into(buffer):
                digest.update(view[:n])
                total += n
        else:
            while chunk := self.rfile.read(50000):
                digest.update(chunk)
                total += len(chunk)
        host, port = self.client_address[:2]
        self.wfile.write(f"{mode} {total} {digest.hexdigest()} {host} {port}\n".encode())


class IntegrityServer(proxyproto.ThreadingProxyTCPServer):
    daemon_threads = True
    proxy_header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: list[str] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        import traceback

        self.errors.append(traceback.format_exc())


def make_case(i: int) -> dict[str, Any]:
    """Connection ``i``: header, payload and how it is written, all from a per-connection seed."""
    rng = random.Random(SEED * 10_000 + i)
    style = ("one", "two", "bytes")[i % 3]
    if style == "bytes":
        size = rng.choice([0, 1, 2, rng.randint(0, SMALL_PAYLOAD)])
    else:
        size = rng.choice([0, 1, 65535, 65536, 65537, MAX_PAYLOAD, *[rng.randint(0, MAX_PAYLOAD)] * 6])
    payload = rng.randbytes(size)
    if rng.random() < 0.5:
        source = (f"192.0.2.{rng.randint(1, 254)}", rng.randint(1, 65535))
        destination = ("198.51.100.1", 443)
    else:
        source = (f"2001:db8::{rng.randint(1, 0xFFFF):x}", rng.randint(1, 65535))
        destination = ("2001:db8::1", 443)
    if rng.random() < 0.5:
        header = proxyproto.encode_v1(source, destination)
    else:
        tlvs = [(0x02, b"example.org")] if rng.random() < 0.5 else []
        header = proxyproto.encode_v2(source, destination, tlvs=tlvs, checksum=rng.random() < 0.3)
    stream = header + payload
    split = rng.randint(1, len(stream) - 1) if style == "two" and len(stream) > 1 else None
    return {"stream": stream, "header": len(header), "style": style, "split": split, "source": source}


def run_client(address: tuple[str, int], i: int) -> dict[str, Any]:
    case = make_case(i)
    stream: bytes = case["stream"]
    payload = stream[case["header"] :]
    with socket.create_connection(address, timeout=20.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if case["style"] == "one":
            sock.sendall(stream)
        elif case["style"] == "two":
            split = case["split"] or len(stream)
            sock.sendall(stream[:split])
            time.sleep(0.001)
            sock.sendall(stream[split:])
        else:
            for k in range(len(stream)):
                sock.sendall(stream[k : k + 1])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    mode, total, digest, host, port = answer.decode().split()
    return {
        "i": i,
        "style": case["style"],
        "mode": mode,
        "sent": len(payload),
        "ok": int(total) == len(payload) and digest == hashlib.sha256(payload).hexdigest(),
        "address_ok": (host, int(port)) == case["source"],
        "got": int(total),
    }


def test_payload_after_header_arrives_intact_T3() -> None:
    server = IntegrityServer(("127.0.0.1", 0), DigestHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: run_client(server.server_address, i), range(CONNECTIONS)))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5.0)
    took = time.monotonic() - start
    bad = [r for r in results if not r["ok"]]
    wrong_address = [r for r in results if not r["address_ok"]]
    total = sum(r["sent"] for r in results)
    combos = {(s, m): 0 for s in ("one", "two", "bytes") for m in READ_MODES}
    for r in results:
        combos[(r["style"], r["mode"])] += 1
    print(
        f"\n[integrity] {CONNECTIONS} connections, {total / 2**20:.1f} MiB of payload in {took:.1f}s; "
        f"mismatches {len(bad)}; wrong client_address {len(wrong_address)}; "
        f"write style x read mode: {combos}"
    )
    assert not server.errors, server.errors[0]
    assert not bad, bad[:5]
    assert not wrong_address, wrong_address[:5]
    assert all(combos.values()), combos


# Streams that start like a signature and then diverge: under the opt-in policies they are payload,
# and every byte must reach the handler even when the divergence arrives in a later segment (the
# ambiguous prefix stays in the kernel meanwhile: SO_RCVLOWAT on TCP, a timer on UNIX).
LOOKALIKES = [
    b"PRI * HTTP/2.0\r\n",
    b"PROX\x00 not a header\n",
    b"PROXX\n",
    b"P\n",
    b"\r\n\r\n\x00\r\nQUIX and more\n",
    b"\r\n\r\n\n",
    b"\r\nhello\n",
]


@pytest.mark.parametrize("name", ["ThreadingProxyTCPServer", "ThreadingProxyUnixStreamServer"])
@pytest.mark.parametrize("policy", ["USE", "IGNORE", "REJECT"])
def test_signature_lookalike_payload_arrives_intact_under_opt_in_policies_T3(name: str, policy: str) -> None:
    # Polling every 0.05 s: the payloads' integrity has nothing to do with the poll interval, and
    # socketserver's default 0.5 s was waited out by shutdown() at the end.
    with ServerProcess(name, {"proxy_policy": policy, "proxy_header_timeout": 5.0}, poll_interval=0.05) as srv:
        baseline = srv.warm_up(probe=b"")
        for payload in LOOKALIKES:
            # The handler answers after the first line and closes: split only inside that line.
            first_line = payload[: payload.index(b"\n") + 1]
            for split in (None, *sorted({k for k in (1, 2, 4, len(first_line) - 1) if 0 < k < len(first_line)})):
                with srv.connect() as sock:
                    if split is None:
                        sock.sendall(payload)
                    else:
                        sock.sendall(payload[:split])
                        time.sleep(0.03)
                        sock.sendall(payload[split:])
                    answer = b""
                    while not answer.endswith(b"\n"):
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        answer += chunk
                report = json.loads(answer)
                # The handler reads one line: the payload up to its first LF, first byte included.
                assert report["line"].encode("latin-1") == first_line, (payload, split, report)
                assert report["command"] is None
                if name.startswith("ThreadingProxyTCP"):
                    assert report["client"][0] == "127.0.0.1"
        srv.settle(baseline, probe=b"")
