"""TLS after the header, wrapped by the handler itself.

The client sends a v2 header, then a TLS handshake.  The handler wraps ``self.request`` with
its own SSLContext: it must see the real address and the decrypted payload.  The one-write
variant sends the header and the ClientHello in a single segment, the case that broke
ingress-nginx behind pires (T3: a reader that buffers past the header eats the ClientHello).
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import ssl

import pytest
from server_kit import CLASS_NAMES, DEST_V4, REAL_V4, serve, v2_header

SECRET = b"secret payload over TLS\n"


class TLSReportHandler(socketserver.BaseRequestHandler):
    """Wraps the accepted socket in TLS, reads one line, reports what it saw inside TLS."""

    def handle(self) -> None:
        header = getattr(self.request, "proxy_header", None)
        context: ssl.SSLContext = self.server.tls_context  # type: ignore[attr-defined]
        with context.wrap_socket(self.request, server_side=True) as tls:
            data = b""
            while not data.endswith(b"\n"):
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
            report = {
                "client_address": list(self.client_address),
                "header_source": None if header is None else list(header.source),
                "payload": data.hex(),
                "pid": os.getpid(),
            }
            tls.sendall(json.dumps(report).encode() + b"\n")


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def check(report: dict) -> None:
    assert tuple(report["client_address"]) == REAL_V4
    assert tuple(report["header_source"]) == REAL_V4
    assert bytes.fromhex(report["payload"]) == SECRET


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_handler_wraps_tls_after_a_v2_header_and_sees_real_address_and_payload(
    name: str, server_tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    def attach(server: object) -> None:
        server.tls_context = server_tls_context  # type: ignore[attr-defined]

    with serve(name, TLSReportHandler, prepare=attach) as srv:
        with srv.connect() as raw:
            raw.sendall(v2_header(REAL_V4, DEST_V4))
            with client_tls_context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(SECRET)
                check(json.loads(read_line(tls)))


def pump(sock: socket.socket, outgoing: ssl.MemoryBIO) -> None:
    data = outgoing.read()
    if data:
        sock.sendall(data)


def feed(sock: socket.socket, incoming: ssl.MemoryBIO) -> None:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("server closed during TLS")
    incoming.write(data)


@pytest.mark.parametrize("name", ["ThreadingProxyTCPServer", "ForkingProxyUnixStreamServer"])
def test_header_and_client_hello_in_one_write_T3(
    name: str, server_tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    """The header and the ClientHello share one segment: exactly the header is consumed."""

    def attach(server: object) -> None:
        server.tls_context = server_tls_context  # type: ignore[attr-defined]

    with serve(name, TLSReportHandler, prepare=attach) as srv:
        with srv.connect() as sock:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client_tls_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            sock.sendall(v2_header(REAL_V4, DEST_V4) + outgoing.read())
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pump(sock, outgoing)
                    feed(sock, incoming)
            pump(sock, outgoing)
            tls.write(SECRET)
            pump(sock, outgoing)
            data = b""
            while not data.endswith(b"\n"):
                try:
                    data += tls.read(65536)
                except ssl.SSLWantReadError:
                    pump(sock, outgoing)
                    feed(sock, incoming)
            check(json.loads(data))


class ListenerTLSHandler(socketserver.StreamRequestHandler):
    """Under a TLS listening socket: reports what it got, inside the TLS session."""

    def handle(self) -> None:
        line = self.rfile.readline()
        header = getattr(self.request, "proxy_header", None)
        report = {
            "client_address": list(self.client_address),
            "is_tls": isinstance(self.request, ssl.SSLSocket),
            "header_source": None if header is None else list(header.source),
            "payload": line.hex(),
        }
        self.wfile.write(json.dumps(report).encode() + b"\n")


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_tls_listening_socket_hands_the_handler_a_tls_socket_after_the_header(
    name: str, server_tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    """DESIGN.md: the mixin accepts the raw connection, reads the header, and finish_request
    wraps it with the listener's context (in the handler's thread or child); verify_request
    sees the raw socket; the TLS socket is closed when the request ends."""
    seen: list = []

    def wrap(server: object) -> None:
        server.socket = server_tls_context.wrap_socket(  # type: ignore[attr-defined]
            server.socket, server_side=True  # type: ignore[attr-defined]
        )
        original = server.verify_request  # type: ignore[attr-defined]

        def verify_request(request: object, client_address: object) -> bool:
            seen.append(isinstance(request, ssl.SSLSocket))
            return original(request, client_address)

        server.verify_request = verify_request  # type: ignore[attr-defined]

    with serve(name, ListenerTLSHandler, prepare=wrap) as srv:
        with srv.connect() as raw:
            raw.sendall(v2_header(REAL_V4, DEST_V4))
            with client_tls_context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(SECRET)
                report = json.loads(read_line(tls))
                assert tls.recv(1) == b"", "the TLS connection stays open after the request"
    check(report)
    assert report["is_tls"] is True
    assert seen == [False]
