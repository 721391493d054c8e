"""Receiving: nginx stream ``proxy_protocol on;`` and curl ``--haproxy-protocol`` (both v1).

nginx writes its v1 line alone as soon as it connects upstream; curl writes
the line and its HTTP request in one write.  Either way the handler must see
the client's own socket address and nothing of the header in the payload.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
from typing import Any, Callable

import pytest
from interop_support import (
    ProcessRunner,
    exchange,
    free_port,
    require_ipv6,
    require_program,
)

import proxyproto
from proxyproto import Command, Family

PAYLOAD = b"through nginx\n"


@pytest.mark.parametrize("client", ["ipv4", "ipv6"])
def test_nginx_stream_proxy_protocol_v1_client_address(
    procs: ProcessRunner,
    proxy_server: Callable[..., Any],
    wait_for_records: Callable[..., Any],
    client: str,
) -> None:
    """nginx stream ``proxy_protocol on``: the handler sees the IPv4 or IPv6 client's own address."""
    server = proxy_server()
    if client == "ipv6":
        require_ipv6()
        listen_host, port = "::1", free_port("::1")
        listen, source = f"[::1]:{port}", None
    else:
        listen_host, port = "127.0.0.1", free_port()
        listen, source = f"127.0.0.1:{port}", ("127.0.0.2", 0)
    nginx = procs.nginx(
        f"""
    server {{
        listen {listen};
        proxy_pass 127.0.0.1:{server.address[1]};
        proxy_protocol on;
        proxy_connect_timeout 5s;
        proxy_timeout 10s;
    }}
""",
        [port],
    )
    own, reply = exchange((listen_host, port), PAYLOAD, source=source)
    (rec,) = wait_for_records(server, 1)
    assert server.errors == []
    assert rec.payload == PAYLOAD
    assert reply == b"client_address=" + repr(own).encode() + b"\n"
    h = rec.header
    assert (h.version, h.command) == (1, Command.PROXY)
    if client == "ipv6":
        assert h.family == Family.INET6
        assert h.source == ("::1", own[1])
        assert h.destination == ("::1", port)
        assert rec.client_address == ("::1", own[1], 0, 0)
    else:
        assert h.family == Family.INET
        assert h.source == own == (own[0], own[1])
        assert own[0] == "127.0.0.2"
        assert h.destination == ("127.0.0.1", port)
        assert rec.client_address == own
    # nginx's own access log agrees with the handler about who the client was.
    line = nginx.wait_for_log(lambda s: s.split()[:2] == [own[0], str(own[1])])
    assert line.split()[2:] == [listen_host, str(port)]


def curl_server(serve: Callable[[Any], Any], host: str) -> Any:
    """``http.server.ThreadingHTTPServer`` retrofitted with the mixin; replies with client_address."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            header = getattr(self.request, "proxy_header", None)
            body = json.dumps(
                {
                    "client_address": list(self.client_address),
                    "version": header.version if header else None,
                    "source": list(header.source) if header and header.source else None,
                    "path": self.path,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class S(proxyproto.ProxyProtocolMixin, http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        proxy_trusted = "127.0.0.0/8,::1"  # curl sends the header itself, from 127.0.0.2 or ::1

    return serve(S((host, 0), Handler))


@pytest.mark.parametrize("client", ["ipv4", "ipv6"])
def test_curl_haproxy_protocol_against_http_server_mixin(serve: Callable[[Any], Any], client: str) -> None:
    """curl ``--haproxy-protocol`` (v1 line and request in one write): the handler sees curl's address."""
    curl = require_program("curl")
    if client == "ipv6":
        require_ipv6()
        httpd = curl_server(serve, "::1")
        url, iface = f"http://[::1]:{httpd.server_address[1]}/who", []
    else:
        httpd = curl_server(serve, "127.0.0.1")
        url, iface = f"http://127.0.0.1:{httpd.server_address[1]}/who", ["--interface", "127.0.0.2"]
    out = subprocess.run(
        [curl, "-sS", "-g", "--max-time", "10", "--haproxy-protocol", *iface, "-w", "\n%{local_ip} %{local_port}", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    body, local = out.stdout.rsplit("\n", 1)
    local_ip, local_port = local.split()
    info = json.loads(body)
    assert info["version"] == 1
    assert info["source"] == [local_ip, int(local_port)]
    assert info["path"] == "/who"
    if client == "ipv6":
        assert info["client_address"] == ["::1", int(local_port), 0, 0]
    else:
        assert local_ip == "127.0.0.2"
        assert info["client_address"] == [local_ip, int(local_port)]
