"""Hostile headers over real connections: refused in one log line, never a traceback (issue 5, acceptance 4).

The server is ``ThreadingProxyTCPServer`` in a thread of this process, so the
records of logger ``proxyproto`` can be counted per connection and
``handle_error`` (overridden to record) proves the serving loop never raised.
The malformed inputs are the core tests' own tables (``MALFORMED_V1`` in
tests/test_v1.py, ``MALFORMED_V2`` in tests/test_v2.py, loaded from their
files), plus the classes a network adds: oversize v2 lengths and slow
delivery, untrusted peers under each untrusted policy (G10), and LOCAL or
UNKNOWN headers that try to pass addresses (V2-R1, V1-R6).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import proxyproto
from proxyproto.crc32c import crc32c

TESTS = Path(__file__).resolve().parent.parent
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
REAL = ("192.0.2.10", 51234)
DEST = ("198.51.100.20", 443)
ADDR4 = bytes([192, 0, 2, 10, 198, 51, 100, 20]) + struct.pack("!HH", REAL[1], DEST[1])
V1 = b"PROXY TCP4 192.0.2.10 198.51.100.20 51234 443\r\n"
V2 = SIG + b"\x21\x11\x00\x0c" + ADDR4
TRUSTED_PEER, UNTRUSTED_PEER = "127.0.0.2", "127.0.0.3"


def v2(ver_cmd: int = 0x21, fam: int = 0x11, body: bytes = ADDR4, length: int | None = None) -> bytes:
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body) if length is None else length) + body


def core_table(module: str, name: str) -> list[tuple[str, bytes, type[Exception]]]:
    """(id, bytes, exception class) rows of a core test table, loaded from its file (empty if absent)."""
    path = TESTS / f"{module}.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location(f"_stress_core_{module}", path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return [(f"{module}:{row[0]}", row[1], row[2]) for row in getattr(loaded, name, [])]


def bad_crc() -> bytes:
    body = ADDR4 + b"\x03\x00\x04\x00\x00\x00\x00"
    header = bytearray(v2(body=body))
    header[-4:] = struct.pack("!I", crc32c(bytes(header)) ^ 1)
    return bytes(header)


OWN_MALFORMED: list[tuple[str, bytes, type[Exception]]] = [
    ("v1-108-bytes-no-crlf", b"PROXY UNKNOWN " + b"a" * 94, proxyproto.InvalidHeader),
    ("v1-nul", b"PROXY TCP4 192.0.2.1\x00 198.51.100.2 1 2\r\n", proxyproto.InvalidHeader),
    ("v2-len-4097-over-default-max", v2(length=4097), proxyproto.InvalidHeader),
    ("v2-len-65535-over-default-max", v2(length=65535), proxyproto.InvalidHeader),
    ("v2-bad-crc", bad_crc(), proxyproto.ChecksumError),
    ("v2-version-1", v2(ver_cmd=0x11), proxyproto.InvalidHeader),
    ("v2-signature-typo", SIG[:11] + b"X" + b"\x21\x11\x00\x0c" + ADDR4, proxyproto.NoProxyHeader),
    ("tls-client-hello", bytes.fromhex("160301020001") + bytes(64), proxyproto.NoProxyHeader),
    ("http-get", b"GET / HTTP/1.0\r\n\r\n", proxyproto.NoProxyHeader),
    ("ssh-banner", b"SSH-2.0-OpenSSH_9.6\r\n", proxyproto.NoProxyHeader),
    ("nul-bytes", bytes(32), proxyproto.NoProxyHeader),
    ("high-bytes", bytes(range(255, 127, -1)), proxyproto.NoProxyHeader),
    ("two-v1-lines-bad-first", b"PROXY TCP9 x\r\n" + V1, proxyproto.InvalidHeader),
]

MALFORMED = [
    *core_table("test_v1", "MALFORMED_V1"),
    *core_table("test_v2", "MALFORMED_V2"),
    *OWN_MALFORMED,
]


class ReportHandler(socketserver.StreamRequestHandler):
    """Reads to EOF and answers one JSON line: client_address, header command, payload."""

    timeout = 10.0

    def handle(self) -> None:
        payload = self.rfile.read()
        header = getattr(self.request, "proxy_header", None)
        self.server.calls.append(self.client_address)  # type: ignore[attr-defined]
        report = {
            "client": list(self.client_address),
            "command": None if header is None else header.command.name,
            "payload": payload.hex(),
        }
        self.wfile.write(json.dumps(report).encode() + b"\n")


class Recorder(logging.Handler):
    """Every record of logger ``proxyproto``, formatted, with whether it carries a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Server:
    """A recording ThreadingProxyTCPServer serving in a thread."""

    def __init__(self, **attrs: Any) -> None:
        # Every refusal is counted line by line here: no rate limit (proxy_log_rate has its own tests).
        settings = {"daemon_threads": True, "proxy_log_rate": None, **attrs}
        cls = type("HostileServer", (proxyproto.ThreadingProxyTCPServer,), settings)
        self.server = cls(("127.0.0.1", 0), ReportHandler)
        self.server.calls = []  # type: ignore[attr-defined]
        self.errors: list[str] = []
        self.server.handle_error = lambda request, address: self.errors.append(traceback.format_exc())  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def calls(self) -> list[Any]:
        return self.server.calls  # type: ignore[attr-defined,no-any-return]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)

    def exchange(self, data: bytes, *, source: str | None = None, pieces: int = 1, gap: float = 0.0,
                 shut: bool = True, timeout: float = 5.0) -> bytes | None:
        """Send ``data`` (in ``pieces`` writes ``gap`` s apart), shut the write side, read to EOF.

        The answer line, or None when the server closed (or reset) without answering.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        with sock:
            if source is not None:
                sock.bind((source, 0))
            sock.connect(self.server.server_address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                size = max(1, -(-len(data) // pieces))
                for start in range(0, len(data), size):
                    sock.sendall(data[start : start + size])
                    if gap:
                        time.sleep(gap)
                if shut:
                    sock.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            except TimeoutError:
                raise
            except OSError:  # reset, broken pipe, ENOTCONN: the server closed first
                return None
        return answer or None


@pytest.fixture
def log() -> Iterator[Recorder]:
    logger = logging.getLogger("proxyproto")
    recorder = Recorder()
    before = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(before)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def serving(**attrs: Any) -> Iterator[Server]:
    """A server for one test; afterwards: handle_error never called, every descriptor given back."""
    before = open_fds()
    srv = Server(**attrs)
    try:
        yield srv
    finally:
        srv.close()
    assert not srv.errors, srv.errors[0]
    assert wait_for(lambda: open_fds() == before), f"{open_fds()} descriptors open, {before} before the server"


def wait_for(predicate: Any, limit: float = 3.0) -> bool:
    end = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def assert_one_refusal(log: Recorder, start: int, what: str, level: int = logging.WARNING) -> None:
    """Exactly one new record since ``start``: at ``level``, no traceback, naming the refusal."""
    new = log.records[start:]
    assert len(new) == 1, f"{what}: {[r.getMessage() for r in new]}"
    record = new[0]
    assert record.levelno == level, f"{what}: {record.levelname} {record.getMessage()}"
    assert record.exc_info is None and record.exc_text is None and record.stack_info is None, what
    assert ": closed: " in record.getMessage() and "\n" not in record.getMessage(), record.getMessage()


def test_malformed_table_is_the_core_tables_plus_network_classes() -> None:
    """The core tables were found (the suite must not silently shrink to the local list)."""
    assert len(MALFORMED) >= 100, len(MALFORMED)


def test_every_malformed_header_is_closed_with_one_line_V1_R5_V2_R8(
    log: Recorder, capfd: pytest.CaptureFixture[str]
) -> None:
    """REQUIRE: each malformed header (in one write, and byte by byte) is closed, one WARNING, handler never called."""
    with serving(proxy_header_timeout=5.0) as srv:
        for ident, data, _cls in MALFORMED:
            for pieces in (1, len(data)):
                start = len(log.records)
                answer = srv.exchange(data, pieces=pieces)
                assert answer is None, f"{ident} was served: {answer!r}"
                assert_one_refusal(log, start, f"{ident} in {pieces} piece(s)")
        assert srv.calls == []
        # Still serving.
        assert json.loads(srv.exchange(V1 + b"x") or b"{}")["client"] == list(REAL)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("length", [4097, 8192, 65535])
def test_oversize_v2_length_refused_at_its_16th_byte_without_eof(log: Recorder, length: int) -> None:
    """A v2 length past ``proxy_max_header_size`` is refused as soon as the length field arrives,
    even delivered a byte at a time, without waiting for the body, the deadline or EOF."""
    with serving(proxy_header_timeout=10.0) as srv:
        start, t0 = len(log.records), time.monotonic()
        answer = srv.exchange(v2(length=length)[:16], pieces=16, gap=0.02, shut=False, timeout=5.0)
        took = time.monotonic() - t0
        assert answer is None
        assert took < 2.0, f"closed after {took:.2f}s"
        assert_one_refusal(log, start, f"len {length}")
        assert "4096" in log.records[-1].getMessage() or "size" in log.records[-1].getMessage().lower()


def big_header(length: int = 65535) -> bytes:
    """A valid PROXY TCP4 header whose len is ``length``: the address block, then NOOP TLVs filling it."""
    body = ADDR4
    while len(body) < length:
        room = length - len(body) - 3
        body += bytes([0x04]) + struct.pack("!H", min(room, 60000)) + bytes(min(room, 60000))
    assert len(body) == length
    return v2(body=body)


def test_largest_v2_header_delivered_slowly_is_served_when_allowed_V2_R3(log: Recorder) -> None:
    """With ``proxy_max_header_size`` = 65551, a 65,551-byte header arriving in 4 KiB pieces is
    served with the real address and the payload after it intact."""
    header = big_header()
    assert len(header) == 65551
    with serving(proxy_header_timeout=10.0, proxy_max_header_size=65551) as srv:
        answer = srv.exchange(header + b"after", pieces=17, gap=0.01)
        assert answer is not None
        report = json.loads(answer)
        assert report["client"] == list(REAL)
        assert bytes.fromhex(report["payload"]) == b"after"
    assert log.records == []


def test_largest_v2_header_stalling_is_closed_at_the_deadline_T2(log: Recorder) -> None:
    """Half of a 65,551-byte header, then silence: closed at the deadline (not before), one WARNING."""
    header = big_header()
    with serving(proxy_header_timeout=1.0, proxy_max_header_size=65551) as srv:
        start, t0 = len(log.records), time.monotonic()
        answer = srv.exchange(header[:32768], pieces=8, shut=False, timeout=5.0)
        took = time.monotonic() - t0
        assert answer is None
        assert 0.9 <= took < 2.0, took
        assert_one_refusal(log, start, "stalled big header")
        assert "incomplete" in log.records[-1].getMessage()


UNTRUSTED_CASES = {
    # what the untrusted peer sends -> per policy: None (closed) or (payload the handler reads, command);
    # under IGNORE an untrusted peer's header is read and removed, and never reaches the handler
    "valid v1 header": (V1 + b"data", {
        "SKIP": (V1 + b"data", None), "IGNORE": (b"data", None), "REJECT": None}),
    "valid v2 header": (V2 + b"data", {
        "SKIP": (V2 + b"data", None), "IGNORE": (b"data", None), "REJECT": None}),
    "v2 LOCAL": (v2(ver_cmd=0x20) + b"data", {
        "SKIP": (v2(ver_cmd=0x20) + b"data", None), "IGNORE": (b"data", None), "REJECT": None}),
    "no header": (b"hello", {"SKIP": (b"hello", None), "IGNORE": (b"hello", None), "REJECT": (b"hello", None)}),
    "malformed header": (b"PROXY TCP5 x\r\nzz", {
        "SKIP": (b"PROXY TCP5 x\r\nzz", None), "IGNORE": None, "REJECT": None}),
    "nothing": (b"", {"SKIP": (b"", None), "IGNORE": (b"", None), "REJECT": (b"", None)}),
}


#: How the streams of the untrusted cases that start like a header begin (v1, v2).
SIGNATURES = (b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n")


@pytest.mark.parametrize("policy", ["SKIP", "IGNORE", "REJECT"])
def test_untrusted_peers_never_set_their_address_G10(log: Recorder, policy: str) -> None:
    """Outside ``proxy_trusted`` (127.0.0.2/32), a peer (127.0.0.3) is served with its socket address
    whatever it sends, or closed in one WARNING line; one that sends a header and is served gets one
    WARNING saying it is not trusted; the trusted peer still gets its real address."""
    with serving(proxy_trusted="127.0.0.2/32", proxy_untrusted_policy=policy, proxy_header_timeout=5.0) as srv:
        trusted = srv.exchange(V1 + b"x", source=TRUSTED_PEER)
        assert trusted is not None and json.loads(trusted)["client"] == list(REAL)
        for what, (data, expected) in UNTRUSTED_CASES.items():
            start = len(log.records)
            answer = srv.exchange(data, source=UNTRUSTED_PEER)
            want = expected[policy]
            if want is None:
                assert answer is None, f"{policy}/{what}: served {answer!r}"
                assert_one_refusal(log, start, f"{policy}/{what}")
                continue
            assert answer is not None, f"{policy}/{what}: closed ({[r.getMessage() for r in log.records[start:]]})"
            report = json.loads(answer)
            assert report["client"][0] == UNTRUSTED_PEER, f"{policy}/{what}: {report}"
            assert bytes.fromhex(report["payload"]) == want[0], f"{policy}/{what}: {report}"
            assert report["command"] == want[1], f"{policy}/{what}: {report}"
            lines = [r.getMessage() for r in log.records[start:]]
            if data.startswith(SIGNATURES):  # served as it is, and the operator is told (the proxy may be unlisted)
                assert len(lines) == 1, f"{policy}/{what}: {lines}"
                assert "sent a PROXY header but is not trusted" in lines[0]
                assert log.records[start].levelno == logging.WARNING
            else:
                assert lines == [], f"{policy}/{what}: {lines}"


def start_with_untrusted_policy(policy: str) -> ValueError:
    """Serve with ``proxy_untrusted_policy`` = ``policy``; the ValueError it must raise before serving
    (in the constructor since issue 14 item 4, or when serving starts)."""
    cls = type("S", (proxyproto.ThreadingProxyTCPServer,), {
        "proxy_trusted": "127.0.0.2/32", "proxy_untrusted_policy": policy})
    try:
        server = cls(("127.0.0.1", 0), ReportHandler)
    except ValueError as exc:
        return exc
    timer = threading.Timer(2.0, server.shutdown)  # bounded even if the refusal never comes
    timer.start()
    try:
        with pytest.raises(ValueError) as info:
            server.serve_forever(poll_interval=0.05)
    finally:
        timer.cancel()
        server.server_close()
    return info.value


@pytest.mark.parametrize("policy", ["USE", "REQUIRE"])
def test_untrusted_policy_that_would_trust_is_refused_at_start_G10(policy: str) -> None:
    """``proxy_untrusted_policy`` USE or REQUIRE would let anyone set their address: ValueError when serving starts."""
    start_with_untrusted_policy(policy)


@pytest.mark.parametrize("policy", ["USE", "REQUIRE"])
def test_untrusted_policy_refusal_says_why_G10(policy: str) -> None:
    """The ValueError names the setting and the reason, not a generic selectors message."""
    error = start_with_untrusted_policy(policy)
    assert "proxy_untrusted_policy" in str(error), str(error)


LOCAL_WITH_ADDRESSES = {
    "v2 LOCAL with an INET block": v2(ver_cmd=0x20, fam=0x11),
    "v2 LOCAL with an INET block and TLVs": v2(ver_cmd=0x20, fam=0x11, body=ADDR4 + b"\x04\x00\x02ab"),
    "v2 LOCAL with an INET6 block": v2(ver_cmd=0x20, fam=0x21, body=bytes(range(36))),
    "v2 PROXY UNSPEC with bytes shaped like addresses": v2(fam=0x00, body=b"\x04\x00\x09" + ADDR4[:9]),
    "v1 UNKNOWN with addresses": b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 UNKNOWN with IPv6 addresses": b"PROXY UNKNOWN 2001:db8::1 2001:db8::2 1 2\r\n",
}


@pytest.mark.parametrize("policy", ["REQUIRE", "USE"])
@pytest.mark.parametrize("what", list(LOCAL_WITH_ADDRESSES))
def test_local_or_unknown_header_cannot_pass_addresses_V2_R1_V1_R6(log: Recorder, policy: str, what: str) -> None:
    """The handler sees the socket's own peer for LOCAL, UNKNOWN and UNSPEC, whatever bytes follow."""
    with serving(proxy_policy=policy, proxy_header_timeout=5.0) as srv:
        answer = srv.exchange(LOCAL_WITH_ADDRESSES[what] + b"payload")
        assert answer is not None, [r.getMessage() for r in log.records]
        report = json.loads(answer)
        assert report["client"][0] == "127.0.0.1", report
        assert bytes.fromhex(report["payload"]) == b"payload"
        assert report["command"] in ("LOCAL", "PROXY")
    assert log.records == []


def test_ignore_policy_keeps_socket_address_for_a_real_header() -> None:
    """IGNORE reads and removes a PROXY header with addresses but serves the socket's peer."""
    with serving(proxy_policy="IGNORE", proxy_header_timeout=5.0) as srv:
        for header in (V1, V2):
            report = json.loads(srv.exchange(header + b"p") or b"{}")
            assert report["client"][0] == "127.0.0.1"
            assert bytes.fromhex(report["payload"]) == b"p"
            assert report["command"] == "PROXY"
