"""The sync worker's first read: the header and the request that came with it, read in one go.

``proxyproto.gunicorn.Sync`` (without TLS) reads a connection's first bytes once, takes the PROXY
header from them and hands every byte after it to gunicorn's own parser; a header not complete in
that read waits with the bytes already read kept.  These tests, through the real ``gunicorn``
command and real sockets, check that not a byte of the stream is lost or invented whatever the
segments: the request in the header's segment, the two split at every boundary that matters, a
pipelined second request, a large body, the end of the stream right after the header, a stream
without a header under ``--proxy-protocol auto``, and TLS (whose ClientHello must stay in the socket
for the TLS layer, even when it came in the header's segment).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gunicorn_kit import CEILING, Gunicorn, closed_unserved, connect, read_response, running_command
from support import free_port, require_module
from web_kit import DEST_V4, DEST_V6, REAL_V4, REAL_V6, python, self_signed

import proxyproto

require_module("gunicorn")


def _sync(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> Any:
    """``gunicorn -k proxyproto.gunicorn.Sync --workers 1`` serving ``gunicorn_digest_app`` (a context manager)."""
    port = free_port()
    args = python(
        "-m",
        "gunicorn",
        "--no-control-socket",
        "-k",
        "proxyproto.gunicorn.Sync",
        "--workers",
        "1",
        "-b",
        f"127.0.0.1:{port}",
        *flags,
        "gunicorn_digest_app:digest_app",
    )
    return running_command(args, port, tmp_path, env=env)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """The sync worker with its defaults: REQUIRE for loopback (the tests' peer)."""
    with _sync(tmp_path_factory.mktemp("sync")) as running:
        yield running


@pytest.fixture(scope="module")
def server_auto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """The sync worker with ``--proxy-protocol auto`` (policy USE): a stream without a header is served too."""
    with _sync(tmp_path_factory.mktemp("auto"), "--proxy-protocol", "auto") as running:
        yield running


HEADERS = {
    "v1": (proxyproto.encode_v1(REAL_V4, DEST_V4), REAL_V4),
    "v2": (proxyproto.encode_v2(REAL_V4, DEST_V4), REAL_V4),
    "v2-tlvs": (proxyproto.encode_v2(REAL_V6, DEST_V6, tlvs=[(proxyproto.TLVType.NOOP, b"a" * 700)]), REAL_V6),
}


def post(path: str, body: bytes, *, close: bool = True, method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def send_in_pieces(address: tuple[str, int], pieces: list[bytes]) -> socket.socket:
    """A connection sending each of ``pieces`` in its own segment (no Nagle), a pause between them."""
    sock = connect(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for number, piece in enumerate(pieces):
        if number:
            time.sleep(0.05)  # (the worker reads the first piece alone; if it is slower, both at once: same bytes)
        sock.sendall(piece)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    try:
        return read_response(sock)
    finally:
        sock.close()


def everything(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


BODY = b"name=value&other=" + bytes(range(256)) * 4


@pytest.mark.parametrize("version", list(HEADERS))
def test_request_in_the_headers_segment_is_served_whole(server: Gunicorn, version: str) -> None:
    header, source = HEADERS[version]
    status, seen = answer(send_in_pieces(server.address, [header + post("/one", BODY)]))
    assert status == 200, seen
    assert seen["client"] == list(source) and seen["header"] is True, seen
    assert (seen["method"], seen["path"]) == ("POST", "/one"), seen
    assert seen["length"] == len(BODY) and seen["sha256"] == hashlib.sha256(BODY).hexdigest(), seen


def _boundaries(header: bytes, request: bytes) -> dict[str, int]:
    """Where a split of ``header + request`` can change what the first read holds."""
    size = len(header)
    head = request.index(b"\r\n\r\n") + 4
    points = {
        "after the first byte": 1,
        "inside the signature": 5,
        "after the v2 signature": 12,
        "after the v2 fixed part": 16,
        "one byte before the header's end": size - 1,
        "at the header's end": size,
        "one byte into the request": size + 1,
        "inside the request line": size + 10,
        "before the blank line": size + head - 2,
        "at the body's start": size + head,
        "inside the body": size + head + 100,
    }
    return {name: at for name, at in points.items() if 0 < at < size + len(request)}


SPLITS = [(version, name) for version in HEADERS for name in _boundaries(HEADERS[version][0], post("/split", BODY))]


@pytest.mark.parametrize(("version", "where"), SPLITS, ids=[f"{v}-{w.replace(' ', '-')}" for v, w in SPLITS])
def test_header_and_request_split_anywhere_give_the_same_request(server: Gunicorn, version: str, where: str) -> None:
    header, source = HEADERS[version]
    stream = header + post("/split", BODY)
    at = _boundaries(header, post("/split", BODY))[where]
    status, seen = answer(send_in_pieces(server.address, [stream[:at], stream[at:]]))
    assert status == 200, seen
    assert seen["client"] == list(source), seen
    assert (seen["method"], seen["path"]) == ("POST", "/split"), seen
    assert seen["sha256"] == hashlib.sha256(BODY).hexdigest() and seen["length"] == len(BODY), seen


def test_header_split_in_three_segments_then_the_request(server: Gunicorn) -> None:
    header, source = HEADERS["v1"]
    pieces = [header[:3], header[3:20], header[20:], post("/three", BODY)]
    status, seen = answer(send_in_pieces(server.address, pieces))
    assert status == 200 and seen["client"] == list(source) and seen["path"] == "/three", seen
    assert seen["sha256"] == hashlib.sha256(BODY).hexdigest(), seen


def test_header_longer_than_the_first_read_is_completed_from_the_socket(tmp_path: Path) -> None:
    """A header of 20 kB (TLVs) is not complete in the first read (8 kB): it waits, those bytes kept."""
    header = proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=[(proxyproto.TLVType.NOOP, b"n" * 20000)])
    with _sync(tmp_path, env={"PROXYPROTO_MAX_HEADER_SIZE": "65551"}) as running:
        for pieces in ([header + post("/long", BODY)], [header[:9000], header[9000:] + post("/long", BODY)]):
            status, seen = answer(send_in_pieces(running.address, pieces))
            assert status == 200 and seen["client"] == list(REAL_V4) and seen["path"] == "/long", seen
            assert seen["sha256"] == hashlib.sha256(BODY).hexdigest(), seen


def test_pipelined_second_request_is_never_served_as_the_first(server: Gunicorn) -> None:
    """gunicorn's sync worker answers the first request and closes (it never keeps a connection alive)."""
    header, source = HEADERS["v2"]
    stream = header + post("/first", b"1", close=False) + post("/second", b"22")
    data = everything(send_in_pieces(server.address, [stream]))
    assert data.count(b"HTTP/1.1 ") == 1, data
    seen = json.loads(data.partition(b"\r\n\r\n")[2])
    assert seen["path"] == "/first" and seen["length"] == 1 and seen["client"] == list(source), seen


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_large_body_after_the_header_arrives_byte_for_byte(server: Gunicorn, version: str) -> None:
    header, source = HEADERS[version]
    body = os.urandom(3 * 1024 * 1024 + 17)
    status, seen = answer(send_in_pieces(server.address, [header + post("/large", body)]))
    assert status == 200 and seen["client"] == list(source), seen
    assert seen["length"] == len(body) and seen["sha256"] == hashlib.sha256(body).hexdigest(), seen


def test_body_that_looks_like_a_header_is_payload(server: Gunicorn) -> None:
    header, source = HEADERS["v2"]
    body = proxyproto.encode_v2(REAL_V6, DEST_V6) + proxyproto.encode_v1(REAL_V6, DEST_V6)
    status, seen = answer(send_in_pieces(server.address, [header + post("/looks", body)]))
    assert status == 200 and seen["client"] == list(source), seen
    assert seen["sha256"] == hashlib.sha256(body).hexdigest(), seen


def test_header_then_end_of_stream_is_closed_and_the_worker_serves_on(server: Gunicorn) -> None:
    header, source = HEADERS["v2"]
    sock = connect(server.address, header)
    sock.shutdown(socket.SHUT_WR)
    assert everything(sock) == b""
    status, seen = answer(send_in_pieces(server.address, [header + post("/after", b"x")]))
    assert status == 200 and seen["client"] == list(source), seen


def test_part_of_a_header_then_end_of_stream_is_refused_with_one_line(server: Gunicorn) -> None:
    header, _ = HEADERS["v2"]
    sock = connect(server.address, header[:10])
    sock.shutdown(socket.SHUT_WR)
    assert closed_unserved(sock)
    deadline = time.monotonic() + CEILING
    while "truncated by EOF after 10 byte(s)" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def test_request_without_a_header_under_require_is_closed_unserved(server: Gunicorn) -> None:
    sock = send_in_pieces(server.address, [post("/none", BODY)])
    assert closed_unserved(sock)


@pytest.mark.parametrize(
    "pieces",
    [
        [post("/plain", BODY)],
        [b"P", post("/plain", BODY, method="PUT")[1:]],
        [b"PU", post("/plain", BODY, method="PUT")[2:]],
    ],
    ids=["one-segment", "split-after-P", "split-after-PU"],
)
def test_stream_without_a_header_under_auto_is_served_from_its_first_byte(
    server_auto: Gunicorn, pieces: list[bytes]
) -> None:
    """Under USE a first read that holds no header (or only an ambiguous ``P``) is the request itself."""
    method = "PUT" if len(pieces) > 1 else "POST"
    sock = send_in_pieces(server_auto.address, pieces)
    own = sock.getsockname()
    status, seen = answer(sock)
    assert status == 200, seen
    assert (seen["method"], seen["path"]) == (method, "/plain") and seen["header"] is False, seen
    assert seen["client"] == [own[0], own[1]], seen
    assert seen["sha256"] == hashlib.sha256(BODY).hexdigest(), seen


@pytest.mark.parametrize("at", [5, 27, 28, 29])
def test_header_split_under_auto_is_still_the_header(server_auto: Gunicorn, at: int) -> None:
    header, source = HEADERS["v2"]
    stream = header + post("/auto", BODY)
    status, seen = answer(send_in_pieces(server_auto.address, [stream[:at], stream[at:]]))
    assert status == 200 and seen["client"] == list(source) and seen["header"] is True, seen
    assert seen["sha256"] == hashlib.sha256(BODY).hexdigest(), seen


def _tls_request(sock: socket.socket, context: ssl.SSLContext, header: bytes, request: bytes) -> bytes:
    """TLS over ``sock`` with the ClientHello in the header's segment; the response's bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    first = True
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        sock.sendall((header if first else b"") + outgoing.read())
        first = False
        data = sock.recv(65536)
        assert data, "closed during the handshake"
        incoming.write(data)
    tls.write(request)
    sock.sendall(outgoing.read())
    response = b""
    while True:
        try:
            chunk = tls.read(65536)
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            if not data:
                return response
            incoming.write(data)
            continue
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return response
        if not chunk:
            return response
        response += chunk


def test_tls_clienthello_in_the_headers_segment_is_left_to_the_tls_layer(tmp_path: Path) -> None:
    cert = self_signed(tmp_path)
    if cert is None:
        pytest.skip("the openssl command is not installed")
    header, source = HEADERS["v2"]
    with _sync(tmp_path, "--certfile", str(cert.cert), "--keyfile", str(cert.key)) as running:
        sock = connect(running.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            data = _tls_request(sock, cert.client_context(), header, post("/tls", BODY))
        finally:
            sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:200]
    seen = json.loads(rest)
    assert seen["client"] == list(source) and seen["scheme"] == "https" and seen["path"] == "/tls", seen
    assert seen["sha256"] == hashlib.sha256(BODY).hexdigest(), seen


def test_preloaded_bytes_come_before_the_sockets_own_through_every_read() -> None:
    """The bytes a first read took after the header are read back first (``recv``, ``recv_into``, a peek
    that consumes nothing), then the socket's own; the socket is a plain socket again once they are read."""
    from proxyproto.sock import _PRELOADED, preload

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"from the socket")
        preload(ours, b"preloaded")
        assert ours.recv(3, socket.MSG_PEEK) == b"pre"
        assert ours.recv(3) == b"pre"
        buffer = bytearray(4)
        assert ours.recv_into(buffer) == 4 and buffer == b"load"
        assert ours.recv(100) == b"ed"  # (never more than is preloaded: what comes next may not have arrived)
        assert type(ours) is socket.socket and ours not in _PRELOADED
        assert ours.recv(100) == b"from the socket"
