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
* the same clients move between plain and wrapped every ``--slice`` seconds
  (0.25 by default), in pairs of slices whose order alternates (ABBA): a
  pair's two halves are a quarter of a second apart, so a drift of the
  machine's speed weighs on both alike (runs of seconds each, as this script
  made at first, saw drifts of +-20 % between the halves of a pair);
* the server's CPU is user + system time of its process to the nanosecond,
  from ``/proc/PID/task/*/schedstat``, read at every switch; a server keeps
  the CPU and the requests of its slice's last requests in flight;
* the table gives medians over slices, and each ratio is the median of the
  per-pair ratios, with its first and third quartiles.

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
VARIANTS = ("plain", "wrapped", "floor")
MODES = ("close", "keepalive")
WRAPPED_CLASS = {"h11": "proxyproto.uvicorn:H11", "httptools": "proxyproto.uvicorn:HttpTools"}
FLOOR_CLASS = {"h11": "uvicorn_floor:H11", "httptools": "uvicorn_floor:HttpTools"}


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
    """One uvicorn process on a loopback port: ``impl`` (h11, httptools) as ``variant``.

    ``plain``: uvicorn's own ``--http``; ``wrapped``: proxyproto's class, every
    client sends a PROXY header; ``floor`` (``--floor``): uvicorn's own class
    parsing one header per connection with ``proxyproto.parse`` and nothing
    else (bench/uvicorn_floor.py), the least any Python PROXY server does.
    """

    impl: str
    variant: str
    loop: str
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def name(self) -> str:
        return f"{self.impl}-{self.variant}"

    @property
    def wrapped(self) -> bool:
        """Whether its clients send a PROXY header."""
        return self.variant == "wrapped"

    def start(self, timeout: float = 20.0) -> None:
        """Start ``python -m uvicorn`` and wait until it listens; up to 3 tries for a port taken meanwhile."""
        for _ in range(3):
            self.port = _free_port()
            classes = {"plain": self.impl, "wrapped": WRAPPED_CLASS[self.impl], "floor": FLOOR_CLASS[self.impl]}
            http = classes[self.variant]
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
        """User + system CPU of the server process so far: the sum of its threads' run time, in ns.

        ``/proc/PID/task/*/schedstat`` counts to the nanosecond; ``/proc/PID/stat``
        (the fallback) counts in clock ticks of 10 ms, too coarse for a slice.
        """
        assert self.proc is not None
        pid = self.proc.pid
        if os.path.exists(f"/proc/{pid}/schedstat"):  # the kernel keeps it (CONFIG_SCHED_INFO)
            total = 0
            for task in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                        total += int(f.read().split()[0])
                except FileNotFoundError:
                    pass  # a thread that ended meanwhile (uvicorn's own work runs in the main thread)
            return total / 1e9
        with open(f"/proc/{pid}/stat") as f:
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


def client(
    index: int, ports: list[int], versions: list[int], mode: str, target: Any, counts: Any, errors: Any
) -> None:
    """Sequential requests to ``ports[target.value]`` until the target is -1, counted in this client's slots.

    The coordinator moves ``target`` from server to server every slice; a
    request is counted for the server that answered it, when it completes.
    In keep-alive mode each client keeps one connection per server.
    """
    prefixes = [headers(v) for v in versions]
    if PIN is not None:
        os.sched_setaffinity(0, PIN[1])
    socks: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    i = 0
    while True:
        t = target.value
        if t < 0:
            break
        slot = index * len(ports) + t
        try:
            if mode == "close":
                with socket.create_connection(("127.0.0.1", ports[t]), timeout=5) as s:
                    s.sendall(prefixes[t][i % len(prefixes[t])] + REQUEST_CLOSE)
                    data = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                ok = data.startswith(b"HTTP/1.1 200")
            else:
                sock = socks.get(t)
                if sock is None:
                    sock = socks[t] = socket.create_connection(("127.0.0.1", ports[t]), timeout=5)
                    sock.sendall(prefixes[t][i % len(prefixes[t])])
                    pending[t] = b""
                sock.sendall(REQUEST)
                response, pending[t] = read_response(sock, pending[t])
                ok = response.startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
            dead = socks.pop(t, None)
            if dead is not None:
                dead.close()
        i += 1
        if ok:
            counts[slot] += 1
        else:
            errors[slot] += 1
    for sock in socks.values():
        sock.close()


@dataclass
class Run:
    """One slice of one server in one mode: its requests, and its CPU from this slice's start to its next."""

    requests: int
    errors: int
    wall: float  # the slice's length: the time the clients spent on this server
    cpu: float  # server CPU seconds from the slice's start to the start of its next slice (or the end)

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


def measure_pair(
    plain: Server, other: Server, mode: str, version: int, clients: int, pairs: int, slice_seconds: float
) -> list[tuple[Run, Run]]:
    """Alternate the same client processes between two servers, slice by slice; (plain, other) per pair.

    Pair k runs plain then the other when k is even, the other then plain when it
    is odd (ABBA), so a drift of the machine's speed within a pair weighs on
    both sides alike.  A slice's server keeps the CPU it spends after the
    switch on requests already in flight: its CPU and requests are counted
    from the start of its slice to the start of its next one.
    """
    ctx = mp.get_context("fork")
    servers = [plain, other]
    target = ctx.RawValue("i", 0)
    counts = ctx.RawArray("q", clients * 2)
    errors = ctx.RawArray("q", clients * 2)
    versions = [0, version if other.wrapped else 0]
    procs = [
        ctx.Process(target=client, args=(i, [s.port for s in servers], versions, mode, target, counts, errors))
        for i in range(clients)
    ]

    def snapshot() -> tuple[float, list[float], list[int], list[int]]:
        done = [sum(counts[i * 2 + t] for i in range(clients)) for t in (0, 1)]
        failed = [sum(errors[i * 2 + t] for i in range(clients)) for t in (0, 1)]
        return time.perf_counter(), [s.cpu_seconds() for s in servers], done, failed

    order = [t for k in range(pairs) for t in ((0, 1) if k % 2 == 0 else (1, 0))]
    for p in procs:
        p.start()
    try:
        for t in (0, 1):  # warm-up, not counted
            target.value = t
            time.sleep(min(1.0, 4 * slice_seconds))
        marks = []
        for t in order:
            target.value = t
            marks.append(snapshot())
            time.sleep(slice_seconds)
        marks.append(snapshot())
        target.value = -1
        for p in procs:
            p.join(10)
        marks.append(snapshot())  # the requests in flight at the end, and their CPU
    finally:
        target.value = -1
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    runs: list[Run] = []
    for i, t in enumerate(order):
        nxt = next((j for j in range(i + 1, len(order)) if order[j] == t), len(marks) - 1)
        (t0, cpu0, done0, failed0), (t1, *_), (_, cpu1, done1, failed1) = marks[i], marks[i + 1], marks[nxt]
        runs.append(Run(done1[t] - done0[t], failed1[t] - failed0[t], t1 - t0, cpu1[t] - cpu0[t]))
    result = []
    for k in range(pairs):
        a, b = runs[2 * k], runs[2 * k + 1]
        result.append((a, b) if order[2 * k] == 0 else (b, a))
    return result


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
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)  # (server name, mode) -> slices
    ratios: dict[tuple[str, str, str], list[tuple[float, float]]] = field(default_factory=dict)  # (impl, mode, variant)


def _spread(values: list[float]) -> str:
    """The middle half of the values (first to third quartile)."""
    if len(values) < 2:
        return f"{values[0]:.3f}"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3f}-{q3:.3f}"


def table(res: Results, impls: list[str], modes: list[str]) -> str:
    """Medians over slices per server and mode; x/plain as the median of per-pair ratios, with quartiles."""
    lines = [
        f"{'mode':<10}{'server':<20}{'req/s':>8}{'CPU us/req':>12}{'busy':>6}{'errors':>7}"
        f"{'req/s ratio (q1-q3)':>24}{'CPU ratio (q1-q3)':>22}"
    ]
    for mode in modes:
        for impl in impls:
            for variant in VARIANTS:
                name = f"{impl}-{variant}"
                runs = res.runs.get((name, mode), [])
                if not runs:
                    continue
                rate = statistics.median(r.rate for r in runs)
                cpu = statistics.median(r.cpu_us for r in runs)
                busy = statistics.median(r.busy for r in runs)
                errors = sum(r.errors for r in runs)
                rr = cr = ""
                pairs = res.ratios.get((impl, mode, variant), [])
                if pairs:
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
    ap.add_argument("--pairs", type=int, default=40, help="slice pairs per server and mode (default 40)")
    ap.add_argument("--slice", type=float, default=0.25, help="seconds per slice (default 0.25)")
    ap.add_argument("--clients", type=int, default=3, help="client processes (default 3)")
    ap.add_argument("--impls", default="h11,httptools", help="subset of h11,httptools")
    ap.add_argument("--modes", default="close,keepalive", help="subset of close,keepalive")
    ap.add_argument("--header", type=int, choices=(1, 2), default=2, help="PROXY header version (default 2)")
    ap.add_argument("--loop", default="auto", help="uvicorn's --loop (auto: uvloop when installed)")
    ap.add_argument("--quick", action="store_true", help="8 pairs of 0.2 s")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also pair plain with uvicorn's own class parsing one header per connection (proxyproto.parse,"
        " nothing else): what parsing alone costs, the floor under any Python PROXY server",
    )
    ap.add_argument("--json", metavar="FILE", help="also write every slice as JSON")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="each server on the last CPU, the clients on the others: the server's CPU per request no"
        " longer shares its core's caches with a client",
    )
    args = ap.parse_args(argv)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs two CPUs or more")
        global PIN
        PIN = ({cpus[-1]}, set(cpus[:-1]))
    if args.quick:
        args.pairs, args.slice = 8, 0.2
    impls = [i for i in args.impls.split(",") if i]
    modes = [m for m in args.modes.split(",") if m]
    if not set(impls) <= set(IMPLS) or not set(modes) <= set(MODES):
        ap.error(f"--impls from {IMPLS}, --modes from {MODES}")

    print(machine())
    print(f"command: python bench/uvicorn_pair.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(
        f"method:  {args.pairs} pairs of {args.slice:g} s slices per server and mode, the same {args.clients}"
        f" client processes moving between plain and wrapped every slice (ABBA), v{args.header} header,"
        f" --loop {args.loop}; server CPU from /proc/PID/task/*/schedstat"
        f"{'; server on CPU %s, clients on %s' % (sorted(PIN[0]), sorted(PIN[1])) if PIN else ''}\n",
        flush=True,
    )
    variants = ["plain", "wrapped"] + (["floor"] if args.floor else [])
    servers = {(impl, v): Server(impl, v, args.loop) for impl in impls for v in variants}
    res = Results()
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            seen = check(server, args.header)
            print(f"{server.name:<18} pid {server.proc.pid if server.proc else '-':<7} app saw client {seen}")
        print(flush=True)
        for mode in modes:
            for impl in impls:
                plain = servers[(impl, "plain")]
                for variant in variants[1:]:
                    other = servers[(impl, variant)]
                    for a, b in measure_pair(plain, other, mode, args.header, args.clients, args.pairs, args.slice):
                        res.runs.setdefault((plain.name, mode), []).append(a)
                        res.runs.setdefault((other.name, mode), []).append(b)
                        res.ratios.setdefault((impl, mode, variant), []).append((b.rate / a.rate, b.cpu_us / a.cpu_us))
                    print(f"{mode} {impl} {variant} done", flush=True)
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
