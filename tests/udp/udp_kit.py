"""Helpers for the UDP tests: hand-built v2 datagram headers, servers in a thread, proxies.

Headers are assembled from the spec's byte layout (not with ``proxyproto.encode_v2``) so a
bug in the encoder cannot hide the same bug in the receiver.  The handler reports what it saw
*in its reply datagram* (one JSON object), because under ``ForkingProxyUDPServer`` it runs in
a child process; the reply also proves it went to the proxy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

from proxyproto import udp

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

CLASS_NAMES = ("ProxyUDPServer", "ThreadingProxyUDPServer", "ForkingProxyUDPServer")

# Addresses carried inside headers are data, never dialled: documentation ranges.
REAL_V4 = ("192.0.2.10", 51234)
DEST_V4 = ("198.51.100.20", 5353)
REAL_V6 = ("2001:db8::7", 4242)
DEST_V6 = ("2001:db8::1", 8443)

REPLY_TIMEOUT = 5.0  # generous: a healthy server answers in milliseconds
SILENCE = 0.3  # how long "no reply" is awaited for a datagram that must be dropped


def v2_header(command: int, fam: int, source: Any = None, destination: Any = None, tlvs: bytes = b"") -> bytes:
    """A v2 header by hand: signature, ver/cmd, fam, len, address block, TLVs."""
    block = b""
    family = fam >> 4
    if family == 1:
        block = (
            ipaddress.IPv4Address(source[0]).packed
            + ipaddress.IPv4Address(destination[0]).packed
            + struct.pack(">HH", source[1], destination[1])
        )
    elif family == 2:
        block = (
            ipaddress.IPv6Address(source[0]).packed
            + ipaddress.IPv6Address(destination[0]).packed
            + struct.pack(">HH", source[1], destination[1])
        )
    body = block + tlvs
    return SIGNATURE + bytes([0x20 | command, fam]) + struct.pack(">H", len(body)) + body


def udp4(source: Any = REAL_V4, destination: Any = DEST_V4) -> bytes:
    """PROXY, fam 0x12 (UDP over IPv4)."""
    return v2_header(1, 0x12, source, destination)


def udp6(source: Any = REAL_V6, destination: Any = DEST_V6) -> bytes:
    """PROXY, fam 0x22 (UDP over IPv6)."""
    return v2_header(1, 0x22, source, destination)


LOCAL = v2_header(0, 0x00)


class Reporter(udp.ProxyDatagramRequestHandler):
    """Replies (through ``wfile``, so to the proxy) with what the handler saw."""

    def handle(self) -> None:
        request = self.request
        header = request.proxy_header
        report = {
            "client_address": list(self.client_address),
            "payload": self.rfile.read().hex(),
            "proxy_address": list(request.proxy_address),
            "request_is_pair": isinstance(request, tuple) and len(request) == 2,
            "socket_is_reply_socket_on_server_socket": isinstance(request[1], udp.ReplySocket)
            and request[1].fileno() == self.server.socket.fileno(),
            "header": None
            if header is None
            else {
                "command": header.command.name,
                "family": header.family.name,
                "protocol": header.protocol.name,
                "length": header.length,
            },
        }
        self.wfile.write(json.dumps(report).encode())


def server_class(name: str, **attrs: Any) -> type:
    """A subclass of ``proxyproto.udp.<name>`` with the given class attributes."""
    base = getattr(udp, name)
    attrs.setdefault("daemon_threads", True)
    return type(f"Test{name}", (base,), attrs)


@contextlib.contextmanager
def running(name: str, handler: type = Reporter, host: str = "127.0.0.1", **attrs: Any) -> Iterator[Any]:
    """A UDP server of class ``name`` serving in a thread on ``host``, port 0; stopped at exit."""
    if ":" in host:
        attrs.setdefault("address_family", socket.AF_INET6)
    cls = server_class(name, **attrs)
    server = cls((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)  # server_close has reaped the children / joined the handler threads


@contextlib.contextmanager
def proxy_socket(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    """The "proxy": a UDP socket bound on ``host`` (any 127/8 address works on Linux)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(REPLY_TIMEOUT)
    try:
        yield sock
    finally:
        sock.close()


def exchange(sock: socket.socket, server: Any, datagram: bytes) -> dict[str, Any]:
    """Send one datagram to ``server``; return the handler's report (it must arrive)."""
    sock.sendto(datagram, server.server_address)
    data, sender = sock.recvfrom(65535)
    assert sender[:2] == server.server_address[:2]
    report: dict[str, Any] = json.loads(data)
    return report


def no_replies(sock: socket.socket, server: Any, datagrams: list[bytes]) -> bool:
    """Send every one of ``datagrams``; True when no reply to any comes within ``SILENCE`` seconds of
    the last (all dropped): each had that long to be answered, watched over the same window."""
    for datagram in datagrams:
        sock.sendto(datagram, server.server_address)
    sock.settimeout(SILENCE)
    try:
        sock.recvfrom(65535)
    except socket.timeout:
        return True
    finally:
        sock.settimeout(REPLY_TIMEOUT)
    return False


def no_reply(sock: socket.socket, server: Any, datagram: bytes) -> bool:
    """Send ``datagram``; True when no reply comes within ``SILENCE`` seconds (it was dropped)."""
    return no_replies(sock, server, [datagram])
