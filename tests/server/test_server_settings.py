"""The mixin's settings: read live, checked where they are set, and never taking the loop down.

``proxy_trusted``, ``proxy_policy``, ``proxy_untrusted_policy``, ``proxy_policy_for``,
``proxy_max_pending``, ``proxy_header_timeout`` and ``proxy_log_rate``, on the instance or the
class, before or while ``serve_forever`` runs: a change takes effect from the next connection;
an invalid value is refused where it is set on an instance, and in the constructor for the
class's; one set on the class while serving closes connections with one ERROR line until it is
fixed (never trusting an untrusted peer, never stopping the loop).  Refusal lines are
rate-limited per kind, with summaries.  Real loopback sockets.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

import pytest
from server_kit import (
    DEST_V4,
    REAL_V4,
    ReplyHandler,
    ReportHandler,
    Running,
    as_address,
    exchange,
    make_class,
    proxyproto_records,
    read_all,
    serve,
    v1_header,
    wait_for,
)

import proxyproto
from proxyproto import Policy

HEADER = v1_header(REAL_V4, DEST_V4)
PAYLOAD = b"payload\n"


# --------------------------------------------------------------------------- changed while serving


def test_trust_narrowed_after_fileno_is_honoured() -> None:
    """``fileno()`` used to freeze the trust settings: a later ``proxy_trusted`` was ignored and
    an untrusted loopback peer set its own client_address."""
    server = make_class(proxyproto.ThreadingProxyTCPServer)(("127.0.0.1", 0), ReportHandler)
    server.fileno()  # what selectors and serve_forever do first
    server.proxy_trusted = ["10.0.0.0/8"]
    running = Running(server)
    try:
        report, own = exchange(running, [HEADER + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == own  # SKIP: the header is payload
        assert bytes.fromhex(report["payload"]) == HEADER + PAYLOAD
        assert REAL_V4 not in server.verified
    finally:
        running.stop()


def test_trust_changed_while_serving_takes_effect_from_next_connection() -> None:
    server = make_class(proxyproto.ThreadingProxyTCPServer)(("127.0.0.1", 0), ReportHandler)
    running = Running(server)
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


def test_trust_changed_on_the_class_while_serving_is_honoured() -> None:
    cls = make_class(proxyproto.ThreadingProxyTCPServer)
    server = cls(("127.0.0.1", 0), ReportHandler)
    running = Running(server)
    try:
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == REAL_V4
        cls.proxy_trusted = ["10.0.0.0/8"]
        report, own = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == own
    finally:
        running.stop()


def test_policy_hook_assigned_while_serving_takes_effect() -> None:
    """A ``proxy_policy_for`` set on the instance or the class while serving is called from the
    next connection on (it used to be looked up once, when serving started: a silent spoof)."""
    cls = make_class(proxyproto.ThreadingProxyTCPServer)
    server = cls(("127.0.0.1", 0), ReportHandler)
    running = Running(server)
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


def test_an_instance_level_policy_hook_gets_the_local_address() -> None:
    seen: list[Any] = []
    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), ReplyHandler)

    def policy_for(peer: Any, local: Any) -> proxyproto.Policy:
        seen.append(local)
        return proxyproto.Policy.REQUIRE

    server.proxy_policy_for = policy_for  # type: ignore[method-assign]
    with Running(server):
        header = proxyproto.encode_v1(("192.0.2.1", 1000), ("192.0.2.2", 80))
        with socket.create_connection(server.server_address, timeout=5) as client:
            client.sendall(header)
            assert client.recv(100) == b"served ('192.0.2.1', 1000)"
    assert seen == [server.server_address]


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


# --------------------------------------------------------------------------- invalid values


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
def test_invalid_setting_on_the_instance_is_refused_where_it_is_set(name: str, value: Any) -> None:
    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), ReportHandler)
    try:
        before = getattr(server, name)
        with pytest.raises(ValueError, match=name):
            setattr(server, name, value)
        assert getattr(server, name) == before
    finally:
        server.server_close()


def test_invalid_trust_set_on_the_class_while_serving_closes_connections_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A class attribute cannot refuse an assignment: the server logs once at ERROR and closes
    every new connection (never trusting an untrusted peer) until the value is fixed."""
    caplog.set_level(logging.INFO, logger="proxyproto")
    cls = make_class(proxyproto.ThreadingProxyTCPServer, proxy_trusted=["10.0.0.0/8"])
    server = cls(("127.0.0.1", 0), ReportHandler)
    running = Running(server)
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


@pytest.mark.parametrize("value", [{"127.0.0.1": 1}.keys(), iter(["127.0.0.1"]), 5])
def test_trusted_of_an_unreadable_type_is_refused_at_assignment(value: Any) -> None:
    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), ReportHandler)
    try:
        with pytest.raises(ValueError, match="proxy_trusted"):
            server.proxy_trusted = value
    finally:
        server.server_close()


def test_trusted_of_an_unreadable_type_set_on_the_class_keeps_the_loop_alive(
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


def test_bad_trusted_network_is_refused_in_the_constructor() -> None:
    class Server(proxyproto.ThreadingProxyTCPServer):
        proxy_trusted = ("10.0.0.0/33",)

    with pytest.raises(ValueError, match="proxy_trusted"):
        Server(("127.0.0.1", 0), ReportHandler)


def test_max_pending_below_one_is_refused_in_the_constructor() -> None:
    """Refused when the listener is activated (before any loop could hang shutdown)."""

    class Server(proxyproto.ProxyTCPServer):
        proxy_max_pending = 0

    with pytest.raises(ValueError, match="proxy_max_pending"):
        Server(("127.0.0.1", 0), ReplyHandler)


def test_shutdown_returns_after_serve_forever_raised_on_configuration() -> None:
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


# --------------------------------------------------------------------------- refusal lines


def test_refusal_lines_are_rate_limited_with_a_summary(caplog: pytest.LogCaptureFixture) -> None:
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

        def accounted() -> int:
            messages = [r.getMessage() for r in proxyproto_records(caplog)]
            summarised = sum(int(m.split()[0]) for m in messages if "suppressed" in m)
            return sum(": closed: " in m for m in messages) + summarised

        # Until a window ends and the idle loop writes the summary (about a second; 3 s at most).
        wait_for(lambda: accounted() >= flood, timeout=3.0)
        report, _ = exchange(running, [HEADER + PAYLOAD])
        assert report is not None and as_address(report["client_address"]) == REAL_V4
    messages = [r.getMessage() for r in proxyproto_records(caplog)]
    refusals = [m for m in messages if ": closed: " in m]
    summaries = [int(m.split()[0]) for m in messages if "suppressed" in m]
    assert len(refusals) <= 10 * (elapsed + 2)
    assert summaries, messages[-5:]
    assert len(refusals) + sum(summaries) == flood


def test_log_rate_none_logs_every_refusal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")
    with serve("ThreadingProxyTCPServer", proxy_log_rate=None) as running:
        for _ in range(30):
            with running.connect() as sock:
                sock.sendall(b"PROXY TCP9 nonsense\r\n")
                read_all(sock)
    assert len([r for r in proxyproto_records(caplog) if ": closed: " in r.getMessage()]) == 30


def test_a_flood_of_one_refusal_kind_does_not_hide_another(caplog: pytest.LogCaptureFixture) -> None:
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
