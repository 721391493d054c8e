"""uvicorn with and without the PROXY header: requests/s and server CPU per request, plain vs wrapped.

The pair of issue 13: the same hello-world ASGI app (``app`` below) under
uvicorn's own command line, ``--http h11`` (plain, clients send no header)
against ``--http proxyproto.uvicorn:H11`` (wrapped, every connection starts
with a PROXY header, ``PROXYPROTO_ALLOW_IPS=127.0.0.1``), and the same for
httptools.  Two modes: ``close`` (one connection per request, the
acceptance case: the wrapper's cost is per connection) and ``keepalive``
(one connection per client, many requests: what is left per request is the
transport indirection).

Method, for a machine whose speed drifts by up to 2x over minutes:

* every server runs for the whole benchmark in its own process, started by
  this script and stopped by PID (a parent-death signal stops it too if this
  script dies);
* the load comes from client processes of their own (raw blocking sockets,
  sequential requests), so their CPU is never the server's;
* a round runs each (server, mode) for ``--seconds``; plain and wrapped of a
  pair run back to back, in alternating order from round to round (ABBA);
* the server's CPU is user + system time of its process from
  ``/proc/PID/stat``, read before and after each run;
* the table gives medians over rounds, and each ratio is the median of the
  per-round ratios of adjacent runs, with its spread (min-max).

Run ``python bench/uvicorn_pair.py --help`` for the options; bench/README.md
has the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
IMPLS = ("h11", "httptools")
MODES = ("close", "keepalive")
WRAPPED_CLASS = {"h11": "proxyproto.uvicorn:H11", "httptools": "proxyproto.uvicorn:HttpTools"}


# --------------------------------------------------------------------------
# The application (imported by uvicorn in the server processes: stdlib only)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Hello world that names the client, as an app reading ``scope["client"]`` (an access log, say) would."""
    if scope["type"] != "http":
        return
    body = b"Hello, %s\n" % scope["client"][0].encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------
# The servers


#: ``--pin``: (the server's CPUs, the clients' CPUs), else None (the scheduler places every process).
PIN: tuple[set[int], set[int]] | None = None


def _die_with_parent() -> None:
    """In the server child: SIGTERM when the benchmark's process dies, so no server outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether the port is in LISTEN state (from the kernel's table: no probe connection)."""
    with open("/proc/net/tcp") as f:
        next(f)
        return any(p[3] == "0A" and int(p[1].rsplit(":", 1)[1], 16) == port for p in (line.split() for line in f))


@dataclass
class Server:
    """One uvicorn process: ``impl`` (h11, httptools), wrapped or not, on a loopback port."""

    impl: str
    wrapped: bool
    loop: str
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def name(self) -> str:
        return f"{self.impl}-{'wrapped' if self.wrapped else 'plain'}"

    def start(self, timeout: float = 20.0) -> None:
        """Start ``python -m uvicorn`` and wait until it listens; up to 3 tries for a port taken meanwhile."""
        for _ in range(3):
            self.port = _free_port()
            http = WRAPPED_CLASS[self.impl] if self.wrapped else self.impl
            argv = [
                sys.executable, "-m", "uvicorn", "uvicorn_pair:app", "--app-dir", HERE,
                "--host", "127.0.0.1", "--port", str(self.port), "--http", http, "--loop", self.loop,
                "--lifespan", "off", "--log-level", "warning", "--no-access-log", "--backlog", "1024",
            ]  # fmt: skip
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
            if self.wrapped:
                env["PROXYPROTO_ALLOW_IPS"] = "127.0.0.1"
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            if PIN is not None:
                os.sched_setaffinity(self.proc.pid, PIN[0])
            deadline = time.monotonic() + timeout
            while not _listening(self.port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            else:
                return
            self.stop()
        raise RuntimeError(f"{self.name}: uvicorn did not start (exit code {self.proc and self.proc.returncode})")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far, from /proc/PID/stat."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14, 15 of stat(5)

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------
# The clients


def headers(version: int) -> list[bytes]:
    """64 PROXY headers with distinct sources (as many clients behind one proxy); [b""] for version 0."""
    if version == 0:
        return [b""]
    out = []
    for i in range(64):
        src, dst, sport = f"198.51.100.{i + 1}", "203.0.113.7", 40000 + i
        if version == 1:
            out.append(b"PROXY TCP4 %s %s %d 443\r\n" % (src.encode(), dst.encode(), sport))
        else:
            addr = struct.pack("!4s4sHH", socket.inet_aton(src), socket.inet_aton(dst), sport, 443)
            out.append(SIG + struct.pack("!BBH", 0x21, 0x11, len(addr)) + addr)
    return out


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
REQUEST_CLOSE = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def read_response(sock: socket.socket, pending: bytes) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length (head + body) and the bytes after it."""
    data = pending
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    start = head.lower().find(b"content-length:")
    length = int(head[start + 15 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def client(port: int, version: int, mode: str, seconds: float, go: Any, results: Any) -> None:
    """Sequential requests until ``seconds`` have passed; report (requests, errors, wall time)."""
    prefixes = headers(version)
    if PIN is not None:
        os.sched_setaffinity(0, PIN[1])
    go.wait()
    t0 = time.perf_counter()
    stop = t0 + seconds
    done = errors = 0
    i = 0
    sock: socket.socket | None = None
    pending = b""
    while time.perf_counter() < stop:
        try:
            if mode == "close":
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(prefixes[i % len(prefixes)] + REQUEST_CLOSE)
                    i += 1
                    data = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                ok = data.startswith(b"HTTP/1.1 200")
            else:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock.sendall(prefixes[i % len(prefixes)])
                    i += 1
                    pending = b""
                sock.sendall(REQUEST)
                response, pending = read_response(sock, pending)
                ok = response.startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
            if sock is not None:
                sock.close()
                sock = None
        done += ok
        errors += not ok
    if sock is not None:
        sock.close()
    results.put((done, errors, time.perf_counter() - t0))


@dataclass
class Run:
    """One measurement of one server in one mode."""

    requests: int
    errors: int
    wall: float
    cpu: float  # server CPU seconds during the run

    @property
    def rate(self) -> float:
        return self.requests / self.wall

    @property
    def cpu_us(self) -> float:
        return self.cpu * 1e6 / max(1, self.requests)

    @property
    def busy(self) -> float:
        """Share of one core the server used: near 1.0 means the server, not the clients, set the rate."""
        return self.cpu / self.wall


def measure(server: Server, mode: str, version: int, clients: int, seconds: float) -> Run:
    """Drive the server with ``clients`` processes for ``seconds``; its CPU from /proc around the load."""
    ctx = mp.get_context("fork")
    go = ctx.Event()
    results = ctx.Queue()
    v = version if server.wrapped else 0
    procs = [ctx.Process(target=client, args=(server.port, v, mode, seconds, go, results)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.1)  # the clients are forked and waiting
    c0 = server.cpu_seconds()
    go.set()
    got = [results.get(timeout=seconds + 30) for _ in procs]
    c1 = server.cpu_seconds()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return Run(sum(g[0] for g in got), sum(g[1] for g in got), max(g[2] for g in got), c1 - c0)


def check(server: Server, version: int) -> str:
    """One request: the body names the client the app saw (the header's source when wrapped)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall((headers(version)[0] if server.wrapped else b"") + REQUEST)
        response, _ = read_response(s, b"")
    return response.rpartition(b"\r\n\r\n")[2].decode().strip()


# --------------------------------------------------------------------------
# The table


@dataclass
class Results:
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)  # (server name, mode) -> rounds
    ratios: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)  # (impl, mode)


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def table(res: Results, impls: list[str], modes: list[str]) -> str:
    """Medians per server and mode; wrapped/plain as the median of per-round ratios, with spread."""
    lines = [
        f"{'mode':<10}{'server':<20}{'req/s':>8}{'CPU us/req':>12}{'busy':>6}{'errors':>7}"
        f"{'req/s ratio (spread)':>24}{'CPU ratio (spread)':>22}"
    ]
    for mode in modes:
        for impl in impls:
            for wrapped in (False, True):
                name = f"{impl}-{'wrapped' if wrapped else 'plain'}"
                runs = res.runs.get((name, mode), [])
                if not runs:
                    continue
                rate = statistics.median(r.rate for r in runs)
                cpu = statistics.median(r.cpu_us for r in runs)
                busy = statistics.median(r.busy for r in runs)
                errors = sum(r.errors for r in runs)
                rr = cr = ""
                pairs = res.ratios.get((impl, mode), [])
                if wrapped and pairs:
                    rates = [p[0] for p in pairs]
                    cpus = [p[1] for p in pairs]
                    rr = f"{statistics.median(rates):.3f}x ({_spread(rates)})"
                    cr = f"{statistics.median(cpus):.3f}x ({_spread(cpus)})"
                lines.append(f"{mode:<10}{name:<20}{rate:>8.0f}{cpu:>12.1f}{busy:>6.2f}{errors:>7}{rr:>24}{cr:>22}")
        lines.append("")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = []
    for module in ("uvicorn", "h11", "httptools", "uvloop"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} missing")
    return (
        f"machine: {cpu} ({os.cpu_count()} cores), {platform.platform()}\n"
        f"python:  {platform.python_implementation()} {platform.python_version()}; {', '.join(versions)}"
    )


def main(argv: list[str] | None = None) -> int:
    """Start the servers, run the interleaved rounds, print the table; stop every server by PID."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per server, mode and round (default 3)")
    ap.add_argument("--clients", type=int, default=3, help="client processes (default 3)")
    ap.add_argument("--impls", default="h11,httptools", help="subset of h11,httptools")
    ap.add_argument("--modes", default="close,keepalive", help="subset of close,keepalive")
    ap.add_argument("--header", type=int, choices=(1, 2), default=2, help="PROXY header version (default 2)")
    ap.add_argument("--loop", default="auto", help="uvicorn's --loop (auto: uvloop when installed)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 1 s")
    ap.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="each server on the last CPU, the clients on the others: the server's CPU per request no"
        " longer shares its core's caches with a client (less spread on a small machine)",
    )
    args = ap.parse_args(argv)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs two CPUs or more")
        global PIN
        PIN = ({cpus[-1]}, set(cpus[:-1]))
    if args.quick:
        args.rounds, args.seconds = 2, 1.0
    impls = [i for i in args.impls.split(",") if i]
    modes = [m for m in args.modes.split(",") if m]
    if not set(impls) <= set(IMPLS) or not set(modes) <= set(MODES):
        ap.error(f"--impls from {IMPLS}, --modes from {MODES}")

    print(machine())
    print(f"command: python bench/uvicorn_pair.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(
        f"method:  {args.rounds} rounds x {args.seconds:g} s per server and mode, {args.clients} client processes,"
        f" v{args.header} header, --loop {args.loop}, plain/wrapped adjacent in ABBA order; server CPU from"
        f" /proc/PID/stat{'; server on CPU %s, clients on %s' % (sorted(PIN[0]), sorted(PIN[1])) if PIN else ''}\n",
        flush=True,
    )
    servers = {(impl, w): Server(impl, w, args.loop) for impl in impls for w in (False, True)}
    res = Results()
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            seen = check(server, args.header)
            print(f"{server.name:<18} pid {server.proc.pid if server.proc else '-':<7} app saw client {seen}")
            for mode in modes:  # warm-up, not counted
                measure(server, mode, args.header, args.clients, min(1.0, args.seconds))
        print(flush=True)
        for rnd in range(args.rounds):
            for mode in modes:
                for impl in impls:
                    order = (False, True) if rnd % 2 == 0 else (True, False)
                    got = {}
                    for wrapped in order:
                        server = servers[(impl, wrapped)]
                        got[wrapped] = run = measure(server, mode, args.header, args.clients, args.seconds)
                        res.runs.setdefault((server.name, mode), []).append(run)
                    ratio = (got[True].rate / got[False].rate, got[True].cpu_us / got[False].cpu_us)
                    res.ratios.setdefault((impl, mode), []).append(ratio)
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print()
    print(table(res, impls, modes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {f"{name} {mode}": [vars(r) for r in runs] for (name, mode), runs in res.runs.items()}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
