"""``proxyproto send --udp`` and ``proxyproto relay --udp`` against the library's own UDP server.

The server is ``proxyproto.udp.ThreadingProxyUDPServer`` with a ``ProxyDatagramRequestHandler``
that answers each datagram with what its handler saw (JSON): the address it was given, the
proxy it came from, the header's family, protocol and destination.  The answer goes back to
the proxy (the CLI), so an answer that reaches the client proves the whole path, replies
included.  The CLI runs as a real process; clients are sockets of the test, bound to their
own loopback addresses so that each client is told apart by its address.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_kit import cli, cli_background, require_ipv6, udp_server

import proxyproto

TIMEOUT = 10.0


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def client(bind: str, relay: tuple[str, int]) -> Iterator[socket.socket]:
    """A UDP client on ``bind``, connected to ``relay``: it takes replies from that address only."""
    sock = socket.socket(_family(relay[0]), socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.bind((bind, 0))
        sock.connect(relay)
        yield sock
    finally:
        sock.close()


def ask(sock: socket.socket, payload: bytes) -> dict[str, Any]:
    """One datagram through the relay; the handler's report, which must come back."""
    sock.send(payload)
    report: dict[str, Any] = json.loads(sock.recv(65535))
    assert report["payload"] == payload.decode("latin-1")
    return report


# -- send --udp -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "source", "destination", "family"),
    [
        ("127.0.0.1", "203.0.113.7:5353", "192.0.2.1:53", "INET"),
        ("::1", "[2001:db8::7]:4242", "[2001:db8::1]:8443", "INET6"),
        ("127.0.0.1", "[::ffff:203.0.113.7]:5353", "[2001:db8::1]:53", "INET6"),
    ],
)
def test_send_udp_reaches_the_handler_as_the_source_and_prints_the_reply(
    host: str, source: str, destination: str, family: str
) -> None:
    if ":" in host:
        require_ipv6()
    with udp_server(host) as server:
        result = cli(
            "send", "--udp", host, str(server.server_address[1]), "--source", source, "--destination", destination,
            stdin=b"ping",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith(b"\n")
        report = json.loads(result.stdout)
    src_host, _, src_port = source.rpartition(":")
    dst_host, _, dst_port = destination.rpartition(":")
    assert report["client_address"] == [src_host.strip("[]"), int(src_port)]
    assert report["header"] == {
        "command": "PROXY",
        "family": family,
        "protocol": "DGRAM",
        "destination": [dst_host.strip("[]"), int(dst_port)],
    }
    assert report["payload"] == "ping"


@contextlib.contextmanager
def recording_udp_socket(host: str = "127.0.0.1", answer: bytes | None = b"ok") -> Iterator[tuple[int, list[bytes]]]:
    """A UDP socket that records each datagram and answers ``answer`` (nothing for None)."""
    received: list[bytes] = []
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except socket.timeout:
                continue
            received.append(data)
            if answer is not None:
                sock.sendto(answer, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], received
    finally:
        stop.set()
        thread.join(5)
        sock.close()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            ["--source", "203.0.113.7:5353", "--destination", "192.0.2.1:53"],
            proxyproto.encode_v2(("203.0.113.7", 5353), ("192.0.2.1", 53), protocol=proxyproto.Protocol.DGRAM),
        ),
        (
            ["--source", "[2001:db8::7]:1", "--destination", "[2001:db8::1]:2", "--checksum", "--tlv", "0xE0=0102"],
            proxyproto.encode_v2(
                ("2001:db8::7", 1),
                ("2001:db8::1", 2),
                protocol=proxyproto.Protocol.DGRAM,
                tlvs=[(0xE0, b"\x01\x02")],
                checksum=True,
            ),
        ),
        ([], b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00"),  # no addresses: PROXY, family and protocol UNSPEC
        (["--local"], b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"),  # LOCAL, as dnsdist's health checks
    ],
)
def test_send_udp_writes_one_datagram_header_then_stdin(options: list[str], expected: bytes) -> None:
    with recording_udp_socket() as (port, received):
        result = cli("send", "--udp", "127.0.0.1", str(port), *options, stdin=b"payload")
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"ok"
    assert received == [expected + b"payload"]
    if options and options[0] == "--source":
        assert received[0][13] in (0x12, 0x22)  # UDP over IPv4 / IPv6


def test_send_udp_without_a_reply_exits_1_after_the_timeout() -> None:
    with recording_udp_socket(answer=None) as (port, received):
        started = time.monotonic()
        result = cli("send", "--udp", "127.0.0.1", str(port), "--timeout", "0.5", stdin=b"x")
        assert result.returncode == 1
    assert 0.5 <= time.monotonic() - started < 15
    assert f"no reply from 127.0.0.1:{port} within 0.5 s (--timeout)".encode() in result.stderr
    assert len(received) == 1 and result.stdout == b""


def test_send_udp_to_a_closed_port_exits_1_saying_it_was_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = cli("send", "--udp", "127.0.0.1", str(port), stdin=b"x")
    assert result.returncode == 1
    assert f"127.0.0.1:{port} refused the datagram".encode() in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_send_udp_with_a_payload_too_large_for_a_datagram_exits_1() -> None:
    with recording_udp_socket(answer=None) as (port, received):
        result = cli("send", "--udp", "127.0.0.1", str(port), stdin=b"x" * 70000)
    assert result.returncode == 1 and b"too large for UDP" in result.stderr
    assert received == []


# -- relay --udp ------------------------------------------------------------------------------------


@contextlib.contextmanager
def udp_relay(tmp: Path, upstream: tuple[str, int], *extra: str, listen: str = "127.0.0.1:0") -> Iterator[Any]:
    """``relay --udp`` in the background; yields (process, port)."""
    args = ["relay", "--udp", "--listen", listen, "--upstream", _where(*upstream[:2]), *extra]
    with cli_background(tmp, *args, name="udp-relay") as running:
        yield running


@pytest.mark.parametrize(("server_host", "relay_host", "clients"), [
    ("127.0.0.1", "127.0.0.1", ["127.0.0.2", "127.0.0.3"]),
    ("::1", "::1", ["::1", "::1"]),
    ("127.0.0.1", "::1", ["::1"]),
    ("::1", "127.0.0.1", ["127.0.0.2"]),
])  # fmt: skip
def test_relay_udp_header_names_each_client_and_replies_come_back(
    server_host: str, relay_host: str, clients: list[str], tmp_path: Path
) -> None:
    if ":" in server_host + relay_host:
        require_ipv6()
    with (
        udp_server(server_host) as server,
        udp_relay(tmp_path, server.server_address, listen=_where(relay_host, 0)) as (proc, port),
    ):
        family = "INET6" if ":" in relay_host else "INET"
        seen_proxies = set()
        for index, bind in enumerate(clients):
            with client(bind, (relay_host, port)) as sock:
                own = list(sock.getsockname()[:2])
                for turn in range(2):
                    report = ask(sock, b"datagram %d.%d" % (index, turn))
                    assert report["client_address"] == own
                    assert report["header"] == {
                        "command": "PROXY",
                        "family": family,
                        "protocol": "DGRAM",
                        "destination": [relay_host, port],
                    }
                    seen_proxies.add(tuple(report["proxy_address"]))
        assert len(seen_proxies) == len(clients)  # one upstream socket per client, kept between its datagrams
        assert proc.popen.poll() is None
    assert "Traceback" not in proc.output()


def test_relay_udp_relays_every_reply_datagram_and_passes_the_checksum(tmp_path: Path) -> None:
    """An upstream that answers twice: both datagrams reach the client; the header carries a valid CRC32C."""
    received: list[bytes] = []
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.settimeout(TIMEOUT)
    with upstream, udp_relay(tmp_path, upstream.getsockname(), "--checksum") as (_, port):
        with client("127.0.0.2", ("127.0.0.1", port)) as sock:
            sock.send(b"question")
            data, relay_side = upstream.recvfrom(65535)
            received.append(data)
            upstream.sendto(b"answer 1", relay_side)
            upstream.sendto(b"answer 2", relay_side)
            assert [sock.recv(65535), sock.recv(65535)] == [b"answer 1", b"answer 2"]
            own = sock.getsockname()
    header = proxyproto.parse(received[0])
    assert header.crc32c is not None  # parse verified it
    assert header.protocol is proxyproto.Protocol.DGRAM
    assert header.source == own and header.destination == ("127.0.0.1", port)
    assert received[0][header.length :] == b"question"


@pytest.mark.parametrize(("listen", "target", "bind", "mapped"), [
    ("0.0.0.0:0", "127.0.0.5", "127.0.0.3", False),
    ("[::]:0", "127.0.0.5", "127.0.0.3", True),
    ("[::]:0", "::1", "::1", False),
])  # fmt: skip
def test_relay_udp_on_a_wildcard_names_and_answers_from_the_address_the_client_wrote_to(
    listen: str, target: str, bind: str, mapped: bool, tmp_path: Path
) -> None:
    """IP_PKTINFO / IPV6_PKTINFO: the header's destination is 127.0.0.5 (not 0.0.0.0), the reply comes from it.

    The client is connected to that address, so a reply from any other one would not reach it.
    """
    if "::" in listen:
        require_ipv6()
    with udp_server() as server, udp_relay(tmp_path, server.server_address, listen=listen) as (_, port):
        with client(bind, (target, port)) as sock:
            report = ask(sock, b"hello")
            own = list(sock.getsockname()[:2])
    prefix = "::ffff:" if mapped else ""
    assert report["client_address"] == [prefix + own[0], own[1]]
    assert report["header"]["destination"] == [prefix + target, port]
    assert report["header"]["family"] == ("INET6" if mapped or ":" in target else "INET")


def test_relay_udp_forgets_an_idle_client_and_maps_it_again(tmp_path: Path) -> None:
    """After --idle-timeout without a datagram, the client's upstream socket is closed; its next datagram opens one."""
    with udp_server() as server, udp_relay(tmp_path, server.server_address, "--idle-timeout", "0.5") as (_, port):
        with client("127.0.0.2", ("127.0.0.1", port)) as sock:
            first = ask(sock, b"one")["proxy_address"]
            time.sleep(0.2)
            assert ask(sock, b"two")["proxy_address"] == first  # still mapped: activity keeps it
            time.sleep(1.2)
            third = ask(sock, b"three")
            own = list(sock.getsockname()[:2])
    assert third["proxy_address"] != first
    assert third["client_address"] == own


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_relay_udp_keeps_at_most_max_clients_least_recently_active_give_way(tmp_path: Path) -> None:
    with udp_server() as server, udp_relay(tmp_path, server.server_address, "--max-clients", "2") as (proc, port):
        with client("127.0.0.2", ("127.0.0.1", port)) as a, client("127.0.0.3", ("127.0.0.1", port)) as b:
            with client("127.0.0.4", ("127.0.0.1", port)) as c:
                a_first = ask(a, b"a")["proxy_address"]
                b_first = ask(b, b"b")["proxy_address"]
                assert ask(a, b"a again")["proxy_address"] == a_first  # a is now the most recently active
                c_first = ask(c, b"c")["proxy_address"]  # the table is full: b, the least recently active, goes
                assert ask(a, b"a still")["proxy_address"] == a_first
                assert ask(c, b"c still")["proxy_address"] == c_first
                assert ask(b, b"b back")["proxy_address"] != b_first  # mapped again (and a gave way)
        proc.wait_for(r"2 clients mapped \(--max-clients\): the least recently active give way")
        assert proc.output().count("clients mapped") == 1  # said once while the table stays full


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts descriptors in /proc")
def test_relay_udp_sockets_stay_bounded_by_max_clients(tmp_path: Path) -> None:
    with udp_server() as server, udp_relay(tmp_path, server.server_address, "--max-clients", "3") as (proc, port):
        pid = proc.popen.pid
        baseline = _fd_count(pid)
        for index in range(20):
            with client(f"127.0.1.{index + 1}", ("127.0.0.1", port)) as sock:
                ask(sock, b"x")
            assert _fd_count(pid) <= baseline + 3
        assert _fd_count(pid) == baseline + 3


def test_relay_udp_keeps_running_when_the_upstream_refuses(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()
    with udp_relay(tmp_path, closed) as (proc, port), client("127.0.0.2", ("127.0.0.1", port)) as sock:
        for _ in range(3):
            sock.send(b"x")
            time.sleep(0.1)
        proc.wait_for("refused")
        assert proc.popen.poll() is None
    assert "Traceback" not in proc.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_relay_udp_stops_cleanly_on_signal(sig: int, tmp_path: Path) -> None:
    with udp_server() as server, udp_relay(tmp_path, server.server_address) as (proc, port):
        with client("127.0.0.2", ("127.0.0.1", port)) as sock:
            ask(sock, b"x")
        started = time.monotonic()
        assert proc.stop(sig) == 0, proc.output()
        assert time.monotonic() - started < 5
    assert "Traceback" not in proc.output()
