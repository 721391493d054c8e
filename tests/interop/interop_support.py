"""Helpers for the interoperability suite: real processes, free ports, tiny servers.

Everything here runs on loopback (127.0.0.0/8, ::1, UNIX sockets), picks its
ports at run time and stops only the processes it started, by PID.  The
fixtures in ``conftest.py`` wrap these helpers; the tests import the plain
functions and classes directly.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import pytest

IN_CI = os.environ.get("CI") == "true"

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# Bounds for waiting on real processes.  Generous: a loaded CI machine with two
# cores must never flake, while a healthy run finishes each wait in milliseconds.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
LOG_TIMEOUT = 5.0

#: Every process the suite started, so a session-end check can prove none survived.
STARTED: list[ManagedProcess] = []

#: A socket address as the socket module gives it: ``(host, port[, ...])`` or a UNIX path.
Address = Union[tuple, str]
#: What a process must be listening on: a TCP port, ``(host, port)`` or a UNIX path.
ListenTarget = Union[int, tuple, str]


def missing(reason: str) -> None:
    """Skip locally, fail under CI: CI must never pass by skipping an interop test."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing program is a failure)", pytrace=False)
    pytest.skip(reason)


def require_program(name: str) -> str:
    """Return the absolute path of ``name``, or skip/fail the test when it is absent."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        missing(f"{name} is not installed")
    assert path is not None
    return path


def require_file(path: str, what: str) -> str:
    """Like :func:`require_program`, for a file such as the nginx stream module."""
    if not os.path.exists(path):
        missing(f"{what} not found at {path}")
    return path


def ipv6_loopback_available() -> bool:
    """True when ::1 can be bound (some containers run without IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def require_ipv6() -> None:
    """Skip (or fail under CI) a test that needs the IPv6 loopback."""
    if not ipv6_loopback_available():
        missing("IPv6 loopback ::1 is not available")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host``, found by binding port 0.

    The port is released before it is returned, so a race with another program
    is possible in principle; the kernel hands out ephemeral ports round-robin,
    which makes an immediate reuse unlikely.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- readiness without side effects --------------------------------------------------
#
# Probing a frontend by connecting to it would make haproxy or nginx open an
# upstream connection and send a PROXY header to the server under test, which
# would then record a phantom client.  The kernel's socket tables say whether a
# port is in LISTEN state without touching it.


def _tcp_listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


def _unix_listening_paths() -> set[str]:
    paths: set[str] = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                # Flags column: __SO_ACCEPTCON (0x10000) marks a listening socket.
                if len(parts) >= 8 and int(parts[3], 16) & 0x10000:
                    paths.add(parts[7])
    except FileNotFoundError:
        pass
    return paths


def is_listening(target: ListenTarget) -> bool:
    """True when a TCP port (int or ``(host, port)``) or UNIX path is listening."""
    if isinstance(target, str):
        if not os.path.exists(target):
            return False
        if not os.path.exists("/proc/net/unix"):
            return True
        # haproxy binds "PATH.<pid>.tmp", listens, then renames it to PATH; the
        # kernel's table keeps the name the socket was bound with.
        return any(p == target or p.startswith(target + ".") for p in _unix_listening_paths())
    port = target if isinstance(target, int) else target[1]
    if os.path.exists("/proc/net/tcp"):
        return port in _tcp_listening_ports()
    host = "127.0.0.1" if isinstance(target, int) else target[0]
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


# --- managed processes ------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """A real haproxy or nginx process, its output files and its fate."""

    name: str
    popen: subprocess.Popen
    workdir: Path
    stdout_path: Path
    stderr_path: Path
    extra_logs: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process wrote so far: stdout, stderr and its log files."""
        chunks = []
        for p in (self.stdout_path, self.stderr_path, *self.extra_logs):
            try:
                chunks.append(p.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "\n".join(chunks)

    def log_lines(self) -> list[str]:
        return [line for line in self.output().splitlines() if line.strip()]

    def wait_for_log(self, predicate: Callable[[str], bool], timeout: float = LOG_TIMEOUT) -> str:
        """Return the first log line satisfying ``predicate``; fail after ``timeout``."""
        found: list[str] = []

        def check() -> bool:
            found[:] = [line for line in self.log_lines() if predicate(line)]
            return bool(found)

        if not wait_until(check, timeout):
            raise AssertionError(f"{self.name}: no matching log line within {timeout}s:\n{self.output()}")
        return found[0]

    def stop(self) -> None:
        """SIGTERM this PID, SIGKILL after a bounded wait, and reap it."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)


class ProcessRunner:
    """Writes generated configs, starts real proxies, stops them by PID at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[ManagedProcess] = []

    def _start(
        self,
        name: str,
        argv: Sequence[str],
        listen: Iterable[ListenTarget],
        extra_logs: Sequence[Path] = (),
    ) -> ManagedProcess:
        n = len(self.processes)
        stdout_path = self.workdir / f"{name}{n}.stdout"
        stderr_path = self.workdir / f"{name}{n}.stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.workdir,
            )
        proc = ManagedProcess(name, popen, self.workdir, stdout_path, stderr_path, list(extra_logs))
        self.processes.append(proc)
        STARTED.append(proc)
        targets = list(listen)

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"{name} exited with {proc.popen.returncode}:\n{proc.output()}")
            return all(is_listening(t) for t in targets)

        if not wait_until(ready, START_TIMEOUT):
            raise AssertionError(f"{name} not listening on {targets} after {START_TIMEOUT}s:\n{proc.output()}")
        return proc

    def haproxy(self, config: str, listen: Iterable[ListenTarget]) -> ManagedProcess:
        """Start ``haproxy -f cfg -db`` (foreground, no master) and wait for ``listen``."""
        exe = require_program("haproxy")
        cfg = self.workdir / f"haproxy{len(self.processes)}.cfg"
        cfg.write_text(config)
        check = subprocess.run(
            [exe, "-c", "-f", str(cfg)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, f"haproxy rejected the generated config:\n{config}\n{check.stderr}"
        return self._start("haproxy", [exe, "-f", str(cfg), "-db"], listen)

    def nginx(self, stream_block: str, listen: Iterable[ListenTarget]) -> ManagedProcess:
        """Start a single foreground nginx process with the stream module and ``stream_block``."""
        exe = require_program("nginx")
        module = require_file(NGINX_STREAM_MODULE, "nginx stream module (libnginx-mod-stream)")
        n = len(self.processes)
        prefix = self.workdir / f"nginx{n}"
        prefix.mkdir()
        (prefix / "logs").mkdir()
        error_log = prefix / "logs" / "error.log"
        access_log = prefix / "logs" / "access.log"
        config = NGINX_TEMPLATE.format(
            module=module,
            error_log=error_log,
            access_log=access_log,
            pid=prefix / "nginx.pid",
            stream=stream_block,
        )
        cfg = prefix / "nginx.conf"
        cfg.write_text(config)
        argv = [exe, "-p", str(prefix), "-c", str(cfg), "-e", "stderr"]
        check = subprocess.run([*argv, "-t"], check=False, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx rejected the generated config:\n{config}\n{check.stderr}"
        return self._start("nginx", argv, listen, extra_logs=[error_log, access_log])

    def stop_all(self) -> None:
        """Stop every process of this test and assert each one has exited."""
        for proc in self.processes:
            proc.stop()
        alive = [p.pid for p in self.processes if p.alive()]
        assert not alive, f"processes still running after stop: {alive}"


def leftover_processes() -> list[str]:
    """Processes started by the suite that are still running (should be empty)."""
    left = []
    for proc in STARTED:
        if proc.alive():
            left.append(f"{proc.name} pid={proc.pid}")
            continue
        # Reaped by Popen; make sure the PID was not somehow re-used by one of ours.
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.encode() in cmdline and str(proc.workdir).encode() in cmdline:
            left.append(f"{proc.name} pid={proc.pid} (still in /proc)")
    return left


HAPROXY_HEAD = """\
global
    log stdout format raw local0 info
    nbthread 1
{global_extra}
defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 5s
    timeout server 5s
    timeout check 2s
"""


def haproxy_config(body: str, global_extra: str = "") -> str:
    """A complete haproxy configuration: logging to stdout, TCP defaults, then ``body``."""
    return HAPROXY_HEAD.format(global_extra=global_extra) + "\n" + body.strip("\n") + "\n"


NGINX_TEMPLATE = """\
load_module {module};
daemon off;
master_process off;
worker_processes 1;
pid {pid};
error_log {error_log} info;
events {{
    worker_connections 64;
}}
stream {{
    log_format pp '$remote_addr $remote_port $server_addr $server_port';
    access_log {access_log} pp;
{stream}
}}
"""


# --- a plain recording backend ---------------------------------------------------------


@dataclass
class BackendConnection:
    peer: tuple
    data: bytes = b""


class RecordingBackend:
    """A plain TCP server (no PROXY protocol) that records what each connection sent.

    Used behind a haproxy ``accept-proxy`` frontend: whatever reaches it is what
    haproxy forwarded after consuming the header.  It answers ``ok:<payload>``
    once it has read a full line, then closes.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.connections: list[BackendConnection] = []
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn = BackendConnection(self.client_address)
                backend.connections.append(conn)
                self.request.settimeout(5.0)
                try:
                    while b"\n" not in conn.data and len(conn.data) < 65536:
                        chunk = self.request.recv(4096)
                        if not chunk:
                            break
                        conn.data += chunk
                    self.request.sendall(b"ok:" + conn.data)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, 0), Handler)
        self.address: tuple[str, int] = tuple(self.server.server_address[:2])  # type: ignore[assignment]
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --- clients ----------------------------------------------------------------------------


def exchange(
    address: Address,
    payload: bytes,
    *,
    source: tuple | None = None,
    timeout: float = 5.0,
    sock: socket.socket | None = None,
) -> tuple[Address, bytes]:
    """Connect (from ``source`` if given), send ``payload``, read to EOF.

    Returns the client socket's own address (the independent truth a proxy
    header must reproduce) and everything the far end sent back.
    """
    if sock is None:
        if isinstance(address, str):
            family = socket.AF_UNIX
        else:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if source is not None:
            sock.bind(source)
        sock.settimeout(timeout)
        sock.connect(address)
    with sock:
        sock.settimeout(timeout)
        own = sock.getsockname()
        sock.sendall(payload)
        reply = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except ConnectionResetError:
            pass
    return own, reply


# --- independent wire checks -----------------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_ADDRESS_BLOCK = {0x00: 0, 0x10: 12, 0x20: 36, 0x30: 216}


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), written here from RFC 3720 so the test does not trust the library's."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def v2_tlv_offsets(header: bytes) -> list[tuple[int, int, int]]:
    """(type, value offset, value length) of each top-level TLV of a v2 header, in wire order."""
    assert header[:12] == V2_SIGNATURE, header[:16]
    total = 16 + int.from_bytes(header[14:16], "big")
    block = _ADDRESS_BLOCK.get(header[13] & 0xF0, 0)
    # A LOCAL header whose length does not cover its family's block is opaque.
    pos = min(16 + block, total)
    out = []
    while pos + 3 <= total:
        length = int.from_bytes(header[pos + 1 : pos + 3], "big")
        out.append((header[pos], pos + 3, length))
        pos += 3 + length
    assert pos == total, f"TLVs do not tile the header: {header.hex()}"
    return out


def v2_crc_is_valid(header: bytes) -> bool:
    """Recompute the CRC32C TLV of a v2 header per CRC-R1..R3."""
    for tlv_type, off, length in v2_tlv_offsets(header):
        if tlv_type == 0x03:
            assert length == 4
            stored = int.from_bytes(header[off : off + 4], "big")
            zeroed = header[:off] + b"\0\0\0\0" + header[off + 4 :]
            return crc32c(zeroed) == stored
    raise AssertionError("no CRC32C TLV in header")


def flip_crc_bit(header: bytes) -> bytes:
    """The same header with one bit of its CRC32C value flipped."""
    for tlv_type, off, _length in v2_tlv_offsets(header):
        if tlv_type == 0x03:
            return header[:off] + bytes([header[off] ^ 0x01]) + header[off + 1 :]
    raise AssertionError("no CRC32C TLV in header")


# --- certificates ----------------------------------------------------------------------


@dataclass
class Certs:
    """Paths of a throw-away PKI made with the openssl CLI."""

    directory: Path
    ca: Path  # CA certificate (PEM)
    server_pem: Path  # server certificate + key, as haproxy's ``crt`` wants it
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    server_name: str = "interop.proxyproto.test"
    client_cn: str = "interop-client"
    server_sig_alg: str = "RSA-SHA256"  # what signed the server certificate
    server_key_alg: str = "RSA2048"  # haproxy's rendering of the server key


def make_certs(directory: Path) -> Certs:
    """Self-signed CA, a server certificate (SAN: name, localhost, 127.0.0.1) and a client certificate."""
    openssl = require_program("openssl")
    d = directory

    def run(*args: str) -> None:
        res = subprocess.run(
            [openssl, *args],
            cwd=d,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, f"openssl {' '.join(args)} failed:\n{res.stderr}"

    certs = Certs(
        directory=d,
        ca=d / "ca.pem",
        server_pem=d / "server.pem",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
    )
    (d / "ca.ext").write_text(
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n"
    )
    (d / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName=DNS:{certs.server_name},DNS:localhost,IP:127.0.0.1,IP:::1\n"
    )
    (d / "client.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    )
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=proxyproto interop CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    for name, cn in (("server", certs.server_name), ("client", certs.client_cn)):
        run(
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={cn}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-sha256",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
        )
    certs.server_pem.write_text(certs.server_cert.read_text() + certs.server_key.read_text())
    return certs
