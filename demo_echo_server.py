#!/usr/bin/env python3
"""The echo server of "Proxy Protocol: what is it and how to use it with Go" (inkel, 2017), on proxyproto.

For every connection it logs ``handling connection from ADDR``, tells the
client ``Your remote address is ADDR``, reads everything the client sends
until EOF, logs ``client sent N bytes: "..."`` and closes.

Behind HAProxy with ``send-proxy`` (or ``send-proxy-v2``) ADDR is the real
client; behind a listener without it, the proxy's address; for a direct
connection, the client's own.  The default policy, USE, accepts all three on
one port, which is what the article shows but what the spec (G9) warns
against: a trusted peer can claim any address.

Trust: headers are believed only from the peers ``--trusted`` names, by
default ``127.0.0.1`` and ``::1`` (loopback only, as in every proxyproto
server); anyone else is served with its own address and its bytes untouched
(a header it sends is payload).  HAProxy on another address (the article's
192.168.1.20) needs ``--trusted 192.168.1.20``; ``--trusted '*'`` trusts
every peer.  Use ``--policy REQUIRE`` and ``--trusted`` with your proxies'
networks for anything real.

    python3 demo_echo_server.py                 # port 7654 on 127.0.0.1, trusting loopback
    printf 'PROXY TCP4 192.168.1.12 192.168.1.20 58472 27654\\r\\ninkel\\n' | nc -N 127.0.0.1 7654
    python3 demo_echo_server.py --host ::1      # IPv6: the address family follows --host
    python3 demo_echo_server.py --host 0.0.0.0 --trusted 192.168.1.20   # HAProxy on another host

A mistake in the options (a host that does not resolve, a busy port, a
network that does not parse) is one line on stderr and exit status 2, as
with ``proxyproto``'s command line.
"""

from __future__ import annotations

import argparse
import logging
import socket
import socketserver
import sys
from typing import Any

import proxyproto

log = logging.getLogger("demo")
PROG = "demo_echo_server.py"
#: ``--trusted``'s default: the library's (loopback only), as the mixin's class attribute says it.
DEFAULT_TRUSTED_NETWORKS = [network for network in proxyproto.ProxyProtocolMixin.proxy_trusted.split(",") if network]

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


class UsageError(Exception):
    """A one-line error for stderr and exit status 2."""


def port_number(text: str) -> int:
    """``--port``: 0-65535 (an argparse type, so a bad one is a usage error)."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is out of range 0-65535")
    return number


def listen_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The address family and bind address for ``--host``: ``::1`` is IPv6, ``127.0.0.1`` IPv4.

    ``socketserver.TCPServer`` is AF_INET unless a subclass says otherwise,
    so the family is looked up here (``getaddrinfo``, numeric or by name).
    """
    if not host:
        return socket.AF_INET, ("", port)  # every IPv4 address, as socketserver does with ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # "[::1]", as URLs and the log lines write it
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"--host {host!r}: cannot resolve it: {exc}") from None
    family, _, _, _, address = infos[0]
    return family, address


def build_server(args: argparse.Namespace) -> socketserver.TCPServer:
    """The server ``args`` describe; UsageError for a bad option or a port that cannot be bound."""
    for option, knob, value in (
        ("--trusted", "trusted", args.trusted),
        ("--header-timeout", "header_timeout", args.header_timeout),
    ):
        try:
            proxyproto.Settings(**{knob: value})  # the library's own checks
        except ValueError as exc:  # "trusted: cannot read 'x' as an IP network: ..."
            raise UsageError(f"{option}: {str(exc).removeprefix(knob + ': ')}") from None
    family, address = listen_address(args.host, args.port)
    # A subclass, not the library's class changed in place: other users of it keep their defaults.
    server_class = type(
        "DemoServer", (SERVER_CLASSES[args.mode],), {"allow_reuse_address": True, "address_family": family}
    )
    try:
        server: socketserver.TCPServer = server_class(address, EchoHandler)
    except OSError as exc:
        where = format_address((args.host, args.port))
        raise UsageError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    server.proxy_policy = proxyproto.Policy[args.policy]  # type: ignore[attr-defined]
    server.proxy_trusted = args.trusted  # type: ignore[attr-defined]
    server.proxy_header_timeout = args.header_timeout  # type: ignore[attr-defined]
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on, IPv4 or IPv6 (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=7654, help="TCP port (default: 7654; 0 picks one)")
    parser.add_argument("--mode", choices=sorted(SERVER_CLASSES), default="threading", help="server class")
    parser.add_argument(
        "--policy",
        choices=[policy.name for policy in proxyproto.Policy],
        default="USE",
        help="what a trusted peer must do (default: USE, header optional)",
    )
    parser.add_argument(
        "--trusted",
        action="append",
        metavar="NETWORK",
        help=(
            "network allowed to send headers (repeatable; default: "
            f"{' and '.join(DEFAULT_TRUSTED_NETWORKS)}, loopback only; '*' trusts every peer)"
        ),
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=3.0,
        help="seconds to wait for a header; a silent client is served after it under USE (default: 3)",
    )
    args = parser.parse_args(argv)
    if args.trusted is None:
        args.trusted = list(DEFAULT_TRUSTED_NETWORKS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    try:
        server = build_server(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    log.info("listening on %s (%s server, policy %s)", format_address((host, port)), args.mode, args.policy)
    log.info("PROXY headers trusted from %s", ", ".join(args.trusted) or "no peer")
    if args.policy in ("USE", "REQUIRE") and "*" in args.trusted:
        log.warning("policy %s with --trusted '*': any client can claim any address", args.policy)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
