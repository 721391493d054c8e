"""gunicorn's workers with and without the PROXY header: server CPU per request, all in one interleaved run.

Issue 23's comparison, five gunicorn servers (``--workers 1`` each, on
loopback), every one gunicorn's real command line in its own process:

* ``sync``: gunicorn's sync worker, clients send no header (the baseline of
  the next two);
* ``sync-gunicorn-proxy``: the same worker with gunicorn's own
  ``--proxy-protocol vN`` (``--proxy-allow-from`` left at its loopback default);
* ``sync-proxyproto``: this library's sync worker (``--sync-ours``, default
  ``proxyproto.gunicorn.Sync``);
* ``uvicorn``: uvicorn's own worker (``--uvicorn``, default
  ``uvicorn.workers.UvicornWorker``), no header (the baseline of the next);
* ``uvicorn-proxyproto``: this library's uvicorn worker (``--uvicorn-ours``,
  default ``proxyproto.gunicorn.UvicornWorker``).

The worker classes are parameters; a class that cannot be imported is left
out of the run (and named).  The WSGI app and the ASGI app (``app`` of
``bench/uvicorn_pair.py``) both answer ``Hello, <client address>``: the check
request before the run shows each server sees the header's source.

Method (``bench/uvicorn_pair.py``'s, for N servers): the same client
processes (raw blocking sockets, a connection per request, ``Connection:
close``) move from server to server every ``--slice`` seconds; a round gives
each server one slice, in an order that reverses every round (ABC CBA: a
drift of the machine's speed weighs on every server alike).  The CPU of a
server is the user + system time of its gunicorn *worker* processes (the
arbiter's is not counted) to the nanosecond, from
``/proc/PID/task/*/schedstat``, read at every switch; a server keeps the CPU
and requests of its last requests in flight (counted from the start of its
slice to the start of its next one).  Each server is compared with its
baseline in the same round (the CPU ratio and the extra microseconds per
request); the table gives the median over rounds with the first and third
quartiles.  Every process is stopped by PID at the end (and by a
parent-death signal if this script dies).

    python bench/gunicorn_pair.py                 # 48 rounds of 5 x 0.25 s, about 70 s
    python bench/gunicorn_pair.py --pin --header 1
    python bench/gunicorn_pair.py --only sync,sync-gunicorn-proxy --rounds 20

Nothing here is part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import uvicorn_pair as pair  # noqa: E402  (bench/uvicorn_pair.py: clients, ports, slices, the ASGI app)

NAMES = ("sync", "sync-gunicorn-proxy", "sync-proxyproto", "uvicorn", "uvicorn-proxyproto")


# --------------------------------------------------------------------------
# The WSGI application (imported by gunicorn in the worker processes: stdlib only)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Hello world that names the client, as an app reading ``REMOTE_ADDR`` (an access log, say) would."""
    body = b"Hello, %s\n" % environ["REMOTE_ADDR"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# --------------------------------------------------------------------------
# The servers


@dataclass
class Server:
    """One ``gunicorn --workers 1`` process on a loopback port.

    ``header``: whether its clients send a PROXY header; ``baseline``: the
    server it is compared with in each round (None for a baseline).
    """

    name: str
    worker_class: str
    app: str
    header: bool
    baseline: str | None
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    workers: list[int] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> None:
        """Start ``python -m gunicorn`` and wait until it listens and its worker runs; up to 3 tries."""
        for _ in range(3):
            self.port = pair._free_port()
            argv = [
                sys.executable, "-m", "gunicorn", "-k", self.worker_class, "--workers", "1",
                "--bind", f"127.0.0.1:{self.port}", "--backlog", "1024", "--log-level", "warning",
                "--chdir", HERE, *self.args, self.app,
            ]  # fmt: skip
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, HERE, os.environ.get("PYTHONPATH")])))
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, preexec_fn=pair._die_with_parent
            )
            if pair.PIN is not None:
                os.sched_setaffinity(self.proc.pid, pair.PIN[0])  # the worker, forked later, inherits it
            deadline = time.monotonic() + timeout
            while not (pair._listening(self.port) and self.children()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                self.workers = self.children()
                if pair.PIN is not None:  # forked after the arbiter's affinity was set; made sure of
                    for pid in self.workers:
                        os.sched_setaffinity(pid, pair.PIN[0])
                return
            self.stop()
        raise RuntimeError(f"{self.name}: gunicorn did not start (exit code {self.proc and self.proc.returncode})")

    def children(self) -> list[int]:
        """The PIDs of the arbiter's children (its workers)."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU of the worker processes so far (every thread's, to the nanosecond)."""
        total = 0
        for pid in self.workers:
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue  # a worker that ended: the check after the run says so
            for task in tasks:
                try:
                    with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                        total += int(f.read().split()[0])
                except FileNotFoundError:
                    pass
        return total / 1e9

    def stop(self) -> None:
        """SIGTERM to the arbiter by PID (it stops its workers), SIGKILL after 10 s, then its workers left."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            left = self.children()  # still the arbiter's: these PIDs are its workers
            self.proc.kill()
            self.proc.wait(5)
        for pid in left:  # orphaned by the SIGKILL
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def importable(worker_class: str) -> str | None:
    """None when gunicorn could load the class, else why not."""
    if "." not in worker_class:
        return None  # one of gunicorn's own short names (sync, gthread, ...)
    module, _, name = worker_class.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except Exception as exc:  # any reason is a reason to leave it out
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------
# The run


def measure_rounds(
    servers: list[Server], version: int, clients: int, rounds: int, slice_seconds: float
) -> list[list[pair.Run]]:
    """Move the same client processes through every server, one slice each per round; the runs of each round.

    The order of a round is the previous one's reversed, so each server is as
    often early as late in a round.  A slice's server keeps the CPU it spends
    after the switch on requests already in flight: its CPU and requests are
    counted from the start of its slice to the start of its next one.
    """
    ctx = mp.get_context("fork")
    n = len(servers)
    target = ctx.RawValue("i", 0)
    counts = ctx.RawArray("q", clients * n)
    errors = ctx.RawArray("q", clients * n)
    versions = [version if s.header else 0 for s in servers]
    ports = [s.port for s in servers]
    procs = [
        ctx.Process(target=pair.client, args=(i, ports, versions, "close", target, counts, errors))
        for i in range(clients)
    ]

    def snapshot() -> tuple[float, list[float], list[int], list[int]]:
        done = [sum(counts[i * n + t] for i in range(clients)) for t in range(n)]
        failed = [sum(errors[i * n + t] for i in range(clients)) for t in range(n)]
        return time.perf_counter(), [s.cpu_seconds() for s in servers], done, failed

    forward = list(range(n))
    order = [t for k in range(rounds) for t in (forward if k % 2 == 0 else forward[::-1])]
    for p in procs:
        p.start()
    try:
        for t in range(n):  # warm-up, not counted
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
    result: list[list[pair.Run]] = []
    for k in range(rounds):
        runs: list[pair.Run | None] = [None] * n
        for i in range(k * n, (k + 1) * n):
            t = order[i]
            nxt = next((j for j in range(i + 1, len(order)) if order[j] == t), len(marks) - 1)
            (t0, cpu0, done0, failed0), (t1, *_), (_, cpu1, done1, failed1) = marks[i], marks[i + 1], marks[nxt]
            runs[t] = pair.Run(done1[t] - done0[t], failed1[t] - failed0[t], t1 - t0, cpu1[t] - cpu0[t])
        result.append([r for r in runs if r is not None])
    return result


def check(server: Server, version: int) -> str:
    """One request: the body names the client the app saw (the header's source when one is sent)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall((pair.headers(version)[0] if server.header else b"") + pair.REQUEST_CLOSE)
        response, _ = pair.read_response(s, b"")
    return response.rpartition(b"\r\n\r\n")[2].decode().strip()


def _median_spread(values: list[float], fmt: str) -> str:
    """``median (q1-q3)`` of the values, each in ``fmt``."""
    if len(values) < 2:
        return format(values[0], fmt)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{format(statistics.median(values), fmt)} ({format(q1, fmt)} to {format(q3, fmt)})"


def table(servers: list[Server], rounds: list[list[pair.Run]]) -> str:
    """Medians over rounds per server; against its baseline, the per-round CPU ratio and extra us per request."""
    index = {s.name: i for i, s in enumerate(servers)}
    lines = [
        f"{'server':<21}{'worker class':<36}{'req/s':>7}{'CPU us/req':>11}{'busy':>6}{'errors':>7}"
        f"   {'CPU ratio to baseline (q1 to q3)':<34}{'extra us/req (q1 to q3)'}"
    ]
    for s in servers:
        i = index[s.name]
        runs = [r[i] for r in rounds]
        rate = statistics.median(r.rate for r in runs)
        cpu = statistics.median(r.cpu_us for r in runs)
        busy = statistics.median(r.busy for r in runs)
        errors = sum(r.errors for r in runs)
        ratio = extra = ""
        if s.baseline in index:
            b = index[s.baseline]
            ratio = _median_spread([r[i].cpu_us / r[b].cpu_us for r in rounds], ".3f") + f" of {s.baseline}"
            extra = _median_spread([r[i].cpu_us - r[b].cpu_us for r in rounds], "+.1f")
        lines.append(
            f"{s.name:<21}{s.worker_class:<36}{rate:>7.0f}{cpu:>11.1f}{busy:>6.2f}{errors:>7}   {ratio:<34}{extra}"
        )
    return "\n".join(lines)


def verdict(servers: list[Server], rounds: list[list[pair.Run]]) -> str:
    """Issue 23's question: does this library's worker cost less CPU per request than gunicorn's own PROXY?"""
    index = {s.name: i for i, s in enumerate(servers)}
    if "sync-gunicorn-proxy" not in index or "sync" not in index:
        return ""
    g, plain = index["sync-gunicorn-proxy"], index["sync"]
    own = [r[g].cpu_us - r[plain].cpu_us for r in rounds]
    lines = [f"gunicorn's own PROXY (sync): {_median_spread(own, '+.1f')} us/req over plain sync"]
    if "sync-proxyproto" in index:
        o = index["sync-proxyproto"]
        lines.append(
            f"proxyproto sync worker:      {_median_spread([r[o].cpu_us - r[plain].cpu_us for r in rounds], '+.1f')}"
            f" us/req over plain sync; CPU per request against gunicorn's own PROXY, per round:"
            f" {_median_spread([r[o].cpu_us / r[g].cpu_us for r in rounds], '.3f')}x"
        )
    if "uvicorn-proxyproto" in index and "uvicorn" in index:
        o, u = index["uvicorn-proxyproto"], index["uvicorn"]
        ours = [r[o].cpu_us - r[u].cpu_us for r in rounds]
        less = [(r[o].cpu_us - r[u].cpu_us) - (r[g].cpu_us - r[plain].cpu_us) for r in rounds]
        lines.append(
            f"proxyproto uvicorn worker:   {_median_spread(ours, '+.1f')} us/req over uvicorn's own worker;"
            f" its extra minus gunicorn's own PROXY's, per round: {_median_spread(less, '+.1f')} us/req"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Start the servers, run the interleaved rounds, print the table; stop every process by PID."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=48, help="rounds, each a slice per server (default 48)")
    ap.add_argument("--slice", type=float, default=0.25, help="seconds per slice (default 0.25)")
    ap.add_argument("--clients", type=int, default=3, help="client processes (default 3)")
    ap.add_argument("--header", type=int, choices=(1, 2), default=2, help="PROXY header version (default 2)")
    ap.add_argument("--sync", default="sync", help="gunicorn's sync worker class (default sync)")
    ap.add_argument("--sync-ours", default="proxyproto.gunicorn.Sync", help="this library's sync worker")
    ap.add_argument("--uvicorn", default="uvicorn.workers.UvicornWorker", help="uvicorn's own worker class")
    ap.add_argument("--uvicorn-ours", default="proxyproto.gunicorn.UvicornWorker", help="this library's uvicorn worker")
    ap.add_argument("--only", default=",".join(NAMES), help=f"subset of {','.join(NAMES)}")
    ap.add_argument("--quick", action="store_true", help="10 rounds of 0.2 s")
    ap.add_argument("--json", metavar="FILE", help="also write every slice as JSON")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="every server on the last CPU, the clients on the others (as bench/uvicorn_pair.py --pin)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.slice = 10, 0.2
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs two CPUs or more")
        pair.PIN = ({cpus[-1]}, set(cpus[:-1]))
    wanted = [n for n in args.only.split(",") if n]
    if not set(wanted) <= set(NAMES):
        ap.error(f"--only from {NAMES}")
    proxy = ["--proxy-protocol", f"v{args.header}"]
    specs = {
        "sync": Server("sync", args.sync, "gunicorn_pair:wsgi_app", False, None),
        "sync-gunicorn-proxy": Server("sync-gunicorn-proxy", args.sync, "gunicorn_pair:wsgi_app", True, "sync", proxy),
        "sync-proxyproto": Server("sync-proxyproto", args.sync_ours, "gunicorn_pair:wsgi_app", True, "sync"),
        "uvicorn": Server("uvicorn", args.uvicorn, "uvicorn_pair:app", False, None),
        "uvicorn-proxyproto": Server("uvicorn-proxyproto", args.uvicorn_ours, "uvicorn_pair:app", True, "uvicorn"),
    }

    sys.path.insert(0, ROOT)  # this tree's proxyproto, as the servers' PYTHONPATH gives it
    print(pair.machine() + f", gunicorn {importlib.import_module('gunicorn').__version__}")
    print(f"command: python bench/gunicorn_pair.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    servers = []
    for name in NAMES:
        if name not in wanted:
            continue
        why = importable(specs[name].worker_class)
        if why is not None:
            print(f"left out: {name} ({specs[name].worker_class}): {why}")
            continue
        servers.append(specs[name])
    print(
        f"method:  {args.rounds} rounds of {len(servers)} slices of {args.slice:g} s (order reversed every round),"
        f" the same {args.clients} client processes, a connection per request, v{args.header} header where sent;"
        f" gunicorn --workers 1; CPU of the worker process from /proc/PID/task/*/schedstat"
        f"{'; servers on CPU %s, clients on %s' % (sorted(pair.PIN[0]), sorted(pair.PIN[1])) if pair.PIN else ''}\n",
        flush=True,
    )
    if not servers:
        return 1
    try:
        for server in servers:
            server.start()
        for server in servers:
            seen = check(server, args.header)
            print(
                f"{server.name:<21} arbiter {server.proc.pid if server.proc else '-'},"
                f" worker {server.workers}: app saw {seen}"
            )
        print(flush=True)
        rounds = measure_rounds(servers, args.header, args.clients, args.rounds, args.slice)
        restarted = [s.name for s in servers if s.children() != s.workers]
    finally:
        for server in servers:
            server.stop()
    if restarted:
        print(f"worker restarted during the run (its CPU is incomplete): {', '.join(restarted)}")
    print(table(servers, rounds))
    print()
    print(verdict(servers, rounds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({s.name: [vars(r[i]) for r in rounds] for i, s in enumerate(servers)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
