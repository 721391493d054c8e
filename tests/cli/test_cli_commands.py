"""``python -m proxyproto send | decode | relay`` run as real subprocesses.

``send`` and ``relay`` talk to the demo echo server (SEED-NOTES), which answers "Your remote
address is ADDR" and logs "client sent N bytes"; ``decode`` reads every capture in
``tests/vectors`` and must say what its JSON twin says; the relay is also put in front of a
real haproxy ``accept-proxy``, whose log is the independent truth.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

import pytest
from cli_kit import VECTORS, capture_send, cli, demo_server, haproxy, relay, wait_until
from support import free_port

import proxyproto

BINS = sorted(VECTORS.glob("*.bin"))


# -- help, usage, exit codes ---------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["send", "--help"], ["decode", "--help"], ["relay", "--help"]])
def test_cli_help_exits_0_and_describes_the_command(args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 0
    assert b"usage: proxyproto" in result.stdout


# Every usage error (exit 2, one line naming the option): test_cli_exit_status.py.


# -- send -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--source", "192.0.2.10:51234", "--destination", "198.51.100.20:7654"], "192.0.2.10:51234"),
        (["--v1", "--source", "192.0.2.10:51234", "--destination", "198.51.100.20:7654"], "192.0.2.10:51234"),
        (["--source", "[2001:db8::7]:4242", "--destination", "[2001:db8::1]:7654"], "[2001:db8::7]:4242"),
        (["--v1", "--source", "[2001:db8::7]:4242", "--destination", "[2001:db8::1]:7654"], "[2001:db8::7]:4242"),
        (
            [
                *("--source", "192.0.2.10:1", "--destination", "198.51.100.20:2", "--checksum"),
                *("--authority", "x.test", "--tlv", "0xE0=0102", "--tlv", "NOOP="),
            ],
            "192.0.2.10:1",
        ),
    ],
)
def test_cli_send_against_demo_server_reports_the_sent_address(
    options: list[str], expected: str, tmp_path: Path
) -> None:
    with demo_server(tmp_path) as (demo, port):
        result = cli("send", "127.0.0.1", str(port), *options, stdin=b"inkel\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"Your remote address is {expected}\n".encode()
        demo.wait_for(re.escape('client sent 6 bytes: "inkel\\n"'))
        assert f"handling connection from {expected}" in demo.output()


def test_cli_send_local_header_keeps_the_socket_address(tmp_path: Path) -> None:
    with demo_server(tmp_path) as (_, port):
        result = cli("send", "127.0.0.1", str(port), "--local", stdin=b"check")
    assert result.returncode == 0
    assert re.fullmatch(rb"Your remote address is 127\.0\.0\.1:\d+\n", result.stdout)


def test_cli_send_relays_large_stdin_and_half_closes(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 400  # 102,400 bytes
    with demo_server(tmp_path) as (demo, port):
        result = cli(
            "send", "127.0.0.1", str(port), "--source", "192.0.2.10:1", "--destination", "192.0.2.20:2", stdin=payload
        )
        assert result.returncode == 0
        demo.wait_for(r"client sent 102400 bytes")


def test_cli_send_connection_refused_exits_1(tmp_path: Path) -> None:
    port = free_port()
    result = cli("send", "127.0.0.1", str(port), "--source", "192.0.2.10:1", "--destination", "192.0.2.20:2")
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}".encode() in result.stderr
    assert b"Traceback" not in result.stderr


def test_cli_send_writes_exactly_the_encoded_header_then_stdin() -> None:
    """What goes on the wire is ``encode_v2(...)`` followed by stdin, byte for byte."""
    received = bytearray()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def accept() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                while chunk := conn.recv(65536):
                    received.extend(chunk)
                conn.sendall(b"bye")

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        result = cli(
            "send", "127.0.0.1", str(port), "--source", "192.0.2.10:1", "--destination", "192.0.2.20:2",
            "--checksum", "--tlv", "ALPN=6832", stdin=b"payload",
        )  # fmt: skip
        thread.join(10)
    assert result.returncode == 0 and result.stdout == b"bye"
    header = proxyproto.encode_v2(("192.0.2.10", 1), ("192.0.2.20", 2), tlvs=[(1, b"h2")], checksum=True)
    assert bytes(received) == header + b"payload"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00"),  # PROXY command, family/protocol UNSPEC, len 0
        (["--v1"], b"PROXY UNKNOWN\r\n"),
        (["--local"], b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"),  # LOCAL
    ],
)
def test_cli_send_without_addresses_sends_unspec_and_help_says_so(options: list[str], expected: bytes) -> None:
    status, received = capture_send(*options, stdin=b"x")
    assert status == 0
    assert received == expected + b"x"
    assert proxyproto.parse(received) == proxyproto.parse(expected + b"x")
    help_text = b" ".join(cli("send", "--help").stdout.split())
    assert b"Without --source and --destination" in help_text
    assert b"UNSPEC (bytes 0x21 0x00)" in help_text and b"'PROXY UNKNOWN'" in help_text
    assert b"--local sends a v2 LOCAL command" in help_text


def test_cli_version_prints_the_package_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"proxyproto {proxyproto.__version__}\n".encode()
    assert proxyproto.__version__ == "0.1.0"


# -- decode ---------------------------------------------------------------------------------


def _expected(path: Path) -> dict[str, Any]:
    return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["expected"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", BINS, ids=[p.stem for p in BINS])
def test_cli_decode_json_matches_every_capture(path: Path) -> None:
    assert BINS, "no captures in tests/vectors"
    result = cli("decode", str(path), "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    want = _expected(path)
    for key in ("version", "command", "family", "protocol", "header_length", "payload_length", "header_hex"):
        assert got[key] == want[key], key
    for key in ("src_addr", "src_port", "dst_addr", "dst_port"):
        if want.get("family") == "AF_UNIX":
            continue
        assert got[key] == want[key], key
    assert [(t["type"], t["value_hex"]) for t in got["tlvs"]] == [(t["type"], t["value_hex"]) for t in want["tlvs"]]
    assert [t["name"] for t in got["tlvs"]] == [t.get("name") for t in want["tlvs"]]
    for got_tlv, want_tlv in zip(got["tlvs"], want["tlvs"]):
        if "value_text" in want_tlv:
            assert got_tlv["value_text"] == want_tlv["value_text"]
        if "ssl" in want_tlv:
            ssl = want_tlv["ssl"]
            assert got["ssl"]["client"] == ssl["client"] and got["ssl"]["verify"] == ssl["verify"]
            assert [(s["type"], s["name"], s["value_hex"]) for s in got["ssl"]["sub_tlvs"]] == [
                (s["type"], s["name"], s["value_hex"]) for s in ssl["sub_tlvs"]
            ]
    if "crc32c" in want:
        assert got["crc32c"] == want["crc32c"]["value_hex"]


@pytest.mark.parametrize("path", BINS, ids=[p.stem for p in BINS])
def test_cli_decode_text_from_stdin_and_from_hex(path: Path) -> None:
    want = _expected(path)
    data = path.read_bytes()
    text = cli("decode", "-", stdin=data)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.decode().splitlines()
    assert f"version: {want['version']}" in lines and f"command: {want['command']}" in lines
    assert f"payload length: {want['payload_length']}" in lines
    if want.get("src_port") is not None:
        host = want["src_addr"]
        shown = f"[{host}]:{want['src_port']}" if ":" in host else f"{host}:{want['src_port']}"
        assert f"source: {shown}" in lines
    spaced = " ".join(data.hex()[i : i + 32] for i in range(0, len(data) * 2, 32)).encode() + b"\n"
    from_hex = cli("decode", "--hex", stdin=spaced)
    assert from_hex.returncode == 0 and from_hex.stdout == text.stdout


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", b"not a PROXY protocol header"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", b"invalid PROXY header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", b"invalid PROXY header"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c", b"incomplete PROXY header"),
        (b"", b"incomplete PROXY header"),
    ],
)
def test_cli_decode_invalid_input_exits_1_with_a_clear_message(data: bytes, message: bytes) -> None:
    result = cli("decode", stdin=data)
    assert result.returncode == 1
    assert message in result.stderr and b"Traceback" not in result.stderr
    assert result.stdout == b""


def test_cli_decode_checksum_mismatch_and_no_verify() -> None:
    data = bytearray(proxyproto.encode_v2(("192.0.2.10", 1), ("192.0.2.20", 2), checksum=True))
    data[17] ^= 1
    refused = cli("decode", stdin=bytes(data))
    assert refused.returncode == 1 and b"CRC" in refused.stderr.upper()
    accepted = cli("decode", "--no-verify-checksum", stdin=bytes(data))
    assert accepted.returncode == 0 and b"crc32c:" in accepted.stdout


def test_cli_decode_missing_file_and_bad_hex_exit_1(tmp_path: Path) -> None:
    missing = cli("decode", str(tmp_path / "nope.bin"))
    assert missing.returncode == 1 and b"cannot read" in missing.stderr
    bad = cli("decode", "--hex", stdin=b"0d0a zz")
    assert bad.returncode == 1 and b"not hex" in bad.stderr


# -- relay ------------------------------------------------------------------------------------


def _client(port: int, data: bytes, local: str = "127.0.0.2") -> tuple[tuple[str, int], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(local, 0)) as sock:
        own = sock.getsockname()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return own, answer


@pytest.mark.parametrize("version", ["--v1", "--v2"])
def test_cli_relay_in_front_of_demo_reports_the_clients_own_address(version: str, tmp_path: Path) -> None:
    with demo_server(tmp_path, "--policy", "REQUIRE") as (demo, demo_port):
        with relay(tmp_path, demo_port, version, "--once") as (proc, port):
            own, answer = _client(port, b"inkel\n")
            assert proc.popen.wait(10) == 0, proc.output()  # --once: exits after the connection
        assert answer == f"Your remote address is {own[0]}:{own[1]}\n".encode()
        demo.wait_for(re.escape('client sent 6 bytes: "inkel\\n"'))


def test_cli_relay_serves_several_connections_with_checksum(tmp_path: Path) -> None:
    with demo_server(tmp_path, "--policy", "REQUIRE") as (demo, demo_port):
        with relay(tmp_path, demo_port, "--checksum", "--max-connections", "3") as (proc, port):
            answers = [_client(port, b"n%d" % i, local=f"127.0.0.{2 + i}") for i in range(3)]
            assert proc.popen.wait(10) == 0
        for own, answer in answers:
            assert answer == f"Your remote address is {own[0]}:{own[1]}\n".encode()
        assert wait_until(lambda: demo.output().count("client sent 2 bytes") == 3)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_relay_stops_cleanly_on_signal(sig: int, tmp_path: Path) -> None:
    with demo_server(tmp_path) as (_, demo_port), relay(tmp_path, demo_port) as (proc, port):
        _client(port, b"x")
        assert proc.stop(sig) == 0, proc.output()
        assert "Traceback" not in proc.output()


def test_cli_relay_unreachable_upstream_closes_the_client_and_keeps_running(tmp_path: Path) -> None:
    with relay(tmp_path, free_port(), "--max-connections", "2") as (proc, port):
        try:
            _, answer = _client(port, b"x")
        except ConnectionResetError:  # closed with the client's byte unread: a reset is a close too
            answer = b""
        assert answer == b""
        proc.wait_for("cannot reach")
        assert proc.popen.poll() is None


def test_cli_relay_listen_failure_exits_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = cli("relay", "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:1", "--once")
    assert result.returncode == 1 and b"cannot listen" in result.stderr


@pytest.mark.parametrize(("version", "frontend"), [("--v1", "accept-proxy"), ("--v2", "accept-proxy")])
def test_cli_relay_in_front_of_haproxy_accept_proxy_interop(version: str, frontend: str, tmp_path: Path) -> None:
    """haproxy decodes the relay's header and logs the client's own address (%ci:%cp)."""

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(5)
            data = self.request.recv(65536)
            self.request.sendall(b"backend got " + data)

    backend = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    backend.daemon_threads = True
    thread = threading.Thread(target=backend.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    front = free_port()
    body = (
        f"frontend fe\n    bind 127.0.0.1:{front} {frontend}\n"
        '    log-format "RELAYLOG %ci %cp %fi %fp"\n    default_backend be\n'
        f"backend be\n    server app 127.0.0.1:{backend.server_address[1]}\n"
    )
    try:
        with haproxy(tmp_path, body, front) as hap, relay(tmp_path, front, version, "--once") as (proc, port):
            own, answer = _client(port, b"hello\n")
            assert proc.popen.wait(10) == 0
            line = hap.wait_for(r"RELAYLOG (\S+) (\S+) (\S+) (\S+)")
    finally:
        backend.shutdown()
        backend.server_close()
        thread.join(5)
    assert answer == b"backend got hello\n"
    assert line.group(1) == own[0] and int(line.group(2)) == own[1]
    assert line.group(3) == "127.0.0.1" and int(line.group(4)) == port


def test_cli_main_is_callable_in_process_and_returns_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    """The console script entry point ``proxyproto.cli:main`` returns 0/1 rather than exiting."""
    from proxyproto import cli as module

    assert module.main(["decode", str(VECTORS / "haproxy_v2_tcp4.bin")]) == 0
    assert "version: 2" in capsys.readouterr().out
    assert module.main(["decode", str(VECTORS / "missing.bin")]) == 1
    assert "cannot read" in capsys.readouterr().err
