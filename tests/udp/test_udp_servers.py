"""The UDP servers: each datagram's v2 header parsed on its own (G8), policies and trust per datagram.

Real datagram sockets on loopback, for the three classes.  The handler reports what it saw in
its reply, which also proves the reply went to the proxy (the datagram's source).  The v2
protocol nibble says what a header describes: a STREAM header in a datagram is refused naming
the protocol, DGRAM is served, UNSPEC (dnsdist's LOCAL health checks) keeps the datagram's source.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading

import pytest
from udp_kit import (
    CLASS_NAMES,
    DEST_V4,
    DEST_V6,
    LOCAL,
    REAL_V4,
    REAL_V6,
    SIGNATURE,
    Reporter,
    exchange,
    no_reply,
    proxy_socket,
    running,
    udp4,
    udp6,
    v2_header,
)

import proxyproto
from proxyproto import Policy, udp
from proxyproto.settings import Settings


@pytest.fixture
def proxy_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    return caplog


def dropped_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxyproto" and "dropped datagram" in r.getMessage()]


# -- headers that carry addresses -------------------------------------------------------------


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_udp4_header_fam_0x12_gives_real_client_and_exact_payload_G8(name: str) -> None:
    datagram = udp4() + b"\x00payload\xff"
    assert datagram[13] == 0x12
    with running(name) as server, proxy_socket() as proxy:
        report = exchange(proxy, server, datagram)
        own = list(proxy.getsockname())
    assert report["client_address"] == list(REAL_V4)
    assert bytes.fromhex(report["payload"]) == b"\x00payload\xff"
    assert report["proxy_address"] == own
    assert report["header"] == {"command": "PROXY", "family": "INET", "protocol": "DGRAM", "length": 28}
    assert report["request_is_pair"] and report["socket_is_reply_socket_on_server_socket"]


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_udp6_header_fam_0x22_gives_real_client_as_4_tuple_G8(name: str) -> None:
    datagram = udp6() + b"six"
    assert datagram[13] == 0x22
    with running(name) as server, proxy_socket() as proxy:
        report = exchange(proxy, server, datagram)
    assert report["client_address"] == [REAL_V6[0], REAL_V6[1], 0, 0]
    assert bytes.fromhex(report["payload"]) == b"six"
    assert report["header"] == {"command": "PROXY", "family": "INET6", "protocol": "DGRAM", "length": 52}


def test_udp_server_on_ipv6_loopback_serves_v4_header() -> None:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("IPv6 loopback unavailable")
    with running("ThreadingProxyUDPServer", host="::1") as server, proxy_socket("::1") as proxy:
        report = exchange(proxy, server, udp4() + b"x")
        own = list(proxy.getsockname())
    assert report["client_address"] == list(REAL_V4)
    assert report["proxy_address"] == own


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_udp_local_header_keeps_the_datagram_source_V2_R1(name: str) -> None:
    with running(name) as server, proxy_socket() as proxy:
        report = exchange(proxy, server, LOCAL + b"health")
        own = list(proxy.getsockname())
    assert report["client_address"] == own
    assert bytes.fromhex(report["payload"]) == b"health"
    assert report["header"]["command"] == "LOCAL"


def test_udp_local_header_with_inet_family_is_still_local_V2_R1() -> None:
    datagram = v2_header(0, 0x12, REAL_V4, DEST_V4) + b"x"
    with running("ProxyUDPServer") as server, proxy_socket() as proxy:
        report = exchange(proxy, server, datagram)
        own = list(proxy.getsockname())
    assert report["client_address"] == own
    assert report["header"]["command"] == "LOCAL"


def test_udp_empty_payload_after_header_is_served() -> None:
    with running("ProxyUDPServer") as server, proxy_socket() as proxy:
        report = exchange(proxy, server, udp4())
    assert report["payload"] == ""
    assert report["client_address"] == list(REAL_V4)


def test_udp_largest_datagram_is_not_truncated() -> None:
    payload = bytes(range(256)) * 117  # 29,952 bytes: far over socketserver's 8192 (the report doubles it in hex)
    with running("ProxyUDPServer") as server, proxy_socket() as proxy:
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        report = exchange(proxy, server, udp4() + payload)
    assert bytes.fromhex(report["payload"]) == payload


def test_udp_checksummed_header_is_verified_CRC_R2(proxy_log: pytest.LogCaptureFixture) -> None:
    good = proxyproto.encode_v2(REAL_V4, DEST_V4, protocol=proxyproto.Protocol.DGRAM, checksum=True)
    bad = bytearray(good)
    bad[16] ^= 0x01  # flip a bit of the source address: the CRC no longer matches
    with running("ProxyUDPServer") as server, proxy_socket() as proxy:
        assert exchange(proxy, server, good + b"ok")["client_address"] == list(REAL_V4)
        assert no_reply(proxy, server, bytes(bad) + b"ok")
    lines = dropped_lines(proxy_log)
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


# -- the protocol byte says what the header describes (G8) ---------------------------------

def unix_header(command: int, fam: int) -> bytes:
    """A v2 header with an AF_UNIX address block (108 NUL-padded bytes per path)."""
    block = b"/run/client.sock".ljust(108, b"\0") + b"/run/server.sock".ljust(108, b"\0")
    return SIGNATURE + bytes([0x20 | command, fam]) + struct.pack(">H", len(block)) + block



STREAM_HEADERS = {
    "0x11 TCP over IPv4": v2_header(1, 0x11, REAL_V4, DEST_V4),
    "0x21 TCP over IPv6": v2_header(1, 0x21, REAL_V6, DEST_V6),
    "0x31 UNIX stream": unix_header(1, 0x31),
}


@pytest.mark.parametrize("policy", [Policy.REQUIRE, Policy.USE, Policy.IGNORE])
@pytest.mark.parametrize("case", sorted(STREAM_HEADERS))
def test_udp_stream_header_is_refused_naming_the_protocol_G8(
    case: str, policy: Policy, proxy_log: pytest.LogCaptureFixture
) -> None:
    """A datagram cannot belong to a TCP connection: a STREAM header in one is an invalid header."""
    byte = case.split()[0]
    with running("ProxyUDPServer", proxy_policy=policy) as server, proxy_socket() as proxy:
        assert no_reply(proxy, server, STREAM_HEADERS[case] + b"payload")
        served = exchange(proxy, server, udp4() + b"next")  # a DGRAM header after it is served
        assert served["header"]["protocol"] == "DGRAM" and bytes.fromhex(served["payload"]) == b"next"
    lines = dropped_lines(proxy_log)
    assert len(lines) == 1, [r.getMessage() for r in proxy_log.records]
    message = lines[0].getMessage()
    assert lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert "STREAM" in message and f"byte {byte}" in message and "G8" in message
    assert "127.0.0.1:" in message and "\n" not in message


def test_udp_stream_header_scans_as_invalid_header_G8() -> None:
    """The refusal is an InvalidHeader (the policy table's "malformed header" row), whatever the policy."""
    scanner = Settings().scanner()
    outcome = scanner.datagram(STREAM_HEADERS["0x11 TCP over IPv4"])
    assert scanner.header is None and outcome.name == "INVALID"
    assert type(scanner.error).__name__ == "InvalidHeader" and "STREAM (TCP)" in str(scanner.error)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_udp_dgram_header_is_served_with_its_source_G8(name: str) -> None:
    with running(name) as server, proxy_socket() as proxy:
        report = exchange(proxy, server, v2_header(1, 0x12, REAL_V4, DEST_V4) + b"dgram")
    assert report["client_address"] == list(REAL_V4)
    assert report["header"]["protocol"] == "DGRAM" and bytes.fromhex(report["payload"]) == b"dgram"


def test_udp_unix_dgram_header_on_ip_listener_keeps_the_datagram_source_G8() -> None:
    """0x32 is a valid datagram header; on an IP listener a UNIX source is served as LOCAL is (DESIGN.md)."""
    with running("ProxyUDPServer") as server, proxy_socket() as proxy:
        report = exchange(proxy, server, unix_header(1, 0x32) + b"u")
        own = list(proxy.getsockname())
    assert report["client_address"] == own
    assert report["header"]["family"] == "UNIX" and report["header"]["protocol"] == "DGRAM"
    assert bytes.fromhex(report["payload"]) == b"u"


UNSPEC_HEADERS = {
    # dnsdist's health check: 16 bytes, LOCAL, family/protocol 0x00, len 0.
    "LOCAL 0x00 (dnsdist health check)": b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",
    "PROXY 0x00": b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00",
    # The family of a LOCAL header is ignored (V2-R1), its STREAM nibble too.
    "LOCAL 0x11 (family ignored)": v2_header(0, 0x11, REAL_V4, DEST_V4),
}


@pytest.mark.parametrize("name", CLASS_NAMES)
@pytest.mark.parametrize("case", sorted(UNSPEC_HEADERS))
def test_udp_unspec_and_local_headers_keep_the_datagram_source_G8(
    case: str, name: str, proxy_log: pytest.LogCaptureFixture
) -> None:
    assert UNSPEC_HEADERS["LOCAL 0x00 (dnsdist health check)"] == LOCAL
    with running(name) as server, proxy_socket() as proxy:
        report = exchange(proxy, server, UNSPEC_HEADERS[case] + b"check")
        own = list(proxy.getsockname())
    assert report["client_address"] == own
    assert bytes.fromhex(report["payload"]) == b"check"
    assert report["header"]["command"] == case.split()[0]
    assert not dropped_lines(proxy_log)


# -- the reply path ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_udp_reply_goes_to_the_proxy_never_to_the_header_source(name: str) -> None:
    """A header naming a third party (a real socket here) must not make the server send to it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as victim:
        victim.bind(("127.0.0.5", 0))
        victim.settimeout(0.3)
        with running(name) as server, proxy_socket() as proxy:
            report = exchange(proxy, server, udp4(victim.getsockname(), DEST_V4) + b"amplify me")
        assert report["client_address"] == list(victim.getsockname())
        with pytest.raises(socket.timeout):
            victim.recvfrom(65535)


def test_proxy_datagram_is_the_socketserver_pair_with_attributes() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        header = proxyproto.parse(udp4())
        request = udp.ProxyDatagram(b"data", sock, header, ("127.0.0.1", 9))
        payload, same = request
        assert (payload, same) == (b"data", sock)
        assert request == (b"data", sock)
        assert request.proxy_header == header and request.proxy_address == ("127.0.0.1", 9)
    finally:
        sock.close()


def test_handler_writing_nothing_sends_nothing() -> None:
    class Quiet(udp.ProxyDatagramRequestHandler):
        def handle(self) -> None:
            pass

    with running("ProxyUDPServer", handler=Quiet) as server, proxy_socket() as proxy:
        assert no_reply(proxy, server, udp4() + b"x")


# -- refusals under REQUIRE ---------------------------------------------------------------


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_udp_require_drops_datagram_without_header_and_logs_one_line(
    name: str, proxy_log: pytest.LogCaptureFixture
) -> None:
    with running(name) as server, proxy_socket() as proxy:
        assert no_reply(proxy, server, b"no header here")
        assert exchange(proxy, server, udp4() + b"next")["client_address"] == list(REAL_V4)
    lines = dropped_lines(proxy_log)
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert "127.0.0.1:" in lines[0].getMessage() and "\n" not in lines[0].getMessage()
    assert lines[0].exc_info is None


BROKEN = {
    "version nibble 1": b"\r\n\r\n\x00\r\nQUIT\n" + b"\x11\x12\x00\x0c" + bytes(12),
    "family nibble 4": b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x42\x00\x00",
    "len shorter than the IPv4 block": b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x12\x00\x04" + bytes(4),
    "TLV overrunning len": udp4()[:14] + struct.pack(">H", 12 + 3) + udp4()[16:] + b"\x04\x00\x09",
    "half a signature": b"\r\n\r\n\x00\r\n",
    "v1 line (no v1 over UDP)": b"PROXY TCP4 192.0.2.10 198.51.100.20 51234 5353\r\nx",
    "v1 UNKNOWN (no v1 over UDP)": b"PROXY UNKNOWN\r\nx",
    "oversize header": v2_header(1, 0x12, REAL_V4, DEST_V4, b"\x04" + struct.pack(">H", 5000) + bytes(5000)),
    "empty datagram": b"",
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_udp_require_drops_broken_or_missing_headers_G8(case: str, proxy_log: pytest.LogCaptureFixture) -> None:
    with running("ProxyUDPServer") as server, proxy_socket() as proxy:
        assert no_reply(proxy, server, BROKEN[case])
        assert exchange(proxy, server, udp4() + b"still serving")["client_address"] == list(REAL_V4)
    lines = dropped_lines(proxy_log)
    assert len(lines) == 1, [r.getMessage() for r in proxy_log.records]
    if case.startswith("v1"):
        assert "v1" in lines[0].getMessage()


def test_udp_header_split_across_two_datagrams_is_two_invalid_datagrams_G8(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    whole = udp4() + b"payload"
    with running("ProxyUDPServer") as server, proxy_socket() as proxy:
        assert no_reply(proxy, server, whole[:20])
        assert no_reply(proxy, server, whole[20:])
        assert exchange(proxy, server, whole)["client_address"] == list(REAL_V4)
    lines = dropped_lines(proxy_log)
    assert len(lines) == 2
    assert "incomplete" in lines[0].getMessage()


def test_udp_require_garbage_flood_logs_one_line_per_datagram_when_unlimited(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    """``proxy_log_rate = None``: every dropped datagram has its line (the limit is tested in test_udp_hardening)."""
    with running("ProxyUDPServer", proxy_log_rate=None) as server, proxy_socket() as proxy:
        for i in range(20):
            proxy.sendto(b"junk %d" % i, server.server_address)
        assert exchange(proxy, server, udp4() + b"x")["client_address"] == list(REAL_V4)
    assert len(dropped_lines(proxy_log)) == 20


# -- the other policies ----------------------------------------------------------------------


def test_udp_use_serves_datagram_without_header_untouched() -> None:
    with running("ProxyUDPServer", proxy_policy=Policy.USE) as server, proxy_socket() as proxy:
        report = exchange(proxy, server, b"plain datagram")
        with_header = exchange(proxy, server, udp4() + b"proxied")
        own = list(proxy.getsockname())
    assert report["client_address"] == own and bytes.fromhex(report["payload"]) == b"plain datagram"
    assert report["header"] is None
    assert with_header["client_address"] == list(REAL_V4)


def test_udp_use_still_drops_malformed_header(proxy_log: pytest.LogCaptureFixture) -> None:
    with running("ProxyUDPServer", proxy_policy="USE") as server, proxy_socket() as proxy:
        assert no_reply(proxy, server, BROKEN["family nibble 4"])
    assert len(dropped_lines(proxy_log)) == 1


def test_udp_ignore_strips_header_but_keeps_source_address() -> None:
    with running("ProxyUDPServer", proxy_policy=Policy.IGNORE) as server, proxy_socket() as proxy:
        report = exchange(proxy, server, udp4() + b"payload")
        own = list(proxy.getsockname())
    assert report["client_address"] == own
    assert bytes.fromhex(report["payload"]) == b"payload"
    assert report["header"]["family"] == "INET"


def test_udp_reject_drops_datagram_with_header_serves_the_others(proxy_log: pytest.LogCaptureFixture) -> None:
    with running("ProxyUDPServer", proxy_policy=Policy.REJECT) as server, proxy_socket() as proxy:
        assert no_reply(proxy, server, udp4() + b"spoof")
        report = exchange(proxy, server, b"honest")
    assert bytes.fromhex(report["payload"]) == b"honest"
    lines = dropped_lines(proxy_log)
    assert len(lines) == 1 and "REJECT" in lines[0].getMessage()


def test_udp_skip_never_looks_header_bytes_are_payload() -> None:
    datagram = udp4() + b"x"
    with running("ProxyUDPServer", proxy_policy=Policy.SKIP) as server, proxy_socket() as proxy:
        report = exchange(proxy, server, datagram)
        own = list(proxy.getsockname())
    assert report["client_address"] == own
    assert bytes.fromhex(report["payload"]) == datagram
    assert report["header"] is None


# -- trust, per datagram by its source ---------------------------------------------------


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_udp_untrusted_source_is_skipped_trusted_source_is_used_G10(name: str) -> None:
    datagram = udp4() + b"x"
    with running(name, proxy_trusted=["127.0.0.1/32"]) as server:
        with proxy_socket("127.0.0.3") as stranger:
            untrusted = exchange(stranger, server, datagram)
            assert untrusted["client_address"] == list(stranger.getsockname())
            assert bytes.fromhex(untrusted["payload"]) == datagram
        with proxy_socket("127.0.0.1") as proxy:
            trusted = exchange(proxy, server, datagram)
    assert trusted["client_address"] == list(REAL_V4)
    assert bytes.fromhex(trusted["payload"]) == b"x"


def test_udp_untrusted_reject_drops_spoof_attempts_G10(proxy_log: pytest.LogCaptureFixture) -> None:
    attrs = {"proxy_trusted": "127.0.0.1", "proxy_untrusted_policy": Policy.REJECT}
    with running("ProxyUDPServer", **attrs) as server, proxy_socket("127.0.0.3") as stranger:
        assert no_reply(stranger, server, udp4() + b"spoof")
        assert bytes.fromhex(exchange(stranger, server, b"plain")["payload"]) == b"plain"
    lines = dropped_lines(proxy_log)
    assert len(lines) == 1 and "127.0.0.3" in lines[0].getMessage()


@pytest.mark.parametrize("bad", [Policy.USE, Policy.REQUIRE, "NOPE"])
def test_udp_untrusted_policy_use_or_require_refused_when_serving_starts(bad: object) -> None:
    cls = type("S", (udp.ProxyUDPServer,), {"proxy_untrusted_policy": bad})
    with pytest.raises(ValueError):
        cls(("127.0.0.1", 0), Reporter)  # in the constructor (server_activate)...
    cls.proxy_untrusted_policy = Policy.SKIP
    server = cls(("127.0.0.1", 0), Reporter)
    cls.proxy_untrusted_policy = bad  # ...and when serving starts, for a change made on the class after it
    try:
        with pytest.raises(ValueError):
            server.serve_forever(poll_interval=0.05)
        with proxy_socket() as proxy:
            proxy.sendto(udp4() + b"x", server.server_address)
            with pytest.raises(ValueError):
                server.handle_request()
    finally:
        server.server_close()


def test_udp_proxy_policy_for_hook_decides_per_datagram() -> None:
    seen: list[tuple[object, object]] = []

    class Hooked(udp.ProxyUDPServer):
        def proxy_policy_for(self, peer: object, local: object) -> Policy:
            seen.append((peer, local))
            return Policy.REQUIRE if peer[0] == "127.0.0.1" else Policy.SKIP  # type: ignore[index]

    server = Hooked(("127.0.0.1", 0), Reporter)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with proxy_socket("127.0.0.1") as proxy:
            assert exchange(proxy, server, udp4() + b"a")["client_address"] == list(REAL_V4)
        with proxy_socket("127.0.0.4") as other:
            assert exchange(other, server, udp4() + b"b")["client_address"][0] == "127.0.0.4"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert [peer[0] for peer, _ in seen] == ["127.0.0.1", "127.0.0.4"]
    assert all(local == server.server_address for _, local in seen)


def test_udp_handle_request_loop_serves_and_drops() -> None:
    cls = type("S", (udp.ProxyUDPServer,), {"timeout": 0.5})
    server = cls(("127.0.0.1", 0), Reporter)
    try:
        with proxy_socket() as proxy:
            proxy.sendto(b"junk", server.server_address)
            server.handle_request()  # drops the junk, serves nobody
            proxy.sendto(udp4() + b"ok", server.server_address)
            server.handle_request()
            data, _ = proxy.recvfrom(65535)
        assert b"192.0.2.10" in data
    finally:
        server.server_close()


def test_udp_mixin_retrofits_an_existing_udp_server_subclass() -> None:
    """One base class, first among the bases, as with the stream mixin."""

    class Existing(socketserver.ThreadingUDPServer):
        daemon_threads = True
        greeting = b"hi"

    class Retrofitted(udp.ProxyDatagramMixin, Existing):
        pass

    server = Retrofitted(("127.0.0.1", 0), Reporter)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with proxy_socket() as proxy:
            report = exchange(proxy, server, udp6() + b"retro")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert report["client_address"] == [REAL_V6[0], REAL_V6[1], 0, 0]
    assert bytes.fromhex(report["payload"]) == b"retro"
