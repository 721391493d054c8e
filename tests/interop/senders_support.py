"""Helpers for the tests against the other PROXY senders Debian ships: dnsdist, stunnel, hitch, varnish, h2o.

What ``interop_support`` does for haproxy and nginx (start from a generated
configuration, wait for LISTEN in the kernel's tables, stop by PID, fail under
``CI=true`` when a program is missing), done here for programs that fork:
hitch runs its TLS workers as children, varnishd a cache child, h2o a crash
handler.  Each program is started in a session of its own, so stopping it
can end, by PID, whatever it left behind in that session.

The configuration writers are plain functions, so the script that made the
captures in ``tests/vectors/`` and the tests use the same configurations.
Each test module starts its program once (a module fixture) and its tests
tell their connections apart by clearing the backend's records first.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interop_support import STARTED, ManagedProcess, is_listening, require_program, wait_until

import proxyproto
from proxyproto import udp

#: Generous bounds: varnishd compiles its VCL with cc before it listens, on a
#: loaded two-core machine; a healthy start takes well under a second.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
WAIT_TIMEOUT = 10.0

#: Every sender started through :func:`start_program`, for the leftover check.
SENDERS: list[Program] = []


# --- processes --------------------------------------------------------------------------


def _session_members(sid: int) -> list[int]:
    """PIDs of live (not zombie) processes in session ``sid``, from ``/proc``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces, so split after its ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry))
    return members


@dataclass
class Program(ManagedProcess):
    """A sender started in its own session: stopping it ends its children too."""

    def children_alive(self) -> list[int]:
        """Processes still running in the session this program was started in (itself included)."""
        return _session_members(self.pid)

    def stop(self) -> None:
        """SIGTERM the program by PID, then, by PID, whatever it forked and left running."""
        super().stop()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self.children_alive()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if not left or wait_until(lambda: not self.children_alive(), STOP_TIMEOUT):
                return


def udp_bound(port: int) -> bool:
    """Whether some UDP socket is bound to ``port``, from the kernel's tables."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)
                if any(int(line.split()[1].rsplit(":", 1)[1], 16) == port for line in f):
                    return True
        except FileNotFoundError:
            continue
    return False


def start_program(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    *,
    tcp: Iterable[Any] = (),
    udp_ports: Iterable[int] = (),
    logs: Sequence[Path] = (),
) -> Program:
    """Start ``argv`` in a new session and wait until its TCP ports listen and UDP ports are bound."""
    n = sum(1 for p in SENDERS if p.name == name)
    stdout_path = workdir / f"{name}{n}.stdout"
    stderr_path = workdir / f"{name}{n}.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir, start_new_session=True
        )
    proc = Program(name, popen, workdir, stdout_path, stderr_path, list(logs))
    STARTED.append(proc)
    SENDERS.append(proc)
    tcp_targets, udp_targets = list(tcp), list(udp_ports)

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{name} exited with {proc.popen.returncode}:\n{proc.output()}")
        return all(is_listening(t) for t in tcp_targets) and all(udp_bound(p) for p in udp_targets)

    try:
        if not wait_until(ready, START_TIMEOUT, interval=0.05):
            raise AssertionError(f"{name} not listening on {tcp_targets} {udp_targets}:\n{proc.output()}")
    except BaseException:
        proc.stop()
        raise
    return proc


def leftover_senders() -> list[str]:
    """Senders (or their children) still running: must be empty once their modules ended."""
    return [f"{p.name} pid={p.pid} session members {p.children_alive()}" for p in SENDERS if p.children_alive()]


@contextlib.contextmanager
def module_workdir(prefix: str) -> Iterator[Path]:
    """A short temporary directory, readable by the unprivileged users hitch, varnish and h2o switch to."""
    d = Path(tempfile.mkdtemp(prefix=f"ppi-{prefix}-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 and ::1 for both TCP and UDP right now."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            for family, kind, host in (
                (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
                (socket.AF_INET6, socket.SOCK_STREAM, "::1"),
                (socket.AF_INET6, socket.SOCK_DGRAM, "::1"),
            ):
                with socket.socket(family, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        if port not in ports:
            ports.append(port)
    return ports


# --- certificates ---------------------------------------------------------------------------


@dataclass
class SelfSigned:
    """A self-signed server certificate made at test time with the openssl CLI."""

    cert: Path
    key: Path
    pem: Path  # certificate and key in one file, as hitch and stunnel take them
    name: str


def self_signed(directory: Path, name: str = "sni.proxyproto.test") -> SelfSigned:
    """``openssl req -x509 -newkey rsa:2048 -nodes``: a certificate for ``name``, localhost and the loopbacks."""
    openssl = require_program("openssl")
    cert, key, pem = directory / "server.crt", directory / "server.key", directory / "server.pem"
    args = "req -x509 -newkey rsa:2048 -nodes -sha256 -days 2".split()
    san = f"subjectAltName=DNS:{name},DNS:localhost,IP:127.0.0.1,IP:::1"
    res = subprocess.run(
        [openssl, *args, "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}", "-addext", san],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, f"openssl req failed:\n{res.stderr}"
    pem.write_text(cert.read_text() + key.read_text())
    for p in (key, pem):
        p.chmod(0o600)  # stunnel warns about a private key others may read
    return SelfSigned(cert, key, pem, name)


# --- backends: the library's servers, recording what each handler saw ----------------------


@dataclass
class Seen:
    """One handler run: the address it was given, the header, the socket's (or datagram's) peer, the payload."""

    client_address: Any
    header: proxyproto.ProxyHeader | None
    peer: Any
    payload: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Backend:
    """A ``socketserver`` server in a thread, handlers appending :class:`Seen` to ``self.seen``."""

    def __init__(self, base: type, address: Any, handler: type, **attrs: Any) -> None:
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        backend = self

        def handle_error(server: Any, request: Any, client_address: Any) -> None:
            backend.errors.append(traceback.format_exc())

        namespace = {"daemon_threads": True, "address_family": _family(address[0]), "handle_error": handle_error}
        cls = type(f"{base.__name__}Backend", (base,), {**namespace, **attrs})
        self.server = cls(address, handler)
        self.server.backend = self
        self.address: tuple[str, int] = tuple(self.server.server_address[:2])  # type: ignore[assignment]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def clear(self) -> None:
        self.seen.clear()
        self.errors.clear()

    def wait(self, count: int, predicate: Callable[[Seen], bool] = lambda s: True) -> list[Seen]:
        """At least ``count`` records satisfying ``predicate`` (fails after a generous bound)."""
        wait_until(lambda: len([s for s in list(self.seen) if predicate(s)]) >= count, WAIT_TIMEOUT)
        found = [s for s in list(self.seen) if predicate(s)]
        assert len(found) >= count, f"expected {count} handler runs, saw {self.seen}; errors {self.errors}"
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "serve_forever did not stop"


class LineHandler(socketserver.BaseRequestHandler):
    """Reads one line, records it, answers ``client_address=<repr>``: the far client learns what we saw."""

    def handle(self) -> None:
        seen = Seen(self.client_address, getattr(self.request, "proxy_header", None), self.request.getpeername())
        self.request.settimeout(WAIT_TIMEOUT)
        while b"\n" not in seen.payload and len(seen.payload) < 65536:
            chunk = self.request.recv(4096)
            if not chunk:
                break
            seen.payload += chunk
        self.server.backend.seen.append(seen)  # type: ignore[attr-defined]
        self.request.sendall(b"client_address=" + repr(self.client_address).encode() + b"\n")


def line_backend(host: str = "127.0.0.1", **attrs: Any) -> Backend:
    """``ThreadingProxyTCPServer`` with :class:`LineHandler`; ``attrs`` set ``proxy_*`` class attributes."""
    return Backend(proxyproto.ThreadingProxyTCPServer, (host, 0), LineHandler, **attrs)


class WhoHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler answering JSON: the address it saw, the header's version and source."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        header = getattr(self.request, "proxy_header", None)
        self.server.backend.seen.append(  # type: ignore[attr-defined]
            Seen(self.client_address, header, self.request.getpeername(), self.path.encode())
        )
        body = json.dumps({"client_address": list(self.client_address), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ProxyHTTPServer(proxyproto.ProxyProtocolMixin, http.server.ThreadingHTTPServer):
    """The retrofit of ``http.server`` the README shows: one more base class."""


def http_backend(host: str = "127.0.0.1") -> Backend:
    return Backend(ProxyHTTPServer, (host, 0), WhoHandler)


# --- TLS clients -------------------------------------------------------------------------


@dataclass
class TLSResult:
    """What a TLS client saw of its own connection: the truth a header's TLVs must reproduce."""

    own: Any  # the TCP socket's own address
    version: str
    cipher: str
    alpn: str | None
    reply: bytes


def tls_exchange(
    address: tuple[str, int],
    payload: bytes,
    *,
    cert: SelfSigned,
    alpn: Sequence[str] = (),
    source: Any = None,
    tls12: bool = False,
) -> TLSResult:
    """Connect over TLS with SNI ``cert.name`` (verifying the certificate), send a line, read one line back."""
    ctx = ssl.create_default_context(cafile=str(cert.cert))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    raw = socket.socket(_family(address[0]), socket.SOCK_STREAM)
    raw.settimeout(WAIT_TIMEOUT)
    if source is not None:
        raw.bind(source)
    raw.connect(address)
    with ctx.wrap_socket(raw, server_hostname=cert.name) as tls:
        tls.sendall(payload)
        reply = b""
        while b"\n" not in reply:
            chunk = tls.recv(4096)
            if not chunk:
                break
            reply += chunk
        cipher = tls.cipher()
        return TLSResult(
            tls.getsockname(), str(tls.version()), cipher[0] if cipher else "", tls.selected_alpn_protocol(), reply
        )


def line_exchange(address: tuple[str, int], payload: bytes, *, source: Any = None) -> tuple[Any, bytes]:
    """Plain TCP: connect (from ``source``), send a line, read one line back; (own address, reply)."""
    with socket.socket(_family(address[0]), socket.SOCK_STREAM) as s:
        s.settimeout(WAIT_TIMEOUT)
        if source is not None:
            s.bind(source)
        s.connect(address)
        s.sendall(payload)
        reply = b""
        while b"\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        return s.getsockname(), reply


# --- DNS, by hand (RFC 1035), for dnsdist ----------------------------------------------------

TYPE_A = 1
TYPE_TXT = 16


def dns_query(name: str, qtype: int = TYPE_TXT, ident: int = 0x4242) -> bytes:
    """A standard query with RD set: header, one question."""
    labels = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.strip(".").split("."))
    return struct.pack("!6H", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def dns_question(message: bytes) -> tuple[int, str, int, int]:
    """(id, qname, qtype, end of the question section) of a message with one uncompressed question."""
    ident = struct.unpack_from("!H", message)[0]
    pos, labels = 12, []
    while message[pos]:
        labels.append(message[pos + 1 : pos + 1 + message[pos]].decode("ascii"))
        pos += 1 + message[pos]
    qtype = struct.unpack_from("!H", message, pos + 1)[0]
    return ident, ".".join(labels), qtype, pos + 5


def dns_answer(query: bytes, text: str | None) -> bytes:
    """The response to ``query``: one TXT record holding ``text`` (a pointer to the question's name), or none."""
    ident, _name, _qtype, end = dns_question(query)
    answers = 0 if text is None else 1
    head = struct.pack("!6H", ident, 0x8180, 1, answers, 0, 0)
    if text is None:
        return head + query[12:end]
    data = text.encode()
    rdata = bytes([len(data)]) + data
    return head + query[12:end] + struct.pack("!HHHIH", 0xC00C, TYPE_TXT, 1, 0, len(rdata)) + rdata


def dns_txt(response: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, texts) of a response built like :func:`dns_answer` (answers point at the question)."""
    ident, flags, _qd, ancount = struct.unpack_from("!4H", response)
    pos = dns_question(response)[3]
    texts = []
    for _ in range(ancount):
        _ptr, rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHHIH", response, pos)
        pos += 12
        if rtype == TYPE_TXT:
            texts.append(response[pos + 1 : pos + 1 + response[pos]].decode())
        pos += rdlen
    return ident, flags & 0x0F, texts


def answer_for(client_address: Any, query: bytes) -> bytes:
    """What the DNS backend answers: the address its handler saw as a TXT record (NODATA for other types)."""
    qtype = dns_question(query)[2]
    return dns_answer(query, repr(client_address) if qtype == TYPE_TXT else None)


class PlainDNSDatagramHandler(socketserver.DatagramRequestHandler):
    """One DNS query per datagram, written for plain ``socketserver``: ``finish()`` answers ``client_address``."""

    def handle(self) -> None:
        query = self.rfile.read()
        header = self.request.proxy_header
        extra = {"transport": "udp", "qname": dns_question(query)[1]}
        self.server.backend.seen.append(  # type: ignore[attr-defined]
            Seen(self.client_address, header, self.request.proxy_address, query, extra)
        )
        self.wfile.write(answer_for(self.client_address, query))


class DNSDatagramHandler(PlainDNSDatagramHandler, udp.ProxyDatagramRequestHandler):
    """The same, with the library's handler: the reply goes back to the proxy (``proxy_address``) by name."""


class DNSStreamHandler(socketserver.BaseRequestHandler):
    """DNS over TCP: length-prefixed queries, answered in turn until the proxy closes."""

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.request.recv(n - len(data))
            if not chunk:
                return b""
            data += chunk
        return data

    def handle(self) -> None:
        self.request.settimeout(WAIT_TIMEOUT)
        header = getattr(self.request, "proxy_header", None)
        connection = id(self)
        with contextlib.suppress(OSError):
            for index in range(64):
                prefix = self._read(2)
                if not prefix:
                    return
                query = self._read(struct.unpack("!H", prefix)[0])
                extra = {"transport": "tcp", "qname": dns_question(query)[1], "connection": connection, "index": index}
                self.server.backend.seen.append(  # type: ignore[attr-defined]
                    Seen(self.client_address, header, self.request.getpeername(), query, extra)
                )
                reply = answer_for(self.client_address, query)
                self.request.sendall(struct.pack("!H", len(reply)) + reply)


class DNSBackend:
    """The library's UDP and TCP servers on one port of 127.0.0.1, as a DNS server behind dnsdist."""

    def __init__(self, datagram_handler: type = DNSDatagramHandler) -> None:
        for _attempt in range(50):
            self.udp = Backend(udp.ThreadingProxyUDPServer, ("127.0.0.1", 0), datagram_handler)
            try:
                self.tcp = Backend(proxyproto.ThreadingProxyTCPServer, self.udp.address, DNSStreamHandler)
            except OSError:  # the TCP side of that port is taken: try another
                self.udp.close()
                continue
            self.tcp.seen = self.udp.seen  # one list, in arrival order
            self.tcp.errors = self.udp.errors
            self.address = self.udp.address
            return
        raise AssertionError("no port free for both UDP and TCP")

    @property
    def seen(self) -> list[Seen]:
        return self.udp.seen

    @property
    def errors(self) -> list[str]:
        return self.udp.errors

    def wait(self, count: int, predicate: Callable[[Seen], bool] = lambda s: True) -> list[Seen]:
        return self.udp.wait(count, predicate)

    def clear(self) -> None:
        self.udp.clear()

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


def udp_dns(address: tuple[str, int], query: bytes, *, source: Any = None) -> tuple[Any, bytes]:
    """Send one query over UDP, return (own address, response)."""
    with socket.socket(_family(address[0]), socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT_TIMEOUT)
        s.bind(source or (address[0], 0))
        s.sendto(query, address)
        return s.getsockname(), s.recv(65535)


# --- configurations ----------------------------------------------------------------------


def dnsdist_config(listen: Sequence[str], backend: tuple[str, int]) -> str:
    """Listeners, one PROXY v2 backend, custom TLVs for query names holding "tlv", no calls out."""
    lines = ['setSecurityPollSuffix("")', f'setLocal("{listen[0]}")']
    lines += [f'addLocal("{address}")' for address in listen[1:]]
    lines += [
        f'newServer({{address="{backend[0]}:{backend[1]}", useProxyProtocol=true}})',
        'addAction(RegexRule("tlv"), SetProxyProtocolValuesAction({[0xE0]="hello", [2]="authority.example"}))',
    ]
    return "\n".join(lines) + "\n"


def stunnel_config(services: dict[str, tuple[str, tuple[str, int]]], pem: Path) -> str:
    """stunnel in the foreground, no PID file, one ``protocol = proxy`` service per ``{name: (accept, connect)}``."""
    out = ["foreground = yes", "pid =", "syslog = no", ""]
    for name, (accept, connect) in services.items():
        out += [f"[{name}]", f"accept = {accept}", f"connect = {connect[0]}:{connect[1]}"]
        out += ["protocol = proxy", f"cert = {pem}", ""]
    return "\n".join(out)


def hitch_config(frontends: Sequence[str], backend: tuple[str, int], pem: Path, version: int) -> str:
    """hitch in the foreground, one worker, ALPN h2 and http/1.1, PROXY v1 or v2 to ``backend``."""
    out = [f'frontend = "{f}"' for f in frontends]
    out += [
        f'backend = "[{backend[0]}]:{backend[1]}"',
        f'pem-file = "{pem}"',
        "daemon = off",
        "workers = 1",
        'alpn-protos = "h2,http/1.1"',
        f"write-proxy-v{version} = on",
    ]
    return "\n".join(out) + "\n"


def varnish_vcl(backend: tuple[str, int]) -> str:
    """Two backends on the same server, one per PROXY version, chosen by path; nothing cached."""
    return f"""vcl 4.1;
backend pp1 {{ .host = "{backend[0]}"; .port = "{backend[1]}"; .proxy_header = 1; }}
backend pp2 {{ .host = "{backend[0]}"; .port = "{backend[1]}"; .proxy_header = 2; }}
sub vcl_recv {{
    if (req.url ~ "^/v1/") {{ set req.backend_hint = pp1; }} else {{ set req.backend_hint = pp2; }}
    return (pass);
}}
"""


def h2o_config(listen: Sequence[tuple[str, int]], backend: tuple[str, int], error_log: Path) -> str:
    """h2o reverse proxy with ``proxy.proxy-protocol: ON`` (which needs upstream keep-alive off); no PID file."""
    out = []
    for host, port in listen:
        out += ["listen:", f'  host: "{host}"', f"  port: {port}"]
    out += [
        f"error-log: {error_log}",
        "hosts:",
        "  default:",
        "    paths:",
        "      /:",
        f"        proxy.reverse.url: http://{backend[0]}:{backend[1]}/",
        "        proxy.proxy-protocol: ON",
        "        proxy.timeout.keepalive: 0",
    ]
    return "\n".join(out) + "\n"
