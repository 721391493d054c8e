"""The UDP servers' settings: read live per datagram, checked where they are set, and refusal
lines rate-limited.

``proxy_policy``, ``proxy_trusted`` and ``proxy_untrusted_policy`` changed while
``serve_forever`` runs take effect from the next datagram; an invalid value is refused where it
is set on the instance, and set on the class it is logged once and every datagram dropped until
it is fixed.  Refusal lines are rate-limited (``proxy_log_rate``), with summaries.

Real datagram sockets on loopback; the handler's reply (to the proxy) says what it saw.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import sys
import time

import pytest
from udp_kit import (
    CLASS_NAMES,
    REAL_V4,
    exchange,
    no_replies,
    no_reply,
    proxy_socket,
    running,
    udp4,
)

from proxyproto import Policy, refusal_log, udp


@pytest.fixture
def proxy_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="proxyproto")
    return caplog


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxyproto" and text in r.getMessage()]


# -- settings changed while serving -------------------------------------------------------------


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_udp_proxy_trusted_set_on_instance_while_serving_takes_effect_next_datagram(
    name: str,
) -> None:
    datagram = udp4() + b"x"
    with (
        running(name, proxy_trusted="127.0.0.0/8") as server,
        proxy_socket("127.0.0.3") as stranger,
        proxy_socket("127.0.0.1") as proxy,
    ):
        assert exchange(stranger, server, datagram)["client_address"] == list(REAL_V4)  # all of 127/8 trusted
        server.proxy_trusted = "127.0.0.1"  # the loop runs in another thread
        own = list(stranger.getsockname())
        for _ in range(20):
            report = exchange(stranger, server, datagram)
            assert report["client_address"] == own  # untrusted: SKIP, the header is payload
            assert bytes.fromhex(report["payload"]) == datagram and report["header"] is None
        assert exchange(proxy, server, datagram)["client_address"] == list(REAL_V4)


def test_udp_trusted_list_changed_in_place_is_noticed() -> None:
    datagram = udp4() + b"x"
    trusted = ["127.0.0.0/8"]
    with running("ProxyUDPServer", proxy_trusted=trusted) as server, proxy_socket("127.0.0.3") as stranger:
        assert exchange(stranger, server, datagram)["client_address"] == list(REAL_V4)
        trusted[0] = "127.0.0.1/32"  # no assignment at all: the same list, narrowed
        assert exchange(stranger, server, datagram)["client_address"] == list(stranger.getsockname())


def test_udp_policy_changes_while_serving_take_effect_next_datagram(
    proxy_log: pytest.LogCaptureFixture,
) -> None:
    attrs = {"proxy_trusted": "127.0.0.1"}
    with running("ProxyUDPServer", **attrs) as server, proxy_socket("127.0.0.3") as stranger:
        with proxy_socket("127.0.0.1") as proxy:
            server.proxy_policy = Policy.SKIP
            assert bytes.fromhex(exchange(proxy, server, udp4() + b"x")["payload"]) == udp4() + b"x"
            server.proxy_policy = "REQUIRE"
            assert exchange(proxy, server, udp4() + b"x")["client_address"] == list(REAL_V4)
        assert exchange(stranger, server, udp4() + b"y")["header"] is None  # SKIP
        server.proxy_untrusted_policy = Policy.REJECT
        assert no_reply(stranger, server, udp4() + b"spoof")
    lines = messages(proxy_log, "dropped datagram")
    assert len(lines) == 1 and "127.0.0.3" in lines[0].getMessage()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("proxy_policy", "NOPE"),
        ("proxy_trusted", "not a network"),
        ("proxy_trusted", ["10.0.0.0/8", 42]),
        ("proxy_untrusted_policy", Policy.USE),
        ("proxy_untrusted_policy", "REQUIRE"),
        ("proxy_max_header_size", 3),
        ("proxy_log_rate", -1),
    ],
)
def test_udp_invalid_setting_on_instance_raises_where_it_is_set(setting: str, value: object) -> None:
    with running("ProxyUDPServer", proxy_trusted="127.0.0.1") as server, proxy_socket() as proxy:
        before = getattr(server, setting)
        with pytest.raises(ValueError):
            setattr(server, setting, value)
        assert getattr(server, setting) == before
        assert exchange(proxy, server, udp4() + b"x")["client_address"] == list(REAL_V4)


@pytest.mark.parametrize(
    ("setting", "value"), [("proxy_trusted", "bogus/99"), ("proxy_policy", "NOPE"), ("proxy_untrusted_policy", "USE")]
)
def test_udp_invalid_class_change_logs_once_and_drops_every_datagram_until_fixed(
    setting: str, value: object, proxy_log: pytest.LogCaptureFixture
) -> None:
    with running("ProxyUDPServer", proxy_trusted="127.0.0.0/8") as server, proxy_socket("127.0.0.3") as stranger:
        cls = type(server)  # a subclass made for this test alone, trusting 127.0.0.0/8
        original = vars(cls).get(setting)
        assert exchange(stranger, server, udp4() + b"ok")["client_address"] == list(REAL_V4)
        setattr(cls, setting, value)  # on the class: no __setattr__ of the instance sees it
        try:
            assert no_replies(stranger, server, [udp4() + b"while broken"] * 5)
        finally:
            if original is None:
                delattr(cls, setting)  # back to the mixin's default
            else:
                setattr(cls, setting, original)  # back to the subclass's trust list
        assert exchange(stranger, server, udp4() + b"fixed")["client_address"] == list(REAL_V4)
    errors = messages(proxy_log, "invalid setting")
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert setting in errors[0].getMessage() or "NOPE" in errors[0].getMessage()
    assert len(messages(proxy_log, "valid again")) == 1


# -- refusal lines rate-limited -----------------------------------------------------------------


def test_udp_log_rate_default_is_the_shared_default() -> None:
    assert udp.ProxyDatagramMixin.proxy_log_rate == refusal_log.DEFAULT_LOG_RATE


FLOOD = 5000
#: Linux's SO_RCVBUFFORCE (33), which the socket module does not export; -1 elsewhere (setsockopt fails).
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else -1)
SUPPRESSED = re.compile(r"(\d+) refusal line\(s\) suppressed")


@pytest.mark.parametrize("rate", [refusal_log.DEFAULT_LOG_RATE, 5])
def test_udp_malformed_flood_is_rate_limited_with_summaries(
    rate: float, proxy_log: pytest.LogCaptureFixture
) -> None:
    with running("ProxyUDPServer", proxy_log_rate=rate) as server, proxy_socket() as proxy:
        try:  # room for the whole flood, so every datagram is counted (root: past rmem_max)
            server.socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
            every_one_arrives = SO_RCVBUFFORCE > 0
        except OSError:  # not root: the kernel may drop part of the flood, uncounted
            every_one_arrives = False
        start = time.monotonic()
        for i in range(FLOOD):
            proxy.sendto(b"junk %d" % i, server.server_address)
            if i % 200 == 199:
                time.sleep(0.002)  # let the server drain its buffer: most datagrams arrive
        assert exchange(proxy, server, udp4() + b"after")["client_address"] == list(REAL_V4)
        # The summary of the last window is written from service_actions once its second is over.
        deadline = time.monotonic() + 3
        while not messages(proxy_log, "suppressed") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.2)  # any later window's summary too
        elapsed = time.monotonic() - start
    dropped = messages(proxy_log, "dropped datagram")
    summaries = messages(proxy_log, "suppressed")
    windows = math.ceil(elapsed) + 1
    assert 0 < len(dropped) <= rate * windows, (len(dropped), elapsed)
    assert 1 <= len(summaries) <= windows
    suppressed = sum(int(SUPPRESSED.search(r.getMessage()).group(1)) for r in summaries)  # type: ignore[union-attr]
    assert len(dropped) + suppressed <= FLOOD
    if every_one_arrives:
        assert len(dropped) + suppressed == FLOOD  # each refusal logged or counted, none lost
    assert suppressed > 0
    assert all(r.levelno == logging.WARNING for r in summaries)


def test_udp_log_rate_none_logs_every_refusal(proxy_log: pytest.LogCaptureFixture) -> None:
    with running("ProxyUDPServer", proxy_log_rate=None) as server, proxy_socket() as proxy:
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        for i in range(100):
            proxy.sendto(b"junk %d" % i, server.server_address)
        assert exchange(proxy, server, udp4() + b"x")["client_address"] == list(REAL_V4)
    assert len(messages(proxy_log, "dropped datagram")) == 100
    assert not messages(proxy_log, "suppressed")
