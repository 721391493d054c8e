"""proxyproto.twisted: a plain Twisted protocol behind the ``proxyproto:`` endpoint, on a real reactor.

Twisted's global reactor runs once per process, so each server is a real
subprocess (``serverFromString(reactor, "proxyproto:...")``, the plugin found
as Twisted finds plugins), stopped by PID; clients are blocking sockets on
loopback, and haproxy a real one.  The protocol answers every connection with
a JSON report of what it saw: ``getPeer()``, ``getHost()``, the header it can
reach, the bytes it received (at the end of the stream, or over TLS at the
first newline).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port, python_script, require_haproxy, require_module
from web_kit import DEST_V4, DEST_V6, REAL_V4, REAL_V6, ROOT, Certificate, command, self_signed, tcp_listening

import proxyproto

require_module("twisted.internet")  # not "twisted": the plugin directory alone is a namespace package
require_module("OpenSSL")

SERVER = r'''
import json, logging, os, sys
from twisted.internet import interfaces, protocol, reactor
from twisted.internet.endpoints import serverFromString
from zope.interface import implementer

logging.basicConfig(level=logging.DEBUG, format="%(levelname)s:%(name)s:%(message)s", stream=sys.stderr)


def address(a):
    if hasattr(a, "port"):
        return [a.host, a.port]
    return [type(a).__name__, a.name.decode() if isinstance(a.name, bytes) else a.name]  # Twisted keeps bytes


@implementer(interfaces.IHalfCloseableProtocol)
class Report(protocol.Protocol):
    def connectionMade(self):
        self.data = b""
        self.secure = interfaces.ISSLTransport.providedBy(self.transport)

    def dataReceived(self, data):
        self.data += data
        if self.secure and b"\n" in self.data:
            self.report()

    def readConnectionLost(self):
        self.report()

    def writeConnectionLost(self):
        pass

    def report(self):
        header = getattr(self.transport, "proxy_header", None)
        seen = None if header is None else {"command": header.command.name, "source": header.source}
        self.transport.write(json.dumps({
            "peer": address(self.transport.getPeer()), "host": address(self.transport.getHost()),
            "header": seen, "payload": self.data.hex(), "secure": bool(self.secure),
        }).encode())
        self.transport.loseConnection()


def cannot_listen(failure):  # say it and stop (a port taken meanwhile), rather than run listening on nothing
    print("cannot listen:", failure.getErrorMessage(), file=sys.stderr, flush=True)
    os._exit(3)


serverFromString(reactor, sys.argv[1]).listen(protocol.Factory.forProtocol(Report)).addErrback(cannot_listen)
reactor.run()
'''

CEILING = 10.0
PAYLOAD = b"PRI payload \x00\xff\r\n bytes"  # starts like "PROXY": nothing may take it for a header


@contextlib.contextmanager
def twisted_server(tmp_path: Path, description: str, port: int, env: dict[str, str] | None = None) -> Iterator[Path]:
    """The report protocol behind ``serverFromString(reactor, description)`` in a subprocess; its log file."""
    script = tmp_path / "report_server.py"
    script.write_text(SERVER)
    with command([sys.executable, str(script), description], port, env=env, workdir=tmp_path):
        yield tmp_path / f"server-{port}.out"


def exchange(
    address: tuple[str, int],
    chunks: list[bytes],
    *,
    local: str | None = None,
    tls: ssl.SSLContext | None = None,
    family: int = socket.AF_INET,
) -> tuple[dict[str, Any] | None, Any]:
    """Send ``chunks`` (a pause between them), then the payload; the report (None: closed unserved), own address."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(CEILING)
        if local:
            sock.bind((local, 0))
        sock.connect(address)
        own = sock.getsockname()
        conn: Any = sock
        with contextlib.suppress(ConnectionError):  # a server that closed meanwhile is observed below
            for i, chunk in enumerate(chunks):
                if i:
                    time.sleep(0.05)
                sock.sendall(chunk)
            if tls is not None:
                conn = tls.wrap_socket(sock, server_hostname="localhost")
                conn.sendall(b"over TLS\n")
            else:
                conn.sendall(PAYLOAD)
                half_close(conn)
        data = b""
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            while chunk := conn.recv(65536):
                data += chunk
        return (json.loads(data) if data else None), own


def half_close(sock: socket.socket) -> None:
    """End ``sock``'s sending side; nothing when the server already closed it.

    A server that closes with the payload unread resets the connection: the
    reset may come after ``sendall`` returned and before this call, which then
    fails with ENOTCONN (an OSError, not a ConnectionError): the test reads the
    close that follows, not a traceback of the client.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise


def lines(log: Path, needle: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if needle in line]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    made = self_signed(tmp_path_factory.mktemp("twisted-tls"))
    if made is None:
        pytest.skip("openssl is not installed")
    return made


@pytest.mark.parametrize(
    "name, header, source, destination",
    [
        ("v1-tcp4", proxyproto.encode_v1(REAL_V4, DEST_V4), REAL_V4, DEST_V4),
        ("v1-tcp6", proxyproto.encode_v1(REAL_V6, DEST_V6), REAL_V6, DEST_V6),
        ("v2-inet", proxyproto.encode_v2(REAL_V4, DEST_V4), REAL_V4, DEST_V4),
        ("v2-inet6", proxyproto.encode_v2(REAL_V6, DEST_V6), REAL_V6, DEST_V6),
    ],
)
def test_get_peer_and_get_host_are_the_headers_addresses(
    tmp_path: Path, name: str, header: bytes, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    port = free_port()
    with twisted_server(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port):
        # In one segment with the payload, and cut inside the header (a v2 header's first chunk < 16 bytes).
        for chunks in ([header], [header[:5], header[5:11], header[11:]]):
            seen, _ = exchange(("127.0.0.1", port), chunks)
            assert seen is not None, f"{name}: closed unserved"
            assert seen["peer"] == list(source) and seen["host"] == list(destination), seen
            assert seen["header"] == {"command": "PROXY", "source": list(source)}
            assert bytes.fromhex(seen["payload"]) == PAYLOAD, "payload changed"


def test_an_ipv6_listener_serves_the_real_client(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
    port = free_port()
    header = proxyproto.encode_v2(REAL_V6, DEST_V6)
    with twisted_server(tmp_path, rf"proxyproto:tcp6:{port}:interface=\:\:1", port):
        seen, _ = exchange(("::1", port), [header], family=socket.AF_INET6)
    assert seen is not None and seen["peer"] == list(REAL_V6) and bytes.fromhex(seen["payload"]) == PAYLOAD


def test_behind_real_haproxy_send_proxy_v2_the_client_is_haproxys_client(tmp_path: Path, cert: Certificate) -> None:
    exe = require_haproxy()
    backend, tls_backend, front, tls_front = free_port(), free_port(), free_port(), free_port()
    config = (
        "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 5s\n    timeout server 5s\n\n"
        f"listen plain\n    bind 127.0.0.1:{front}\n    server app 127.0.0.1:{backend} send-proxy-v2\n"
        f"listen passthrough\n    bind 127.0.0.1:{tls_front}\n    server app 127.0.0.1:{tls_backend} send-proxy-v2\n"
    )
    (tmp_path / "haproxy.cfg").write_text(config)
    tls = f"proxyproto:ssl:{tls_backend}:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}"
    with (
        twisted_server(tmp_path, f"proxyproto:tcp:{backend}:interface=127.0.0.1", backend),
        twisted_server(tmp_path, tls, tls_backend),
        command([exe, "-f", str(tmp_path / "haproxy.cfg"), "-db"], tls_front, workdir=tmp_path),
    ):
        seen, own = exchange(("127.0.0.1", front), [], local="127.0.0.2")
        assert seen is not None and seen["peer"] == [own[0], own[1]], seen
        assert bytes.fromhex(seen["payload"]) == PAYLOAD
        # TLS passthrough: haproxy's header in the clear, then the client's own handshake with Twisted.
        seen, own = exchange(("127.0.0.1", tls_front), [], local="127.0.0.2", tls=cert.client_context())
        assert seen is not None and seen["secure"] and seen["peer"] == [own[0], own[1]], seen
        assert bytes.fromhex(seen["payload"]) == b"over TLS\n"


def test_tls_is_negotiated_after_the_header(tmp_path: Path, cert: Certificate) -> None:
    port = free_port()
    description = f"proxyproto:ssl:{port}:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}"
    with twisted_server(tmp_path, description, port) as log:
        for header in (proxyproto.encode_v2(REAL_V4, DEST_V4), proxyproto.encode_v1(REAL_V6, DEST_V6)):
            seen, _ = exchange(("127.0.0.1", port), [header], tls=cert.client_context())
            source = REAL_V4 if b"PROXY" not in header else REAL_V6
            assert seen is not None and seen["secure"] and seen["peer"] == list(source), seen
            assert seen["header"] == {"command": "PROXY", "source": list(source)}
            assert bytes.fromhex(seen["payload"]) == b"over TLS\n"
        # A handshake without the header first: closed, and the line says what to fix.
        with socket.create_connection(("127.0.0.1", port), timeout=CEILING) as sock:
            with contextlib.suppress(ssl.SSLError, OSError):
                cert.client_context().wrap_socket(sock, server_hostname="localhost")
        deadline = time.monotonic() + CEILING
        while not lines(log, "sent a TLS handshake first") and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(lines(log, "sent a TLS handshake first")) == 1


def test_a_client_silent_after_its_header_is_closed_at_the_tls_deadline(tmp_path: Path, cert: Certificate) -> None:
    port = free_port()
    description = (
        f"proxyproto:ssl:{port}:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}:header_timeout=0.5"
    )
    with twisted_server(tmp_path, description, port) as log:
        with socket.create_connection(("127.0.0.1", port), timeout=CEILING) as sock:
            sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4))  # then no ClientHello
            waited = closed_after(sock)
        time.sleep(0.2)
    assert 0.4 <= waited < 5, f"closed after {waited:.2f} s, the deadline being 0.5 s"
    assert len(lines(log, "closed: TLS handshake not done within 0.5 s")) == 1


def test_an_untrusted_peers_header_never_becomes_the_client(tmp_path: Path) -> None:
    port = free_port()
    header = proxyproto.encode_v2(REAL_V4, DEST_V4)
    # The default trust list: loopback's 127.0.0.1 and ::1, not 127.0.0.2.
    with twisted_server(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port) as log:
        seen, own = exchange(("127.0.0.1", port), [header], local="127.0.0.2")
    assert seen is not None and seen["peer"] == [own[0], own[1]] and seen["header"] is None, seen
    assert bytes.fromhex(seen["payload"]) == header + PAYLOAD, "SKIP serves the stream untouched"
    warned = lines(log, "sent a PROXY header but is not trusted")
    assert len(warned) == 1 and warned[0].startswith("WARNING:proxyproto:127.0.0.2:"), warned
    # Told to read and remove such headers (IGNORE), the peer is still served with its own address.
    port = free_port()
    with twisted_server(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1:untrusted_policy=IGNORE", port):
        seen, own = exchange(("127.0.0.1", port), [header], local="127.0.0.2")
    assert seen is not None and seen["peer"] == [own[0], own[1]] and seen["header"] is None, seen
    assert bytes.fromhex(seen["payload"]) == PAYLOAD


def test_a_malformed_header_is_closed_with_one_refusal_line(tmp_path: Path) -> None:
    port = free_port()
    with twisted_server(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port) as log:
        seen, _ = exchange(("127.0.0.1", port), [b"PROXY TCP4 192.0.2.10 198.51.100.20 51234\r\n"])
        assert seen is None
        deadline = time.monotonic() + CEILING
        while not lines(log, ": closed: ") and time.monotonic() < deadline:
            time.sleep(0.05)
    refused = lines(log, ": closed: ")
    assert len(refused) == 1 and refused[0].startswith("WARNING:proxyproto:127.0.0.1:"), refused
    assert "v1:" in refused[0] and f"(listener 127.0.0.1:{port})" in refused[0]
    assert "Traceback" not in log.read_text()


def wait_for_line(log: Path, needle: str) -> list[str]:
    """The log's lines holding ``needle``, once there is one (at most CEILING seconds)."""
    deadline = time.monotonic() + CEILING
    while not lines(log, needle) and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines(log, needle)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (RST), not an orderly end of stream."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_reset_mid_header_is_logged_as_a_read_error_at_info(tmp_path: Path) -> None:
    port = free_port()
    with twisted_server(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port) as log:
        sock = socket.create_connection(("127.0.0.1", port), timeout=CEILING)
        sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4)[:10])
        time.sleep(0.2)
        reset(sock)
        refused = wait_for_line(log, "while reading the PROXY header")
    assert len(refused) == 1 and refused[0].startswith("INFO:proxyproto:127.0.0.1:"), refused
    assert not lines(log, "truncated"), log.read_text()


def test_plain_http_on_a_tls_port_is_logged_as_a_failed_handshake(tmp_path: Path, cert: Certificate) -> None:
    port = free_port()
    description = f"proxyproto:ssl:{port}:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}"
    with twisted_server(tmp_path, description, port) as log:
        seen, _ = exchange(("127.0.0.1", port), [proxyproto.encode_v2(REAL_V4, DEST_V4), b"GET / HTTP/1.0\r\n\r\n"])
        assert seen is None
        refused = wait_for_line(log, "closed: TLS handshake failed: ")
    assert len(refused) == 1 and refused[0].startswith("INFO:proxyproto:127.0.0.1:"), refused
    assert "http request" in refused[0], refused  # OpenSSL's own reason: plain HTTP where TLS was due
    assert not lines(log, "closed cleanly"), log.read_text()


def test_tls_after_the_header_refuses_a_twisted_whose_tls_layer_hides_its_handshake_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read with a default, a renamed flag would count every handshake as done: no TLS deadline, silently."""
    from twisted.internet import protocol
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from proxyproto.twisted import ProxyProtocolFactory

    app = protocol.Factory.forProtocol(protocol.Protocol)
    ProxyProtocolFactory(app, ssl=CertificateOptions())  # today's Twisted: accepted
    monkeypatch.delattr(TLSMemoryBIOProtocol, "_handshakeDone")
    with pytest.raises(RuntimeError, match="TLSMemoryBIOProtocol has no _handshakeDone"):
        ProxyProtocolFactory(app, ssl=CertificateOptions())
    ProxyProtocolFactory(app)  # without ssl= the TLS layer is not used: nothing to check


def closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes ``sock`` (EOF or reset), sending nothing."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    return time.monotonic() - start


def test_a_silent_client_is_closed_at_its_deadline(tmp_path: Path) -> None:
    port = free_port()
    description = f"proxyproto:tcp:{port}:interface=127.0.0.1:header_timeout=0.5"
    with twisted_server(tmp_path, description, port) as log:
        with socket.create_connection(("127.0.0.1", port), timeout=CEILING) as silent:
            waited = closed_after(silent)
        time.sleep(0.2)
    assert 0.4 <= waited < 5, f"closed after {waited:.2f} s, the deadline being 0.5 s"
    assert len(lines(log, "closed: no PROXY header within 0.5 s")) == 1


def test_past_max_pending_the_oldest_waiting_connection_is_closed(tmp_path: Path) -> None:
    port = free_port()
    with twisted_server(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1:max_pending=2", port) as log:
        first = socket.create_connection(("127.0.0.1", port), timeout=CEILING)
        time.sleep(0.2)
        others = [socket.create_connection(("127.0.0.1", port), timeout=CEILING) for _ in range(2)]
        try:
            assert closed_after(first) < 5
            seen, _ = exchange(("127.0.0.1", port), [proxyproto.encode_v1(REAL_V4, DEST_V4)])
            assert seen is not None and seen["peer"] == list(REAL_V4)  # evicting one more, still serving
        finally:
            for sock in [first, *others]:
                sock.close()
    assert lines(log, "closed: 2 connections already wait for their header (max_pending)")


def test_sigint_with_connections_waiting_for_their_header_returns_promptly(tmp_path: Path) -> None:
    port = free_port()
    with twisted_server(tmp_path, f"proxyproto:tcp:{port}:interface=127.0.0.1", port):
        parked = [socket.create_connection(("127.0.0.1", port), timeout=CEILING) for _ in range(5)]
        parked[0].sendall(proxyproto.encode_v2(REAL_V4, DEST_V4)[:10])  # and one with half a header
        time.sleep(0.2)
        start = time.monotonic()
    # twisted_server's exit sends SIGINT (the reactor's graceful stop) and waits for the process.
    took = time.monotonic() - start
    try:
        assert took < 5, f"the server took {took:.1f} s to stop with 5 connections waiting (header_timeout 10 s)"
        for sock in parked:
            assert closed_after(sock) < 1
    finally:
        for sock in parked:
            sock.close()


def test_a_unix_listener_trusts_its_peers_only_behind_a_socket_file_that_is_not_world_writable(tmp_path: Path) -> None:
    header = proxyproto.encode_v2(REAL_V4, DEST_V4)
    unix_header = proxyproto.encode_v2("/run/real-client.sock", "/run/listener.sock")
    script = tmp_path / "report_server.py"
    script.write_text(SERVER)

    def send_unix(path: Path, header: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(CEILING)
            sock.connect(str(path))
            sock.sendall(header + PAYLOAD)
            sock.shutdown(socket.SHUT_WR)
            return dict(json.loads(b"".join(iter(lambda: sock.recv(65536), b""))))

    for mode, trusted in (("600", True), ("666", False)):
        path = tmp_path / f"srv-{mode}.sock"
        out = open(tmp_path / f"unix-{mode}.out", "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, str(script), f"proxyproto:unix:{path}:mode={mode}"], stdout=out,
                                stderr=out, env=env)
        try:
            deadline = time.monotonic() + CEILING
            while not path.exists():
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / f"unix-{mode}.out").read_text()
                time.sleep(0.05)
            seen, *unix_seen = (send_unix(path, h) for h in (header, unix_header))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(CEILING)
            out.close()
        if trusted:
            assert seen["peer"] == list(REAL_V4) and bytes.fromhex(seen["payload"]) == PAYLOAD, seen
            # A UNIX-family header on a UNIX listener: getPeer() and getHost() are its UNIXAddress pair.
            assert unix_seen[0]["peer"] == ["UNIXAddress", "/run/real-client.sock"], unix_seen
            assert unix_seen[0]["host"] == ["UNIXAddress", "/run/listener.sock"], unix_seen
        else:  # anyone on the host may connect: the default trust list does not cover it (SKIP)
            assert seen["peer"][0] == "UNIXAddress" and bytes.fromhex(seen["payload"]) == header + PAYLOAD, seen


ENDPOINT_PROBE = r"""
import json, sys
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor

reactor = MemoryReactor()
try:
    endpoint = serverFromString(reactor, sys.argv[1])
except ValueError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit
endpoint.listen(Factory.forProtocol(Protocol))
s = endpoint.settings
print(json.dumps({
    "trusted": s.trusted.names(), "policy": s.policy.name, "untrusted_policy": s.untrusted_policy.name,
    "header_timeout": s.header_timeout, "max_pending": s.max_pending, "tls": endpoint.ssl is not None,
    "tcp": [(port, interface) for port, _, _, interface in reactor.tcpServers], "ssl": len(reactor.sslServers),
}))
"""


def probe_endpoint(description: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """What ``serverFromString(MemoryReactor(), description)`` gives, in a fresh interpreter (the plugin as usual)."""
    result = subprocess.run(
        [sys.executable, "-c", ENDPOINT_PROBE, description], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_endpoint_options_set_the_knobs_over_the_environment(cert: Certificate) -> None:
    seen = probe_endpoint(
        r"proxyproto:tcp:8000:interface=127.0.0.1:trusted=10.0.0.0/8,127.0.0.1,\:\:1:untrusted_policy=IGNORE"
        ":header_timeout=2.5",
        {"PROXYPROTO_MAX_PENDING": "7", "PROXYPROTO_HEADER_TIMEOUT": "9"},
    )
    assert seen["trusted"] == ["10.0.0.0/8", "127.0.0.1/32", "::1/128"] and seen["untrusted_policy"] == "IGNORE"
    assert seen["header_timeout"] == 2.5 and seen["max_pending"] == 7  # the string first, then PROXYPROTO_*
    assert seen["tcp"] == [[8000, "127.0.0.1"]] and not seen["tls"]
    # ssl: listens on plain TCP (the TLS layer above the header), with Twisted's own certificate options.
    seen = probe_endpoint(f"proxyproto:ssl:8443:interface=127.0.0.1:privateKey={cert.key}:certKey={cert.cert}")
    assert seen["tcp"] == [[8443, "127.0.0.1"]] and seen["ssl"] == 0 and seen["tls"]
    assert seen["trusted"] == ["127.0.0.1/32", "::1/128"] and seen["policy"] == "REQUIRE"  # the defaults


@pytest.mark.parametrize(
    "description, words",
    [
        ("proxyproto:tcp:8000:policy=MAYBE", "proxyproto endpoint option policy: 'MAYBE' is not a policy"),
        ("proxyproto:tcp:8000:trusted=10.0.0.0/33", "proxyproto endpoint option trusted: cannot read"),
        ("proxyproto:tcp:8000:untrusted_policy=USE", "proxyproto endpoint option untrusted_policy: USE and REQUIRE"),
        ("proxyproto:tcp:8000:max_pending=0", "proxyproto endpoint option max_pending: must be an integer"),
        ("proxyproto:tcp:8000:verify_checksum=maybe", "proxyproto endpoint option verify_checksum: not a boolean"),
        # Twisted keeps the last of a repeated option: appended to a template, this one would trust every peer.
        ("proxyproto:tcp:8000:trusted=10.0.0.0/8:trusted=*", "endpoint option trusted: given more than once"),
        (r"proxyproto:tcp:8000:interface=127.0.0.1:interface=\:\:", "option interface: given more than once"),
    ],
)
def test_an_invalid_endpoint_option_is_refused_before_listening_naming_it(description: str, words: str) -> None:
    assert words in probe_endpoint(description)["error"]


FACTORY_SERVER = r"""
import signal, sys
from twisted.internet import protocol, reactor
from proxyproto.twisted import ProxyProtocolFactory

factory = ProxyProtocolFactory(protocol.Factory.forProtocol(protocol.Protocol), trusted="127.0.0.1")
ports = [reactor.listenTCP(int(p), factory, interface="127.0.0.1") for p in sys.argv[1:]]
signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(lambda: [p.stopListening() for p in ports]))
reactor.run()
"""


def test_stopping_the_factorys_ports_closes_its_waiting_connections_at_once(tmp_path: Path) -> None:
    """``reactor.listenTCP`` with a ProxyProtocolFactory on two ports: when both stop, no waiting connection is left."""
    script = tmp_path / "factory_server.py"
    script.write_text(FACTORY_SERVER)
    first, second = free_port(), free_port()
    with command([sys.executable, str(script), str(first), str(second)], second, workdir=tmp_path) as proc:
        deadline = time.monotonic() + CEILING
        while not tcp_listening(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = [socket.create_connection(("127.0.0.1", port), timeout=CEILING) for port in (first, second, first)]
        try:
            waiting[0].sendall(proxyproto.encode_v1(REAL_V4, DEST_V4)[:9])
            time.sleep(0.2)
            proc.send_signal(signal.SIGUSR1)
            for sock in waiting:
                assert closed_after(sock) < 2  # header_timeout is 10 s: only the stop closes them
            assert proc.poll() is None, "the reactor keeps running"
        finally:
            for sock in waiting:
                sock.close()


def test_importing_the_adapter_installs_no_reactor() -> None:
    code = "import sys, proxyproto.twisted; print('twisted.internet.reactor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"  # Daphne installs its own reactor after importing its modules


def test_the_plugin_directory_never_shadows_the_twisted_package() -> None:
    plugins = ROOT / "twisted" / "plugins"
    assert (plugins / "proxyproto_endpoints.py").is_file()
    assert not (ROOT / "twisted" / "__init__.py").exists() and not (plugins / "__init__.py").exists()
    code = (
        "import twisted, twisted.plugins, proxyproto, sys; "
        "print(twisted.__file__); print(list(twisted.plugins.__path__)); "
        "print('twisted.internet' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout.splitlines()
    assert out[0].endswith(os.path.join("twisted", "__init__.py")) and not out[0].startswith(str(ROOT)), out
    assert str(plugins) in out[1], "Twisted does not look in the repository's twisted/plugins"


# -- docs/twisted.rst: every example runs as written, only the port changed ----------------------------

PAGE = ROOT / "docs" / "twisted.rst"


def block(name: str) -> str:
    """The page's ``.. code-block::`` with ``:name: <name>``, dedented."""
    match = re.search(
        r"^\.\. code-block:: \w+\n   :name: " + re.escape(name) + r"\n\n((?:(?:    .*)?\n)+)",
        PAGE.read_text(),
        re.MULTILINE,
    )
    assert match, f"no block named {name} in {PAGE}"
    return "\n".join(line[4:] for line in match.group(1).splitlines()).strip() + "\n"


def shell_line(name: str, ports: dict[str, int]) -> tuple[list[str], dict[str, str], int]:
    """A page's ``daphne`` line as argv (this interpreter's ``-m daphne``), its ``VAR=value`` prefixes, its port."""
    line = block(name).strip()
    for old, new in ports.items():
        line = line.replace(f":{old}:", f":{new}:")
    words = shlex.split(line)
    env = {}
    while re.match(r"^[A-Z_]+=", words[0]):
        variable, _, value = words.pop(0).partition("=")
        env[variable] = value
    assert words[0] == "daphne", line
    port = next(new for old, new in ports.items() if f":{new}:" in line)
    return [sys.executable, "-m", "daphne", *words[1:]], env, port


def test_docs_daphne_examples_serve_the_real_client(
    tmp_path: Path, cert: Certificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_module("daphne")
    from support import run_on
    from web_kit import get

    monkeypatch.chdir(tmp_path)  # the reader's directory: app.py, key.pem and cert.pem are there
    (tmp_path / "app.py").write_text(block("asgi-app"))
    shutil.copy(cert.key, tmp_path / "key.pem")
    shutil.copy(cert.cert, tmp_path / "cert.pem")
    ports = {"8000": free_port(), "8443": free_port()}
    pythonpath = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    header = proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=[proxyproto.TLV(proxyproto.TLVType.AUTHORITY, b"app.example")])
    hello = {"raw": f"Hello, {REAL_V4[0]} (app.example)\n"}

    def answers(port: int, expected: dict[str, str], **kwargs: Any) -> None:
        async def scenario() -> None:
            assert await get(("127.0.0.1", port), header, **kwargs) == (200, expected)

        run_on("asyncio", scenario)

    for name, tls in (("daphne-example", None), ("daphne-tls", cert.client_context())):
        args, env, port = shell_line(name, ports)
        with command(args, port, env={**env, **pythonpath}, workdir=tmp_path):
            answers(port, hello, tls=tls)
    args, env, port = shell_line("daphne-options", ports)
    assert env == {"PROXYPROTO_HEADER_TIMEOUT": "5"}
    with command(args, port, env={**env, **pythonpath}, workdir=tmp_path):
        answers(port, hello)
        # 127.0.0.2 is not in trusted=: its header is read and removed (IGNORE), its own address served, and
        # the application never sees that header.
        answers(port, {"raw": "Hello, 127.0.0.2 (no authority)\n"}, local="127.0.0.2")


@pytest.mark.parametrize(
    "name, answer",
    [("twisted-endpoint-example", f"Hello, {REAL_V4[0]}\n"), ("twisted-code-example", f"Hello, {REAL_V4[0]} (v2)\n")],
)
def test_docs_twisted_examples_greet_the_real_client(tmp_path: Path, name: str, answer: str) -> None:
    port = free_port()
    script = tmp_path / f"{name}.py"
    script.write_text(block(name).replace("8000", str(port)))
    with command(python_script(script), port, workdir=tmp_path):
        with socket.create_connection(("127.0.0.1", port), timeout=CEILING) as sock:
            sock.sendall(proxyproto.encode_v2(REAL_V4, DEST_V4))
            got = b""
            while not got.endswith(b"\n"):
                chunk = sock.recv(1024)
                assert chunk, got
                got += chunk
    assert got.decode() == answer
