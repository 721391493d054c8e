"""Connections per second and server CPU per connection: plain vs proxied.

Why this exists: the mixin's goal is to be close to free, so a server with it
must accept connections at the rate the plain ``socketserver`` does and spend
about the same CPU on each.  This script measures, in the same run, each pair

    threading  socketserver.ThreadingTCPServer  vs proxyproto.ThreadingProxyTCPServer
    sync       socketserver.TCPServer           vs proxyproto.ProxyTCPServer
    forking    socketserver.ForkingTCPServer    vs proxyproto.ForkingProxyTCPServer

with the proxied server fed v1 and v2 headers (64 distinct addresses; header
and payload in one write, as haproxy sends them) and the plain one fed the
payload only.  The handler reads the payload (5 bytes) and writes a 3-byte
reply.

How: each server runs in its own process (``python bench/conn.py --serve
KIND``), on 127.0.0.1 and a port picked by the kernel.  After a warm-up,
its CPU (user + system, ``getrusage`` of itself and of its reaped children,
so the forked handlers count) is read through a control pipe before and after
the load, which comes from several client processes, each making sequential
connections (connect, send, read the reply, close).  Every case is bounded
in count and in time.  The rounds interleave the cases (so drift hurts all
alike) and the table gives the median.

    python bench/conn.py                   # 3 rounds x 2,000 connections per case
    python bench/conn.py --quick           # 1 round x 1,000
    python bench/conn.py --syscalls 500    # system calls per connection (strace -f -c)
    python bench/conn.py --json out.json

Note: on a 2-core machine the clients and the server share the cores, so
conn/s is a property of the whole loopback system; CPU per connection is the
server's own.  Nothing here is part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PAYLOAD = b"ping\n"
REPLY = b"ok\n"
SIG = b"\r\n\r\n\x00\r\nQUIT\n"

# kind -> (pair, module, class name, header version or 0)
KINDS: dict[str, tuple[str, str, str, int]] = {
    "threading-plain": ("threading", "socketserver", "ThreadingTCPServer", 0),
    "threading-v1": ("threading", "proxyproto", "ThreadingProxyTCPServer", 1),
    "threading-v2": ("threading", "proxyproto", "ThreadingProxyTCPServer", 2),
    "sync-plain": ("sync", "socketserver", "TCPServer", 0),
    "sync-v1": ("sync", "proxyproto", "ProxyTCPServer", 1),
    "sync-v2": ("sync", "proxyproto", "ProxyTCPServer", 2),
    "forking-plain": ("forking", "socketserver", "ForkingTCPServer", 0),
    "forking-v1": ("forking", "proxyproto", "ForkingProxyTCPServer", 1),
    "forking-v2": ("forking", "proxyproto", "ForkingProxyTCPServer", 2),
}


# --------------------------------------------------------------------------
# The server process


def cpu_us() -> int:
    """User + system CPU of this process and its reaped children, in microseconds."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return int(total * 1e6)


def serve(kind: str) -> None:
    """Run one server until told to stop on stdin; answer CPU queries there.

    Protocol on stdin/stdout, one line each: the server prints ``PORT n`` when
    listening; ``cpu`` answers ``CPU us`` once every forked child is reaped;
    ``stop`` shuts the server down.
    """
    _, module, name, _ = KINDS[kind]
    base = getattr(__import__(module), name)

    class Handler(socketserver.BaseRequestHandler):
        """Read the few payload bytes, write a short reply."""

        def handle(self) -> None:
            self.request.recv(64)
            self.request.sendall(REPLY)

    class Server(base):  # type: ignore[misc,valid-type]
        allow_reuse_address = True
        daemon_threads = True
        block_on_close = False
        request_queue_size = 256

    srv = Server(("127.0.0.1", 0), Handler)
    print(f"PORT {srv.server_address[1]}", flush=True)

    def control() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "cpu":
                deadline = time.monotonic() + 10
                while getattr(srv, "active_children", None) and time.monotonic() < deadline:
                    time.sleep(0.02)  # ForkingMixIn reaps in service_actions
                print(f"CPU {cpu_us()}", flush=True)
            elif cmd == "stop":
                break
        srv.shutdown()

    threading.Thread(target=control, daemon=True).start()
    srv.serve_forever(poll_interval=0.05)
    srv.server_close()


class ServerProc:
    """A server subprocess and its control pipe."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=ROOT)
        self.port = int(self._expect("PORT"))
        self.addr = ("127.0.0.1", self.port)

    def _expect(self, word: str) -> str:
        out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        line = out.readline()
        if not line.startswith(word + " "):
            self.stop()
            raise RuntimeError(f"{self.kind} server said {line!r} (expected {word})")
        return line.split(" ", 1)[1].strip()

    def cpu(self) -> int:
        """The server's CPU so far (self + reaped children), microseconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("cpu\n")
        self.proc.stdin.flush()
        return int(self._expect("CPU"))

    def stop(self) -> None:
        """Ask the server to stop; kill it (by PID) if it does not within 10 s."""
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------
# The clients


def headers(version: int) -> list[bytes]:
    """64 distinct headers of that version (b"" for the plain server)."""
    if version == 0:
        return [b""]
    out = []
    for i in range(64):
        src, dst, sport, dport = f"198.51.100.{i + 1}", "203.0.113.7", 40000 + i, 443
        if version == 1:
            out.append(b"PROXY TCP4 %s %s %d %d\r\n" % (src.encode(), dst.encode(), sport, dport))
        else:
            addr = struct.pack("!4s4sHH", socket.inet_aton(src), socket.inet_aton(dst), sport, dport)
            out.append(SIG + struct.pack("!BBH", 0x21, 0x11, len(addr)) + addr)
    return out


def client(addr: tuple[str, int], msgs: list[bytes], count: int, deadline: float,
           go: Any, results: Any) -> None:
    """Make ``count`` sequential connections (or until ``deadline``); report counts and time."""
    go.wait()
    t0 = time.perf_counter()
    done = errors = 0
    n = len(msgs)
    for i in range(count):
        if time.monotonic() > deadline:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5.0)
        try:
            s.connect(addr)
            s.sendall(msgs[i % n])
            if s.recv(64) != REPLY:
                errors += 1
        except OSError:
            errors += 1
        finally:
            s.close()
        done += 1
    results.put((done, errors, time.perf_counter() - t0))


def load(addr: tuple[str, int], version: int, total: int, clients: int, limit: float) -> dict[str, Any]:
    """Drive ``total`` connections from ``clients`` processes; return rate and errors."""
    ctx = mp.get_context("fork")
    go = ctx.Event()
    results = ctx.Queue()
    msgs = [h + PAYLOAD for h in headers(version)]
    deadline = time.monotonic() + limit
    per = [total // clients + (1 if k < total % clients else 0) for k in range(clients)]
    procs = [ctx.Process(target=client, args=(addr, msgs, n, deadline, go, results)) for n in per]
    for p in procs:
        p.start()
    time.sleep(0.05)
    go.set()
    got = [results.get(timeout=limit + 30) for _ in procs]
    for p in procs:
        p.join(10)
    done = sum(g[0] for g in got)
    wall = max(g[2] for g in got)
    return {"done": done, "errors": sum(g[1] for g in got), "wall": wall, "rate": done / wall}


# --------------------------------------------------------------------------
# Rate and CPU


def run_case(kind: str, count: int, clients: int, limit: float, warmup: int) -> dict[str, Any]:
    """One measurement of one server kind: warm up, CPU before, load, CPU after."""
    version = KINDS[kind][3]
    srv = ServerProc(kind)
    try:
        load(srv.addr, version, warmup, clients, limit)
        c0 = srv.cpu()
        r = load(srv.addr, version, count, clients, limit)
        c1 = srv.cpu()
    finally:
        srv.stop()
    r["cpu_us_per_conn"] = (c1 - c0) / max(1, r["done"])
    return r


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    """Median of one figure over the rounds."""
    return statistics.median(r[key] for r in rounds)


def rate_table(res: dict[str, list[dict[str, Any]]]) -> str:
    """Plain aligned text: conn/s, CPU us/conn, ratios proxy/plain."""
    lines = [f"{'pair':<10}{'server':<34}{'conn/s':>9}{'CPU us/conn':>13}"
             f"{'conn/s ratio':>14}{'CPU ratio':>11}{'errors':>8}"]
    for pair in ("threading", "sync", "forking"):
        base = res.get(f"{pair}-plain")
        for kind in (f"{pair}-plain", f"{pair}-v1", f"{pair}-v2"):
            rounds = res.get(kind)
            _, _, name, v = KINDS[kind]
            label = f"{name} ({'no header' if v == 0 else f'v{v} header'})"
            if not rounds:
                lines.append(f"{pair:<10}{label:<34}{'not run':>9}")
                continue
            rate = median_of(rounds, "rate")
            cpu = median_of(rounds, "cpu_us_per_conn")
            errs = sum(r["errors"] for r in rounds)
            if base and v:
                rr = f"{rate / median_of(base, 'rate'):.3f}x"
                cr = f"{cpu / median_of(base, 'cpu_us_per_conn'):.3f}x"
            else:
                rr = cr = ""
            lines.append(f"{pair:<10}{label:<34}{rate:>9.0f}{cpu:>13.1f}{rr:>14}{cr:>11}{errs:>8}")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# System calls


STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, tuple[int, int]]:
    """``strace -c`` table -> {syscall: (calls, errors)} (the "total" row dropped)."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        m = STRACE_ROW.match(line)
        if m and m.group(3) != "total":
            out[m.group(3)] = (int(m.group(1)), int(m.group(2) or 0))
    return out


def count_syscalls(kind: str, n: int, clients: int, limit: float) -> dict[str, Any]:
    """Attach ``strace -f -c`` to a warmed-up server, drive ``n`` connections, detach."""
    version = KINDS[kind][3]
    srv = ServerProc(kind)
    fd, path = tempfile.mkstemp(prefix=f"strace-{kind}-", suffix=".txt")
    os.close(fd)
    try:
        load(srv.addr, version, 50, clients, limit)
        # -f with -p attaches every thread of the process and follows new ones.
        st = subprocess.Popen(["strace", "-f", "-c", "-o", path, "-p", str(srv.proc.pid)],
                              stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # let strace attach to every thread
        r = load(srv.addr, version, n, clients, limit)
        time.sleep(0.3)
        if kind.startswith("forking"):
            srv.cpu()  # wait until every child is reaped (their wait4 counted)
        st.send_signal(signal.SIGINT)
        try:
            st.wait(30)
        except subprocess.TimeoutExpired:
            st.kill()
            st.wait(5)
        with open(path) as f:
            summary = parse_strace_summary(f.read())
    finally:
        srv.stop()
        os.unlink(path)
    return {"done": r["done"], "errors": r["errors"], "calls": summary}


def syscall_tables(n: int, clients: int, limit: float, pairs: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Per pair: total per connection for plain, v1, v2, and the per-syscall difference."""
    out: list[str] = []
    data: dict[str, Any] = {}
    for pair in pairs:
        res = {k: count_syscalls(k, n, clients, limit) for k in (f"{pair}-plain", f"{pair}-v1", f"{pair}-v2")}
        data[pair] = res
        names = sorted(set().union(*(r["calls"] for r in res.values())))
        per = {k: {s: r["calls"].get(s, (0, 0))[0] / max(1, r["done"]) for s in names} for k, r in res.items()}
        errs = {k: {s: r["calls"].get(s, (0, 0))[1] / max(1, r["done"]) for s in names} for k, r in res.items()}
        plain, v1, v2 = (f"{pair}-plain", f"{pair}-v1", f"{pair}-v2")
        out.append(f"{pair}: system calls per connection, strace -f -c over {n} connections"
                   f" (errors in brackets)")
        out.append(f"  {'syscall':<18}{'plain':>15}{'v1':>15}{'v2':>15}{'v1-plain':>10}{'v2-plain':>10}")

        def cell(k: str, s: str, per: dict[str, dict[str, float]] = per,
                 errs: dict[str, dict[str, float]] = errs) -> str:
            e = errs[k][s]
            return f"{per[k][s]:.2f}" + (f" [{e:.2f}]" if e >= 0.005 else "")
        rows = sorted(names, key=lambda s: (-max(abs(per[v1][s] - per[plain][s]),
                                                 abs(per[v2][s] - per[plain][s])), s))
        for s in rows:
            if max(per[k][s] for k in per) < 0.005:
                continue
            out.append(f"  {s:<18}{cell(plain, s):>15}{cell(v1, s):>15}{cell(v2, s):>15}"
                       f"{per[v1][s] - per[plain][s]:>+10.2f}{per[v2][s] - per[plain][s]:>+10.2f}")
        tot = {k: sum(per[k].values()) for k in per}
        out.append(f"  {'TOTAL':<18}{tot[plain]:>15.2f}{tot[v1]:>15.2f}{tot[v2]:>15.2f}"
                   f"{tot[v1] - tot[plain]:>+10.2f}{tot[v2] - tot[plain]:>+10.2f}")
        bad = {k: r["errors"] for k, r in res.items() if r["errors"]}
        if bad:
            out.append(f"  client errors: {bad}")
        out.append("")
    return "\n".join(out), data


# --------------------------------------------------------------------------


def machine() -> str:
    """CPU model, cores and Python version, for the table's header."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"machine: {cpu} ({os.cpu_count()} cores), {platform.platform()}\n"
            f"python:  {platform.python_implementation()} {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    """Parse options; run the rate/CPU table or the system-call table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", metavar="KIND", choices=sorted(KINDS), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 round of 1,000 connections per case")
    ap.add_argument("--count", type=int, help="connections per case and round (default 2,000)")
    ap.add_argument("--rounds", type=int, help="rounds, cases interleaved (default 3)")
    ap.add_argument("--clients", type=int, default=3, help="client processes (default 3)")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds at most per case and round")
    ap.add_argument("--pairs", default="threading,sync,forking", help="subset, comma-separated")
    ap.add_argument("--syscalls", type=int, metavar="N", help="count system calls over N connections")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    pairs = [p for p in args.pairs.split(",") if p]
    cmd = "python bench/conn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(machine())
    print(f"command: {cmd.rstrip()}")
    try:
        import proxyproto  # noqa: F401
    except ImportError as exc:
        print(f"proxyproto not importable: {exc}")
    if args.syscalls:
        print(f"clients: {args.clients} processes, loopback; header and payload in one write\n", flush=True)
        text, data = syscall_tables(args.syscalls, args.clients, args.limit, pairs)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"syscalls": data}, f, indent=2)
        return 0

    count = args.count or (1000 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = min(200, count // 5)
    print(f"method:  {rounds} round(s) x {count} connections per case (after {warmup} warm-up),"
          f" {args.clients} client processes, median over rounds\n", flush=True)
    res: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for pair in pairs:
            for kind in (f"{pair}-plain", f"{pair}-v1", f"{pair}-v2"):
                if kind in failed:
                    continue
                try:
                    res.setdefault(kind, []).append(run_case(kind, count, args.clients, args.limit, warmup))
                except (RuntimeError, OSError, ValueError) as exc:
                    failed[kind] = str(exc)
    print(rate_table(res))
    for kind, why in failed.items():
        print(f"{kind}: not run: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": res, "failed": failed}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
