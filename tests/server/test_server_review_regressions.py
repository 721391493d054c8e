"""Regressions found by a review of the I/O layer, each kept as the smallest real-socket case."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import proxyproto
from proxyproto.policy import TrustedNetworks


class Reply(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"served " + repr(self.client_address).encode())


@contextmanager
def serving(server: Any) -> Iterator[Any]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


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
    with serving(Server(address, Reply)) as server:
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


def test_evicted_connection_is_not_stepped_again_in_the_same_batch(caplog: pytest.LogCaptureFixture) -> None:
    """proxy_max_pending = 1: accepting B evicts A; A's readiness in the same select batch is skipped
    (it used to be read after close: a second, EBADF log line for the same peer)."""
    caplog.set_level(logging.DEBUG, logger="proxyproto")

    class Server(proxyproto.ProxyTCPServer):
        proxy_max_pending = 1
        timeout = 0.5

    server = Server(("127.0.0.1", 0), Reply)
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


def test_max_pending_below_one_is_refused_in_the_constructor() -> None:
    """Refused when the listener is activated (issue 14 item 4: before any loop could hang shutdown)."""

    class Server(proxyproto.ProxyTCPServer):
        proxy_max_pending = 0

    with pytest.raises(ValueError, match="proxy_max_pending"):
        Server(("127.0.0.1", 0), Reply)


@pytest.mark.parametrize(
    "trusted",
    [ipaddress.ip_network("10.0.0.0/16"), ipaddress.ip_address("10.0.0.9"), "10.0.0.0/16"],
    ids=["ip_network", "ip_address", "str"],
)
def test_a_single_network_object_is_one_network_G10(trusted: Any) -> None:
    networks = TrustedNetworks(trusted)
    assert len(networks.networks) == 1
    assert "10.0.0.9" in networks
    assert "::ffff:10.0.0.9" in networks
    assert "10.1.0.9" not in networks


def test_an_instance_level_policy_hook_gets_the_local_address() -> None:
    seen: list[Any] = []
    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), Reply)

    def policy_for(peer: Any, local: Any) -> proxyproto.Policy:
        seen.append(local)
        return proxyproto.Policy.REQUIRE

    server.proxy_policy_for = policy_for  # type: ignore[method-assign]
    with serving(server):
        header = proxyproto.encode_v1(("192.0.2.1", 1000), ("192.0.2.2", 80))
        with socket.create_connection(server.server_address, timeout=5) as client:
            client.sendall(header)
            assert client.recv(100) == b"served ('192.0.2.1', 1000)"
    assert seen == [server.server_address]
