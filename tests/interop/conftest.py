"""Interoperability suite: proxyproto against real proxies, in both directions.

Proven compatible (Debian 12 "bookworm" packages, as CI installs them with
``apt-get install -y haproxy nginx-light libnginx-mod-stream curl openssl``):

Real senders, received by ``ThreadingProxyTCPServer`` / ``ThreadingProxyUnixStreamServer``
/ ``http.server.ThreadingHTTPServer`` + ``ProxyProtocolMixin``:

- HAProxy 2.6.12 ``send-proxy`` (v1) and ``send-proxy-v2``: IPv4 and IPv6 clients,
  IPv4 clients on a dual-stack ``v4v6`` bind (arrive as ``::ffff:a.b.c.d``),
  clients on a UNIX-socket frontend (v1 ``UNKNOWN``, v2 ``LOCAL``), and a
  ``unix@`` backend connecting to a UNIX-socket server.
- HAProxy 2.6.12 ``send-proxy-v2`` with ``proxy-v2-options
  crc32c,unique-id,authority,ssl,ssl-cipher,cert-cn,cert-sig,cert-key`` behind a TLS
  frontend (OpenSSL 3.0, client certificates, SNI, ALPN): every TLV decoded.
- HAProxy 2.6.12 health checks: ``check send-proxy-v2`` (LOCAL, with and
  without ``proxy-v2-options``) and ``check send-proxy`` (v1).
- HAProxy 2.6.12 ``mode tcp`` + ``send-proxy-v2`` in front of a server that
  terminates TLS itself after the header (TLS passthrough), driven by curl 7.88.
- nginx 1.22.1 stream module ``proxy_protocol on;`` (v1), IPv4 and IPv6 clients.
- curl 7.88.1 ``--haproxy-protocol`` (v1), IPv4 and IPv6.

Real receiver, fed by ``encode_v1``, ``encode_v2`` and ``create_connection``:

- HAProxy 2.6.12 ``bind ... accept-proxy``: logs exactly the encoded addresses
  (IPv4, IPv6, IPv4 mapped into IPv6) and the AUTHORITY and UNIQUE_ID TLVs
  (``fc_pp_authority``, ``fc_pp_unique_id``), accepts ALPN and NOOP TLVs and a
  correct CRC32C, and refuses a header whose CRC32C has one bit flipped.

Every process runs on loopback with ports picked at run time, is started by a
fixture from a generated configuration in a per-test temporary directory, and is
stopped by PID when its test ends; a session-end check proves none survived.
A missing program skips its tests locally and fails them when ``CI=true``.
"""

from __future__ import annotations

import logging
import shutil
import socket
import socketserver
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from interop_support import (
    ProcessRunner,
    RecordingBackend,
    leftover_processes,
    make_certs,
    wait_until,
)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    """Session finaliser: no haproxy/nginx started by the suite may outlive it."""
    yield
    left = leftover_processes()
    assert not left, f"interop processes still running at session end: {left}"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short per-test temporary directory (UNIX socket paths must fit in 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ppi-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs(workdir: Path) -> Iterator[ProcessRunner]:
    """Start real haproxy/nginx processes; at teardown stop them by PID and check they exited."""
    runner = ProcessRunner(workdir)
    yield runner
    runner.stop_all()


@pytest.fixture(scope="session")
def certs() -> Iterator[Any]:
    """A self-signed CA plus server and client certificates, made once per session."""
    d = Path(tempfile.mkdtemp(prefix="ppi-pki-"))
    try:
        yield make_certs(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def backend() -> Iterator[RecordingBackend]:
    """A plain recording TCP backend on 127.0.0.1, port picked by the kernel."""
    b = RecordingBackend()
    yield b
    b.close()


# --- receiving: a proxyproto server that records what each handler saw ---------------------


@dataclass
class Received:
    """What one handler invocation observed."""

    client_address: Any
    header: Any  # proxyproto.ProxyHeader | None
    peer: Any  # the socket's real peer, for comparison
    payload: bytes = b""
    error: str | None = None

    @property
    def is_check(self) -> bool:
        """A LOCAL header: a health check or a connection the proxy made for itself."""
        import proxyproto

        return self.header is not None and self.header.command == proxyproto.Command.LOCAL


class RecordingProxyHandler(socketserver.BaseRequestHandler):
    """Records ``client_address``, ``request.proxy_header`` and one line of payload; echoes.

    It reads even after a LOCAL header: haproxy sends LOCAL both for health
    checks (which close right after the header, so the read ends at once) and
    for real clients of a UNIX-socket frontend.
    """

    def handle(self) -> None:
        try:
            peer = self.request.getpeername()
        except OSError as exc:
            peer = f"getpeername failed: {exc!r}"
        rec = Received(self.client_address, getattr(self.request, "proxy_header", None), peer)
        self.request.settimeout(5.0)
        try:
            while b"\n" not in rec.payload and len(rec.payload) < 65536:
                chunk = self.request.recv(4096)
                if not chunk:
                    break
                rec.payload += chunk
        except OSError as exc:  # a v1 health check resets right after its header
            rec.error = repr(exc)
        self.server.records.append(rec)  # type: ignore[attr-defined]
        if rec.error is None and rec.payload:
            try:
                self.request.sendall(b"client_address=" + repr(self.client_address).encode() + b"\n")
            except OSError:
                pass


@pytest.fixture
def serve() -> Iterator[Callable[[Any], Any]]:
    """Run any ``socketserver`` server's ``serve_forever`` in a thread; stop it at teardown."""
    started: list[tuple[Any, threading.Thread]] = []

    def start(server: Any) -> Any:
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        started.append((server, t))
        return server

    yield start
    for server, t in started:
        server.shutdown()
        server.server_close()
        t.join(5)
        assert not t.is_alive(), "serve_forever did not stop"


@pytest.fixture
def proxy_server(serve: Callable[[Any], Any]) -> Callable[..., Any]:
    """Factory: start a proxyproto threading server on loopback; shut down at teardown.

    ``proxy_server(host="127.0.0.1")``, ``proxy_server(host="::1")`` or
    ``proxy_server(unix_path=...)``; keyword ``attrs`` set class attributes such
    as ``proxy_policy``.  The returned server has ``records`` (a list of
    :class:`Received`), ``errors`` (tracebacks from ``handle_error``) and
    ``address``.
    """
    import proxyproto

    def factory(
        host: str = "127.0.0.1",
        unix_path: str | None = None,
        handler: type = RecordingProxyHandler,
        **attrs: Any,
    ) -> Any:
        base: type
        address: Any
        if unix_path is not None:
            base, address, family = (
                proxyproto.ThreadingProxyUnixStreamServer,
                unix_path,
                socket.AF_UNIX,
            )
        else:
            base, address = proxyproto.ThreadingProxyTCPServer, (host, 0)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def handle_error(self: Any, request: Any, client_address: Any) -> None:
            self.errors.append(traceback.format_exc())

        cls = type(
            "InteropServer",
            (base,),
            {
                "daemon_threads": True,
                "address_family": family,
                "handle_error": handle_error,
                **attrs,
            },
        )
        server = cls(address, handler)
        server.records = []
        server.errors = []
        server.address = server.server_address if unix_path is None else unix_path
        return serve(server)

    return factory


def wait_records(server: Any, count: int, timeout: float = 5.0) -> list[Received]:
    """Wait until ``server`` has recorded at least ``count`` handler runs."""
    wait_until(lambda: len(server.records) >= count, timeout)
    assert len(server.records) >= count, f"expected {count} records, got {server.records}"
    return list(server.records)


@pytest.fixture
def wait_for_records() -> Callable[..., list[Received]]:
    """The :func:`wait_records` helper, as a fixture so test modules need not import conftest."""
    return wait_records


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def pp_log() -> Iterator[list[logging.LogRecord]]:
    """Every record the ``proxyproto`` logger emits during the test, at DEBUG and above."""
    logger = logging.getLogger("proxyproto")
    handler = _ListHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(old_level)
