"""Slow and silent clients never stall a good one, cost no CPU, and are closed on time (issue 5, acceptance 1, 3).

Against each of the six classes, run in a subprocess (``stress_server.py``) with
``proxy_header_timeout = 2.0``: 200 connections that never send, 200 that send
the header one byte every 0.5 s, 200 that send half a header and close (100
shut their write side so the server's close can be timed, 100 close at once);
meanwhile 100 well-behaved requests.  ``proxy_max_pending`` is raised to 1000
so that all 400 slow connections stay parked for the whole window (eviction is
tested on its own below); with the default 256 the oldest would be evicted early,
which would only make the figures look better.

Measured and printed (the lead reads them from the report): the 99th percentile
answer time of the good requests (asserted < 0.5 s), the server's CPU while
only the slow clients are parked (asserted < 10 % of one core; good requests
are kept out of that window because a fork per request is real work that has
nothing to do with parking), the longest lifetime of a bad connection
(asserted < timeout + 1 s), and the descriptor counts before and after.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from stress_kit import CLASS_NAMES, REAL_V4, V1_HEADER, ServerProcess, percentile, wait_until

HEADER_TIMEOUT = 2.0
SILENT = TRICKLE = HALF = 200
GOOD = 100
TRICKLE_PERIOD = 0.5
CPU_WINDOW = 1.0


@dataclass
class Bad:
    """One hostile connection and what the client saw of it."""

    sock: socket.socket
    kind: str  # "silent", "trickle", "half-shutdown", "half-close"
    start: float
    end: float | None = None
    sent: int = 0
    answered: bool = False


@dataclass
class Load:
    """The slow clients, driven by one selector thread of the test process."""

    srv: ServerProcess
    header: bytes
    limit: float
    conns: list[Bad] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def _connect(self, kind: str) -> Bad:
        sock = self.srv.connect(timeout=5.0)
        return Bad(sock, kind, time.monotonic())

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test, never swallowed
            self.error = exc
            self.ready.set()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        half = self.header[: len(self.header) // 2]
        kinds = ["silent"] * SILENT + ["trickle"] * TRICKLE + ["half-shutdown", "half-close"] * (HALF // 2)
        for i, kind in enumerate(kinds):
            bad = self._connect(kind)
            if kind.startswith("half"):
                bad.sock.sendall(half)
                bad.sent = len(half)
                if kind == "half-close":
                    bad.sock.close()
                    bad.end = bad.start  # nothing left to observe on our side
                    self.conns.append(bad)
                    continue
                bad.sock.shutdown(socket.SHUT_WR)
            bad.sock.setblocking(False)
            sel.register(bad.sock, selectors.EVENT_READ, bad)
            self.conns.append(bad)
            if i % 25 == 24:
                time.sleep(0.005)  # keep within the listen backlog: no SYN retransmits skewing times
        self.ready.set()
        live = sum(1 for bad in self.conns if bad.end is None)
        end = time.monotonic() + self.limit
        tick = time.monotonic() + TRICKLE_PERIOD
        while live and time.monotonic() < end:
            now = time.monotonic()
            if now >= tick:
                for bad in self.conns:
                    if bad.kind == "trickle" and bad.end is None and bad.sent < len(self.header):
                        try:
                            bad.sock.send(self.header[bad.sent : bad.sent + 1])
                            bad.sent += 1
                        except OSError:
                            pass  # closed by the server: the selector reports it
                tick += TRICKLE_PERIOD
            for key, _ in sel.select(timeout=max(0.0, min(tick, end) - time.monotonic())):
                bad = key.data
                try:
                    data = bad.sock.recv(4096)
                except OSError:
                    data = b""
                bad.answered = bad.answered or bool(data)
                bad.end = time.monotonic()
                sel.unregister(bad.sock)
                bad.sock.close()
                live -= 1
        for bad in self.conns:
            if bad.end is None:
                sel.unregister(bad.sock)
                bad.sock.close()
        sel.close()


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_slow_and_silent_clients_never_stall_good_ones_T1_G7(name: str) -> None:
    # A listen backlog of 1024: 600 connections in a burst would otherwise overflow the default 128
    # whenever the loop is descheduled for a few ms, and a dropped SYN costs a 1 s retransmit that
    # has nothing to do with the mixin (the accept rate is not what this test measures).
    attrs = {"proxy_header_timeout": HEADER_TIMEOUT, "proxy_max_pending": 1000, "request_queue_size": 1024}
    with ServerProcess(name, attrs) as srv:
        baseline = srv.warm_up()
        cpu_idle_0 = srv.cpu()
        load = Load(srv, V1_HEADER, limit=HEADER_TIMEOUT + 4.0)
        thread = threading.Thread(target=load.run, daemon=True)
        thread.start()
        assert load.ready.wait(20.0), "the slow clients could not connect"
        assert load.error is None, load.error
        connected_s = time.monotonic() - load.conns[0].start

        # CPU while the slow clients are parked (no good traffic in this window).
        time.sleep(0.2)
        t0, c0 = time.monotonic(), srv.cpu()
        parked_fds_start = srv.fds()
        time.sleep(CPU_WINDOW)
        t1, c1 = time.monotonic(), srv.cpu()
        cpu_pct = 100 * (c1 - c0) / (t1 - t0)
        parked_fds = min(parked_fds_start, srv.fds())
        baseline_total = sum(baseline.values())

        # 100 good requests, 4 at a time, while the slow clients are still parked.
        def one(_: int) -> float:
            took, report = srv.good_request()
            assert report["client"][:2] == list(REAL_V4), report
            return took

        good_start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            times = list(pool.map(one, range(GOOD)))
        good_window = (good_start - load.conns[0].start, time.monotonic() - load.conns[0].start)

        thread.join(HEADER_TIMEOUT + 10.0)
        assert not thread.is_alive()
        assert load.error is None, load.error
        lifetimes = {
            kind: max(bad.end - bad.start for bad in load.conns if bad.kind == kind and bad.end is not None)
            for kind in ("silent", "trickle", "half-shutdown")
        }
        still_open = [bad.kind for bad in load.conns if bad.end is None]
        answered = [bad.kind for bad in load.conns if bad.answered]
        p99 = percentile(times, 99)
        print(
            f"\n[slow-clients] {name}: connect 600 in {connected_s:.2f}s; p99 {1000 * p99:.1f} ms "
            f"(max {1000 * max(times):.1f} ms, median {1000 * percentile(times, 50):.1f} ms) for {GOOD} good "
            f"requests at t={good_window[0]:.2f}-{good_window[1]:.2f}s; server CPU {cpu_pct:.1f}% of a core "
            f"over {t1 - t0:.2f}s with 400 parked; longest bad lifetime "
            + ", ".join(f"{k} {v:.2f}s" for k, v in lifetimes.items())
            + f"; server fds {baseline_total} baseline {baseline}, {parked_fds} while parked, {srv.fds()} after; "
            f"CPU since start {srv.cpu():.2f}s (before the load {cpu_idle_0:.2f}s)"
        )
        # The CPU window really had the slow clients parked (listener, selector, stdio, 400 sockets).
        assert parked_fds >= baseline_total + SILENT + TRICKLE, (parked_fds, baseline_total)
        assert not still_open, f"{len(still_open)} bad connections never closed: {set(still_open)}"
        assert not answered, f"bad connections got an answer: {answered[:5]}"
        assert p99 < 0.5, f"p99 {p99:.3f}s"
        assert cpu_pct < 10.0, f"server used {cpu_pct:.1f}% of a core with slow clients parked"
        for kind, longest in lifetimes.items():
            assert longest < HEADER_TIMEOUT + 1.0, f"a {kind} connection lived {longest:.2f}s"

        srv.settle(baseline)
        srv.stop()
        log = srv.stderr()
        assert "Traceback" not in log, log[-3000:]
        closed_lines = [line for line in log.splitlines() if line.startswith("LOG ") and ": closed: " in line]
        # Each refusal is one log line: exactly one per bad connection.
        assert len(closed_lines) == SILENT + TRICKLE + HALF, (len(closed_lines), closed_lines[:5])


@pytest.mark.parametrize("name", ["ThreadingProxyTCPServer", "ThreadingProxyUnixStreamServer"])
def test_max_pending_evicts_the_oldest_parked_connection(name: str) -> None:
    """Past ``proxy_max_pending`` the oldest parked connection is closed at once and logged, one line each."""
    attrs = {"proxy_header_timeout": 10.0, "proxy_max_pending": 10}
    # Eviction happens at accept, whatever the poll interval; socketserver's default 0.5 s would
    # only be waited out by shutdown() at the end.
    with ServerProcess(name, attrs, poll_interval=0.05) as srv:
        baseline = srv.warm_up()
        socks = []
        for _ in range(30):
            socks.append(srv.connect())
            time.sleep(0.01)  # accept order == connect order
        for sock in socks:
            sock.settimeout(0.0)
        start = time.monotonic()

        def evicted(sock: socket.socket) -> bool:
            try:
                return sock.recv(1) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

        wait_until(lambda: all(evicted(s) for s in socks[:20]), 3.0)
        first = [evicted(s) for s in socks[:20]]
        last = [evicted(s) for s in socks[20:]]
        took = time.monotonic() - start
        _, _report = srv.good_request()  # still serving with 10 parked
        for sock in socks:
            sock.close()
        print(f"\n[max-pending] {name}: 20 oldest of 30 evicted within {took:.2f}s; 10 newest still parked")
        assert all(first), first
        assert not any(last), last
        srv.settle(baseline)
        srv.stop()
        log = srv.stderr()
        # 20 evictions for the 30 silent clients; one more when the good client's connection was
        # accepted before its header arrived (a loaded machine): it parked as the 11th, and the
        # oldest of the 10 waiting made room, as max_pending says.
        assert log.count("(proxy_max_pending)") in (20, 21), log[-2000:]
        assert "Traceback" not in log


@pytest.mark.parametrize("name", ["ThreadingProxyTCPServer", "ThreadingProxyUnixStreamServer"])
def test_ambiguous_prefix_under_opt_in_policy_does_not_spin(name: str) -> None:
    """Under USE, 200 clients stop after ``PR`` (it may still be payload, so it stays in the kernel):
    the server waits without spinning (SO_RCVLOWAT on TCP, a timer on UNIX) and answers a good client.

    On UNIX sockets a peek cannot see EOF behind the two queued bytes, so those connections are
    released at their deadline (``proxy_header_timeout``), not when the peers close: hence 2 s here."""
    with ServerProcess(name, {"proxy_header_timeout": HEADER_TIMEOUT, "proxy_policy": "USE"}) as srv:
        baseline = srv.warm_up()
        socks = []
        for _ in range(200):
            sock = srv.connect()
            sock.sendall(b"PR")
            socks.append(sock)
        time.sleep(0.3)
        c0, t0 = srv.cpu(), time.monotonic()
        time.sleep(CPU_WINDOW)
        cpu_pct = 100 * (srv.cpu() - c0) / (time.monotonic() - t0)
        took, report = srv.good_request()
        for sock in socks:
            sock.close()
        print(f"\n[opt-in prefix] {name}: CPU {cpu_pct:.1f}% of a core with 200 'PR' parked; good answer "
              f"{1000 * took:.1f} ms")
        assert report["client"][:2] == list(REAL_V4)
        assert cpu_pct < 10.0
        assert took < 0.5
        srv.settle(baseline)


def split_after_prefix_latency(name: str) -> float:
    """Extra seconds a USE-policy client waits when its header arrives as ``PR`` + 50 ms + the rest."""
    with ServerProcess(name, {"proxy_header_timeout": 5.0, "proxy_policy": "USE"}) as srv:
        srv.warm_up()
        worst = 0.0
        for _ in range(3):
            start = time.monotonic()
            with srv.connect() as sock:
                sock.sendall(b"PR")
                time.sleep(0.05)
                sock.sendall(V1_HEADER[2:] + b"ping\n")
                assert sock.recv(4096)
            worst = max(worst, time.monotonic() - start - 0.05)
        return worst


def test_split_after_ambiguous_prefix_is_answered_promptly_on_tcp() -> None:
    """TCP: SO_RCVLOWAT wakes the loop when the rest of the header arrives."""
    assert split_after_prefix_latency("ThreadingProxyTCPServer") < 0.2


def test_split_after_ambiguous_prefix_is_answered_promptly_on_unix() -> None:
    """UNIX (no SO_RCVLOWAT): the short retry timer should bound the extra wait, not poll_interval."""
    assert split_after_prefix_latency("ThreadingProxyUnixStreamServer") < 0.2


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_burst_of_completed_headers_is_served_without_poll_waits(name: str) -> None:
    """200 parked connections complete their headers in the same instant (the server is stopped with
    SIGSTOP while they send): the loop hands them out back to back, none waits for poll_interval
    (DESIGN: while completed connections are queued, the descriptor stays readable)."""
    with ServerProcess(name, {"proxy_header_timeout": 10.0, "request_queue_size": 1024}) as srv:
        baseline = srv.warm_up()
        socks = [srv.connect(timeout=10.0) for _ in range(200)]
        assert wait_until(lambda: srv.fds() >= sum(baseline.values()) + 200, 5.0)
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            for sock in socks:
                sock.sendall(V1_HEADER + b"ping\n")
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        start = time.monotonic()
        answered = 0
        for sock in socks:
            try:
                answered += bool(sock.recv(4096))
            except OSError:
                pass
            sock.close()
        took = time.monotonic() - start
        print(f"\n[burst] {name}: 200 completed together, all answered in {took:.2f}s")
        assert answered == 200
        assert took < 5.0  # 200 waits of poll_interval (0.5 s) would take 100 s
        srv.settle(baseline)
