"""A proxyproto server in its own process, so its CPU time and descriptors can be measured honestly.

Usage: ``python stress_server.py '<json config>'``.  The config names the class
(``"class"``), the address (``"host"`` for TCP, ``"path"`` for UNIX), class
attributes to set (``"attrs"``), ``"rlimit_nofile"`` (lower the soft limit
first) and ``"poll_interval"``.  The script prints one JSON line
``{"address": ..., "pid": ...}`` once it serves, then obeys one command per
stdin line, answering each with one JSON line on stdout:

* ``fds``: how many descriptors the process holds;
* ``failfork``: the next ``os.fork()`` raises OSError (EAGAIN), once;
* ``close``: time ``shutdown()`` and ``server_close()``, report, exit.

It exits cleanly on SIGTERM or when stdin closes.  Log records of logger
``proxyproto`` (and everything else) go to stderr, one line each, so a test
can count refusals and look for tracebacks there.

The handler reads one line and answers one JSON line saying what it saw
(``client``, ``pid``, ``line``); a line starting with ``raise`` makes it raise.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import socketserver
import sys
import threading
import time
from typing import Any

# The checkout's package, whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import proxyproto


class LineHandler(socketserver.StreamRequestHandler):
    """Answers one line with what it saw; ``raise`` makes it fail (handle_error's normal path)."""

    timeout = 10.0  # a handler never outlives a stuck test client by much

    def handle(self) -> None:
        line = self.rfile.readline(4096)
        if line.startswith(b"raise"):
            raise RuntimeError("handler asked to raise")
        header = getattr(self.request, "proxy_header", None)
        report = {
            "client": list(self.client_address) if isinstance(self.client_address, tuple) else self.client_address,
            "pid": os.getpid(),
            "line": line.decode("latin-1"),
            "command": None if header is None else int(header.command),
        }
        self.wfile.write(json.dumps(report).encode() + b"\n")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class TermRequested(Exception):
    """SIGTERM arrived: leave the command loop and close down."""


def main() -> None:
    config: dict[str, Any] = json.loads(sys.argv[1])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = config.get("rlimit_nofile")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard) if wanted else hard, hard))
    logging.basicConfig(
        level=logging.DEBUG, stream=sys.stderr, format="LOG %(levelname)s %(name)s %(message)s"
    )

    fork_failures = [0]
    real_fork = os.fork

    def fork() -> int:
        if fork_failures[0]:
            fork_failures[0] -= 1
            raise OSError(errno.EAGAIN, "simulated fork failure")
        return real_fork()

    os.fork = fork  # ForkingMixIn looks it up on the module at each request

    def on_term(signum: int, frame: object) -> None:
        raise TermRequested

    signal.signal(signal.SIGTERM, on_term)

    baseline = fd_count()
    cls = getattr(proxyproto, config["class"])
    # Refusal lines are counted one by one in these tests: no rate limit unless a test asks for one.
    attrs = {"proxy_log_rate": None, **config.get("attrs", {})}
    server_cls = type("StressServer", (cls,), attrs)
    address: Any = config["path"] if "path" in config else (config.get("host", "127.0.0.1"), 0)
    server = server_cls(address, LineHandler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": config.get("poll_interval", 0.5)}, daemon=True
    )
    thread.start()
    bound = server.server_address
    print(json.dumps({"address": list(bound) if isinstance(bound, tuple) else bound, "pid": os.getpid(),
                      "fds_before_server": baseline}), flush=True)
    closed = False
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "fds":
                print(json.dumps({"fds": fd_count()}), flush=True)
            elif command == "failfork":
                fork_failures[0] = 1
                print(json.dumps({"armed": True}), flush=True)
            elif command == "close":
                start = time.monotonic()
                server.shutdown()
                middle = time.monotonic()
                server.server_close()
                end = time.monotonic()
                closed = True
                thread.join(5.0)
                print(json.dumps({"shutdown_s": middle - start, "close_s": end - middle,
                                  "fds_before_server": baseline, "fds_after_close": fd_count()}), flush=True)
                break
    except TermRequested:
        pass
    finally:
        if not closed:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
