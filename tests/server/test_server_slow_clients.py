"""No connection can stall another (DESIGN.md "without stalling anyone").

For each of the six classes: 50 connections that never send a byte and 50 that send one header
byte every 0.3 s are parked on the server; meanwhile a well-behaved client must be answered
within 0.5 s (a stall shows as whole seconds), every bad connection must be closed within
``proxy_header_timeout`` + 1 s, and the server must not spin on its parked sockets.

How CPU is measured, honestly: the bad clients run in a *separate process* (their selector loop
and their 100 sockets cost the test process nothing), and the server serves in a thread of
this process.  ``getrusage(RUSAGE_SELF)`` over the window therefore counts the serving loop,
its handler threads (threading classes), and the test's own main thread, which only sleeps and
makes a handful of short good-client connections; it does not count forked handler children
(RUSAGE_CHILDREN).  The window is the time all 100 bad connections are parked, up to just before
their deadline, so it holds no fork() of the parent for the silent ones USE serves then.  The
figure is an upper bound on the serving loop's own cost, which is what "no spinning" is about.

The same holds at the limits: a server out of descriptors (RLIMIT_NOFILE 64, in a process of
its own) gives the oldest parked connection's place to a new one, and a forking server at
``max_children`` keeps expiring parked headers while new clients wait in the backlog.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import socket
import socketserver
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_kit import (
    CLASS_NAMES,
    DEST_V4,
    REAL_V4,
    ReportHandler,
    as_address,
    parse_report,
    read_all,
    serve,
    v1_header,
    wait_for,
)

from proxyproto import Policy

HEADER = v1_header(REAL_V4, DEST_V4)
PAYLOAD = b"payload\n"
#: Short, yet far above a good client's answer (a few ms): the good clients, every 0.2 s, fit
#: 4 or 5 into the 0.8 s before the first deadline, and the closing bounds keep their 1 s of slack.
HEADER_TIMEOUT = 1.2
#: Seconds between two bytes of a trickling client: 4 bytes before its deadline.
TRICKLE_INTERVAL = 0.3
SILENT = TRICKLE = 50

# The bad clients, run with ``python -c`` and one JSON argument; they print "ready" once all
# 100 are connected, then one JSON summary line when every connection is closed (or at ``limit``).
BAD_CLIENTS = r"""
import json, selectors, socket, sys, time
cfg = json.loads(sys.argv[1])
family = getattr(socket, cfg["family"])
address = cfg["address"] if isinstance(cfg["address"], str) else tuple(cfg["address"])
header = bytes.fromhex(cfg["header"])
sel = selectors.DefaultSelector()
conns = []
for i in range(cfg["silent"] + cfg["trickle"]):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect(address)
    s.setblocking(False)
    rec = {"trickle": i >= cfg["silent"], "start": time.monotonic(), "end": None, "sent": 0,
           "answered": False}
    conns.append((s, rec))
    sel.register(s, selectors.EVENT_READ, rec)
print("ready", flush=True)
limit = time.monotonic() + cfg["limit"]
tick = time.monotonic()
live = len(conns)

def close(s, rec, now):
    global live
    rec["end"] = now
    sel.unregister(s)
    s.close()
    live -= 1

while live and time.monotonic() < limit:
    now = time.monotonic()
    if now >= tick:
        for s, rec in conns:
            if rec["trickle"] and rec["end"] is None and rec["sent"] < len(header):
                try:
                    s.send(header[rec["sent"]:rec["sent"] + 1])
                    rec["sent"] += 1
                except OSError:
                    close(s, rec, now)
        tick += cfg["interval"]
    wait = max(0.0, min(tick, limit) - time.monotonic())
    for key, _ in sel.select(timeout=wait):
        s, rec = key.fileobj, key.data
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if data:
            rec["answered"] = True
        close(s, rec, time.monotonic())
lifetimes = [rec["end"] - rec["start"] for _, rec in conns if rec["end"] is not None]
def longest(trickle):
    spans = [rec["end"] - rec["start"] for _, rec in conns
             if rec["end"] is not None and rec["trickle"] == trickle]
    return max(spans) if spans else None
print(json.dumps({
    "closed": len(lifetimes),
    "open": sum(1 for _, rec in conns if rec["end"] is None),
    "answered": sum(1 for _, rec in conns if rec["answered"]),
    "longest_silent": longest(False),
    "longest_trickle": longest(True),
    "max_sent": max(rec["sent"] for _, rec in conns),
}), flush=True)
"""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def good_client(srv: object) -> tuple:
    """One well-behaved client: header and a line in one write, the reply line back.
    Returns (seconds from connect to answer, reported client address)."""
    start = time.monotonic()
    with srv.connect(timeout=5.0) as sock:  # type: ignore[attr-defined]
        sock.sendall(v1_header(REAL_V4, DEST_V4) + b"ping\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    took = time.monotonic() - start
    report = parse_report(data)
    assert report is not None, "the good client was not served"
    return took, as_address(report["client_address"])


def slowest_ms(answers: list) -> float:
    return 1000 * max((took for took, _ in answers), default=float("nan"))


class LineOrBannerHandler(ReportHandler):
    """Reads a line after a header; speaks first (and at once) to a connection without one,
    which is how a connection served "with no header" under USE must not block a thread."""

    def handle(self) -> None:
        self.mode = "none" if getattr(self.request, "proxy_header", None) is None else "line"
        super().handle()


CASES = [(name, Policy.REQUIRE) for name in CLASS_NAMES] + [
    # Under USE every trickled byte of "PROXY ..." is first an ambiguous prefix: the server
    # waits for one more byte (SO_RCVLOWAT on TCP, a timer on UNIX sockets) without spinning.
    ("ProxyTCPServer", Policy.USE),
    ("ThreadingProxyUnixStreamServer", Policy.USE),
    ("ForkingProxyTCPServer", Policy.USE),
]


@pytest.mark.parametrize("name,policy", CASES)
def test_parked_clients_never_stall_a_good_one_and_are_closed_on_time_T1(
    name: str, policy: Policy
) -> None:
    with serve(name, LineOrBannerHandler, proxy_header_timeout=HEADER_TIMEOUT,
               proxy_policy=policy) as srv:
        server = srv.server
        address = server.server_address
        cfg = {
            "family": socket.AddressFamily(server.address_family).name,
            "address": address if isinstance(address, str) else list(address),
            "header": v1_header(REAL_V4, DEST_V4).hex(),
            "silent": SILENT,
            "trickle": TRICKLE,
            "interval": TRICKLE_INTERVAL,
            "limit": HEADER_TIMEOUT + 6.0,
        }
        bad = subprocess.Popen(
            [sys.executable, "-c", BAD_CLIENTS, json.dumps(cfg)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        try:
            assert bad.stdout is not None
            assert bad.stdout.readline().strip() == "ready"
            wall0, cpu0 = time.monotonic(), cpu_seconds()
            # Good clients while all 100 are parked (the earliest closes at HEADER_TIMEOUT).
            answers = []
            while time.monotonic() - wall0 < HEADER_TIMEOUT - 0.4:
                answers.append(good_client(srv))
                time.sleep(0.2)
            # The CPU window ends here, with all 100 still parked: what follows is their
            # deadline, where USE serves the silent ones, and under ForkingMixIn the parent's
            # 50 fork() calls of this large process are serving, not spinning.
            wall, cpu = time.monotonic() - wall0, cpu_seconds() - cpu0
            summary = json.loads(bad.stdout.readline())
            bad.wait(10)
        finally:
            if bad.poll() is None:
                bad.kill()
                bad.wait()
            if bad.stdout is not None:
                bad.stdout.close()

    print(  # the figures, for ``pytest -s``
        f"{name} {policy.name}: slowest good client {slowest_ms(answers):.1f} ms, "
        f"longest silent {summary['longest_silent']:.2f} s, "
        f"longest trickling {summary['longest_trickle']:.2f} s, CPU {cpu:.3f} s in {wall:.2f} s"
    )
    assert len(answers) >= 4
    slowest = max(took for took, _ in answers)
    assert slowest < 0.5, f"a good client waited {slowest:.2f} s behind parked ones"
    assert all(addr == REAL_V4 for _, addr in answers)

    assert summary["open"] == 0, summary
    # REQUIRE closes all 100; USE serves the silent ones "with no header" at the deadline
    # and closes the partial headers.
    assert summary["answered"] == (SILENT if policy is Policy.USE else 0), summary
    assert summary["closed"] == SILENT + TRICKLE
    assert summary["longest_trickle"] <= HEADER_TIMEOUT + 1.0, summary
    if policy is Policy.REQUIRE:
        assert summary["longest_silent"] <= HEADER_TIMEOUT + 1.0, summary
    else:
        # Served at the deadline rather than closed: 50 handlers start at once, which under
        # ForkingMixIn means 50 forks of this (large) pytest process in a row, and waits
        # whenever max_children (40) are alive.  Bounded generously; not a closing time.
        assert summary["longest_silent"] <= HEADER_TIMEOUT + 4.0, summary
    assert summary["max_sent"] >= 2, "the trickling clients did trickle"

    assert cpu < 0.10 * wall, f"server used {cpu:.2f} s CPU in {wall:.2f} s: spinning?"


# --------------------------------------------------------------------------- out of descriptors


_FD_SERVER = """
import logging, resource, socketserver, sys
import proxyproto
resource.setrlimit(resource.RLIMIT_NOFILE, (__LIMIT__, __LIMIT__))
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(repr(self.client_address).encode() + b"\\n")

class Server(proxyproto.ThreadingProxyTCPServer):
    proxy_header_timeout = 60.0
    daemon_threads = True

server = Server(("127.0.0.1", 0), Echo)
print(server.server_address[1], flush=True)
server.serve_forever(poll_interval=0.05)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_out_of_descriptors_evicts_the_oldest_parked_connection() -> None:
    """With RLIMIT_NOFILE 64, silent sockets used to deny service for the whole header timeout
    (EMFILE came before the pending cap).  Now the oldest parked one gives its place: a good
    client is served at once, the server does not spin, and descriptors return to baseline."""
    limit = 64
    proc = subprocess.Popen(
        [sys.executable, "-c", _FD_SERVER.replace("__LIMIT__", str(limit))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    silent: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
            first.sendall(HEADER)  # serving has started once this is answered
            assert read_all(first) == repr(REAL_V4).encode() + b"\n"
        baseline = _open_fds(proc.pid)
        for _ in range(limit + 20):  # more than the server can hold
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            silent.append(sock)
        assert wait_for(lambda: _open_fds(proc.pid) >= limit - 1, timeout=5)
        cpu_before, wall_before = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.0)
        cpu = (_cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - wall_before)
        assert cpu < 0.10, f"server used {cpu:.0%} of a core while out of descriptors"

        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as good:
            good.sendall(HEADER + PAYLOAD)
            answer = read_all(good)
        assert time.monotonic() - began < 1.0
        assert answer == repr(REAL_V4).encode() + b"\n"

        for sock in silent:
            sock.close()
        silent.clear()
        assert wait_for(lambda: _open_fds(proc.pid) <= baseline, timeout=5), _open_fds(proc.pid)
    finally:
        for sock in silent:
            sock.close()
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err
    assert len(re.findall(r"accept\(\) failed", err)) >= 1
    assert len(re.findall(r"accept\(\) failed", err)) <= 5, err[-2000:]
    # The eviction is Parking's, in its one sentence (the count is how many waited).
    assert re.search(
        r"closed: \d+ connections already wait for their header \(the process is out of file descriptors\)", err
    )


# --------------------------------------------------------------------------- a forking server at max_children


class HoldHandler(socketserver.StreamRequestHandler):
    """Reads to EOF, then reports: a child lives as long as its client keeps the connection."""

    def handle(self) -> None:
        self.rfile.read()
        self.wfile.write(repr(self.client_address).encode() + b"\n")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forking_server_at_max_children_keeps_expiring_headers() -> None:
    """socketserver's blocking waitpid at max_children froze the loop: parked headers were
    neither expired nor evicted, and a good client timed out.  Now, while two children hold
    the cap, a silent client parked before is closed at its deadline, new clients wait in the
    backlog (the listener rests), and a good one is served as soon as a child exits.  The loop
    does not spin meanwhile (the server runs in this process: its CPU is this process's), and
    every descriptor is given back."""
    baseline = len(os.listdir("/proc/self/fd"))
    with serve(
        "ForkingProxyTCPServer",
        HoldHandler,
        max_children=2,
        proxy_header_timeout=1.0,
        poll_interval=0.05,
    ) as running:
        holders: list[socket.socket] = []
        silent = running.connect()
        try:
            began = time.monotonic()
            for _ in range(2):
                sock = running.connect()
                sock.sendall(HEADER)
                holders.append(sock)
            assert wait_for(lambda: len(running.server.active_children or ()) == 2, timeout=5)
            cpu, wall = time.process_time(), time.monotonic()
            assert read_all(silent, limit=5) == b""  # closed by its header deadline, at the cap
            assert time.monotonic() - began < 3.0
            time.sleep(0.5)  # still at the cap, nothing parked: the loop must sleep
            assert (time.process_time() - cpu) / (time.monotonic() - wall) < 0.10

            good = running.connect()
            good.sendall(HEADER + PAYLOAD)
            good.shutdown(socket.SHUT_WR)
            time.sleep(0.3)
            holders[0].shutdown(socket.SHUT_WR)  # its child answers and exits
            assert read_all(holders[0]) == repr(REAL_V4).encode() + b"\n"
            began = time.monotonic()
            assert read_all(good, limit=5) == repr(REAL_V4).encode() + b"\n"
            assert time.monotonic() - began < 1.0
            good.close()
        finally:
            # The children share this process's client sockets (the server runs in a thread
            # here): shutdown, not just close, ends their reads, so server_close's reap returns.
            for sock in [silent, *holders]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= baseline, timeout=5)
