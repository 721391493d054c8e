"""10,000 datagrams with random payloads and random real addresses arrive byte-exact (G8).

Three "proxies" (sockets bound on 127.0.0.1-3) send datagrams whose v2 headers name random
IPv4 and IPv6 clients; the handler records what it was given.  The sender keeps at most a
window of datagrams in flight and the server socket has a large receive buffer, so loopback
loses nothing: every datagram is accounted for, exactly (no tolerance for losses).
Bounded: 10,000 datagrams per class, a 60 s ceiling that a healthy run never nears; the
forking class, a process per datagram, answers 100.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import random
import socket
import socketserver
import threading
import time
from typing import Any

import pytest
from udp_kit import exchange, proxy_socket, running, v2_header

from proxyproto import udp

COUNT = 10_000
WINDOW = 64
CEILING = 60.0


class Recorder(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        payload, _sock = self.request
        entry = (tuple(self.client_address), bytes(payload), tuple(self.request.proxy_address))
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.records.append(entry)  # type: ignore[attr-defined]


def random_case(rng: random.Random) -> tuple[bytes, tuple[Any, ...], bytes]:
    """(header, expected client_address, payload) with a random family, address, port and payload."""
    payload = rng.randbytes(rng.choice((0, 1, 7, 100, rng.randrange(0, 1400), rng.randrange(1400, 9000))))
    port, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
    if rng.random() < 0.5:
        src = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        dst = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        return v2_header(1, 0x12, (src, port), (dst, dport)), (src, port), payload
    src = str(ipaddress.IPv6Address(rng.getrandbits(128)))
    dst = str(ipaddress.IPv6Address(rng.getrandbits(128)))
    return v2_header(1, 0x22, (src, port), (dst, dport)), (src, port, 0, 0), payload


@pytest.mark.parametrize("name", ["ProxyUDPServer", "ThreadingProxyUDPServer"])
def test_ten_thousand_random_datagrams_arrive_byte_exact_with_right_addresses_G8(name: str) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    cls = type("Bulk", (getattr(udp, name),), {"daemon_threads": True, "proxy_trusted": ["127.0.0.0/29"]})
    server = cls(("127.0.0.1", 0), Recorder)
    server.records = []
    server.lock = threading.Lock()
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    proxies = []
    for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        proxies.append(s)
    expected: collections.Counter[tuple[Any, ...]] = collections.Counter()
    start = time.monotonic()
    try:
        for i in range(COUNT):
            header, client, payload = random_case(rng)
            proxy = proxies[i % len(proxies)]
            proxy.sendto(header + payload, server.server_address)
            expected[(client, payload, proxy.getsockname())] += 1
            if i % WINDOW == WINDOW - 1:
                while len(server.records) < i + 1 - WINDOW and time.monotonic() - start < CEILING:
                    time.sleep(0.0005)
        deadline = start + CEILING
        while len(server.records) < COUNT and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # anything extra (a duplicate) would show up now
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        for s in proxies:
            s.close()
    elapsed = time.monotonic() - start
    got = collections.Counter(server.records)
    lost = expected - got
    extra = got - expected
    print(f"{name}: {len(server.records)}/{COUNT} datagrams in {elapsed:.2f} s (seed {seed})")
    assert not lost and not extra, f"seed {seed}: {sum(lost.values())} lost, {sum(extra.values())} unexpected"
    assert len(server.records) == COUNT


def test_forking_server_answers_every_one_of_100_random_datagrams_from_its_children_G8() -> None:
    """A child per datagram: each reply (sent by the child, to the proxy) reports the right client."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    with running("ForkingProxyUDPServer") as server, proxy_socket() as proxy:
        for i in range(100):
            header, client, payload = random_case(rng)
            payload = payload[:2000]  # the hex report must fit one reply datagram
            report = exchange(proxy, server, header + payload)
            assert report["client_address"] == list(client), f"seed {seed}, datagram {i}"
            assert bytes.fromhex(report["payload"]) == payload, f"seed {seed}, datagram {i}"
