"""Policies and trust, cell by cell (DESIGN.md "Policies, case by case").

Each test states one cell of the table: what arrives, under which policy, and whether the
connection is served (with which address and which bytes) or closed (with which single log
line on logger ``proxyproto``).  Logging is observed with the threading class because caplog
cannot see records emitted in a forked child.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import tempfile
import threading
import time
from typing import Any

import pytest
from server_kit import (
    DEST_V4,
    REAL_V4,
    V1_UNKNOWN,
    V2_SIGNATURE,
    BannerReportHandler,
    ReplyHandler,
    ReportHandler,
    Running,
    as_address,
    exchange,
    make_class,
    parse_report,
    proxyproto_records,
    read_all,
    serve,
    tlv,
    v1_header,
    v2_header,
    wait_for,
)

import proxyproto
from proxyproto import Policy

SERVER = "ThreadingProxyTCPServer"
#: proxy_header_timeout for the deadline cells: short, yet far above a fast reply (a few ms), so
#: "closed at the deadline" (asserted no earlier than DEADLINE - 0.1) cannot be "closed at once";
#: the loop polls every 0.05 s (server_kit), and the upper bound keeps its whole second of slack.
DEADLINE = 0.5
#: proxy_header_timeout where SKIP must answer at once (< 0.5 s): a SKIP that waited for the
#: deadline would answer at 1 s and fail.
SKIP_DEADLINE = 1.0
PAYLOAD = b"payload after the header\r\n"

VALID = {
    "v1": v1_header(REAL_V4, DEST_V4),
    "v2": v2_header(REAL_V4, DEST_V4),
}
NO_ADDRESS = {
    "v2_local": v2_header(local=True),
    "v1_unknown": V1_UNKNOWN,
    "v2_proxy_unspec": v2_header(),
}
NOT_A_HEADER = {
    "http": b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
    "tls_hello_start": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    "ssh_banner": b"SSH-2.0-OpenSSH_9.2\r\n",
}
MALFORMED = {
    "v1_bad_protocol_V1_R5": b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
    "v1_lone_lf_V1_R4": b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
    "v1_no_crlf_in_107_bytes_V1_R2": b"PROXY UNKNOWN " + b"x" * 120,
    "v2_version_nibble_1_V2_R8": V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\0" * 12,
    "v2_bad_crc_CRC_R4": v2_header(REAL_V4, DEST_V4, crc="bad"),
    "v2_proxy_inet_len_short_V2_R5": V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4,
}
PARTIAL = {
    "v1_prefix": b"PROXY TCP4 192.0.2.1",
    "v2_prefix": V2_SIGNATURE + b"\x21\x11",
    "v2_address_block_half": v2_header(REAL_V4, DEST_V4)[:22],
}
OPT_IN = [Policy.USE, Policy.IGNORE, Policy.REJECT]
LOOKING = [Policy.REQUIRE, Policy.USE, Policy.IGNORE, Policy.REJECT]


# --------------------------------------------------------------------------- helpers


def peer_records(caplog: pytest.LogCaptureFixture, peer: Any) -> list:
    """Records of logger proxyproto whose message names this peer (host and port)."""
    host, port = peer[0], peer[1]
    return [
        r for r in proxyproto_records(caplog)
        if str(port) in r.getMessage() and host in r.getMessage()
    ]


def assert_closed_and_logged(caplog: pytest.LogCaptureFixture, peer: Any, level: int) -> None:
    """One line at ``level`` naming the peer and a reason, no traceback, nothing louder."""
    assert wait_for(
        lambda: any(r.levelno == level for r in peer_records(caplog, peer)), 3.0
    ), f"no {logging.getLevelName(level)} line naming {peer}: {proxyproto_records(caplog)}"
    time.sleep(0.1)  # a second line, if any, would arrive now
    records = peer_records(caplog, peer)
    at_level = [r for r in records if r.levelno == level]
    assert len(at_level) == 1, [r.getMessage() for r in records]
    assert not [r for r in records if r.levelno > level], [r.getMessage() for r in records]
    for r in records:
        assert r.exc_info is None and r.stack_info is None, "a closing line carries no traceback"
        message = r.getMessage()
        assert "\n" not in message and "Traceback" not in message
    line = at_level[0].getMessage()
    assert len(line) > len(f"{peer[0]}:{peer[1]}") + 5, f"no reason in {line!r}"


def assert_nothing_loud(caplog: pytest.LogCaptureFixture, peer: Any) -> None:
    """A served connection logs nothing at WARNING or above."""
    loud = [r.getMessage() for r in peer_records(caplog, peer) if r.levelno >= logging.WARNING]
    assert not loud


def assert_not_served(srv: Any) -> None:
    """Closed means neither verify_request nor the handler ran."""
    time.sleep(0.05)
    assert srv.server.verified == []
    assert srv.server.reports == []


def wait_quiet(sock: socket.socket, limit: float) -> tuple:
    """Read (without sending anything) until EOF; returns (report or None, seconds taken)."""
    start = time.monotonic()
    data = read_all(sock, limit)
    return parse_report(data), time.monotonic() - start


# --------------------------------------------------------------------------- valid headers


@pytest.mark.parametrize("version", sorted(VALID))
@pytest.mark.parametrize("policy", [Policy.REQUIRE, Policy.USE])
def test_valid_header_is_served_with_the_real_address_V2_R2(
    proxy_log: pytest.LogCaptureFixture, policy: Policy, version: str
) -> None:
    with serve(SERVER, proxy_policy=policy) as srv:
        report, own = exchange(srv, [VALID[version] + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4
        assert srv.server.verified == [REAL_V4]
        assert bytes.fromhex(report["payload"]) == PAYLOAD
        assert_nothing_loud(proxy_log, own)


@pytest.mark.parametrize("version", sorted(VALID))
def test_ignore_consumes_a_valid_header_but_serves_the_socket_address(
    proxy_log: pytest.LogCaptureFixture, version: str
) -> None:
    """IGNORE parses and strips the header, keeps it on the socket, and uses the socket's peer."""
    with serve(SERVER, proxy_policy=Policy.IGNORE) as srv:
        report, own = exchange(srv, [VALID[version] + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert srv.server.verified == [own]
        assert bytes.fromhex(report["payload"]) == PAYLOAD
        assert report["header"] is not None
        assert as_address(report["header"]["source"]) == REAL_V4
        assert_nothing_loud(proxy_log, own)


@pytest.mark.parametrize("version", sorted(VALID))
def test_reject_closes_a_valid_header_with_a_warning(
    proxy_log: pytest.LogCaptureFixture, version: str
) -> None:
    with serve(SERVER, proxy_policy=Policy.REJECT) as srv:
        report, own = exchange(srv, [VALID[version] + PAYLOAD])
        assert report is None
        assert_closed_and_logged(proxy_log, own, logging.WARNING)
        assert_not_served(srv)


@pytest.mark.parametrize("version", sorted(VALID))
def test_skip_leaves_a_header_untouched_as_payload_G9(
    proxy_log: pytest.LogCaptureFixture, version: str
) -> None:
    """SKIP never looks: the header bytes are payload and the address is the socket's."""
    with serve(SERVER, proxy_policy=Policy.SKIP) as srv:
        report, own = exchange(srv, [VALID[version] + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert bytes.fromhex(report["payload"]) == VALID[version] + PAYLOAD
        assert report["header"] is None
        assert_nothing_loud(proxy_log, own)


# --------------------------------------------------------------------------- LOCAL, UNKNOWN, UNSPEC


@pytest.mark.parametrize("kind", sorted(NO_ADDRESS))
@pytest.mark.parametrize("policy", [Policy.REQUIRE, Policy.USE, Policy.IGNORE])
def test_header_without_addresses_is_served_with_the_socket_address_V2_R4(
    proxy_log: pytest.LogCaptureFixture, policy: Policy, kind: str
) -> None:
    with serve(SERVER, proxy_policy=policy) as srv:
        report, own = exchange(srv, [NO_ADDRESS[kind] + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert srv.server.verified == [own]
        assert bytes.fromhex(report["payload"]) == PAYLOAD
        assert report["header"] is not None, "a parsed LOCAL/UNKNOWN header stays on the socket"
        assert_nothing_loud(proxy_log, own)


@pytest.mark.parametrize("kind", sorted(NO_ADDRESS))
def test_reject_closes_a_header_without_addresses(
    proxy_log: pytest.LogCaptureFixture, kind: str
) -> None:
    with serve(SERVER, proxy_policy=Policy.REJECT) as srv:
        report, own = exchange(srv, [NO_ADDRESS[kind] + PAYLOAD])
        assert report is None
        assert_closed_and_logged(proxy_log, own, logging.WARNING)
        assert_not_served(srv)


@pytest.mark.parametrize("kind", sorted(NO_ADDRESS))
def test_skip_leaves_a_header_without_addresses_untouched(kind: str) -> None:
    with serve(SERVER, proxy_policy=Policy.SKIP) as srv:
        report, own = exchange(srv, [NO_ADDRESS[kind] + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert bytes.fromhex(report["payload"]) == NO_ADDRESS[kind] + PAYLOAD


# --------------------------------------------------------------------------- no header at all


@pytest.mark.parametrize("kind", sorted(NOT_A_HEADER))
def test_require_closes_a_stream_without_header_with_a_warning_section_7(
    proxy_log: pytest.LogCaptureFixture, kind: str
) -> None:
    """"must be dropped" (2.2 detection rule c)."""
    with serve(SERVER, proxy_policy=Policy.REQUIRE) as srv:
        report, own = exchange(srv, [NOT_A_HEADER[kind]])
        assert report is None
        assert_closed_and_logged(proxy_log, own, logging.WARNING)
        assert_not_served(srv)


@pytest.mark.parametrize("kind", sorted(NOT_A_HEADER))
@pytest.mark.parametrize("policy", [Policy.USE, Policy.IGNORE, Policy.REJECT, Policy.SKIP])
def test_stream_without_header_is_served_untouched_under_opt_in_policies(
    proxy_log: pytest.LogCaptureFixture, policy: Policy, kind: str
) -> None:
    """Nothing is consumed when there is no header: the handler gets every byte."""
    with serve(SERVER, proxy_policy=policy) as srv:
        report, own = exchange(srv, [NOT_A_HEADER[kind]])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert srv.server.verified == [own]
        assert bytes.fromhex(report["payload"]) == NOT_A_HEADER[kind]
        assert report["header"] is None
        assert_nothing_loud(proxy_log, own)


@pytest.mark.parametrize("policy", OPT_IN)
def test_ambiguous_prefix_waits_for_the_next_byte_then_serves_a_non_header(policy: Policy) -> None:
    """"PR" could start "PROXY": the server must wait, then serve "PRIVMSG" untouched."""
    with serve(SERVER, proxy_policy=policy) as srv:
        report, own = exchange(srv, [b"PR", b"IVMSG #chan :hi\r\n"], delay=0.3)
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert bytes.fromhex(report["payload"]) == b"PRIVMSG #chan :hi\r\n"


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("kind", sorted(MALFORMED))
@pytest.mark.parametrize("policy", LOOKING)
def test_malformed_header_is_closed_with_a_warning_V1_R5(
    proxy_log: pytest.LogCaptureFixture, policy: Policy, kind: str
) -> None:
    """Every policy that looks aborts on a malformed header; none serves it."""
    with serve(SERVER, proxy_policy=policy) as srv:
        report, own = exchange(srv, [MALFORMED[kind] + PAYLOAD])
        assert report is None
        assert_closed_and_logged(proxy_log, own, logging.WARNING)
        assert_not_served(srv)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_skip_leaves_a_malformed_header_untouched(kind: str) -> None:
    with serve(SERVER, proxy_policy=Policy.SKIP) as srv:
        report, _ = exchange(srv, [MALFORMED[kind] + PAYLOAD])
        assert report is not None
        assert bytes.fromhex(report["payload"]) == MALFORMED[kind] + PAYLOAD


def test_truncated_by_eof_is_closed_with_a_warning_T2(proxy_log: pytest.LogCaptureFixture) -> None:
    """A header cut short by the peer's EOF is invalid, not "no header"."""
    with serve(SERVER, proxy_policy=Policy.REQUIRE) as srv:
        report, own = exchange(srv, [VALID["v1"][:20]])
        assert report is None
        assert_closed_and_logged(proxy_log, own, logging.WARNING)
        assert_not_served(srv)


def test_checksum_is_not_verified_when_proxy_verify_checksum_is_false_CRC_R4() -> None:
    with serve(SERVER, proxy_verify_checksum=False) as srv:
        report, _ = exchange(srv, [MALFORMED["v2_bad_crc_CRC_R4"] + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4
        assert bytes.fromhex(report["payload"]) == PAYLOAD


def test_correct_checksum_is_served_CRC_R3() -> None:
    with serve(SERVER) as srv:
        report, _ = exchange(srv, [v2_header(REAL_V4, DEST_V4, crc="good") + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4


def big_header(total: int) -> bytes:
    """A v2 TCP4 header of exactly ``total`` bytes, padded with a NOOP TLV."""
    pad = total - 16 - 12 - 3
    header = v2_header(REAL_V4, DEST_V4, tlvs=tlv(0x04, b"\0" * pad))
    assert len(header) == total
    return header


def test_header_over_proxy_max_header_size_is_refused(proxy_log: pytest.LogCaptureFixture) -> None:
    """Default cap 4096: a 5000-byte header is refused before it is read in full."""
    with serve(SERVER) as srv:
        report, own = exchange(srv, [big_header(5000) + PAYLOAD])
        assert report is None
        assert_closed_and_logged(proxy_log, own, logging.WARNING)


def test_raising_proxy_max_header_size_admits_larger_headers() -> None:
    with serve(SERVER, proxy_max_header_size=8192) as srv:
        report, _ = exchange(srv, [big_header(5000) + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4
        assert bytes.fromhex(report["payload"]) == PAYLOAD


def test_header_at_exactly_proxy_max_header_size_is_served() -> None:
    with serve(SERVER) as srv:
        report, _ = exchange(srv, [big_header(4096) + PAYLOAD])
        assert report is not None
        assert bytes.fromhex(report["payload"]) == PAYLOAD


# --------------------------------------------------------------------------- silence


def test_require_closes_silence_at_the_deadline_with_info_G7(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    with serve(SERVER, BannerReportHandler, proxy_header_timeout=DEADLINE) as srv:
        with srv.connect() as sock:
            own = sock.getsockname()
            report, took = wait_quiet(sock, DEADLINE + 3)
        assert report is None
        assert DEADLINE - 0.1 <= took <= DEADLINE + 1.0
        assert_closed_and_logged(proxy_log, own, logging.INFO)
        assert_not_served(srv)


@pytest.mark.parametrize("policy", OPT_IN)
def test_opt_in_policy_serves_silence_after_the_deadline_without_header_G6(
    proxy_log: pytest.LogCaptureFixture, policy: Policy
) -> None:
    """Server-speaks-first protocols keep working under the opt-ins, but only once the deadline
    has passed: a header could still have arrived until then (G6)."""
    with serve(SERVER, BannerReportHandler, proxy_policy=policy,
               proxy_header_timeout=DEADLINE) as srv:
        with srv.connect() as sock:
            own = sock.getsockname()
            report, took = wait_quiet(sock, DEADLINE + 3)
        assert report is not None
        assert DEADLINE - 0.1 <= took <= DEADLINE + 1.0
        assert as_address(report["client_address"]) == own
        assert report["header"] is None
        assert srv.server.verified == [own]
        assert_nothing_loud(proxy_log, own)


def test_skip_serves_silence_at_once() -> None:
    """SKIP never waits for a header: a banner goes out immediately."""
    with serve(SERVER, BannerReportHandler, proxy_policy=Policy.SKIP,
               proxy_header_timeout=SKIP_DEADLINE) as srv:
        with srv.connect() as sock:
            own = sock.getsockname()
            report, took = wait_quiet(sock, SKIP_DEADLINE + 3)
        assert report is not None
        assert took < 0.5
        assert as_address(report["client_address"]) == own


# --------------------------------------------------------------------------- partial header


@pytest.mark.parametrize("kind", sorted(PARTIAL))
@pytest.mark.parametrize("policy", LOOKING)
def test_partial_header_at_the_deadline_is_closed_with_a_warning_T2(
    proxy_log: pytest.LogCaptureFixture, policy: Policy, kind: str
) -> None:
    with serve(SERVER, BannerReportHandler, proxy_policy=policy,
               proxy_header_timeout=DEADLINE) as srv:
        with srv.connect() as sock:
            own = sock.getsockname()
            sock.sendall(PARTIAL[kind])
            report, took = wait_quiet(sock, DEADLINE + 3)
        assert report is None
        assert DEADLINE - 0.1 <= took <= DEADLINE + 1.0
        assert_closed_and_logged(proxy_log, own, logging.WARNING)
        assert_not_served(srv)


def test_deadline_is_for_the_whole_header_not_per_read_T2(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    """A byte every 0.2 s must not extend a 0.5 s deadline: the header is closed at about 0.5 s."""
    header = VALID["v1"]
    with serve(SERVER, BannerReportHandler, proxy_header_timeout=DEADLINE) as srv:
        with srv.connect() as sock:
            own = sock.getsockname()
            sock.settimeout(0.2)
            start = time.monotonic()
            closed_at = None
            for i in range(len(header) - 1):
                try:
                    sock.sendall(header[i:i + 1])
                    if sock.recv(1) == b"":
                        closed_at = time.monotonic() - start
                except socket.timeout:
                    continue
                except OSError:
                    closed_at = time.monotonic() - start
                break
        assert closed_at is not None, "the trickle outlived the whole header"
        assert DEADLINE - 0.1 <= closed_at <= DEADLINE + 1.0
        assert_closed_and_logged(proxy_log, own, logging.WARNING)


def test_skip_serves_a_partial_header_at_once() -> None:
    with serve(SERVER, BannerReportHandler, proxy_policy=Policy.SKIP,
               proxy_header_timeout=SKIP_DEADLINE) as srv:
        with srv.connect() as sock:
            sock.sendall(PARTIAL["v1_prefix"])
            report, took = wait_quiet(sock, SKIP_DEADLINE + 3)
        assert report is not None
        assert took < 0.5


# --------------------------------------------------------------------------- close first


def test_require_closes_a_peer_that_leaves_before_its_first_byte_at_debug(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    with serve(SERVER, proxy_policy=Policy.REQUIRE) as srv:
        sock = srv.connect()
        own = sock.getsockname()
        sock.close()
        assert_closed_and_logged(proxy_log, own, logging.DEBUG)
        assert_not_served(srv)


@pytest.mark.parametrize("policy", [Policy.USE, Policy.IGNORE, Policy.REJECT, Policy.SKIP])
def test_peer_that_leaves_before_its_first_byte_is_served_and_sees_eof(
    proxy_log: pytest.LogCaptureFixture, policy: Policy
) -> None:
    """Under the opt-ins and SKIP the handler runs and reads EOF at once (not at the deadline)."""
    with serve(SERVER, proxy_policy=policy, proxy_header_timeout=5.0) as srv:
        sock = srv.connect()
        own = sock.getsockname()
        sock.close()
        assert wait_for(lambda: bool(srv.server.reports), 3.0)
        report = srv.server.reports[0]
        assert report["payload"] == ""
        assert as_address(report["client_address"]) == own
        assert_nothing_loud(proxy_log, own)


# --------------------------------------------------------------------------- trust


TRUSTED, UNTRUSTED = "127.0.0.2", "127.0.0.3"


@pytest.mark.parametrize("version", sorted(VALID))
def test_trusted_peer_header_gives_the_real_address_G10(version: str) -> None:
    with serve(SERVER, proxy_trusted=["127.0.0.2/32"]) as srv:
        report, own = exchange(srv, [VALID[version] + PAYLOAD], source_host=TRUSTED)
        assert own[0] == TRUSTED
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4


def test_trusted_peer_without_header_is_closed_under_require(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    with serve(SERVER, proxy_trusted=["127.0.0.2/32"]) as srv:
        report, own = exchange(srv, [NOT_A_HEADER["http"]], source_host=TRUSTED)
        assert report is None
        assert_closed_and_logged(proxy_log, own, logging.WARNING)


@pytest.mark.parametrize("version", sorted(VALID))
def test_untrusted_peer_under_skip_sees_header_bytes_as_payload_section_5(version: str) -> None:
    """Default untrusted policy is SKIP: "if it is not expected, do not even try to detect it"."""
    with serve(SERVER, proxy_trusted=["127.0.0.2/32"]) as srv:
        report, own = exchange(srv, [VALID[version] + PAYLOAD], source_host=UNTRUSTED)
        assert own[0] == UNTRUSTED
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert srv.server.verified == [own]
        assert bytes.fromhex(report["payload"]) == VALID[version] + PAYLOAD
        assert report["header"] is None


def test_untrusted_peer_under_skip_is_served_at_once_without_header() -> None:
    with serve(SERVER, BannerReportHandler, proxy_trusted=["127.0.0.2/32"],
               proxy_header_timeout=SKIP_DEADLINE) as srv:
        with srv.connect(source_host=UNTRUSTED) as sock:
            report, took = wait_quiet(sock, SKIP_DEADLINE + 3)
        assert report is not None
        assert took < 0.5


def test_untrusted_peer_under_reject_is_closed_when_it_sends_a_header(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    """REJECT is the opt-in that sniffs untrusted peers for spoof attempts."""
    with serve(SERVER, proxy_trusted=["127.0.0.2/32"],
               proxy_untrusted_policy=Policy.REJECT) as srv:
        report, own = exchange(srv, [VALID["v2"] + PAYLOAD], source_host=UNTRUSTED)
        assert report is None
        assert_closed_and_logged(proxy_log, own, logging.WARNING)
        report, own = exchange(srv, [PAYLOAD], source_host=UNTRUSTED)
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert bytes.fromhex(report["payload"]) == PAYLOAD


@pytest.mark.parametrize("version", sorted(VALID))
@pytest.mark.parametrize("policy", [Policy.SKIP, Policy.IGNORE, Policy.REJECT])
def test_header_from_an_untrusted_peer_never_reaches_client_address_G10(
    policy: Policy, version: str
) -> None:
    with serve(SERVER, proxy_trusted=["127.0.0.2/32"], proxy_untrusted_policy=policy) as srv:
        report, own = exchange(srv, [VALID[version] + PAYLOAD], source_host=UNTRUSTED)
        assert REAL_V4 not in srv.server.verified
        if report is not None:
            assert as_address(report["client_address"]) == own


@pytest.mark.parametrize("policy", [Policy.USE, Policy.REQUIRE])
def test_untrusted_policy_that_would_trust_anyone_is_refused_at_start(policy: Policy) -> None:
    """USE/REQUIRE for untrusted peers would let them set their address: ValueError when the
    server starts (in the constructor or when serving begins)."""
    cls = make_class(
        proxyproto.ThreadingProxyTCPServer,
        proxy_trusted=["127.0.0.2/32"],
        proxy_untrusted_policy=policy,
    )
    try:
        server = cls(("127.0.0.1", 0), ReportHandler)
    except ValueError:
        return
    try:
        timer = threading.Timer(2.0, server.shutdown)
        timer.start()
        with pytest.raises(ValueError):
            server.serve_forever(poll_interval=0.05)
        timer.cancel()
    finally:
        server.server_close()


def test_ipv4_mapped_peer_on_dual_stack_server_matches_its_ipv4_network() -> None:
    """::ffff:127.0.0.2 is in 127.0.0.2/32 (haproxy's dual-stack binds)."""

    class DualStack(proxyproto.ThreadingProxyTCPServer):  # type: ignore[misc]
        address_family = socket.AF_INET6

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    with serve(DualStack, host="::ffff:127.0.0.1", proxy_trusted=["127.0.0.2/32"]) as srv:
        port = srv.server.server_address[1]
        for source, expect_real in ((TRUSTED, True), (UNTRUSTED, False)):
            with socket.create_connection(("127.0.0.1", port), timeout=5,
                                          source_address=(source, 0)) as sock:
                sock.sendall(VALID["v1"] + PAYLOAD)
                sock.shutdown(socket.SHUT_WR)
                report = parse_report(read_all(sock))
            assert report is not None
            addr = as_address(report["client_address"])
            if expect_real:
                assert addr == REAL_V4
            else:
                assert addr[0] == "::ffff:" + UNTRUSTED
                assert bytes.fromhex(report["payload"]) == VALID["v1"] + PAYLOAD


@pytest.mark.parametrize(
    "trusted",
    [
        ["127.0.0.2"],
        [ipaddress.ip_network("127.0.0.0/30")],
        ("10.0.0.0/8", "127.0.0.2/31"),
    ],
    ids=["single_address", "ip_network_object", "tuple_of_networks"],
)
def test_proxy_trusted_accepts_addresses_and_networks(trusted: Any) -> None:
    with serve(SERVER, proxy_trusted=trusted) as srv:
        report, _ = exchange(srv, [VALID["v1"]], source_host=TRUSTED)
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4
        report, own = exchange(srv, [VALID["v1"]], source_host="127.0.0.5")
        assert report is not None
        assert as_address(report["client_address"]) == own


@pytest.mark.parametrize("name", ["ThreadingProxyUnixStreamServer", "ProxyUnixStreamServer"])
def test_unix_socket_peers_are_always_trusted(name: str) -> None:
    """File permissions are a UNIX socket's access control: its header is honoured."""
    with serve(name, proxy_trusted=["10.0.0.0/8"]) as srv:
        report, _ = exchange(srv, [VALID["v2"] + PAYLOAD])
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4


def test_proxy_policy_for_override_decides_per_connection() -> None:
    """The hook gets the peer and the local address as the socket module gives them."""
    calls: list = []

    class PerPeer(proxyproto.ThreadingProxyTCPServer):  # type: ignore[misc]
        def proxy_policy_for(self, peer: Any, local: Any) -> Policy:
            calls.append((peer, local))
            return Policy.REQUIRE if peer[0] == TRUSTED else Policy.SKIP

    with serve(PerPeer) as srv:
        report, own = exchange(srv, [VALID["v1"] + PAYLOAD], source_host=TRUSTED)
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4
        assert calls[-1] == (own, srv.server.server_address)
        report, own = exchange(srv, [VALID["v1"] + PAYLOAD], source_host=UNTRUSTED)
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert bytes.fromhex(report["payload"]) == VALID["v1"] + PAYLOAD
        assert calls[-1] == (own, srv.server.server_address)


# --------------------------------------------------------------------------- max pending


def test_proxy_max_pending_closes_and_logs_the_oldest_parked_connections(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    """With a cap of 5, eight silent connections leave the five newest parked."""
    with serve(SERVER, proxy_max_pending=5, proxy_header_timeout=30.0) as srv:
        socks = []
        try:
            for _ in range(8):
                socks.append(srv.connect())
                time.sleep(0.1)  # accepted in this order
            peers = [s.getsockname() for s in socks]
            for sock in socks[:3]:
                sock.settimeout(3.0)
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
            # The five newest stay open: none is readable (EOF or reset would be) within 0.3 s,
            # all five watched over the same 0.3 s.
            assert select.select(socks[3:], [], [], 0.3)[0] == []
            for peer in peers[:3]:
                assert wait_for(lambda p=peer: bool(peer_records(proxy_log, p)), 2.0), peer
                assert all(r.exc_info is None for r in peer_records(proxy_log, peer))
            for peer in peers[3:]:
                assert not peer_records(proxy_log, peer) or all(
                    r.levelno < logging.INFO for r in peer_records(proxy_log, peer)
                )
            assert srv.server.verified == []
        finally:
            for sock in socks:
                sock.close()


def test_evicted_connection_is_not_stepped_again_in_the_same_batch(caplog: pytest.LogCaptureFixture) -> None:
    """proxy_max_pending = 1: accepting B evicts A; A's readiness in the same select batch is skipped
    (it used to be read after close: a second, EBADF log line for the same peer)."""
    caplog.set_level(logging.DEBUG, logger="proxyproto")

    class Server(proxyproto.ProxyTCPServer):
        proxy_max_pending = 1
        timeout = 0.5

    server = Server(("127.0.0.1", 0), ReplyHandler)
    try:
        with socket.create_connection(server.server_address) as first:
            first.sendall(b"PROXY TCP4 ")
            time.sleep(0.1)
            server.handle_request()  # parks the first connection
            with socket.create_connection(server.server_address):
                time.sleep(0.05)
                first.sendall(b"1.2.3.4 ")  # both the listener and the first connection are ready
                time.sleep(0.1)
                server.handle_request()
    finally:
        server.server_close()
    lines = [record.getMessage() for record in caplog.records if record.name == "proxyproto"]
    assert len([line for line in lines if "proxy_max_pending" in line]) == 1
    assert not [line for line in lines if "Bad file descriptor" in line]


# --------------------------------------------------------------------------- a header written one byte at a time


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
@pytest.mark.parametrize("policy", ["USE", "IGNORE", "REQUIRE"])
def test_header_written_one_byte_at_a_time_is_served_under_every_policy_G5_T2(unix: bool, policy: str) -> None:
    """A 631-byte header in 1-byte writes: under the opt-in policies the prefix is held in the kernel
    only while ambiguous; once it commits (``PROXY`` or the v2 signature) it is consumed, so the
    sender never blocks on a full socket buffer (it did on UNIX sockets, about 70 writes in)."""
    header = proxyproto.encode_v2(("192.0.2.10", 51234), ("198.51.100.20", 443), tlvs=[(0xE0, b"x" * 600)])
    base = proxyproto.ThreadingProxyUnixStreamServer if unix else proxyproto.ThreadingProxyTCPServer

    class Server(base):  # type: ignore[valid-type,misc]
        proxy_policy = policy
        proxy_header_timeout = 5.0

    address: Any = os.path.join(tempfile.mkdtemp(), "s") if unix else ("127.0.0.1", 0)
    with Running(Server(address, ReplyHandler)) as running:
        server = running.server
        client = socket.socket(socket.AF_UNIX if unix else socket.AF_INET)
        client.settimeout(5)
        with client:
            client.connect(server.server_address)
            for index in range(len(header)):
                client.sendall(header[index : index + 1])
            reply = client.recv(100)
    expected = "('192.0.2.10', 51234)" if policy != "IGNORE" else ""
    assert reply.startswith(b"served ")
    if expected:
        assert reply == b"served " + expected.encode()
