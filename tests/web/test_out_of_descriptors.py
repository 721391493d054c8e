"""Out of descriptors: silent connections never lock a good client out of an asyncio adapter.

Every server here runs in its own process with ``RLIMIT_NOFILE`` 64 (set by
``preexec_fn`` in the child, never in the test process) and a header timeout
far longer than the test, so 120 silent connections would hold every
descriptor the process may open.  The adapters keep a reserve of descriptors
free by closing the oldest waiting connections before the process runs out
(:mod:`proxyproto.parking`): a good client with a valid v2 header is served
at once, the server does not spin while the flood waits, and its descriptors
return to where they were once the silent clients close.  The servers are
the real programs: ``aio.start_server``, ``wrap_protocol_factory`` under
asyncio and uvloop, uvicorn's command line, aiohttp's ``ProxyTCPSite`` and
hypercorn through :func:`proxyproto.hypercorn.serve`.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port, listening, require_module

import proxyproto

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

LIMIT = 64
FLOOD = 120
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 443)
V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)
HTTP_GET = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"

# A raw server answers the peer address it was given, then closes.
_AIO = """
import asyncio, sys
from proxyproto import aio

async def handler(reader, writer):
    writer.write(repr(writer.get_extra_info("peername")).encode())
    await writer.drain()
    writer.close()

async def main():
    server = await aio.start_server(handler, "127.0.0.1", int(sys.argv[1]), header_timeout=60.0)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""

_WRAPPED = """
import asyncio, sys
from proxyproto.aio_protocol import wrap_protocol_factory

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(repr(transport.get_extra_info("peername")).encode())
        transport.close()

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(wrap_protocol_factory(Echo, header_timeout=60.0), "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()

if sys.argv[2] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""

_AIOHTTP = """
import asyncio, sys
from aiohttp import web
from proxyproto.aiohttp import ProxyTCPSite

async def report(request):
    return web.Response(text=repr(request.remote))

async def main():
    app = web.Application()
    app.router.add_get("/", report)
    runner = web.AppRunner(app)
    await runner.setup()
    await ProxyTCPSite(runner, "127.0.0.1", int(sys.argv[1]), header_timeout=60.0).start()
    await asyncio.Event().wait()

asyncio.run(main())
"""

_HYPERCORN = """
import asyncio, sys
from hypercorn.config import Config
import proxyproto.hypercorn
from web_kit import app

config = Config()
config.bind = [f"127.0.0.1:{sys.argv[1]}"]
asyncio.run(proxyproto.hypercorn.serve(app, config, header_timeout=60.0))
"""


def _servers() -> dict[str, tuple[list[str], bool]]:
    """name -> (command line with the port as ``{port}``, whether it speaks HTTP)."""
    py = sys.executable
    uvicorn = [py, "-m", "uvicorn", "web_kit:app", "--app-dir", str(HERE), "--http", "proxyproto.uvicorn:H11"]
    return {
        "aio.start_server": ([py, "-c", _AIO, "{port}"], False),
        "wrap_protocol_factory-asyncio": ([py, "-c", _WRAPPED, "{port}", "asyncio"], False),
        "wrap_protocol_factory-uvloop": ([py, "-c", _WRAPPED, "{port}", "uvloop"], False),
        "uvicorn-h11-asyncio": ([*uvicorn, "--loop", "asyncio", "--port", "{port}"], True),
        "aiohttp": ([py, "-c", _AIOHTTP, "{port}"], True),
        "hypercorn": ([py, "-c", _HYPERCORN, "{port}"], True),
    }


_NEEDS = {
    "wrap_protocol_factory-uvloop": "uvloop",
    "uvicorn-h11-asyncio": "uvicorn",
    "aiohttp": "aiohttp",
    "hypercorn": "hypercorn",
}


def _limit_descriptors() -> None:
    """In the server child, before it runs: RLIMIT_NOFILE 64 (soft and hard)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads), from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(predicate())  # type: ignore[operator]


@contextlib.contextmanager
def server(args: list[str], port: int, out_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` with RLIMIT_NOFILE 64 until the block ends; SIGINT, then SIGKILL after 10 s, by PID."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "PROXYPROTO_HEADER_TIMEOUT": "60"}
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [arg.replace("{port}", str(port)) for arg in args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            preexec_fn=_limit_descriptors,
        )
        try:
            assert wait_for(lambda: listening(port) or proc.poll() is not None, 20), out_path.read_text()
            assert proc.poll() is None, out_path.read_text()
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def ask(port: int, http: bool) -> bytes:
    """A good client: a valid v2 header (and a request, for HTTP), then everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(V2 + (HTTP_GET if http else b""))
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def settled(pid: int, out_path: Path, quiet: float, timeout: float) -> bool:
    """Wait until the server's descriptors and output have not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = (open_fds(pid), out_path.stat().st_size)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the server's CPU and descriptors in /proc")
@pytest.mark.parametrize("name", list(_servers()))
def test_good_client_is_served_while_silent_connections_exhaust_descriptors(name: str, tmp_path: Path) -> None:
    """RLIMIT_NOFILE 64, 120 silent connections: the flood is absorbed, then costs no CPU; a good
    client is served at once; every descriptor comes back when the flood closes.

    The asyncio loop accepts a whole burst before any connection reaches the adapter, so a
    burst deeper than the free descriptors still fails in ``accept()`` (asyncio then logs and
    backs off for a second; a loop of uvicorn's listen backlog logs once per queued
    connection): the first seconds are bounded, not free.  Once the waiting connections have
    been cut down, nothing fails any more: no output, no CPU.
    """
    if name in _NEEDS:
        require_module(_NEEDS[name])
    args, http = _servers()[name]
    port = free_port()
    out_path = tmp_path / "server.out"
    silent: list[socket.socket] = []
    with server(args, port, out_path) as proc:
        try:
            assert REAL_V4[0].encode() in ask(port, http)  # serving, with its steady descriptors open
            baseline = open_fds(proc.pid)

            flood_began, cpu_at_flood = time.monotonic(), cpu_seconds(proc.pid)
            for _ in range(FLOOD):
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            assert settled(proc.pid, out_path, quiet=1.2, timeout=10), "the flood was never absorbed"
            absorbed = time.monotonic() - flood_began
            cpu_absorbing = (cpu_seconds(proc.pid) - cpu_at_flood) / absorbed
            held = open_fds(proc.pid)
            lines = len(out_path.read_text(errors="replace").splitlines())

            # A loop spinning on the flood shows as the whole window in CPU (a full core); a quiet one
            # measures no clock tick at all.  With the 1.2 s of quiet before it, two of asyncio's 1 s
            # accept back-offs pass without a line: a failure repeating after one would show.
            window = 1.0
            before, began = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(window)
            cpu = (cpu_seconds(proc.pid) - before) / (time.monotonic() - began)
            lines_in_window = len(out_path.read_text(errors="replace").splitlines()) - lines

            began = time.monotonic()
            answer = ask(port, http)
            elapsed = time.monotonic() - began
            assert REAL_V4[0].encode() in answer, answer[-500:]
            assert elapsed < 2.0, f"the good client waited {elapsed:.2f} s"
            assert held <= LIMIT // 2, f"{held} descriptors open of {LIMIT} with the flood waiting"
            assert cpu < 0.05, f"{cpu:.0%} of a core while the flood waits (absorbed in {absorbed:.1f} s)"
            assert lines_in_window == 0, out_path.read_text(errors="replace")[-2000:]
            assert cpu_absorbing < 0.5, f"{cpu_absorbing:.0%} of a core for {absorbed:.1f} s absorbing the flood"

            for sock in silent:
                sock.close()
            silent.clear()
            assert wait_for(lambda: open_fds(proc.pid) <= baseline, 5), f"{open_fds(proc.pid)} > {baseline}"
        finally:
            for sock in silent:
                sock.close()
    output = out_path.read_text(errors="replace")
    evicted = r"closed: \d+ connections already wait for their header \(the process is near its RLIMIT_NOFILE of 64\)"
    assert re.search(evicted, output), output[-2000:]


# -- gunicorn's WSGI workers ---------------------------------------------------------------------------
#
# gunicorn's sync and gthread workers keep the descriptor reserve too (gthread's pool thread needs a
# descriptor for each new connection), and own ``accept()`` (as the socketserver mixin does): on EMFILE
# the oldest connection still waiting for its header gives its place, one line says so, and the worker
# goes on serving (it must not die with a traceback and be rebooted by the arbiter).


def worker_pid(arbiter: int) -> int:
    """The one worker process of the gunicorn arbiter ``arbiter`` (from ``/proc``), once it is up."""
    children: list[str] = []

    def found() -> bool:
        children[:] = Path(f"/proc/{arbiter}/task/{arbiter}/children").read_text().split()
        return len(children) == 1

    assert wait_for(found, 20), children
    return int(children[0])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the worker's descriptors in /proc")
@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_worker_keeps_serving_while_silent_connections_exhaust_descriptors(
    worker: str, tmp_path: Path
) -> None:
    """RLIMIT_NOFILE 64, 120 silent trusted connections: the oldest waiting connections are closed
    before the descriptors run out (or, should ``accept()`` still meet EMFILE, to make room, with one
    line for the failure); a good client is served at once by the same worker, which never dies with
    a traceback; every descriptor comes back when the flood closes."""
    require_module("gunicorn")
    import gunicorn_kit

    port = free_port()
    out_path = tmp_path / "server.out"
    silent: list[socket.socket] = []
    with server(gunicorn_kit.gunicorn_args(worker, port, workers=1), port, out_path) as proc:
        try:
            assert REAL_V4[0].encode() in ask(port, True)
            pid = worker_pid(proc.pid)
            baseline = open_fds(pid)
            for _ in range(FLOOD):
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            assert settled(pid, out_path, quiet=1.2, timeout=10), "the flood was never absorbed"
            held = open_fds(pid)

            began = time.monotonic()
            answer = ask(port, True)
            elapsed = time.monotonic() - began
            assert REAL_V4[0].encode() in answer, answer[-500:]
            assert elapsed < 2.0, f"the good client waited {elapsed:.2f} s"
            assert worker_pid(proc.pid) == pid, "the worker was replaced"
            assert held <= LIMIT, held

            for sock in silent:
                sock.close()
            silent.clear()
            assert wait_for(lambda: open_fds(pid) <= baseline, 5), f"{open_fds(pid)} > {baseline}"
        finally:
            for sock in silent:
                sock.close()
    output = out_path.read_text(errors="replace")
    assert "Traceback" not in output and "Exception in worker process" not in output, output[-3000:]
    assert output.count("Booting worker") == 1, output[-3000:]
    evicted = r"closed: \d+ connections already wait for their header \(the process is near its RLIMIT_NOFILE of 64\)"
    assert re.search(evicted, output), output[-2000:]
    assert output.count("accept() failed") <= 1, output[-3000:]  # EMFILE itself, should a burst outrun the reserve
