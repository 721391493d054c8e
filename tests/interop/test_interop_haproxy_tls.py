"""Receiving with TLS: haproxy's TLS-frontend TLVs, and TLS passthrough to a TLS-terminating server.

Part one: haproxy terminates TLS and sends ``send-proxy-v2`` with every
``proxy-v2-options`` it has in 2.6.  Each TLV must decode to what the Python
client did (source address, SNI, ALPN, TLS version, cipher) and to what the
generated certificates say (client CN, the signature and key algorithm of
haproxy's own certificate), and the CRC32C must check out when recomputed
independently.

Part two: haproxy in ``mode tcp`` forwards the raw TLS stream behind a v2
header to an ``http.server`` that reads the header and then runs the TLS
handshake itself (its listening socket wrapped, the usual idiom); curl through
haproxy gets its own address back.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
from typing import Any, Callable

import pytest
from interop_support import (
    Certs,
    ProcessRunner,
    free_port,
    haproxy_config,
    require_program,
    v2_crc_is_valid,
    v2_tlv_offsets,
)

import proxyproto
from proxyproto import Command, Family, SSLClient

PAYLOAD = b"over tls\n"
ALL_OPTIONS = "crc32c,unique-id,authority,ssl,ssl-cipher,cert-cn,cert-sig,cert-key"


def start_tls_frontend(procs: ProcessRunner, certs: Certs, server_port: int) -> int:
    """haproxy terminating TLS (client cert optional, ALPN h2/http1.1) and sending every v2 option."""
    port = free_port()
    cfg = haproxy_config(
        f"""
frontend fe
    bind 127.0.0.1:{port} ssl crt {certs.server_pem} ca-file {certs.ca} verify optional alpn h2,http/1.1
    unique-id-format %ci:%cp
    default_backend be

backend be
    server s1 127.0.0.1:{server_port} send-proxy-v2 proxy-v2-options {ALL_OPTIONS}
"""
    )
    procs.haproxy(cfg, [port])
    return port


def tls_exchange(port: int, certs: Certs, *, client_cert: bool, tls12: bool) -> tuple[Any, dict[str, Any], bytes]:
    """A Python TLS client from 127.0.0.2 with SNI, ALPN and optionally a client certificate."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if client_cert:
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(5.0)
    raw.bind(("127.0.0.2", 0))
    raw.connect(("127.0.0.1", port))
    with ctx.wrap_socket(raw, server_hostname=certs.server_name) as tls:
        own = tls.getsockname()
        cipher = tls.cipher()
        assert cipher is not None
        seen = {"version": tls.version(), "cipher": cipher[0], "alpn": tls.selected_alpn_protocol()}
        tls.sendall(PAYLOAD)
        reply = b""
        try:
            while True:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except (ssl.SSLEOFError, ConnectionResetError):
            pass
    return own, seen, reply


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
@pytest.mark.parametrize("client_cert", [True, False], ids=["client_cert", "no_client_cert"])
def test_haproxy_tls_frontend_tlvs_match_client_and_certs_V2_TLV(
    procs: ProcessRunner,
    proxy_server: Callable[..., Any],
    wait_for_records: Callable[..., Any],
    certs: Certs,
    client_cert: bool,
    tls12: bool,
) -> None:
    """Every TLV haproxy 2.6 can send decodes to the client's and the certificates' truth."""
    server = proxy_server()
    port = start_tls_frontend(procs, certs, server.address[1])
    own, seen, reply = tls_exchange(port, certs, client_cert=client_cert, tls12=tls12)
    (rec,) = wait_for_records(server, 1)
    assert server.errors == []
    assert rec.payload == PAYLOAD
    assert reply == b"client_address=" + repr(own).encode() + b"\n"
    h = rec.header
    assert rec.client_address == own
    assert (h.version, h.command, h.family) == (2, Command.PROXY, Family.INET)
    assert h.source == own and h.destination == ("127.0.0.1", port)

    assert seen["alpn"] == "h2"
    assert h.alpn == b"h2"
    assert h.authority == certs.server_name
    assert h.unique_id == f"{own[0]}:{own[1]}".encode()

    wire = h.to_bytes()
    assert v2_tlv_offsets(wire)[0][0] == 0x03, "haproxy puts the CRC32C TLV first"
    assert v2_crc_is_valid(wire)
    assert h.crc32c == int.from_bytes(wire[v2_tlv_offsets(wire)[0][1] :][:4], "big")

    info = h.ssl
    assert info is not None
    assert info.version == seen["version"] == ("TLSv1.2" if tls12 else "TLSv1.3")
    assert info.cipher == seen["cipher"]
    assert info.sig_alg == certs.server_sig_alg
    assert info.key_alg == certs.server_key_alg
    assert info.verify == 0
    if client_cert:
        assert info.client == SSLClient.SSL | SSLClient.CERT_CONN | SSLClient.CERT_SESS
        assert info.cn == certs.client_cn
        assert info.verified is True
    else:
        assert info.client == SSLClient.SSL
        assert info.cn is None
        assert info.verified is False


def test_haproxy_tls_passthrough_curl_gets_own_address(
    procs: ProcessRunner, serve: Callable[[Any], Any], certs: Certs
) -> None:
    """``mode tcp`` + ``send-proxy-v2`` in front of a server that terminates TLS after the header."""
    curl = require_program("curl")
    seen: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            header = getattr(self.request, "proxy_header", None)
            info = {
                "client_address": list(self.client_address),
                "version": header.version if header else None,
                "tls": self.request.version() if isinstance(self.request, ssl.SSLSocket) else None,
            }
            seen.append(info)
            body = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(proxyproto.ProxyProtocolMixin, http.server.ThreadingHTTPServer):
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    serve(httpd)

    port = free_port()
    cfg = haproxy_config(
        f"""
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{httpd.server_address[1]} send-proxy-v2
"""
    )
    procs.haproxy(cfg, [port])
    out = subprocess.run(
        [
            curl,
            "-sS",
            "-k",
            "--max-time",
            "10",
            "--interface",
            "127.0.0.2",
            "-w",
            "\n%{local_ip} %{local_port}",
            f"https://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    body, local = out.stdout.rsplit("\n", 1)
    local_ip, local_port = local.split()
    info = json.loads(body)
    assert info["client_address"] == [local_ip, int(local_port)]
    assert local_ip == "127.0.0.2"
    assert info["version"] == 2
    assert info["tls"] in ("TLSv1.2", "TLSv1.3")
    assert seen == [info]
