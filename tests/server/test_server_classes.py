"""The six prebuilt servers: what a handler and verify_request see.

Every test runs on real loopback sockets (TCP on 127.0.0.1 or ::1, UNIX sockets in a temporary
directory), and the handler reports through the connection so the Forking classes are covered
the same way as the others.
"""

from __future__ import annotations

import socketserver
import time

import pytest
from server_kit import (
    CLASS_NAMES,
    DEST_V4,
    DEST_V6,
    PLAIN_BASES,
    REAL_V4,
    REAL_V6,
    TCP_CLASS_NAMES,
    V1_UNKNOWN,
    LineReportHandler,
    as_address,
    bytewise,
    exchange,
    serve,
    v1_header,
    v2_header,
)

HEADERS = {
    "v1": v1_header(REAL_V4, DEST_V4),
    "v2": v2_header(REAL_V4, DEST_V4),
}

# Bytes that look like headers and line ends: after the first header everything is payload
# (SPEC-NOTES, AWS note: "parse only the first header and treat everything after it as payload").
PAYLOAD = b"payload\r\n\x00\xff" + v1_header(("1.1.1.1", 1), ("2.2.2.2", 2)) + b"\r\n\r\n\x00\r\nQUIT\n!"


def split(header: bytes, payload: bytes, how: str) -> list:
    """The client's writes for one of the fragmentations a real network can produce."""
    if how == "one_write":
        return [header + payload]
    if how == "two_writes_split_inside_header":
        cut = len(header) // 2
        return [header[:cut], header[cut:] + payload]
    if how == "two_writes_split_after_header":
        return [header, payload]
    assert how == "byte_by_byte"
    return bytewise(header + payload)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", CLASS_NAMES)
def test_proxy_header_gives_real_client_address_in_handler_and_verify_request_V2_R2(
    name: str, version: str
) -> None:
    """The address in a PROXY header is what the handler and verify_request both see."""
    with serve(name) as srv:
        report, _ = exchange(srv, [HEADERS[version] + b"hi"])
        assert report is not None, "server closed a connection with a valid header"
        assert as_address(report["client_address"]) == REAL_V4
        assert srv.server.verified == [REAL_V4]
        assert report["header"]["version"] == int(version[1])
        assert report["header"]["command"] == 1
        assert as_address(report["header"]["source"]) == REAL_V4
        assert as_address(report["header"]["destination"]) == DEST_V4


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_local_header_gives_the_sockets_own_peer_V2_R1(name: str) -> None:
    """LOCAL: "use the real connection endpoints"; the parsed header is still attached."""
    with serve(name) as srv:
        report, own = exchange(srv, [v2_header(local=True) + b"hc"])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert srv.server.verified == [own]
        assert report["header"] is not None and report["header"]["command"] == 0
        assert bytes.fromhex(report["payload"]) == b"hc"


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_local_header_with_inet_family_and_addresses_gives_the_sockets_own_peer_V2_R3(
    name: str,
) -> None:
    """An AWS-style health check: LOCAL that says TCP/IPv4 with dummy addresses is still LOCAL."""
    with serve(name) as srv:
        report, own = exchange(srv, [v2_header(REAL_V4, DEST_V4, local=True) + b"x"])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert bytes.fromhex(report["payload"]) == b"x"


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_v1_unknown_gives_the_sockets_own_peer_V1_R6(name: str) -> None:
    """PROXY UNKNOWN: "use the real connection's parameters"."""
    with serve(name) as srv:
        report, own = exchange(srv, [V1_UNKNOWN + b"abc"])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert srv.server.verified == [own]
        assert bytes.fromhex(report["payload"]) == b"abc"


@pytest.mark.parametrize(
    "how",
    ["one_write", "two_writes_split_inside_header", "two_writes_split_after_header", "byte_by_byte"],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("name", CLASS_NAMES)
def test_rfile_receives_the_payload_byte_exact_T3(name: str, version: str, how: str) -> None:
    """Exactly the header is consumed, however the bytes are fragmented (T2, T3)."""
    chunks = split(HEADERS[version], PAYLOAD, how)
    delay = 0.003 if how == "byte_by_byte" else 0.05
    with serve(name) as srv:
        report, _ = exchange(srv, chunks, delay=delay)
        assert report is not None
        assert bytes.fromhex(report["payload"]) == PAYLOAD
        assert as_address(report["client_address"]) == REAL_V4


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_request_is_a_real_socket_with_proxy_header(name: str) -> None:
    """self.request is a socket.socket (subclass) instance carrying ``proxy_header``."""
    with serve(name) as srv:
        report, _ = exchange(srv, [HEADERS["v2"]])
        assert report is not None
        assert report["is_socket"] is True
        assert report["has_proxy_header_attr"] is True
        assert report["header"] is not None
        assert srv.server.socket.gettimeout() is None, "the listener keeps its blocking mode"


def _plain_timeout(name: str) -> object:
    """The timeout a handler's socket has under the same socketserver class without the mixin."""
    with serve(PLAIN_BASES[name]) as srv:
        report, _ = exchange(srv, [b"x"])
    assert report is not None
    return report["timeout"]


@pytest.mark.parametrize("how", ["one_write", "byte_by_byte"])
@pytest.mark.parametrize("default", [None, 2.5])
@pytest.mark.parametrize("name", CLASS_NAMES)
def test_request_timeout_is_what_it_would_be_without_the_mixin(
    name: str, default: object, how: str, default_timeout: object
) -> None:
    """The mixin puts accepted sockets in non-blocking mode while it reads the header; the
    handler must get the timeout socketserver would have given it (accepted sockets inherit
    socket.setdefaulttimeout()).  The baseline is measured, not assumed."""
    default_timeout(default)  # type: ignore[operator]
    expected = _plain_timeout(name)
    assert expected == default  # sanity: CPython gives accepted sockets the default timeout
    with serve(name) as srv:
        # byte by byte: the connection is parked first, then handed out
        report, _ = exchange(srv, split(HEADERS["v1"], b"t", how), delay=0.003)
        assert report is not None
        assert report["timeout"] == expected


@pytest.mark.parametrize("name", TCP_CLASS_NAMES)
def test_ipv6_server_v2_tcp6_header_gives_four_tuple(name: str) -> None:
    """On an AF_INET6 server, a TCP6 header gives (host, port, 0, 0) like the socket module."""
    with serve(name, ipv6=True) as srv:
        report, _ = exchange(srv, [v2_header(REAL_V6, DEST_V6) + b"six"])
        assert report is not None
        assert as_address(report["client_address"]) == (REAL_V6[0], REAL_V6[1], 0, 0)
        assert srv.server.verified == [(REAL_V6[0], REAL_V6[1], 0, 0)]
        assert bytes.fromhex(report["payload"]) == b"six"


@pytest.mark.parametrize("name", TCP_CLASS_NAMES)
def test_ipv6_server_v1_tcp6_header_gives_four_tuple(name: str) -> None:
    with serve(name, ipv6=True) as srv:
        report, _ = exchange(srv, [v1_header(REAL_V6, DEST_V6) + b"six"])
        assert report is not None
        assert as_address(report["client_address"]) == (REAL_V6[0], REAL_V6[1], 0, 0)


@pytest.mark.parametrize("name", TCP_CLASS_NAMES)
def test_ipv6_server_local_header_gives_own_four_tuple_peer(name: str) -> None:
    with serve(name, ipv6=True) as srv:
        report, own = exchange(srv, [v2_header(local=True)])
        assert report is not None
        assert as_address(report["client_address"]) == own
        assert len(own) == 4


def test_ipv6_server_tcp4_header_gives_the_ipv4_shape() -> None:
    """The shape follows the header's family: an IPv4 client is (host, port) even on ::1."""
    with serve("ThreadingProxyTCPServer", ipv6=True) as srv:
        report, _ = exchange(srv, [v2_header(REAL_V4, DEST_V4)])
        assert report is not None
        assert as_address(report["client_address"]) == REAL_V4


@pytest.mark.parametrize("name", CLASS_NAMES[3:])
def test_unix_family_header_gives_the_path(name: str) -> None:
    """A v2 AF_UNIX header gives the source path, as the socket module gives UNIX addresses."""
    with serve(name) as srv:
        report, _ = exchange(srv, [v2_header("/run/client.sock", "/run/server.sock") + b"u"])
        assert report is not None
        assert report["client_address"] == "/run/client.sock"
        assert bytes.fromhex(report["payload"]) == b"u"


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_header_family_decides_the_address_shape_not_the_server_family(name: str) -> None:
    """haproxy forwarding IPv6 clients to an IPv4 or UNIX-socket backend: the client is a
    (host, port, 0, 0) whatever the listening socket's family."""
    with serve(name) as srv:
        report, _ = exchange(srv, [v1_header(REAL_V6, DEST_V6)])
        assert report is not None
        assert as_address(report["client_address"]) == (REAL_V6[0], REAL_V6[1], 0, 0)


def test_prebuilt_classes_are_the_mixin_over_socketserver() -> None:
    """One line each: mixin first, then the socketserver class (composability with user mixins)."""
    import proxyproto

    for name, base in PLAIN_BASES.items():
        cls = getattr(proxyproto, name)
        assert issubclass(cls, proxyproto.ProxyProtocolMixin)
        for part in base.__mro__:
            if part.__module__ == "socketserver" and part is not object:
                assert issubclass(cls, part)
                assert cls.__mro__.index(proxyproto.ProxyProtocolMixin) < cls.__mro__.index(part)
    assert issubclass(proxyproto.ThreadingProxyTCPServer, socketserver.ThreadingMixIn)


@pytest.mark.parametrize("name", ["ProxyTCPServer", "ThreadingProxyUnixStreamServer"])
def test_queued_connections_do_not_wait_for_poll_interval(name: str) -> None:
    """Connections whose headers complete together are all handed out at once: the server's
    descriptor stays readable while any is queued (DESIGN.md), so none waits for the next
    poll_interval (3 s here, so a wait would show)."""
    with serve(name, LineReportHandler, poll_interval=3.0) as srv:
        time.sleep(0.1)  # serve_forever is now blocked in select(3.0)
        clients = [srv.connect() for _ in range(12)]
        try:
            start = time.monotonic()
            for sock in clients:
                sock.sendall(HEADERS["v2"] + b"q\n")
            for sock in clients:
                sock.settimeout(5.0)
                assert sock.recv(4096).endswith(b"\n")
            took = time.monotonic() - start
        finally:
            for sock in clients:
                sock.close()
        assert took < 1.0, f"12 ready connections took {took:.2f} s to be served"


# --------------------------------------------------------------------------- a UNIX-family header on a UNIX listener


def test_unix_family_header_on_unix_listener_still_gives_the_path() -> None:
    header = v2_header("/run/client.sock", "/run/server.sock")
    with serve("ThreadingProxyUnixStreamServer") as running:
        report, _ = exchange(running, [header + PAYLOAD])
        assert report is not None and report["client_address"] == "/run/client.sock"
