"""proxyproto.gunicorn's workers, through the real ``gunicorn`` command with ``--workers 2``.

Every test starts ``gunicorn -k proxyproto.gunicorn.<Worker>`` on a free loopback port (stopped by
PID with SIGTERM) and talks to it with real sockets: v1 and v2 headers, IPv4 and IPv6 sources, a
real haproxy ``send-proxy-v2`` in front, TLS after the header (``--certfile``/``--keyfile``),
keep-alive (the header once per connection), an untrusted peer, gunicorn's flags as the settings,
and a graceful shutdown with connections parked mid-header.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from gunicorn_kit import (
    CEILING,
    NEEDS,
    closed_unserved,
    connect,
    get,
    gunicorn,
    gunicorn_args,
    read_response,
    request,
)
from support import free_port, require_haproxy, require_module
from web_kit import DEST_V4, DEST_V6, HERE, REAL_V4, REAL_V6, ROOT, command, self_signed

import proxyproto

require_module("gunicorn")

#: The worker classes this file runs (each skipped when what it needs is not installed).
ALL = ["uvicorn", "uvicorn-h11"]
#: Those that keep a connection open for more requests (gunicorn's sync worker closes after each).
KEEP_ALIVE = ["uvicorn"]


def _need(worker: str) -> None:
    for module in NEEDS[worker]:
        require_module(module)


HEADERS = {
    "v1-ipv4": (proxyproto.encode_v1(REAL_V4, DEST_V4), REAL_V4),
    "v1-ipv6": (proxyproto.encode_v1(REAL_V6, DEST_V6), REAL_V6),
    "v2-ipv4": (proxyproto.encode_v2(REAL_V4, DEST_V4), REAL_V4),
    "v2-ipv6": (proxyproto.encode_v2(REAL_V6, DEST_V6, tlvs=[(proxyproto.TLVType.AUTHORITY, b"example.com")]), REAL_V6),
}


@pytest.mark.parametrize("worker", ALL)
def test_worker_serves_the_real_client_of_v1_v2_ipv4_and_ipv6_headers(worker: str, tmp_path: Path) -> None:
    _need(worker)
    with gunicorn(worker, tmp_path) as server:
        for name, (header, source) in HEADERS.items():
            status, seen = get(server.address, header)
            assert status == 200, (name, seen)
            assert seen["client"] == list(source), (name, seen)
            assert seen["header"]["source"] == list(source), (name, seen)
            assert seen["gunicorn_proxy"] is None  # gunicorn's own parser never saw it
        _, seen = get(server.address, HEADERS["v2-ipv6"][0])
        assert seen["header"]["tlvs"] == [[int(proxyproto.TLVType.AUTHORITY), b"example.com".hex()]]


@pytest.mark.parametrize("worker", ALL)
def test_worker_listening_on_ipv6_loopback_serves_the_header_source(worker: str, tmp_path: Path) -> None:
    _need(worker)
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with gunicorn(worker, tmp_path, host="::1") as server:
        status, seen = get(server.address, proxyproto.encode_v2(REAL_V4, DEST_V4))
        assert status == 200 and seen["client"] == list(REAL_V4), seen


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


@pytest.mark.parametrize("worker", ALL)
def test_untrusted_peers_header_never_becomes_the_client(worker: str, tmp_path: Path) -> None:
    """127.0.0.2 is outside the default trust list (loopback 127.0.0.1 and ::1): its header is payload."""
    _need(worker)
    with gunicorn(worker, tmp_path) as server:
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


@pytest.mark.parametrize("worker", ALL)
def test_trusted_peer_without_a_header_is_closed_unserved(worker: str, tmp_path: Path) -> None:
    _need(worker)
    with gunicorn(worker, tmp_path) as server:
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


@pytest.mark.parametrize("worker", ALL)
def test_behind_real_haproxy_send_proxy_v2(worker: str, tmp_path: Path) -> None:
    _need(worker)
    exe = require_haproxy()
    front = free_port()
    with gunicorn(worker, tmp_path) as server:
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
