"""Issue 11 (hardening, round 2) and issue 14 (misuse refused clearly): the socketserver mixin.

Each test is named after the item it closes and reproduces the attack or mistake on real
loopback sockets (and, for the descriptor limit, a real server process with a low
RLIMIT_NOFILE).  Each failed on the code before the fix.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from server_kit import (
    DEST_V4,
    REAL_V4,
    ReportHandler,
    Running,
    as_address,
    exchange,
    make_class,
    proxyproto_records,
    read_all,
    serve,
    v1_header,
    v2_header,
    wait_for,
)

import proxyproto
from proxyproto import Policy, ProxyProtocolMixin

HEADER = v1_header(REAL_V4, DEST_V4)
PAYLOAD = b"payload\n"
ROOT = Path(__file__).resolve().parents[2]


def start(server: Any) -> Running:
    """Serve an already built server in a thread (the tests change it before or while serving)."""
    server.verified = []
    return Running(server)


# --------------------------------------------------------------------------- item 1: live trust


def test_trust_narrowed_after_fileno_is_honoured_issue11_item1() -> None:
    """``fileno()`` used to freeze the trust settings: a later ``proxy_trusted`` was ignored and
    an untrusted loopback peer set its own client_address."""
    server = make_class(proxyproto.ThreadingProxyTCPServer)(("127.0.0.1", 0), ReportHandler)
    server.fileno()  # what selectors and serve_forever do first
    server.proxy_trusted = ["10.0.0.0/8"]
    running = start(server)
    try:
        report, own = exchange(running, [HEADER + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == own  # SKIP: the header is payload
        assert bytes.fromhex(report["payload"]) == HEADER + PAYLOAD
        assert REAL_V4 not in server.verified
    finally:
        running.stop()


def test_trust_changed_while_serving_takes_effect_from_next_connection_issue11_item1() -> None:
    server = make_class(proxyproto.ThreadingProxyTCPServer)(("127.0.0.1", 0), ReportHandler)
    running = start(server)
    try:
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == REAL_V4

        server.proxy_trusted = "10.0.0.0/8, 192.168.0.0/16"  # instance, while serve_forever runs
        report, own = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == own

        server.proxy_untrusted_policy = Policy.REJECT  # untrusted headers are now refused
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is None

        server.proxy_trusted = ["127.0.0.0/8"]
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == REAL_V4

        server.proxy_trusted.clear()  # a list changed in place: now it trusts no one
        report, own = exchange(running, [b"GET / HTTP/1.0\r\n\r\n"])
        assert report is not None and as_address(report["client_address"]) == own
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is None  # REJECT for the untrusted peer
        assert server.verified[-1] != REAL_V4
    finally:
        running.stop()


def test_trust_changed_on_the_class_while_serving_is_honoured_issue11_item1() -> None:
    cls = make_class(proxyproto.ThreadingProxyTCPServer)
    server = cls(("127.0.0.1", 0), ReportHandler)
    running = start(server)
    try:
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == REAL_V4
        cls.proxy_trusted = ["10.0.0.0/8"]
        report, own = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == own
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("proxy_trusted", "10.0.0.0/33"),
        ("proxy_trusted", ["not an address"]),
        ("proxy_untrusted_policy", Policy.USE),
        ("proxy_untrusted_policy", "REQUIRE"),
        ("proxy_policy", "SOMETIMES"),
        ("proxy_max_pending", 0),
        ("proxy_header_timeout", -1),
        ("proxy_log_rate", -5),
    ],
)
def test_invalid_setting_on_the_instance_is_refused_where_it_is_set_issue11_item1(name: str, value: Any) -> None:
    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), ReportHandler)
    try:
        before = getattr(server, name)
        with pytest.raises(ValueError, match=name):
            setattr(server, name, value)
        assert getattr(server, name) == before
    finally:
        server.server_close()


def test_invalid_trust_set_on_the_class_while_serving_closes_connections_and_logs_once_issue11_item1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A class attribute cannot refuse an assignment: the server logs once at ERROR and closes
    every new connection (never trusting an untrusted peer) until the value is fixed."""
    caplog.set_level(logging.INFO, logger="proxyproto")
    cls = make_class(proxyproto.ThreadingProxyTCPServer, proxy_trusted=["10.0.0.0/8"])
    server = cls(("127.0.0.1", 0), ReportHandler)
    running = start(server)
    try:
        cls.proxy_untrusted_policy = "USE"  # would let untrusted peers set their address
        for _ in range(3):
            report, _ = exchange(running, [HEADER + PAYLOAD])
            assert report is None
        errors = [r for r in proxyproto_records(caplog) if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "proxy_untrusted_policy" in errors[0].getMessage()
        cls.proxy_untrusted_policy = Policy.SKIP
        report, own = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == own
        assert server.verified == [own]
    finally:
        running.stop()


# --------------------------------------------------------------------------- item 2: UNIX header on IP


class AddressHandler(http.server.BaseHTTPRequestHandler):
    """Answers with ``address_string()`` and ``client_address``: what failed with an IndexError."""

    def do_GET(self) -> None:
        header = getattr(self.request, "proxy_header", None)
        body = f"{self.address_string()} {self.client_address!r} family={header and int(header.family)}\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


class RetrofitHTTPServer(ProxyProtocolMixin, http.server.ThreadingHTTPServer):
    errors: list
    verified: list

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.verified.append(client_address)
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1])


@pytest.mark.parametrize(
    "source",
    [b"\0" * 216, b"/run/client.sock".ljust(108, b"\0") + b"/run/server.sock".ljust(108, b"\0"), b"\0x" + b"\0" * 214],
    ids=["all-zero", "pathname", "abstract"],
)
def test_unix_family_header_on_ip_listener_serves_the_socket_peer_issue11_item2(source: bytes) -> None:
    """A v2 PROXY header with family 0x31 on a TCP listener: ``client_address`` keeps the shape
    the handlers written for TCP assume (the socket's own peer); the header stays on the request."""
    header = v2_header()[:12] + b"\x21\x31" + len(source).to_bytes(2, "big") + source
    assert proxyproto.parse(header).family is proxyproto.Family.UNIX
    server = RetrofitHTTPServer(("127.0.0.1", 0), AddressHandler)
    server.errors = []
    running = start(server)
    try:
        with socket.create_connection(server.server_address, timeout=5) as sock:
            own = sock.getsockname()
            sock.sendall(header + b"GET / HTTP/1.0\r\n\r\n")
            response = read_all(sock)
        assert response.startswith(b"HTTP/1.0 200"), response
        body = response.split(b"\r\n\r\n", 1)[1].decode()
        assert body == f"{own[0]} {own!r} family=3\n"
        assert server.errors == []
        assert server.verified == [own]
    finally:
        running.stop()


def test_unix_family_header_on_unix_listener_still_gives_the_path_issue11_item2() -> None:
    header = v2_header("/run/client.sock", "/run/server.sock")
    with serve("ThreadingProxyUnixStreamServer") as running:
        report, _ = exchange(running, [header + PAYLOAD])
        assert report is not None and report["client_address"] == "/run/client.sock"


# --------------------------------------------------------------------------- item 5: fd limit

_FD_SERVER = """
import logging, resource, socketserver, sys
import proxyproto
resource.setrlimit(resource.RLIMIT_NOFILE, (__LIMIT__, __LIMIT__))
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(repr(self.client_address).encode() + b"\\n")

class Server(proxyproto.ThreadingProxyTCPServer):
    proxy_header_timeout = 60.0
    daemon_threads = True

server = Server(("127.0.0.1", 0), Echo)
print(server.server_address[1], flush=True)
server.serve_forever(poll_interval=0.05)
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_out_of_descriptors_evicts_the_oldest_parked_connection_issue11_item5() -> None:
    """With RLIMIT_NOFILE 64, silent sockets used to deny service for the whole header timeout
    (EMFILE came before the pending cap).  Now the oldest parked one gives its place: a good
    client is served at once, the server does not spin, and descriptors return to baseline."""
    limit = 64
    proc = subprocess.Popen(
        [sys.executable, "-c", _FD_SERVER.replace("__LIMIT__", str(limit))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    silent: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
            first.sendall(HEADER)  # serving has started once this is answered
            assert read_all(first) == repr(REAL_V4).encode() + b"\n"
        baseline = _open_fds(proc.pid)
        for _ in range(limit + 20):  # more than the server can hold
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            silent.append(sock)
        assert wait_for(lambda: _open_fds(proc.pid) >= limit - 1, timeout=5)
        cpu_before, wall_before = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.0)
        cpu = (_cpu_seconds(proc.pid) - cpu_before) / (time.monotonic() - wall_before)
        assert cpu < 0.10, f"server used {cpu:.0%} of a core while out of descriptors"

        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as good:
            good.sendall(HEADER + PAYLOAD)
            answer = read_all(good)
        assert time.monotonic() - began < 1.0
        assert answer == repr(REAL_V4).encode() + b"\n"

        for sock in silent:
            sock.close()
        silent.clear()
        assert wait_for(lambda: _open_fds(proc.pid) <= baseline, timeout=5), _open_fds(proc.pid)
    finally:
        for sock in silent:
            sock.close()
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err
    assert len(re.findall(r"accept\(\) failed", err)) >= 1
    assert len(re.findall(r"accept\(\) failed", err)) <= 5, err[-2000:]


# --------------------------------------------------------------------------- item 6: forking cap


class HoldHandler(socketserver.StreamRequestHandler):
    """Reads to EOF, then reports: a child lives as long as its client keeps the connection."""

    def handle(self) -> None:
        self.rfile.read()
        self.wfile.write(repr(self.client_address).encode() + b"\n")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forking_server_at_max_children_keeps_expiring_headers_issue11_item6() -> None:
    """socketserver's blocking waitpid at max_children froze the loop: parked headers were
    neither expired nor evicted, and a good client timed out.  Now, while two children hold
    the cap, a silent client parked before is closed at its deadline, new clients wait in the
    backlog (the listener rests), and a good one is served as soon as a child exits.  The loop
    does not spin meanwhile (the server runs in this process: its CPU is this process's), and
    every descriptor is given back."""
    baseline = len(os.listdir("/proc/self/fd"))
    with serve(
        "ForkingProxyTCPServer",
        HoldHandler,
        max_children=2,
        proxy_header_timeout=1.0,
        poll_interval=0.05,
    ) as running:
        holders: list[socket.socket] = []
        silent = running.connect()
        try:
            began = time.monotonic()
            for _ in range(2):
                sock = running.connect()
                sock.sendall(HEADER)
                holders.append(sock)
            assert wait_for(lambda: len(running.server.active_children or ()) == 2, timeout=5)
            cpu, wall = time.process_time(), time.monotonic()
            assert read_all(silent, limit=5) == b""  # closed by its header deadline, at the cap
            assert time.monotonic() - began < 3.0
            time.sleep(0.5)  # still at the cap, nothing parked: the loop must sleep
            assert (time.process_time() - cpu) / (time.monotonic() - wall) < 0.10

            good = running.connect()
            good.sendall(HEADER + PAYLOAD)
            good.shutdown(socket.SHUT_WR)
            time.sleep(0.3)
            holders[0].shutdown(socket.SHUT_WR)  # its child answers and exits
            assert read_all(holders[0]) == repr(REAL_V4).encode() + b"\n"
            began = time.monotonic()
            assert read_all(good, limit=5) == repr(REAL_V4).encode() + b"\n"
            assert time.monotonic() - began < 1.0
            good.close()
        finally:
            # The children share this process's client sockets (the server runs in a thread
            # here): shutdown, not just close, ends their reads, so server_close's reap returns.
            for sock in [silent, *holders]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= baseline, timeout=5)


# --------------------------------------------------------------------------- item 7: log floods


def test_refusal_lines_are_rate_limited_with_a_summary_issue11_item7(caplog: pytest.LogCaptureFixture) -> None:
    """300 malformed headers with ``proxy_log_rate = 10``: at most ten lines a second reach the
    log, and a summary accounts for every suppressed one."""
    caplog.set_level(logging.INFO, logger="proxyproto")
    flood = 300
    with serve("ThreadingProxyTCPServer", proxy_log_rate=10) as running:
        began = time.monotonic()
        for _ in range(flood):
            with running.connect() as sock:
                sock.sendall(b"PROXY TCP9 nonsense\r\n")
                read_all(sock)
        elapsed = time.monotonic() - began
        time.sleep(1.2)  # a window ends; the idle loop writes the summary
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == REAL_V4
    messages = [r.getMessage() for r in proxyproto_records(caplog)]
    refusals = [m for m in messages if ": closed: " in m]
    summaries = [int(m.split()[0]) for m in messages if "suppressed" in m]
    assert len(refusals) <= 10 * (elapsed + 2)
    assert summaries, messages[-5:]
    assert len(refusals) + sum(summaries) == flood


def test_log_rate_none_logs_every_refusal_issue11_item7(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")
    with serve("ThreadingProxyTCPServer", proxy_log_rate=None) as running:
        for _ in range(30):
            with running.connect() as sock:
                sock.sendall(b"PROXY TCP9 nonsense\r\n")
                read_all(sock)
    assert len([r for r in proxyproto_records(caplog) if ": closed: " in r.getMessage()]) == 30


# --------------------------------------------------------------------------- issue 14: misuse


def test_mixin_on_a_udp_server_is_a_type_error_issue14_item3(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TypeError, match=r"proxyproto\.ProxyUDPServer"):

        class Wrong(ProxyProtocolMixin, socketserver.UDPServer):
            pass

    assert proxyproto_records(caplog) == []


def test_mixin_after_the_server_class_is_a_type_error_issue14_item3() -> None:
    with pytest.raises(TypeError, match=r"before (Threading)?TCPServer"):

        class Wrong(socketserver.ThreadingTCPServer, ProxyProtocolMixin):
            pass

    class Fine(socketserver.ThreadingMixIn, ProxyProtocolMixin, socketserver.TCPServer):
        pass

    class Stack(ProxyProtocolMixin):  # not yet a server: checked when combined
        pass

    class Combined(Stack, socketserver.TCPServer):
        pass

    for cls in (Fine, Combined):
        cls(("127.0.0.1", 0), ReportHandler).server_close()


def test_bad_trusted_network_is_refused_in_the_constructor_issue14_item4() -> None:
    class Server(proxyproto.ThreadingProxyTCPServer):
        proxy_trusted = ("10.0.0.0/33",)

    with pytest.raises(ValueError, match="proxy_trusted"):
        Server(("127.0.0.1", 0), ReportHandler)


def test_shutdown_returns_after_serve_forever_raised_on_configuration_issue14_item4() -> None:
    """``serve_forever`` raising on a configuration error used to leave ``shutdown()`` waiting
    forever for an event only a running loop sets."""
    cls = make_class(proxyproto.ThreadingProxyTCPServer)
    server = cls(("127.0.0.1", 0), ReportHandler)
    try:
        cls.proxy_trusted = ["10.0.0.0/33"]  # on the class, after the constructor's check
        errors: list[BaseException] = []

        def run() -> None:
            try:
                server.serve_forever(poll_interval=0.05)
            except ValueError as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(5)
        assert errors and "proxy_trusted" in str(errors[0])
        done = threading.Event()
        threading.Thread(target=lambda: (server.shutdown(), done.set()), daemon=True).start()
        assert done.wait(1.0), "shutdown() hung after a configuration error"
    finally:
        server.server_close()


# --------------------------------------------------------------------------- the review's findings


def test_policy_hook_assigned_while_serving_takes_effect_issue11_item1() -> None:
    """A ``proxy_policy_for`` set on the instance or the class while serving is called from the
    next connection on (it used to be looked up once, when serving started: a silent spoof)."""
    cls = make_class(proxyproto.ThreadingProxyTCPServer)
    server = cls(("127.0.0.1", 0), ReportHandler)
    running = start(server)
    try:
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == REAL_V4
        server.proxy_policy_for = lambda peer, local: Policy.SKIP
        report, own = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == own
        del server.proxy_policy_for
        cls.proxy_policy_for = lambda self, peer, local: Policy.REJECT
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is None
    finally:
        running.stop()


def test_failing_policy_hook_closes_the_connection_not_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    """An ordinary hook written for IP peers fails on an unnamed UNIX peer (``''[0]``)."""
    caplog.set_level(logging.INFO, logger="proxyproto")

    def hook(self: Any, peer: Any, local: Any) -> Policy:
        return Policy.REQUIRE if peer[0] else Policy.SKIP

    with serve("ThreadingProxyUnixStreamServer", proxy_policy_for=hook) as running:
        with socket.socket(socket.AF_UNIX) as sock:  # unbound: its address is ''
            sock.settimeout(5)
            sock.connect(running.server.server_address)
            # The hook runs right after the accept, before the server reads: the close can come
            # before this write, which then meets a closed peer (EPIPE), as the refusal intends.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(HEADER + PAYLOAD)
            assert read_all(sock) == b""
        assert running.thread.is_alive()
        report, _ = exchange(running, [HEADER + PAYLOAD])  # a bound client: the hook works
        assert report is not None
    errors = [r.getMessage() for r in proxyproto_records(caplog) if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "IndexError" in errors[0]


@pytest.mark.parametrize("value", [{"127.0.0.1": 1}.keys(), iter(["127.0.0.1"]), 5])
def test_trusted_of_an_unreadable_type_is_refused_at_assignment_issue11_item1(value: Any) -> None:
    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), ReportHandler)
    try:
        with pytest.raises(ValueError, match="proxy_trusted"):
            server.proxy_trusted = value
    finally:
        server.server_close()


def test_trusted_of_an_unreadable_type_set_on_the_class_keeps_the_loop_alive_issue11_item1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")
    with serve("ThreadingProxyTCPServer") as running:
        type(running.server).proxy_trusted = 5  # the test's own subclass
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is None and running.thread.is_alive()
        type(running.server).proxy_trusted = "127.0.0.1,::1"  # fixed: the default, loopback
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == REAL_V4
    errors = [r for r in proxyproto_records(caplog) if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "proxy_trusted" in errors[0].getMessage()


def test_forking_mixin_before_the_proxy_class_is_a_type_error_issue14_item3() -> None:
    """``ForkingMixIn``'s service_actions and collect_children do not call super(): placed
    first, they would switch off header deadlines and the max_children handling."""
    with pytest.raises(TypeError, match=r"before ForkingMixIn"):

        class Wrong(socketserver.ForkingMixIn, proxyproto.ProxyTCPServer):
            pass


def test_a_flood_of_one_refusal_kind_does_not_hide_another_issue11_item7(caplog: pytest.LogCaptureFixture) -> None:
    """Budgets are per kind: 100 malformed headers spend the malformed budget, and the one
    spoof attempt REJECT catches afterwards is still written."""
    caplog.set_level(logging.INFO, logger="proxyproto")
    with serve(
        "ThreadingProxyTCPServer", proxy_trusted=["10.0.0.0/8"], proxy_untrusted_policy="REJECT", proxy_log_rate=5
    ) as running:
        for _ in range(100):
            with running.connect() as sock:
                sock.sendall(b"PROXY TCP9 nonsense\r\n")
                read_all(sock)
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is None
    messages = [r.getMessage() for r in proxyproto_records(caplog)]
    assert any("which policy REJECT refuses" in m for m in messages)
