"""Which UNIX-socket peers may send a header, and the real socket family behind a server's label.

A UNIX-socket peer is trusted only where the socket's permissions restrict who can
connect: a world-writable socket file (``uvicorn --uds`` chmods its socket 0o666), an
abstract name or an unnamed socket trusts no peer unless ``trusted`` says ``unix`` (or
``"*"``).  ``uvicorn --fd`` labels the TCP listener it is given AF_UNIX: the address a
UNIX-family header leaves in ``scope["client"]`` and any UNIX-vs-IP decision follow the
real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from support import require_module
from web_kit import HERE, ROOT

import proxyproto
import proxyproto.aio
import proxyproto.aio_protocol
from proxyproto.peers import socket_family, unix_access
from proxyproto.policy import UNIX_ANY, UNIX_NONE, UNIX_OPEN, UNIX_RESTRICTED, Policy, TrustedNetworks
from proxyproto.settings import Settings

SPOOFED = ("203.0.113.7", 4242)
DEST = ("198.51.100.20", 443)
HEADER = proxyproto.encode_v2(SPOOFED, DEST)
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
LINE = b"hello\n"
NOBODY = 65534


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is 0o700, closed to another uid)."""
    path = Path(tempfile.mkdtemp(prefix="pp-unix-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


# -- the token and the rule -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "unix"),
    [
        ("127.0.0.1,::1", UNIX_RESTRICTED),
        ("127.0.0.1,::1,unix", UNIX_ANY),
        (["10.0.0.0/8", "UNIX"], UNIX_ANY),
        ("*", UNIX_ANY),
        ("", UNIX_NONE),
        ("unix", UNIX_ANY),
    ],
)
def test_trusted_list_says_which_unix_peers_are_trusted(spec: Any, unix: str) -> None:
    trusted = TrustedNetworks(spec)
    assert trusted.unix == unix
    assert "unix" not in trusted  # the token is no IP network


@pytest.mark.parametrize(
    ("mode", "spec", "expected"),
    [
        (0o600, "127.0.0.1", Policy.REQUIRE),
        (0o660, "127.0.0.1,::1", Policy.REQUIRE),
        (0o666, "127.0.0.1", Policy.SKIP),
        (0o666, "0.0.0.0/0", Policy.SKIP),  # every IP peer; a world-writable socket's still need saying
        (0o666, "127.0.0.1,unix", Policy.REQUIRE),
        (0o666, "*", Policy.REQUIRE),
        (0o600, "", Policy.SKIP),
    ],
)
def test_unix_peer_is_trusted_only_where_the_socket_file_restricts_it(mode: int, spec: str, expected: Policy) -> None:
    with shared_dir() as directory, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        path = str(directory / "s")
        listener.bind(path)
        os.chmod(path, mode)
        trust = Settings(trusted=spec).trust("", listener)
        assert trust.policy is expected and trust.trusted is (expected is Policy.REQUIRE)


def test_abstract_and_unnamed_unix_sockets_trust_no_peer_by_default() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract:
        abstract.bind(b"\0proxyproto-test-%d" % os.getpid())
        assert unix_access(abstract) == UNIX_OPEN
        assert Settings(trusted="127.0.0.1").trust("", abstract).policy is Policy.SKIP
        assert Settings(trusted="unix").trust("", abstract).trusted
    left, right = socket.socketpair()
    with left, right:
        assert unix_access(left) == UNIX_OPEN


def test_mislabeled_tcp_socket_is_an_ip_socket_and_its_peers_are_not_trusted_as_unix_peers() -> None:
    """What uvicorn --fd does: ``socket.fromfd(fd, AF_UNIX, ...)`` over a TCP socket."""
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        labelled = socket.fromfd(tcp.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        with labelled:
            assert labelled.family == socket.AF_UNIX  # the label
            assert socket_family(labelled) == socket.AF_INET  # the socket
            assert unix_access(labelled) is None
            # An IP peer the loop could not tell (uvloop answers None after a reset): not trusted.
            trust = Settings(trusted="10.0.0.0/8").trust(None, labelled)
            assert trust.policy is Policy.SKIP and not trust.trusted


# -- the adapters' own UNIX servers ---------------------------------------------------------------


@contextlib.contextmanager
def mixin_unix(path: str, **knobs: Any) -> Iterator[list[Any]]:
    seen: list[Any] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            seen.append(self.client_address)
            self.wfile.write(b"ok\n")

    attrs = {f"proxy_{k}": v for k, v in knobs.items()}
    server = type("Server", (proxyproto.ThreadingProxyUnixStreamServer,), attrs)(path, Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.asynccontextmanager
async def aio_unix(path: str, **knobs: Any) -> AsyncIterator[list[Any]]:
    seen: list[Any] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        seen.append(writer.get_extra_info("peername"))
        writer.write(b"ok\n")
        writer.close()

    server = await proxyproto.aio.start_unix_server(handle, path, **knobs)
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def protocol_unix(path: str, **knobs: Any) -> AsyncIterator[list[Any]]:
    seen: list[Any] = []

    class Inner(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            seen.append(self.transport.get_extra_info("peername"))
            self.transport.write(b"ok\n")
            self.transport.close()

    factory = proxyproto.aio_protocol.wrap_protocol_factory(Inner, **knobs)
    server = await asyncio.get_running_loop().create_unix_server(factory, path)
    try:
        yield seen
    finally:
        server.close()
        factory.close()
        await server.wait_closed()


async def _unix_exchange(path: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("adapter", ["socketserver-mixin", "aio-start_unix_server", "wrap_protocol_factory"])
@pytest.mark.parametrize(
    ("mode", "trusted", "uses_header"),
    [(0o600, "127.0.0.1", True), (0o666, "127.0.0.1", False), (0o666, "127.0.0.1,unix", True)],
    ids=["restrictive", "world-writable", "world-writable-unix-token"],
)
def test_unix_servers_trust_peers_only_behind_restrictive_permissions(
    adapter: str, mode: int, trusted: str, uses_header: bool
) -> None:
    async def scenario() -> None:
        with shared_dir() as directory:
            path = str(directory / "s")
            knobs = {"trusted": trusted, "untrusted_policy": "IGNORE"}
            if adapter == "socketserver-mixin":
                with mixin_unix(path, **knobs) as seen:
                    os.chmod(path, mode)
                    reply = await _unix_exchange(path, HEADER + LINE)
            else:
                server = aio_unix if adapter == "aio-start_unix_server" else protocol_unix
                async with server(path, **knobs) as seen:
                    os.chmod(path, mode)  # after bind, as uvicorn does: the mode is read per connection
                    reply = await _unix_exchange(path, HEADER + LINE)
            assert reply == b"ok\n"
            assert (tuple(seen[0][:2]) == SPOOFED) is uses_header, seen

    asyncio.run(asyncio.wait_for(scenario(), 20))


@pytest.mark.parametrize("adapter", ["socketserver-mixin", "aio-start_unix_server", "wrap_protocol_factory"])
@pytest.mark.parametrize(
    ("trusted", "policy", "advice"),
    [
        ("127.0.0.1", "SKIP", "its socket file is world-writable"),
        ("127.0.0.1", "IGNORE", "its socket file is world-writable"),
        ("127.0.0.1", "REJECT", "its socket file is world-writable"),
        ("", "IGNORE", "to trust the peers of this socket, add unix to"),
    ],
    ids=["world-writable-skip", "world-writable-ignore", "world-writable-reject", "trust-no-one"],
)
def test_untrusted_unix_peer_is_told_what_to_change_for_a_socket_not_an_address(
    adapter: str, trusted: str, policy: str, advice: str, records: Any
) -> None:
    """A UNIX peer has no address to add: the line says why it is untrusted and the ways out."""
    name = "proxy_trusted" if adapter == "socketserver-mixin" else "trusted"

    async def scenario() -> None:
        with shared_dir() as directory:
            path = str(directory / "s")
            knobs = {"trusted": trusted, "untrusted_policy": policy}
            if adapter == "socketserver-mixin":
                with mixin_unix(path, **knobs):
                    os.chmod(path, 0o777)  # gunicorn's default --umask 0
                    with contextlib.suppress(ConnectionResetError):  # REJECT closes
                        await _unix_exchange(path, HEADER + LINE)
            else:
                server = aio_unix if adapter == "aio-start_unix_server" else protocol_unix
                async with server(path, **knobs):
                    os.chmod(path, 0o777)
                    with contextlib.suppress(ConnectionResetError):
                        await _unix_exchange(path, HEADER + LINE)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    deadline = time.monotonic() + 5
    while True:
        said = [record.getMessage() for record in records.snapshot()]
        lines = [message for message in said if "not trusted" in message or "untrusted" in message]
        if lines:
            break
        assert time.monotonic() < deadline, said
        time.sleep(0.05)
    assert len(lines) == 1, lines
    assert lines[0].startswith("unix:"), lines[0]
    assert advice in lines[0] and f"add unix to {name}" in lines[0], lines[0]
    assert "add its address" not in lines[0], lines[0]
    if trusted:
        assert "--umask 007" in lines[0] and "0o666" in lines[0], lines[0]


def test_untrusted_unix_peer_advice_names_the_variable_when_the_environment_set_the_trust_list() -> None:
    from proxyproto.advice import untrusted_header
    from proxyproto.settings import settings_from_environment

    line = untrusted_header(settings_from_environment({}), Policy.SKIP, "")
    assert "add unix to PROXYPROTO_ALLOW_IPS" in line and "world-writable" in line, line
    waitress_peer = ("localhost", None)  # how waitress names a UNIX peer
    assert "add unix to trusted" in untrusted_header(Settings(), Policy.SKIP, waitress_peer)
    assert "add its address to trusted" in untrusted_header(Settings(), Policy.SKIP, ("127.0.0.2", 5000))


# -- uvicorn's real command line ----------------------------------------------------------------


@contextlib.contextmanager
def uvicorn_cli(args: list[str], ready: Callable[[], bool], env: dict[str, str], **popen: Any) -> Iterator[None]:
    """``python -m uvicorn web_kit:app ARGS`` until the block ends; stopped by PID (SIGINT, then SIGKILL)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), **env}
    command = [sys.executable, "-m", "uvicorn", "web_kit:app", "--http", "proxyproto.uvicorn:H11", *args]
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, **popen
    )
    try:
        deadline = time.monotonic() + 20
        while not ready():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)


_CLIENT = """
import os, socket, sys
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
sock.sendall(bytes.fromhex(sys.argv[2]))
data = b""
while True:
    chunk = sock.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode("latin1"))
"""


def _as_nobody(path: str, data: bytes) -> str:
    """Send ``data`` to the UNIX socket ``path`` from a process running as uid 65534; the reply."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, path, data.hex()], capture_output=True, timeout=20, check=True
    )
    return done.stdout.decode("latin1")


def _report(response: str) -> dict[str, Any] | None:
    head, _, body = response.partition("\r\n\r\n")
    if " 200 " not in head.split("\r\n")[0]:
        return None
    return json.loads(body)  # type: ignore[no-any-return]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run a client as another uid")
@pytest.mark.parametrize(
    ("allow_ips", "uses_header"), [(None, False), ("127.0.0.1,::1,unix", True)], ids=["default", "unix-token"]
)
def test_uvicorn_uds_world_writable_socket_ignores_another_users_header_by_default(
    allow_ips: str | None, uses_header: bool
) -> None:
    require_module("uvicorn")
    with shared_dir() as directory:
        path = str(directory / "uvicorn.sock")

        def chmodded() -> bool:  # uvicorn chmods its socket 0o666 after bind
            with contextlib.suppress(FileNotFoundError):
                return stat.S_IMODE(os.stat(path).st_mode) == 0o666
            return False

        env = {} if allow_ips is None else {"PROXYPROTO_ALLOW_IPS": allow_ips}
        with uvicorn_cli(["--uds", path], chmodded, env):
            response = _as_nobody(path, HEADER + REQUEST)
    report = _report(response)
    if uses_header:
        assert report is not None and report["client"] == list(SPOOFED), response
    else:
        # The header is payload (SKIP, the default for untrusted peers): uvicorn answers 400.
        assert response.startswith("HTTP/1.1 400 ") and "203.0.113.7" not in response, response


def test_uvicorn_fd_tcp_listener_keeps_the_socket_ip_for_a_unix_family_header() -> None:
    """uvicorn --fd wraps the fd as AF_UNIX; a UNIX-family header still leaves the socket's IP tuple."""
    require_module("uvicorn")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    unix_header = proxyproto.encode_v2("/run/client.sock", "/run/server.sock")
    inet_from_untrusted = proxyproto.encode_v2(SPOOFED, DEST)
    try:
        with uvicorn_cli(
            ["--fd", str(listener.fileno())],
            lambda: True,  # the listener is ours: connections wait in its backlog until uvicorn accepts
            {"PROXYPROTO_ALLOW_IPS": "127.0.0.1"},
            pass_fds=(listener.fileno(),),
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=15) as client:
                client.sendall(unix_header + REQUEST)
                local = client.getsockname()
                response = _read_all(client)
            report = _report(response)
            assert report is not None and report["client"] == [local[0], local[1]], response
            with socket.create_connection(("127.0.0.1", port), timeout=15) as client:
                client.sendall(inet_from_untrusted + REQUEST)
                assert _report(_read_all(client))["client"] == list(SPOOFED)  # type: ignore[index]
    finally:
        listener.close()


def _read_all(sock: socket.socket) -> str:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode("latin1")
        data += chunk
