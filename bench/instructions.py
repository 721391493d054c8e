"""Instructions executed per parse and per connection, counted by valgrind.

Why this exists: wall-clock figures on a shared 2-core machine move by 10 to
20 % between runs, enough to hide or invent the effect of a change.  The
number of machine instructions a piece of Python code executes is
deterministic, so this script counts them with ``valgrind --tool=callgrind``
(user space only; the kernel's share of a system call is not counted, see
``syscalls.sh`` for those).  Instructions are not time (cache misses and
branch mispredictions are not weighed), so ``parse.py`` and ``conn.py`` stay
the measure of speed; this is the stable companion that tells whether a
change made the code do less.

Method: each figure is the difference between two runs of the same program,
one doing ``N`` more operations than the other, divided by ``N``, so start-up
and import costs cancel out.

* ``parse``: instructions per call of ``proxyproto.parse`` (reading both
  addresses, as ``parse.py`` does) and of each installed peer, on the same
  six headers as ``parse.py`` (one of its 64 inputs per case, so the count is
  exact), plus the floor row.
* ``conn``: instructions per connection in the serving process of a plain
  ``socketserver.TCPServer`` and of ``ProxyTCPServer`` with a v1 and a v2
  header (the sync pair: the threading pair's counts depend on how threads
  interleave under valgrind).

Run from the repository root (valgrind installed: ``apt-get install valgrind``)::

    python bench/instructions.py              # both, about 6 minutes
    python bench/instructions.py parse --cases ac
    python bench/instructions.py conn
    python bench/instructions.py matchers     # the header-first path's v1 and v2 matchers
    python bench/instructions.py uvicorn --servers httptools --header 1,2
    python bench/instructions.py gunicorn --header 2

Nothing here is part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path[:0] = [ROOT, BENCH]

from parse import CASES  # noqa: E402  (bench/parse.py: the cases, their inputs and rows)

CALLS = 2000
CONNECTIONS = 300

# One program per measurement; {n} is the number of timed operations.
PARSE_PROGRAM = """
import sys
sys.path[:0] = [{root!r}, {bench!r}]
import parse as bench
case, row = {case!r}, {row!r}
inputs = bench.build_inputs()[case][:1]
impl = dict((f.__name__, f) for f in bench.PARSE_IMPLS)[row](case, inputs)
if impl.fn is None or impl.status != "ok":
    print("UNAVAILABLE", impl.status)
    raise SystemExit(0)
fn, x = impl.fn, impl.inputs[0]
fn(x)
for _ in range({n}):
    fn(x)
"""

SERVE_PROGRAM = """
import socketserver, sys
sys.path.insert(0, {root!r})
from proxyproto import ProxyTCPServer

served = 0

class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        global served
        self.request.recv(64)
        self.request.sendall(b"ok\\n")
        served += 1

server = (ProxyTCPServer if {proxied!r} else socketserver.TCPServer)(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
while served < {n}:  # connections served, not handle_request() calls: one may park and be served later
    server.handle_request()
server.server_close()
"""

UVICORN_PROGRAM = """
import asyncio, sys
sys.path[:0] = [{root!r}, {bench!r}]
import uvicorn, uvloop
from uvicorn_pair import app as hello

served = 0

async def app(scope, receive, send):
    global served
    await hello(scope, receive, send)
    served += 1
    if served >= {n}:
        server.should_exit = True

config = uvicorn.Config(app, host="127.0.0.1", port={port}, http={http!r}, loop="none",
                        lifespan="off", access_log=False, log_level="warning")
server = uvicorn.Server(config)
uvloop.install()
print("ready", flush=True)
asyncio.run(server.serve())
"""

ROWS = [
    ("proxyproto", "ours_parse"),
    ("proxy-protocol", "pp_parse"),
    ("twisted", "twisted_parse"),
    ("gunicorn", "gunicorn_parse"),
    ("floor", "floor_parse"),
]


def _instructions(stderr: str) -> int:
    match = re.search(r"refs:\s+([\d,]+)", stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def _valgrind(program: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", program]


def count_parse(case: str, row: str, n: int) -> int | None:
    """Instructions of ``n`` calls (plus start-up) of one implementation; None when it is unavailable."""
    program = PARSE_PROGRAM.format(root=ROOT, bench=BENCH, case=case, row=row, n=n)
    done = subprocess.run(_valgrind(program), capture_output=True, text=True, check=False)
    if "UNAVAILABLE" in done.stdout or "Traceback" in done.stderr:
        return None
    return _instructions(done.stderr)


def count_serving(header: bytes | None, n: int) -> int:
    """Instructions of a server process that serves ``n`` connections (plus start-up)."""
    program = SERVE_PROGRAM.format(root=ROOT, proxied=header is not None, n=n)
    with subprocess.Popen(_valgrind(program), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
                conn.sendall((header or b"") + b"hello")
                conn.recv(16)
        _, stderr = proc.communicate(timeout=120)
    return _instructions(stderr)


def count_uvicorn(http: str, header: bytes, n: int) -> int:
    """Instructions of an in-process uvicorn (on uvloop) that serves ``n`` connections, one request each."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    program = UVICORN_PROGRAM.format(root=ROOT, bench=BENCH, port=port, http=http, n=n)
    env = dict(os.environ, PROXYPROTO_ALLOW_IPS="127.0.0.1", PYTHONHASHSEED=os.environ.get("PYTHONHASHSEED", "0"))
    with subprocess.Popen(
        _valgrind(program), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        request = header + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for _ in range(n):
            for _attempt in range(600):  # until the server listens (valgrind starts slowly)
                try:
                    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
                    break
                except ConnectionRefusedError:
                    time.sleep(0.1)
            with conn:
                conn.sendall(request)
                while conn.recv(4096):
                    pass
        _, stderr = proc.communicate(timeout=120)
    return _instructions(stderr)


def run_uvicorn(servers: str, versions: str = "2") -> None:
    """Print instructions per connection of uvicorn, plain and wrapped (v1 and/or v2), per HTTP implementation."""
    from proxyproto import encode_v1, encode_v2

    source, destination = ("192.168.1.12", 58472), ("192.168.1.20", 27654)
    headers = {"1": encode_v1(source, destination), "2": encode_v2(source, destination)}
    print(f"\nUVICORN: instructions per connection in the serving process (valgrind), difference of {CONNECTIONS}")
    for impl in servers.split(","):
        wrapped = {"h11": "proxyproto.uvicorn:H11", "httptools": "proxyproto.uvicorn:HttpTools"}[impl]
        plain: float | None = None
        rows = [(f"{impl} plain", impl, b"")]
        rows += [(f"{impl} wrapped (v{v})", wrapped, headers[v]) for v in versions.split(",")]
        for name, http, head in rows:
            per_conn = (count_uvicorn(http, head, 50 + CONNECTIONS) - count_uvicorn(http, head, 50)) / CONNECTIONS
            plain = plain or per_conn
            extra = "" if per_conn == plain else f"  {per_conn / plain:.3f}x plain, {per_conn - plain:+,.0f}"
            print(f"  {name:<28} {per_conn:>10,.0f}{extra}", flush=True)


GUNICORN_SERVERS = {
    # name: (worker class, extra arguments, whether the clients send a header)
    "sync": ("sync", [], False),
    "sync-gunicorn-proxy": ("sync", ["--proxy-protocol", "{version}"], True),
    "sync-proxyproto": ("proxyproto.gunicorn.Sync", [], True),
    # the control (bench/gunicorn_control.py): gunicorn's sync worker with this library's settings object
    "served": ("gunicorn_control.SyncServedSettings", [], False),
    "served-gunicorn-proxy": ("gunicorn_control.SyncServedSettings", ["--proxy-protocol", "{version}"], True),
}
#: The rows run when none are named: gunicorn's sync worker, its own PROXY, this library's.
GUNICORN_DEFAULT = "sync,sync-gunicorn-proxy,sync-proxyproto"


def count_gunicorn(worker: str, args: list[str], header: bytes, n: int) -> int:
    """Instructions of a gunicorn worker process (``--workers 1``, the arbiter not counted) serving ``n`` connections.

    valgrind follows the arbiter's fork of the worker and writes one count
    per process; the worker's is the one not the arbiter's.
    """
    import tempfile

    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        argv = [
            "valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out}/cg.%p",
            sys.executable, "-m", "gunicorn", "-k", worker, "--workers", "1", "--timeout", "600",
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "--chdir", BENCH, *args, "gunicorn_pair:wsgi_app",
        ]  # fmt: skip
        path = os.pathsep.join(filter(None, [ROOT, BENCH, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path, PYTHONHASHSEED="0")
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            request = header + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            for _ in range(n):
                for _attempt in range(3000):  # until the worker listens (valgrind starts slowly)
                    try:
                        conn = socket.create_connection(("127.0.0.1", port), timeout=120)
                        break
                    except ConnectionRefusedError:
                        if proc.poll() is not None:
                            raise RuntimeError(f"gunicorn -k {worker} exited with {proc.returncode}") from None
                        time.sleep(0.1)
                else:
                    raise RuntimeError(f"gunicorn -k {worker} did not listen within 300 s")
                with conn:
                    conn.sendall(request)
                    while conn.recv(4096):
                        pass
        finally:
            proc.terminate()  # the arbiter (valgrind runs in its process): it stops its worker
            try:
                _, stderr = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        counts = {}
        for name in os.listdir(out):
            with open(os.path.join(out, name)) as f:
                total = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
            if total is not None:
                counts[int(name.rsplit(".", 1)[1])] = int(total.group(1))
    workers = [count for pid, count in counts.items() if pid != proc.pid]
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker's count, got {counts} (arbiter {proc.pid}):\n{stderr[-2000:]}")
    return workers[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_gunicorn(names: str, version: str) -> None:
    """Print instructions per connection of gunicorn's sync worker, plain, with its own PROXY, and ours."""
    from proxyproto import encode_v1, encode_v2

    source, destination = ("192.168.1.12", 58472), ("192.168.1.20", 27654)
    header = {"1": encode_v1, "2": encode_v2}[version](source, destination)
    print(
        f"\nGUNICORN: instructions per connection in the worker process (valgrind), difference of {CONNECTIONS},"
        f" v{version} header where sent"
    )
    plain: float | None = None
    for name in names.split(","):
        worker, args, sends = GUNICORN_SERVERS[name]
        args = [a.format(version=f"v{version}") for a in args]
        head = header if sends else b""
        more = count_gunicorn(worker, args, head, 50 + CONNECTIONS)
        per_conn = (more - count_gunicorn(worker, args, head, 50)) / CONNECTIONS
        plain = plain or per_conn
        extra = "" if per_conn == plain else f"  {per_conn / plain:.3f}x plain, {per_conn - plain:+,.0f}"
        print(f"  {name:<28} {per_conn:>10,.0f}{extra}", flush=True)


def run_parse(cases: str) -> None:
    """Print the per-call table of every case."""
    print(f"PARSE: instructions per call (valgrind), difference of {CALLS} calls; ratio ours/this = this/ours")
    for case in cases:
        print(f"\n{CASES[case]}")
        print(f"  {'implementation':<16} {'instructions':>12}  {'ours/this':>9}")
        ours: float | None = None
        for name, row in ROWS:
            base = count_parse(case, row, 0)
            more = count_parse(case, row, CALLS)
            if base is None or more is None:
                print(f"  {name:<16} {'n/a or fails':>12}")
                continue
            per_call = (more - base) / CALLS
            if ours is None:
                ours = per_call
            print(f"  {name:<16} {per_call:>12,.0f}  {per_call / ours:>8.2f}x", flush=True)


def run_conn() -> None:
    """Print instructions per connection of the sync pair."""
    from proxyproto import encode_v1, encode_v2

    source, destination = ("192.168.1.12", 58472), ("192.168.1.20", 27654)
    cases = [
        ("TCPServer (no header)", None),
        ("ProxyTCPServer (v1 header)", encode_v1(source, destination)),
        ("ProxyTCPServer (v2 header)", encode_v2(source, destination)),
    ]
    print(f"\nCONN: instructions per connection in the serving process (valgrind), difference of {CONNECTIONS}")
    plain: float | None = None
    for name, header in cases:
        per_conn = (count_serving(header, 50 + CONNECTIONS) - count_serving(header, 50)) / CONNECTIONS
        plain = plain or per_conn
        extra = "" if per_conn == plain else f"  {per_conn / plain:.2f}x plain, +{per_conn - plain:,.0f}"
        print(f"  {name:<28} {per_conn:>10,.0f}{extra}", flush=True)


MATCHER_PROGRAM = """
import re, sys
sys.path.insert(0, {root!r})
from proxyproto import encode_v1, encode_v2
from proxyproto.v1 import match_line
from proxyproto.v2 import match
source, destination = ("192.168.1.12", 58472), ("192.168.1.20", 27654)
line = encode_v1(source, destination) + b"GET / HTTP/1.1\\r\\n"
binary = encode_v2(source, destination) + b"GET"
end = line.find(b"\\r\\n") + 2
octet = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
ip = octet + rb"(?:\\." + octet + rb"){{3}}"
port = rb"(0|[1-9][0-9]{{0,4}})"
regex = re.compile(rb"PROXY TCP4 (" + ip + rb") (" + ip + rb") " + port + rb" " + port + rb"\\r\\n")

def line_by_regex():
    found = regex.match(line)
    src, dst, sport, dport = found.groups()
    return (src.decode(), int(sport)), (dst.decode(), int(dport))

call = {{
    "v1.match_line (TCP4)": lambda: match_line(line, end, False),
    "v2.match (TCP over IPv4)": lambda: match(binary, 4096, True),
    "one regex over the v1 line": line_by_regex,
}}[{name!r}]
for _ in range({n}):
    call()
"""

MATCHERS = ("v1.match_line (TCP4)", "v2.match (TCP over IPv4)", "one regex over the v1 line")


def run_matchers() -> None:
    """Print instructions per call of the header-first path's matchers, and of the regex alternative to the line's."""
    print(f"\nMATCHERS: instructions per call (valgrind), difference of {CALLS * 10} calls")
    for name in MATCHERS:
        counts = []
        for n in (1000, 1000 + CALLS * 10):
            program = MATCHER_PROGRAM.format(root=ROOT, name=name, n=n)
            env = dict(os.environ, PYTHONHASHSEED="0")
            done = subprocess.run(_valgrind(program), capture_output=True, text=True, check=False, env=env)
            counts.append(_instructions(done.stderr))
        print(f"  {name:<28} {(counts[1] - counts[0]) / (CALLS * 10):>10,.0f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ("parse", "matchers", "conn", "uvicorn", "gunicorn", "all")
    parser.add_argument("what", nargs="?", choices=what, default="all")
    parser.add_argument("--cases", default="abcdef", help="parse cases, e.g. ac")
    parser.add_argument("--servers", default="httptools,h11", help="uvicorn HTTP implementations, e.g. h11")
    parser.add_argument("--header", default="2", help="uvicorn: PROXY header versions, e.g. 1,2 (default 2)")
    parser.add_argument(
        "--gunicorn", default=GUNICORN_DEFAULT, help=f"gunicorn servers, from {','.join(GUNICORN_SERVERS)}"
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    # Byte-code compiled before counting: a module compiled during the first of a pair of runs would
    # count its compilation as served connections or parse calls.
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "proxyproto"), BENCH], check=False)
    print(f"machine: {platform.machine()} ({os.cpu_count()} cores), {platform.platform()}")
    print(f"python:  {platform.python_implementation()} {platform.python_version()}")
    print(f"command: python bench/instructions.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    if args.what in ("parse", "all"):
        run_parse(args.cases)
    if args.what in ("matchers", "all"):
        run_matchers()
    if args.what in ("conn", "all"):
        run_conn()
    if args.what in ("uvicorn", "all"):
        run_uvicorn(args.servers, args.header)
    if args.what == "gunicorn":  # not in "all": it needs proxyproto.gunicorn and takes minutes more
        run_gunicorn(args.gunicorn, args.header.split(",")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
