"""Retrofitting stdlib servers by adding one base class.

Each server is the stdlib class with ``ProxyProtocolMixin`` as first base and nothing else
changed: stock handlers, stock logging to stderr (captured with capsys, which sees writes from
the serving thread because sys.stderr is process-wide).  A UNIX-family header on an IP
listener leaves ``client_address`` in the shape those handlers assume.  Combinations of the
mixin with stdlib classes that cannot work (on a UDP server, after the server class, after
``ForkingMixIn``) are a TypeError when the class is defined.
"""

from __future__ import annotations

import functools
import http.server
import socket
import socketserver
import ssl
import sys
import wsgiref.simple_server
import xmlrpc.client
import xmlrpc.server
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import pytest
from server_kit import DEST_V4, REAL_V4, ReportHandler, Running, proxyproto_records, read_all, v1_header, v2_header

import proxyproto
from proxyproto import ProxyProtocolMixin


class ProxyThreadingHTTPServer(ProxyProtocolMixin, http.server.ThreadingHTTPServer):
    pass


class ProxyWSGIServer(ProxyProtocolMixin, wsgiref.simple_server.WSGIServer):
    pass


class ProxyXMLRPCServer(ProxyProtocolMixin, xmlrpc.server.SimpleXMLRPCServer):
    pass


def raw_request(address: Any, header: bytes, request: bytes) -> bytes:
    """Send the PROXY header then a plain HTTP request on one connection; the whole response."""
    with socket.create_connection(address[:2], timeout=5) as sock:
        sock.sendall(header + request)
        return read_all(sock)


def log_lines(captured: str, marker: str) -> list:
    return [line for line in captured.splitlines() if marker in line]


@pytest.fixture
def docroot(tmp_path: Path) -> Path:
    (tmp_path / "hello.txt").write_bytes(b"hello from behind the proxy\n")
    return tmp_path


def http_server(docroot: Path) -> ProxyThreadingHTTPServer:
    handler: Callable[..., Any] = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(docroot)
    )
    return ProxyThreadingHTTPServer(("127.0.0.1", 0), handler)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_threading_http_server_logs_the_real_client(
    docroot: Path, capsys: pytest.CaptureFixture, version: str
) -> None:
    header = v1_header(REAL_V4, DEST_V4) if version == "v1" else v2_header(REAL_V4, DEST_V4)
    server = http_server(docroot)
    running = Running(server)
    try:
        response = raw_request(
            server.server_address, header, b"GET /hello.txt HTTP/1.0\r\nHost: t\r\n\r\n"
        )
    finally:
        running.stop()
    assert response.startswith(b"HTTP/1.0 200")
    assert response.endswith(b"hello from behind the proxy\n")
    lines = log_lines(capsys.readouterr().err, "GET /hello.txt")
    assert len(lines) == 1
    assert lines[0].startswith(REAL_V4[0] + " - - ["), lines[0]


def test_wsgi_server_puts_the_real_client_in_remote_addr(capsys: pytest.CaptureFixture) -> None:
    seen: list = []

    def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen.append(environ["REMOTE_ADDR"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["REMOTE_ADDR"].encode()]

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, server_class=ProxyWSGIServer)
    running = Running(server)
    try:
        response = raw_request(
            server.server_address,
            v2_header(REAL_V4, DEST_V4),
            b"GET /who HTTP/1.0\r\nHost: t\r\n\r\n",
        )
    finally:
        running.stop()
    assert b" 200 " in response.split(b"\r\n", 1)[0]
    assert response.endswith(REAL_V4[0].encode())
    assert seen == [REAL_V4[0]]
    lines = log_lines(capsys.readouterr().err, "GET /who")
    assert len(lines) == 1 and lines[0].startswith(REAL_V4[0] + " - - ["), lines


def test_xmlrpc_server_logs_the_real_client(capsys: pytest.CaptureFixture) -> None:
    server = ProxyXMLRPCServer(("127.0.0.1", 0))  # logRequests=True is the stdlib default
    server.register_function(lambda a, b: a + b, "add")
    running = Running(server)
    body = xmlrpc.client.dumps((2, 3), "add").encode()
    request = (
        b"POST /RPC2 HTTP/1.0\r\nHost: t\r\nContent-Type: text/xml\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    try:
        response = raw_request(server.server_address, v1_header(REAL_V4, DEST_V4), request)
    finally:
        running.stop()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert xmlrpc.client.loads(payload)[0] == (5,)
    lines = log_lines(capsys.readouterr().err, "POST /RPC2")
    assert len(lines) == 1 and lines[0].startswith(REAL_V4[0] + " - - ["), lines


def test_http_server_with_tls_listening_socket_serves_https_after_a_header(
    docroot: Path,
    capsys: pytest.CaptureFixture,
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
) -> None:
    """The usual idiom: wrap server.socket after construction.  The PROXY header arrives in the
    clear before the TLS handshake, as haproxy sends it (DESIGN.md, "What a handler sees")."""
    server = http_server(docroot)
    server.socket = server_tls_context.wrap_socket(server.socket, server_side=True)
    running = Running(server)
    try:
        with socket.create_connection(server.server_address[:2], timeout=5) as raw:
            raw.sendall(v2_header(REAL_V4, DEST_V4))
            with client_tls_context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: localhost\r\n\r\n")
                response = read_all(tls)
    finally:
        running.stop()
    assert response.startswith(b"HTTP/1.0 200")
    assert response.endswith(b"hello from behind the proxy\n")
    lines = log_lines(capsys.readouterr().err, "GET /hello.txt")
    assert len(lines) == 1 and lines[0].startswith(REAL_V4[0] + " - - ["), lines


def test_tls_listener_does_not_let_a_silent_client_stall_https(
    docroot: Path,
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
) -> None:
    """The handshake runs in the handler's thread, not in the accept loop: a client parked
    without header must not delay a second one."""
    import time

    server = http_server(docroot)
    server.socket = server_tls_context.wrap_socket(server.socket, server_side=True)
    running = Running(server)
    try:
        with socket.create_connection(server.server_address[:2], timeout=5):
            time.sleep(0.1)
            start = time.monotonic()
            with socket.create_connection(server.server_address[:2], timeout=5) as raw:
                raw.sendall(v1_header(REAL_V4, DEST_V4))
                with client_tls_context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    response = read_all(tls)
            took = time.monotonic() - start
    finally:
        running.stop()
    assert response.startswith(b"HTTP/1.0 200")
    assert took < 2.0  # a handshake and one request: milliseconds; a stall would be the header timeout


# --------------------------------------------------------------------------- a UNIX-family header on an IP listener


class AddressHandler(http.server.BaseHTTPRequestHandler):
    """Answers with ``address_string()`` and ``client_address``: what failed with an IndexError."""

    def do_GET(self) -> None:
        header = getattr(self.request, "proxy_header", None)
        body = f"{self.address_string()} {self.client_address!r} family={header and int(header.family)}\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


class RetrofitHTTPServer(ProxyProtocolMixin, http.server.ThreadingHTTPServer):
    errors: list
    verified: list

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.verified.append(client_address)
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1])


@pytest.mark.parametrize(
    "source",
    [b"\0" * 216, b"/run/client.sock".ljust(108, b"\0") + b"/run/server.sock".ljust(108, b"\0"), b"\0x" + b"\0" * 214],
    ids=["all-zero", "pathname", "abstract"],
)
def test_unix_family_header_on_ip_listener_serves_the_socket_peer(source: bytes) -> None:
    """A v2 PROXY header with family 0x31 on a TCP listener: ``client_address`` keeps the shape
    the handlers written for TCP assume (the socket's own peer); the header stays on the request."""
    header = v2_header()[:12] + b"\x21\x31" + len(source).to_bytes(2, "big") + source
    assert proxyproto.parse(header).family is proxyproto.Family.UNIX
    server = RetrofitHTTPServer(("127.0.0.1", 0), AddressHandler)
    server.errors = []
    running = Running(server)
    try:
        with socket.create_connection(server.server_address, timeout=5) as sock:
            own = sock.getsockname()
            sock.sendall(header + b"GET / HTTP/1.0\r\n\r\n")
            response = read_all(sock)
        assert response.startswith(b"HTTP/1.0 200"), response
        body = response.split(b"\r\n\r\n", 1)[1].decode()
        assert body == f"{own[0]} {own!r} family=3\n"
        assert server.errors == []
        assert server.verified == [own]
    finally:
        running.stop()


# --------------------------------------------------------------------------- the mixin among stdlib classes


def test_mixin_on_a_udp_server_is_a_type_error(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TypeError, match=r"proxyproto\.udp\.ProxyUDPServer"):

        class Wrong(ProxyProtocolMixin, socketserver.UDPServer):
            pass

    assert proxyproto_records(caplog) == []


def test_mixin_after_the_server_class_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"before (Threading)?TCPServer"):

        class Wrong(socketserver.ThreadingTCPServer, ProxyProtocolMixin):
            pass

    class Fine(socketserver.ThreadingMixIn, ProxyProtocolMixin, socketserver.TCPServer):
        pass

    class Stack(ProxyProtocolMixin):  # not yet a server: checked when combined
        pass

    class Combined(Stack, socketserver.TCPServer):
        pass

    for cls in (Fine, Combined):
        cls(("127.0.0.1", 0), ReportHandler).server_close()


def test_forking_mixin_before_the_proxy_class_is_a_type_error() -> None:
    """``ForkingMixIn``'s service_actions and collect_children do not call super(): placed
    first, they would switch off header deadlines and the max_children handling."""
    with pytest.raises(TypeError, match=r"before ForkingMixIn"):

        class Wrong(socketserver.ForkingMixIn, proxyproto.ProxyTCPServer):
            pass
