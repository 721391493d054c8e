#!/usr/bin/env python3
"""The echo server of "Proxy Protocol: what is it and how to use it with Go" (inkel, 2017), on proxyproto.

For every connection it logs ``handling connection from ADDR``, tells the
client ``Your remote address is ADDR``, reads everything the client sends
until EOF, logs ``client sent N bytes: "..."`` and closes.

Behind HAProxy with ``send-proxy`` (or ``send-proxy-v2``) ADDR is the real
client; behind a listener without it, the proxy's address; for a direct
connection, the client's own.  The default policy, USE, accepts all three on
one port, which is what the article shows but what the spec (G9) warns
against: any client can claim any address.  Use ``--policy REQUIRE`` and
``--trusted`` for anything real.

    python3 demo_echo_server.py                 # port 7654 on 127.0.0.1
    printf 'PROXY TCP4 192.168.1.12 192.168.1.20 58472 27654\\r\\ninkel\\n' | nc -N 127.0.0.1 7654
"""

from __future__ import annotations

import argparse
import logging
import socketserver
import sys
from typing import Any

import proxyproto

log = logging.getLogger("demo")

SERVER_CLASSES: dict[str, Any] = {
    "sync": proxyproto.ProxyTCPServer,
    "threading": proxyproto.ThreadingProxyTCPServer,
    "forking": proxyproto.ForkingProxyTCPServer,
}


def format_address(address: Any) -> str:
    """``host:port``, ``[host]:port`` for IPv6, or a UNIX path."""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


def quote(data: bytes) -> str:
    """Quote bytes the way Go's %q does for the article's log line: ``"inkel\\n"``."""
    escapes = {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x22: '\\"', 0x5C: "\\\\"}
    out = []
    for byte in data:
        if byte in escapes:
            out.append(escapes[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


class EchoHandler(socketserver.BaseRequestHandler):
    """Tell the client its address, then read until EOF and log what it sent."""

    def handle(self) -> None:
        address = format_address(self.client_address)
        log.info("handling connection from %s", address)
        self.request.sendall(f"Your remote address is {address}\n".encode())
        received = bytearray()
        while True:
            chunk = self.request.recv(65536)
            if not chunk:
                break
            received += chunk
        log.info("client sent %d bytes: %s", len(received), quote(bytes(received)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7654, help="TCP port (default: 7654)")
    parser.add_argument("--mode", choices=sorted(SERVER_CLASSES), default="threading", help="server class")
    parser.add_argument(
        "--policy",
        choices=[policy.name for policy in proxyproto.Policy],
        default="USE",
        help="what a trusted peer must do (default: USE, header optional)",
    )
    parser.add_argument(
        "--trusted", action="append", metavar="NETWORK", help="network allowed to send headers (repeatable)"
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=3.0,
        help="seconds to wait for a header; a silent client is served after it under USE (default: 3)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    server_class = SERVER_CLASSES[args.mode]
    server_class.allow_reuse_address = True
    server = server_class((args.host, args.port), EchoHandler)
    server.proxy_policy = proxyproto.Policy[args.policy]
    server.proxy_trusted = args.trusted
    server.proxy_header_timeout = args.header_timeout
    host, port = server.server_address[:2]
    log.info("listening on %s (%s server, policy %s)", format_address((host, port)), args.mode, args.policy)
    if args.policy in ("USE", "REQUIRE") and not args.trusted:
        log.warning("policy %s with no --trusted networks: any client can claim any address", args.policy)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
