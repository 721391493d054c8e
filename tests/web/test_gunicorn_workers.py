"""proxyproto.gunicorn's workers, through the real ``gunicorn`` command with ``--workers 2``.

Every test runs ``gunicorn -k proxyproto.gunicorn.<Worker>`` on a free loopback port (stopped by
PID with SIGTERM; those that only send requests to the default settings share one per worker class)
and talks to it with real sockets: v1 and v2 headers, IPv4 and IPv6 sources, a
real haproxy ``send-proxy-v2`` in front, TLS after the header (``--certfile``/``--keyfile``),
keep-alive (the header once per connection), an untrusted peer, gunicorn's flags as the settings,
and a graceful shutdown with connections parked mid-header.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gunicorn_kit import (
    CEILING,
    NEEDS,
    WORKERS,
    Gunicorn,
    closed_unserved,
    connect,
    get,
    gunicorn,
    gunicorn_args,
    read_response,
    request,
    running_command,
)
from support import free_port, require_haproxy, require_module
from web_kit import DEST_V4, DEST_V6, HERE, REAL_V4, REAL_V6, ROOT, command, self_signed

import proxyproto

require_module("gunicorn")

#: The worker classes this file runs (each skipped when what it needs is not installed).
ALL = ["sync", "gthread", "uvicorn", "uvicorn-h11"]
#: Those that keep a connection open for more requests (gunicorn's sync worker closes after each).
KEEP_ALIVE = ["gthread", "uvicorn"]


def _need(worker: str) -> None:
    for module in NEEDS[worker]:
        require_module(module)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """``gunicorn -k <worker>`` (the parameter) with its default settings, started once and shared by
    the tests that only send it requests: none of them changes its settings, stops it, exhausts its
    workers or reads its log (those start their own with :func:`gunicorn`)."""
    worker = request.param
    _need(worker)
    with gunicorn(worker, tmp_path_factory.mktemp(f"gunicorn-{worker}")) as running:
        yield running


HEADERS = {
    "v1-ipv4": (proxyproto.encode_v1(REAL_V4, DEST_V4), REAL_V4),
    "v1-ipv6": (proxyproto.encode_v1(REAL_V6, DEST_V6), REAL_V6),
    "v2-ipv4": (proxyproto.encode_v2(REAL_V4, DEST_V4), REAL_V4),
    "v2-ipv6": (proxyproto.encode_v2(REAL_V6, DEST_V6, tlvs=[(proxyproto.TLVType.AUTHORITY, b"example.com")]), REAL_V6),
}


@pytest.mark.parametrize("server", ALL, indirect=True)
def test_worker_serves_the_real_client_of_v1_v2_ipv4_and_ipv6_headers(server: Gunicorn) -> None:
    for name, (header, source) in HEADERS.items():
        status, seen = get(server.address, header)
        assert status == 200, (name, seen)
        assert seen["client"] == list(source), (name, seen)
        assert seen["header"]["source"] == list(source), (name, seen)
        assert seen["gunicorn_proxy"] is None  # gunicorn's own parser never saw it
    _, seen = get(server.address, HEADERS["v2-ipv6"][0])
    assert seen["header"]["tlvs"] == [[int(proxyproto.TLVType.AUTHORITY), b"example.com".hex()]]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (its /proc stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("worker", ALL)
def test_an_idle_worker_sleeps_until_a_connection_comes(worker: str, tmp_path: Path) -> None:
    """Idle, a worker waits in its loop's poll: a loop that spins (an accept that never says "nothing
    to accept") shows as a whole CPU second per second, a sleeping worker as a few milliseconds."""
    _need(worker)
    with gunicorn(worker, tmp_path, workers=1) as server:
        assert get(server.address, HEADERS["v2-ipv4"][0])[0] == 200  # the worker is up and serving
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        workers = [int(pid) for pid in children]
        before = sum(_cpu_seconds(pid) for pid in workers)
        time.sleep(1.5)
        spent = sum(_cpu_seconds(pid) for pid in workers) - before
    assert spent < 0.3, f"{spent:.2f} CPU seconds in 1.5 idle seconds"


@pytest.mark.parametrize("worker", ALL)
def test_worker_with_an_ipv4_and_an_ipv6_listener_serves_the_header_source_on_both(worker: str, tmp_path: Path) -> None:
    """Two ``-b`` listeners (gunicorn's sync worker then waits on both with select): IPv6 loopback as well."""
    _need(worker)
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    port6 = free_port()
    with gunicorn(worker, tmp_path, "-b", f"[::1]:{port6}") as server:
        for _ in range(2):
            status, seen = get(("::1", port6), proxyproto.encode_v2(REAL_V4, DEST_V4))
            assert status == 200 and seen["client"] == list(REAL_V4), seen
            status, seen = get(server.address, proxyproto.encode_v1(REAL_V6, DEST_V6))
            assert status == 200 and seen["client"] == list(REAL_V6), seen
        sock = connect(("::1", port6))  # ::1 is trusted by default: without a header it is closed
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        assert closed_unserved(sock)


@pytest.mark.parametrize("worker", KEEP_ALIVE)
def test_keep_alive_reads_the_header_once_per_connection(worker: str, tmp_path: Path) -> None:
    _need(worker)
    with gunicorn(worker, tmp_path, "--keep-alive", "5") as server:
        sock = connect(server.address, proxyproto.encode_v1(REAL_V4, DEST_V4))
        try:
            pids = set()
            for _ in range(3):  # the later requests start with "POST", never a header
                status, seen = request(sock, keep_alive=True, body=b"x" * 10)
                assert status == 200 and seen["client"] == list(REAL_V4) and seen["body"] == 10, seen
                pids.add(seen["pid"])
            assert len(pids) == 1
        finally:
            sock.close()


@pytest.mark.parametrize("server", ALL, indirect=True)
def test_untrusted_peers_header_never_becomes_the_client(server: Gunicorn) -> None:
    """127.0.0.2 is outside the default trust list (loopback 127.0.0.1 and ::1): its header is payload."""
    sock = connect(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4), local="127.0.0.2")
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        try:
            status, seen = read_response(sock)
        except ConnectionError:
            status, seen = 0, {}
    finally:
        sock.close()
    assert status != 200 and seen.get("client") != list(REAL_V4), seen
    # Without a header it is served, as itself.
    status, seen = get(server.address, local="127.0.0.2")
    assert status == 200 and seen["client"][0] == "127.0.0.2" and seen["header"] is None, seen


@pytest.mark.parametrize("worker", ALL)
def test_proxy_allow_from_is_the_trust_list(worker: str, tmp_path: Path) -> None:
    _need(worker)
    with gunicorn(worker, tmp_path, "--proxy-allow-from", "127.0.0.2") as server:
        status, seen = get(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4), local="127.0.0.2")
        assert status == 200 and seen["client"] == list(REAL_V4), seen
        sock = connect(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4), local="127.0.0.1")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        try:
            status, seen = read_response(sock)
        except ConnectionError:
            status, seen = 0, {}
        finally:
            sock.close()
        assert seen.get("client") != list(REAL_V4), seen
    assert "127.0.0.2/32" in server.log() and "--proxy-allow-from" in server.log()


@pytest.mark.parametrize("server", ALL, indirect=True)
def test_trusted_peer_without_a_header_is_closed_unserved(server: Gunicorn) -> None:
    sock = connect(server.address)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    assert closed_unserved(sock)


@pytest.mark.parametrize("worker", ALL)
def test_tls_is_negotiated_after_the_header(worker: str, tmp_path: Path) -> None:
    _need(worker)
    cert = self_signed(tmp_path)
    if cert is None:
        pytest.skip("the openssl command is not installed")
    flags = ("--certfile", str(cert.cert), "--keyfile", str(cert.key))
    with gunicorn(worker, tmp_path, *flags) as server:
        for header, source in (HEADERS["v2-ipv4"], HEADERS["v1-ipv6"]):
            status, seen = get(server.address, header, tls=cert.client_context())
            assert status == 200 and seen["client"] == list(source) and seen["scheme"] == "https", seen
    assert "TLS is negotiated after the header" in server.log()


@pytest.mark.parametrize("server", ALL, indirect=True)
def test_behind_real_haproxy_send_proxy_v2(server: Gunicorn, tmp_path: Path) -> None:
    exe = require_haproxy()
    front = free_port()
    config = (
        "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 5s\n    timeout server 5s\n\n"
        f"listen fe\n    bind 127.0.0.1:{front}\n    server app 127.0.0.1:{server.port} send-proxy-v2\n"
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    with command([exe, "-f", str(cfg), "-db"], front, workdir=tmp_path):
        for _ in range(3):
            sock = connect(("127.0.0.1", front), local="127.0.0.2")
            own = sock.getsockname()
            try:
                status, seen = request(sock)
            finally:
                sock.close()
            assert status == 200 and seen["client"] == [own[0], own[1]], seen
            assert seen["header"]["source"] == [own[0], own[1]]


@pytest.mark.parametrize("worker", ALL)
def test_sigterm_with_connections_parked_mid_header_returns_promptly(worker: str, tmp_path: Path) -> None:
    """gunicorn's graceful_timeout is 30 s and the header timeout 10 s: the workers stop in far less."""
    _need(worker)
    with gunicorn(worker, tmp_path) as server:
        header = proxyproto.encode_v2(REAL_V4, DEST_V4)
        parked = [connect(server.address, header[:7]) for _ in range(6)]
        try:
            time.sleep(0.3)  # every one accepted and waiting for the rest of its header
            took = server.stop()
        finally:
            for sock in parked:
                sock.close()
    assert took < 8.0, f"gunicorn took {took:.1f} s to stop:\n{server.log()}"
    assert server.proc.returncode == 0, server.log()


@pytest.mark.parametrize("worker", ALL)
def test_conflicting_trust_lists_stop_gunicorn_at_start_naming_both(worker: str, tmp_path: Path) -> None:
    _need(worker)
    args = gunicorn_args(worker, free_port(), "--proxy-allow-from", "10.0.0.0/8")
    env = {"PYTHONPATH": f"{ROOT}:{HERE}", "PROXYPROTO_ALLOW_IPS": "192.168.0.0/16", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=CEILING, cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "--proxy-allow-from 10.0.0.0/8 and PROXYPROTO_ALLOW_IPS=192.168.0.0/16 disagree" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("worker", ALL)
def test_silent_and_slow_clients_never_hold_the_only_worker(worker: str, tmp_path: Path) -> None:
    """One worker (one thread for gthread): connections still sending their header wait aside, others are served."""
    _need(worker)
    with gunicorn(worker, tmp_path, "--threads", "1", workers=1) as server:
        silent = [connect(server.address) for _ in range(3)]
        slow = connect(server.address)
        header = proxyproto.encode_v2(REAL_V6, DEST_V6)
        try:
            for i in range(len(header)):  # the header byte by byte, other clients served in between
                slow.sendall(header[i : i + 1])
                if i % 9 == 0:
                    start = time.monotonic()
                    status, seen = get(server.address, proxyproto.encode_v1(REAL_V4, DEST_V4))
                    assert status == 200 and seen["client"] == list(REAL_V4), seen
                    assert time.monotonic() - start < 5.0, "a waiting header held the worker"
            status, seen = request(slow)
            assert status == 200 and seen["client"] == list(REAL_V6), seen
        finally:
            for sock in [*silent, slow]:
                sock.close()


@pytest.mark.parametrize("worker", ALL)
def test_header_timeout_closes_a_silent_client_with_one_line(worker: str, tmp_path: Path) -> None:
    _need(worker)
    with gunicorn(worker, tmp_path, env={"PROXYPROTO_HEADER_TIMEOUT": "0.5"}) as server:
        sock = connect(server.address)
        start = time.monotonic()
        assert closed_unserved(sock)
        assert time.monotonic() - start < 5.0
        deadline = time.monotonic() + CEILING
        while "no PROXY header within 0.5 s" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)


@pytest.mark.parametrize("worker", ["sync", "gthread", "uvicorn-h11"])
def test_proxy_protocol_auto_is_policy_use(worker: str, tmp_path: Path) -> None:
    """gunicorn's meaning of ``--proxy-protocol`` (auto): a header when one is sent, served without one too."""
    _need(worker)
    with gunicorn(worker, tmp_path, "--proxy-protocol", "auto") as server:
        status, seen = get(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4))
        assert status == 200 and seen["client"] == list(REAL_V4), seen
        sock = connect(server.address)
        own = sock.getsockname()
        try:
            status, seen = request(sock)
        finally:
            sock.close()
        assert status == 200 and seen["client"] == [own[0], own[1]] and seen["header"] is None, seen
    assert "PROXY header policy USE for 127.0.0.1/32, ::1/128" in server.log()


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorns_own_proxy_parser_is_off_so_a_second_header_is_payload(worker: str, tmp_path: Path) -> None:
    """With ``--proxy-protocol v2`` gunicorn would parse a header itself: here the first is ours, the next is bytes."""
    _need(worker)
    with gunicorn(worker, tmp_path, "--proxy-protocol", "v2") as server:
        second = proxyproto.encode_v2(REAL_V6, DEST_V6)
        sock = connect(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4) + second)
        try:
            status, seen = request(sock)
        except ConnectionError:
            status, seen = 0, {}
        finally:
            sock.close()
        assert status != 200 and seen.get("client") != list(REAL_V6), seen
        status, seen = get(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4))
        assert status == 200 and seen["client"] == list(REAL_V4) and seen["gunicorn_proxy"] is None, seen
    assert "PROXY header policy REQUIRE for 127.0.0.1/32, ::1/128, SKIP for other peers (policy: --proxy-protocol" in (
        server.log()
    )


@pytest.mark.parametrize("worker", ["sync", "uvicorn"])
def test_gunicorn_env_flag_sets_a_proxyproto_variable(worker: str, tmp_path: Path) -> None:
    _need(worker)
    with gunicorn(worker, tmp_path, "--env", "PROXYPROTO_ALLOW_IPS=127.0.0.2") as server:
        status, seen = get(server.address, proxyproto.encode_v1(REAL_V4, DEST_V4), local="127.0.0.2")
        assert status == 200 and seen["client"] == list(REAL_V4), seen


def test_refusal_line_names_the_flag_that_gave_the_trust_list(tmp_path: Path) -> None:
    with gunicorn("sync", tmp_path, "--proxy-allow-from", "127.0.0.0/8") as server:
        sock = connect(server.address)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        assert closed_unserved(sock)
        deadline = time.monotonic() + CEILING
        while "send-proxy" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    (line,) = [line for line in server.log().splitlines() if "send-proxy" in line]
    assert "[WARNING] proxyproto: 127.0.0.1:" in line and "--proxy-allow-from is 127.0.0.0/8" in line, line
    assert "take this peer out of --proxy-allow-from" in line


@pytest.mark.parametrize(
    ("flags", "variable", "message"),
    [
        (
            ("--proxy-protocol", "v2"),
            ("PROXYPROTO_POLICY", "USE"),
            "--proxy-protocol v2 (policy REQUIRE) and PROXYPROTO_POLICY=USE disagree",
        ),
        ((), ("PROXYPROTO_HEADER_TIMEOUT", "0"), "PROXYPROTO_HEADER_TIMEOUT='0'"),
        (("--http2-cleartext", "upgrade"), ("PROXYPROTO_POLICY", "REQUIRE"), "--http2-cleartext upgrade is not"),
    ],
)
def test_misconfiguration_stops_gunicorn_at_start_in_one_line(
    flags: tuple[str, ...], variable: tuple[str, str], message: str, tmp_path: Path
) -> None:
    args = gunicorn_args("sync", free_port(), *flags)
    env = {"PYTHONPATH": f"{ROOT}:{HERE}", variable[0]: variable[1], "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=CEILING, cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_uvicorn_worker_refuses_use_with_tls_at_start(tmp_path: Path) -> None:
    """The uvicorn workers negotiate TLS after the header only under REQUIRE or SKIP: USE with TLS is refused."""
    _need("uvicorn")
    cert = self_signed(tmp_path)
    if cert is None:
        pytest.skip("the openssl command is not installed")
    args = gunicorn_args(
        "uvicorn", free_port(), "--proxy-protocol", "auto", "--certfile", str(cert.cert), "--keyfile", str(cert.key)
    )
    env = {"PYTHONPATH": f"{ROOT}:{HERE}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=CEILING, cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "policy USE (from --proxy-protocol) cannot be used with --certfile/--keyfile" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# -- docs/gunicorn.rst ------------------------------------------------------------------------------

PAGE = ROOT / "docs" / "gunicorn.rst"
KIT_NAMES = {name: kit for kit, (name, _) in WORKERS.items()}


def page_block(name: str) -> list[str]:
    """The lines of the page's ``.. code-block:: sh`` named ``name``."""
    match = re.search(
        r"^\.\. code-block:: sh\n   :name: " + re.escape(name) + r"\n\n((?:(?:    .*)?\n)+)", PAGE.read_text(), re.M
    )
    assert match, f"no block named {name} in {PAGE}"
    return [line[4:] for line in match.group(1).splitlines() if line.strip()]


PAGE_LINES = [(name, line) for name in ("workers", "settings", "tls") for line in page_block(name)]


@pytest.mark.parametrize(("block", "line"), PAGE_LINES, ids=[f"{b}-{i}" for i, (b, _) in enumerate(PAGE_LINES)])
def test_page_command_line_serves_the_real_client(block: str, line: str, tmp_path: Path) -> None:
    """Each command line of docs/gunicorn.rst, run as written (port, certificate files and app:app changed)."""
    words = shlex.split(line)
    env = {}
    while re.match(r"^[A-Z_]+=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[0] == "gunicorn" and words[-1] == "app:app", line
    worker = KIT_NAMES[words[words.index("-k") + 1].rpartition(".")[2]]
    _need(worker)
    tls = None
    if "--certfile" in words:
        cert = self_signed(tmp_path)
        if cert is None:
            pytest.skip("the openssl command is not installed")
        words = [{"cert.pem": str(cert.cert), "key.pem": str(cert.key)}.get(word, word) for word in words]
        tls = cert.client_context()
    workers = int(words[words.index("--workers") + 1]) if "--workers" in words else 1
    port = free_port()
    args = [sys.executable, "-m", "gunicorn", "--no-control-socket", "-b", f"127.0.0.1:{port}", *words[1:-1]]
    with running_command([*args, WORKERS[worker][1]], port, tmp_path, env=env, workers=workers) as server:
        status, seen = get(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4), tls=tls)
        assert status == 200 and seen["client"] == list(REAL_V4), seen
        if "PROXYPROTO_HEADER_TIMEOUT" in env:  # a silent client is closed at that deadline
            timeout = float(env["PROXYPROTO_HEADER_TIMEOUT"])
            sock = connect(server.address)
            start = time.monotonic()
            assert closed_unserved(sock)
            assert timeout - 0.5 < time.monotonic() - start < timeout + 5.0
    if block == "settings" and "--proxy-allow-from" in words:
        shown = re.findall(r"^    (\[INFO\] proxyproto: .*)$", PAGE.read_text(), re.M)
        assert len(shown) == 2, shown  # the policy line, and the forwarded headers' line
        for line_shown in shown:
            assert line_shown in server.log(), server.log()


def test_sync_worker_with_threads_stops_gunicorn_at_start_naming_gthread(tmp_path: Path) -> None:
    """gunicorn swaps a ``*SyncWorker`` class for its own gthread worker; ``Sync`` refuses ``--threads`` instead."""
    args = gunicorn_args("sync", free_port(), "--threads", "4")
    env = {"PYTHONPATH": f"{ROOT}:{HERE}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=CEILING, cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "does not use --threads 4: use -k proxyproto.gunicorn.GThread" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("server", ALL, indirect=True)
def test_forwarded_headers_relayed_by_the_proxy_never_set_the_client(server: Gunicorn) -> None:
    """haproxy in ``mode tcp`` relays a client's X-Forwarded-* lines untouched: they are the client's claims.

    With a PROXY header, gunicorn's ``--forwarded-allow-ips`` (loopback by default) is checked against
    the real client, so ``X-Forwarded-Proto`` is not believed; uvicorn's X-Forwarded-For middleware is
    off for peers trusted to send the header, so a LOCAL header (the socket's own address) is not
    replaced by ``X-Forwarded-For`` either.
    """
    forged = "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
    sock = connect(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4))
    try:
        status, seen = request(sock, headers=forged)
    finally:
        sock.close()
    assert status == 200 and seen["client"] == list(REAL_V4) and seen["scheme"] == "http", seen
    sock = connect(server.address, proxyproto.encode_v2(command=proxyproto.Command.LOCAL))
    own = sock.getsockname()
    try:
        status, seen = request(sock, headers=forged)
    finally:
        sock.close()
    assert status == 200 and seen["client"] == [own[0], own[1]], seen
    assert seen["header"]["command"] == "LOCAL"


_OUT_OF_DESCRIPTORS = """
import logging, os, resource, socket, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
import proxyproto
from proxyproto.gunicorn import _Reception

listener = socket.create_server(("127.0.0.1", 0))
listener.setblocking(False)
served = []
reception = _Reception(proxyproto.Settings(), [listener], lambda *args: served.append(args))
header = proxyproto.encode_v1(("192.0.2.10", 51234), ("198.51.100.20", 443))

def client(data):
    sock = socket.create_connection(listener.getsockname())
    sock.sendall(data)
    time.sleep(0.05)  # (in the listener's queue, with its bytes)
    return sock

def fill():
    fds = []
    while True:
        try:
            fds.append(os.dup(0))
        except OSError:
            return fds

silent = client(b"")
reception.accept(listener)
print("parked", len(reception.waiting))
second = client(header)
filler = fill()
reception.accept(listener)  # EMFILE: the silent one gives its place, the second is served
print("served", [address for _, _, address, _, _ in served], "parked", len(reception.waiting))
os.close(filler.pop())
third = client(header)
filler += fill()
reception.accept(listener)  # EMFILE, nobody parked: the listener rests, nothing raised
print("resting", reception.resting(), "served", len(served))
for fd in filler:
    os.close(fd)
time.sleep(0.15)
print("resting", reception.resting())
reception.accept(listener)
print("served", [address for _, _, address, _, _ in served])
"""


def test_wsgi_worker_out_of_descriptors_evicts_the_oldest_waiting_or_rests_the_listener() -> None:
    """accept() failing with EMFILE (a real one, RLIMIT_NOFILE 64 filled in a child) never raises in a
    worker's loop: with a connection waiting for its header, that one is closed and the accept
    retried; with none, the listener rests and accepts again once descriptors are back.  One line
    for the failure, one when accept() works again."""
    require_module("gunicorn")
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CEILING,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    lines = out.splitlines()
    assert "parked 1" in lines, out
    assert "served [('192.0.2.10', 51234)] parked 0" in lines, out
    assert "resting True served 1" in lines and "resting False" in lines, out
    assert "served [('192.0.2.10', 51234), ('192.0.2.10', 51234)]" in lines, out
    evicted = "closed: 1 connections already wait for their header (the process is out of file descriptors)"
    assert sum(evicted in line for line in lines) == 1, out
    assert out.count("accept() failed: [Errno 24] Too many open files") == 1, out
    assert out.count("accept() works again") == 1, out


#: The first bytes of a TLS record (a handshake record's type and version), then nothing more.
PARTIAL_RECORD = b"\x16\x03\x01"


@pytest.mark.parametrize(
    ("worker", "after_header"),
    [("sync", b""), ("sync", PARTIAL_RECORD), ("gthread", PARTIAL_RECORD)],
    ids=["sync-nothing", "sync-partial-record", "gthread-partial-record"],
)
def test_tls_handshake_stalled_after_the_header_is_closed_at_header_timeout(
    worker: str, after_header: bytes, tmp_path: Path
) -> None:
    """With ``--certfile``, a client that sends its header and then stalls the handshake is closed
    within ``PROXYPROTO_HEADER_TIMEOUT`` (one refusal line, no traceback); meanwhile gthread serves
    another client, and afterwards both workers do."""
    _need(worker)
    cert = self_signed(tmp_path)
    if cert is None:
        pytest.skip("the openssl command is not installed")
    # Closed at the deadline, asserted after more than timeout - 0.5 s (a close at once takes ms) and
    # within timeout + 5 s; gthread's good client is served 0.3 s in, long before it.
    timeout = 1.0
    flags = ["--certfile", str(cert.cert), "--keyfile", str(cert.key)]
    if worker == "gthread":
        flags += ["--threads", "2"]
    env = {"PROXYPROTO_HEADER_TIMEOUT": str(timeout)}
    header = proxyproto.encode_v2(REAL_V4, DEST_V4)
    with gunicorn(worker, tmp_path, *flags, env=env, workers=1) as server:
        stalled = connect(server.address, header + after_header)
        start = time.monotonic()
        if worker == "gthread":
            time.sleep(0.3)  # (the stalled handshake holds a pool thread by now)
            status, seen = get(server.address, header, tls=cert.client_context())
            assert status == 200 and seen["client"] == list(REAL_V4), seen
        assert closed_unserved(stalled)
        elapsed = time.monotonic() - start
        status, seen = get(server.address, header, tls=cert.client_context())
        assert status == 200 and seen["client"] == list(REAL_V4) and seen["scheme"] == "https", seen
        log = server.log()
    assert timeout - 0.5 < elapsed < timeout + 5.0, elapsed
    assert re.search(rf"127\.0\.0\.1:\d+: closed: TLS handshake not done within {timeout:g} s", log), log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_untrusted_peer_sending_a_header_gets_one_warning_line(worker: str, tmp_path: Path) -> None:
    """127.0.0.2 (untrusted, SKIP) sends a header 0.2 s after connecting: gunicorn answers the bytes as
    payload, and one WARNING says the peer sent a PROXY header but is not trusted; its plain requests
    add no line."""
    _need(worker)
    with gunicorn(worker, tmp_path, workers=1) as server:
        sock = connect(server.address, local="127.0.0.2")
        try:
            time.sleep(0.2)
            sock.sendall(
                proxyproto.encode_v1(REAL_V4, DEST_V4) + b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            try:
                status, seen = read_response(sock)
            except ConnectionError:
                status, seen = 0, {}
        finally:
            sock.close()
        assert status != 200, seen
        for _ in range(2):
            status, seen = get(server.address, local="127.0.0.2")
            assert status == 200 and seen["client"][0] == "127.0.0.2", seen
        time.sleep(0.2)
        log = server.log()
    warning = "[WARNING] proxyproto: 127.0.0.2:"
    lines = [line for line in log.splitlines() if warning in line]
    assert len(lines) == 1, log
    assert "sent a PROXY header but is not trusted" in lines[0], log
