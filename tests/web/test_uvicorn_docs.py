"""docs/uvicorn.rst: the page renders, and every example runs as written (only the port changed).

Each example runs the way a reader runs it: the Python blocks as scripts and the
``sh`` blocks as command lines (``uvicorn`` is this interpreter's ``-m uvicorn``),
in a subprocess on a free loopback port, stopped by PID with SIGINT (the reader's
Ctrl-C, which is also what the examples' shutdown paths handle) and SIGKILL after
10 s.  A raw-socket client sends a PROXY header and checks that the server answers
with the header's source.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from doc_examples import missing_link_targets, rendering_warnings
from support import free_port, listening, python_script, require_module
from web_kit import DEST_V4, REAL_V4, Certificate, self_signed

import proxyproto

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "uvicorn.rst"
HEADER = proxyproto.encode_v2(REAL_V4, DEST_V4)
HELLO = f"Hello, {REAL_V4[0]}\n".encode()


def block(name: str) -> str:
    """The ``.. code-block::`` with ``:name: <name>``, dedented."""
    match = re.search(
        r"^\.\. code-block:: \w+\n   :name: " + re.escape(name) + r"\n\n((?:(?:    .*)?\n)+)",
        PAGE.read_text(),
        re.MULTILINE,
    )
    assert match, f"no block named {name} in {PAGE}"
    return "\n".join(line[4:] for line in match.group(1).splitlines()).strip() + "\n"


def command_line(line: str, ports: dict[int, int]) -> tuple[list[str], dict[str, str]]:
    """A page's shell line as argv and environment: ``VAR=value`` prefixes, ``uvicorn`` run by this Python."""
    words = shlex.split(line)
    env = {}
    while re.match(r"^[A-Z_]+=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "uvicorn", line
    argv = [sys.executable, "-m", "uvicorn"] + [str(ports.get(int(w), w)) if w.isdigit() else w for w in words[1:]]
    return argv, env


@contextlib.contextmanager
def running(argv: list[str], port: int, cwd: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run a server until the block ends: started in ``cwd``, waited for on ``port``, stopped by PID."""
    log = cwd / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)]), **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            assert proc.poll() is None, f"{argv} exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{argv} is not listening on {port}:\n{log.read_text()}"
            time.sleep(0.05)
        yield
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> float:
    """SIGINT, then SIGKILL after 10 s; the seconds it took to exit."""
    start = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return time.monotonic() - start


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def http_get(port: int, header: bytes = HEADER, tls: ssl.SSLContext | None = None) -> bytes:
    """One ``Connection: close`` request after ``header`` (TLS after the header with ``tls``); the response."""
    request = b"GET / HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(header)
        if tls is None:
            sock.sendall(request)
            return read_all(sock)
        with tls.wrap_socket(sock, server_hostname="localhost") as secure:
            secure.sendall(request)
            return read_all(secure)


def assert_hello(response: bytes) -> None:
    assert response.startswith(b"HTTP/1.1 200"), response
    assert HELLO in response.partition(b"\r\n\r\n")[2], response  # chunked: the text inside one chunk


# -- the page ------------------------------------------------------------------------------------


def test_page_renders_without_docutils_warnings() -> None:
    assert rendering_warnings(PAGE) == ""


def test_page_links_point_to_existing_files() -> None:
    assert missing_link_targets(PAGE) == []


def test_install_lines_name_extras_that_exist() -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    extras = set(parser["options.extras_require"])
    named = re.findall(r"pip install '\.\[(\w+)\]'", PAGE.read_text())
    assert named and set(named) <= extras


def test_environment_table_has_every_variable_with_its_default() -> None:
    """Every entry of ``proxyproto.settings.ENVIRONMENT`` has a row saying its real default."""
    from proxyproto.settings import ENVIRONMENT

    lines = PAGE.read_text().splitlines()
    for name, default in ENVIRONMENT.items():
        row = next((line for line in lines if line.startswith(f"``{name}``")), None)
        assert row is not None, name
        shown = row.split()[1].strip("`")
        assert shown == default or (shown[0].isdigit() and float(shown) == float(default)), (name, default, row)


def test_tls_with_a_policy_that_looks_at_the_stream_is_refused() -> None:
    from proxyproto.aio_protocol import wrap_protocol_factory

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for policy in ("USE", "IGNORE", "REJECT"):
        with pytest.raises(ValueError, match=policy):
            wrap_protocol_factory(lambda: None, ssl=context, policy=policy)  # type: ignore[arg-type,return-value]
    wrap_protocol_factory(lambda: None, ssl=context, policy="REQUIRE")  # type: ignore[arg-type,return-value]


# -- the generic wrapper ---------------------------------------------------------------------------


def test_generic_example_greets_the_real_client_and_echoes(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "hello.py"
    script.write_text(block("generic-example").replace("8080", str(port)))
    with running(python_script(script), port, tmp_path):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        with sock:
            sock.sendall(HEADER + b"ping\n")
            data = b""
            while data != HELLO + b"ping\n":
                chunk = sock.recv(1024)
                assert chunk, data
                data += chunk


def test_generic_example_without_a_header_is_closed(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "hello.py"
    script.write_text(block("generic-example").replace("8080", str(port)))
    with running(python_script(script), port, tmp_path):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        with sock, contextlib.suppress(ConnectionResetError):
            sock.sendall(b"ping\n")
            assert sock.recv(1024) == b""


def test_generic_example_shutdown_closes_connections_waiting_for_their_header(tmp_path: Path) -> None:
    """Ctrl-C with silent clients connected: the example exits at once, not after header_timeout (10 s)."""
    port = free_port()
    script = tmp_path / "hello.py"
    script.write_text(block("generic-example").replace("8080", str(port)))
    proc = subprocess.Popen(python_script(script), cwd=tmp_path, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            assert proc.poll() is None and time.monotonic() < deadline, "the example did not start"
            time.sleep(0.05)
        silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        time.sleep(0.3)  # accepted, waiting for their header
        elapsed = stop(proc)
        assert elapsed < 5.0, f"the example took {elapsed:.1f} s to stop"
        for sock in silent:
            with sock, contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
    finally:
        stop(proc)


# -- uvicorn ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1], ids=["H11", "HttpTools-allow-ips"])
def test_uvicorn_cli_lines_serve_the_real_client(index: int, tmp_path: Path) -> None:
    require_module("uvicorn")
    (tmp_path / "app.py").write_text(block("uvicorn-app"))
    line = block("uvicorn-cli").splitlines()[index]
    if "HttpTools" in line:
        require_module("httptools")
    port = free_port()
    argv, env = command_line(line, {8000: port})
    with running(argv, port, tmp_path, env):
        assert_hello(http_get(port))
        # Without a header, from a trusted peer (127.0.0.1) under REQUIRE: closed, no response.
        with contextlib.suppress(ConnectionResetError):
            assert http_get(port, header=b"") == b""


def test_uvicorn_code_example_serves_the_real_client(tmp_path: Path) -> None:
    require_module("uvicorn")
    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(block("uvicorn-code").replace("8000", str(port)))
    with running(python_script(script), port, tmp_path):
        assert_hello(http_get(port))
        assert_hello(http_get(port, proxyproto.encode_v1(REAL_V4, DEST_V4)))


def test_uvicorn_https_line_negotiates_tls_after_the_header(tmp_path: Path) -> None:
    require_module("uvicorn")
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    assert (cert.key.name, cert.cert.name) == ("server.key", "server.crt")  # the names the page uses
    (tmp_path / "app.py").write_text(block("uvicorn-app"))
    port = free_port()
    argv, env = command_line(block("uvicorn-https").strip(), {8443: port})
    with running(argv, port, tmp_path, env):
        assert_hello(http_get(port, tls=cert.client_context()))


def test_uvicorn_scope_header_example_reads_the_trusted_proxys_tlvs(tmp_path: Path) -> None:
    require_module("uvicorn")
    port = free_port()
    script = tmp_path / "tlvs.py"
    script.write_text(block("uvicorn-scope-header").replace("8000", str(port)))
    tlvs = [
        proxyproto.TLV(proxyproto.TLVType.AUTHORITY, b"shop.example"),
        proxyproto.TLV(proxyproto.TLVType.UNIQUE_ID, b"7f3a-0001"),
    ]
    with running(python_script(script), port, tmp_path):
        response = http_get(port, proxyproto.encode_v2(REAL_V4, DEST_V4, tlvs=tlvs))
        assert response.startswith(b"HTTP/1.1 200"), response
        assert b"request 7f3a-0001 for shop.example\n" in response.partition(b"\r\n\r\n")[2], response
        response = http_get(port)  # a header without TLVs
        assert b"no request id\n" in response.partition(b"\r\n\r\n")[2], response
