"""System calls per connection of gunicorn's sync worker: plain, its own ``--proxy-protocol``, and ours.

The companion of ``python bench/instructions.py gunicorn`` for the kernel's side: for each server
(the same three rows, the same WSGI app, ``gunicorn --workers 1``) it warms the worker up, attaches
``strace -f -c`` to the worker process (the arbiter's child), drives N connections over loopback
(header and request in one write, as haproxy sends them; a connection per request), and prints
the calls per connection, by name::

    python bench/gunicorn_syscalls.py                 # 400 connections per server, v2 header
    python bench/gunicorn_syscalls.py -n 1000 --header 1

Needs strace and the right to ptrace one's own children (root, or kernel.yama.ptrace_scope <= 1).
Every process started here is stopped by its PID; every wait is bounded.  Nothing here is part of
the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path[:0] = [ROOT, BENCH]

from instructions import GUNICORN_DEFAULT, GUNICORN_SERVERS, _free_port  # noqa: E402  (the same rows as the instruction counts)


def _connect(port: int, proc: subprocess.Popen[bytes]) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except ConnectionRefusedError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not listen on {port}") from None
            time.sleep(0.1)


def _one(port: int, proc: subprocess.Popen[bytes], request: bytes) -> None:
    with _connect(port, proc) as conn:
        conn.sendall(request)
        while conn.recv(4096):
            pass


def count(worker: str, args: list[str], header: bytes, n: int) -> dict[str, float]:
    """Calls per connection, by name, in the worker process of ``gunicorn -k worker`` over ``n`` connections."""
    port = _free_port()
    argv = [
        sys.executable, "-m", "gunicorn", "-k", worker, "--workers", "1", "--timeout", "600",
        "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "--chdir", BENCH, *args, "gunicorn_pair:wsgi_app",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, BENCH, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request = header + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    tracer = None
    try:
        for _ in range(50):  # warm up: imports, caches
            _one(port, proc, request)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, timeout=10)
        workers = children.stdout.split()
        if len(workers) != 1:
            raise RuntimeError(f"expected one worker of arbiter {proc.pid}, found {workers}")
        with tempfile.TemporaryDirectory() as out:
            path = os.path.join(out, "strace.txt")
            tracer = subprocess.Popen(
                ["strace", "-f", "-c", "-o", path, "-p", workers[0]], stderr=subprocess.DEVNULL
            )
            time.sleep(1.0)  # attached (strace -p returns before it traces; a call missed here is one of warm-up)
            for _ in range(n):
                _one(port, proc, request)
            time.sleep(0.5)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
            tracer = None
            with open(path) as f:
                table = f.read()
    finally:
        if tracer is not None:
            tracer.kill()
            tracer.wait(timeout=30)
        proc.send_signal(signal.SIGTERM)  # the arbiter: it stops its worker
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    calls = {}
    for line in table.splitlines():
        match = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if match and match.group(2) != "total":
            calls[match.group(2)] = int(match.group(1)) / n
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=400, help="connections counted per server (400)")
    parser.add_argument("--header", choices=("1", "2"), default="2")
    parser.add_argument("--servers", default=GUNICORN_DEFAULT, help=",".join(GUNICORN_SERVERS))
    options = parser.parse_args()
    from proxyproto import encode_v1, encode_v2

    source, destination = ("192.168.1.12", 58472), ("192.168.1.20", 27654)
    header = {"1": encode_v1, "2": encode_v2}[options.header](source, destination)
    print(f"GUNICORN: system calls per connection in the worker process (strace -f -c), {options.n} connections,"
          f" v{options.header} header where sent")  # fmt: skip
    for name in options.servers.split(","):
        worker, args, sends = GUNICORN_SERVERS[name]
        args = [a.format(version=f"v{options.header}") for a in args]
        calls = count(worker, args, header if sends else b"", options.n)
        by_name = ", ".join(f"{call} {per:.2f}" for call, per in sorted(calls.items(), key=lambda item: -item[1]))
        print(f"  {name:<22} {sum(calls.values()):6.2f}  ({by_name})", flush=True)


if __name__ == "__main__":
    main()
