"""shutdown(), server_close(), handle_request() and fork with parked connections.

Parked connections belong to the mixin, not to a handler, so the mixin must close them: when
the server closes, and in every forked child (a child holding a copy of a parked socket would
keep it open, and its client would wait for the child instead of the deadline).
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import time

import pytest
from server_kit import (
    CLASS_NAMES,
    DEST_V4,
    REAL_V4,
    LineReportHandler,
    Running,
    make_class,
    new_unix_dir,
    serve,
    server_class,
    v1_header,
    wait_for,
)


def sees_eof(sock: socket.socket, limit: float) -> bool:
    """True when the peer closed (EOF or reset) within ``limit`` seconds."""
    sock.settimeout(limit)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_shutdown_and_server_close_are_prompt_and_close_parked_connections(name: str) -> None:
    with serve(name, proxy_header_timeout=30.0) as srv:
        parked = [srv.connect() for _ in range(5)]
        parked.append(srv.connect())
        parked[-1].sendall(b"PROXY TCP4 192.0")  # one with half a header
        time.sleep(0.3)  # all accepted and parked
        try:
            start = time.monotonic()
            srv.server.shutdown()
            took_shutdown = time.monotonic() - start
            srv.server.server_close()
            took = time.monotonic() - start
            srv.stopped = True
            srv.thread.join(5)
            assert took_shutdown < 2.0 and took < 2.0
            for sock in parked:
                assert sees_eof(sock, 2.0), "a parked connection outlived server_close()"
        finally:
            for sock in parked:
                sock.close()


class HoldingChildHandler(socketserver.StreamRequestHandler):
    """Reads a line, then holds the child until a second line comes (the test says when), then answers."""

    def handle(self) -> None:
        self.rfile.readline()
        self.rfile.readline()
        self.wfile.write(json.dumps({"client_address": list(self.client_address)}).encode() + b"\n")


@pytest.mark.parametrize("name", ["ForkingProxyTCPServer", "ForkingProxyUnixStreamServer"])
def test_forked_child_does_not_keep_a_parked_connection_open(name: str) -> None:
    """A parked client is closed by the parent at its deadline and must see EOF then, even
    though a child forked while it was parked is still alive."""
    with serve(name, HoldingChildHandler, proxy_header_timeout=1.0) as srv:
        with srv.connect() as parked:
            start = time.monotonic()
            time.sleep(0.2)
            with srv.connect() as busy:
                busy.sendall(v1_header(REAL_V4, DEST_V4) + b"go\n")  # forks now, the child holds on
                assert sees_eof(parked, 3.5)
                took = time.monotonic() - start
                assert took < 2.2, f"parked client saw EOF after {took:.2f} s: child kept it open"
                busy.sendall(b"answer now\n")  # the child was alive until here
                busy.settimeout(5)
                answer = busy.recv(4096)
                assert json.loads(answer)["client_address"] == list(REAL_V4)


def test_handle_request_loop_expires_parked_connections() -> None:
    """A handle_request() loop never calls service_actions(); with ``timeout`` set it still
    wakes up and expires a parked connection at its deadline (DESIGN.md)."""
    cls = make_class(server_class("ProxyTCPServer"), proxy_header_timeout=0.5, timeout=0.1)
    server = cls(("127.0.0.1", 0), LineReportHandler)
    server.verified = []
    try:
        with socket.create_connection(server.server_address, timeout=5) as silent:
            start = time.monotonic()
            silent.setblocking(False)

            def closed() -> bool:
                server.handle_request()
                try:
                    return silent.recv(1) == b""
                except BlockingIOError:
                    return False
                except ConnectionResetError:
                    return True

            assert wait_for(closed, 3.0, step=0.0)
            assert time.monotonic() - start < 1.5
            with socket.create_connection(server.server_address, timeout=5) as good:
                good.sendall(v1_header(REAL_V4, DEST_V4) + b"x\n")
                for _ in range(20):
                    server.handle_request()
                    good.setblocking(False)
                    try:
                        data = good.recv(4096)
                        break
                    except BlockingIOError:
                        continue
                else:
                    pytest.fail("handle_request() never served a complete header")
                assert json.loads(data)["client_address"] == list(REAL_V4)
    finally:
        server.server_close()


def test_socket_replaced_after_construction_is_the_one_served() -> None:
    """The listening socket is registered when serving starts, not in __init__ (DESIGN.md):
    replacing ``server.socket`` before serve_forever works (here: a socket bound elsewhere)."""
    tmp = new_unix_dir()
    cls = make_class(server_class("ThreadingProxyUnixStreamServer"))
    server = cls(os.path.join(tmp, "first"), LineReportHandler)
    replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    replacement.bind(os.path.join(tmp, "second"))
    replacement.listen(16)
    server.socket.close()
    server.socket = replacement
    server.server_address = os.path.join(tmp, "second")
    running = Running(server, tmp)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(os.path.join(tmp, "second"))
            c.sendall(v1_header(REAL_V4, DEST_V4) + b"x\n")
            assert json.loads(c.recv(4096))["client_address"] == list(REAL_V4)
    finally:
        running.stop()
