"""``proxyproto`` on the command line: send, decode and relay PROXY protocol headers.

* ``proxyproto send HOST PORT --source IP:PORT --destination IP:PORT``:
  connect, send a v1 or v2 header, then relay stdin to the socket and the
  socket to stdout, like ``nc`` (half-closing the socket at the end of stdin).
* ``proxyproto decode [FILE|-] [--hex] [--json]``: print the header at the
  start of a capture, and the length of the payload after it.
* ``proxyproto relay --listen HOST:PORT --upstream HOST:PORT``: a local
  stand-in for haproxy's ``send-proxy`` / ``send-proxy-v2``: forward each
  connection to the upstream, prefixed with a header carrying the client's
  address and the listening address.
* ``proxyproto --version``: the package's version.

Exit codes: 0 success, 1 bad input or a network failure (one line on
stderr saying which), 2 bad usage (argparse's message).

This module holds the command line's syntax (the parser and its argument
types) and :func:`main`, which runs a command and turns its outcome into the
exit code.  The commands themselves are in :mod:`proxyproto.cli_relay` (send,
relay) and :mod:`proxyproto.cli_decode`; :mod:`proxyproto.cli_failure` holds
the error they raise.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence

from . import __version__
from .cli_decode import command_decode
from .cli_failure import PROG, Failure
from .cli_relay import command_relay, command_send
from .tlv import TLVType

__all__ = ["main"]


# -- argument types --------------------------------------------------------------------


def parse_endpoint(text: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT`` (an argparse type): host text as given, port as int."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT (IPv6 as [::1]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: write an IPv6 address in brackets, as [::1]:PORT")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port {number} is out of range 0-65535")
    return host, number


def parse_ip_endpoint(text: str) -> tuple[str, int]:
    """Like :func:`parse_endpoint`, but the host must be an IP address (header fields)."""
    host, port = parse_endpoint(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not an IP address") from None
    return host, port


def parse_tlv(text: str) -> tuple[int, bytes]:
    """``TYPE=HEX``: TYPE decimal, 0x-hex or a TLVType name (``ALPN``, ``0x01``, ``1``)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TYPE=HEX, as 0xE0=0102")
    name = name.strip()
    try:
        tlv_type = TLVType[name.upper()].value if name.upper() in TLVType.__members__ else int(name, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: TLV type {name!r} is not a number or a TLV name") from None
    if not 0 <= tlv_type <= 255:
        raise argparse.ArgumentTypeError(f"{text!r}: TLV type {tlv_type} is out of range 0-255")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: value {value!r} is not hex") from None
    return tlv_type, data


# -- entry point -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send, decode and relay HAProxy PROXY protocol (v1/v2) headers.",
        epilog="Exit status: 0 success, 1 bad input or network failure, 2 bad usage.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    send = commands.add_parser(
        "send",
        help="connect, send a header, then relay stdin/stdout like nc",
        description="Connect to HOST PORT, send a PROXY header, then copy stdin to the connection and the "
        "connection to stdout; at the end of stdin, half-close (the answer still arrives).",
        epilog="Without --source and --destination the header carries no addresses: v2 sends a PROXY command "
        "with family and protocol UNSPEC (bytes 0x21 0x00), v1 sends 'PROXY UNKNOWN'. A receiver then keeps the "
        "connection's own address, or may refuse the header (the spec allows both; go-proxyproto refuses it). "
        "--local sends a v2 LOCAL command instead, as haproxy's health checks do, which every receiver must accept.",
    )
    send.add_argument("host", metavar="HOST")
    send.add_argument("port", metavar="PORT", type=int)
    send.add_argument(
        "--source",
        type=parse_ip_endpoint,
        metavar="IP:PORT",
        help="the client the header names (with --destination; without both: an UNSPEC/UNKNOWN header)",
    )
    send.add_argument(
        "--destination",
        type=parse_ip_endpoint,
        metavar="IP:PORT",
        help="the address the client connected to (with --source)",
    )
    version = send.add_mutually_exclusive_group()
    version.add_argument("--v1", action="store_true", help="send a v1 text header")
    version.add_argument("--v2", action="store_true", help="send a v2 binary header (the default)")
    send.add_argument("--local", action="store_true", help="v2 LOCAL command (no addresses), as health checks send")
    send.add_argument(
        "--tlv", action="append", type=parse_tlv, metavar="TYPE=HEX", help="add a v2 TLV (repeatable), e.g. 0xE0=0102"
    )
    send.add_argument("--authority", metavar="NAME", help="add a PP2_TYPE_AUTHORITY TLV (the SNI host name)")
    send.add_argument("--checksum", action="store_true", help="add a PP2_TYPE_CRC32C TLV")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds to connect (default: 10)")
    send.set_defaults(run=command_send)

    decode = commands.add_parser(
        "decode",
        help="print the header at the start of a capture",
        description="Decode the PROXY header at the start of FILE (or stdin) and print it, with the payload length.",
    )
    decode.add_argument("file", nargs="?", default="-", metavar="FILE", help="capture file, or - for stdin (default)")
    decode.add_argument("--hex", action="store_true", help="the input is hex text (whitespace ignored)")
    decode.add_argument("--json", action="store_true", help="print JSON instead of text")
    decode.add_argument("--no-verify-checksum", action="store_true", help="do not verify a CRC32C TLV")
    decode.add_argument("--allow-v4-in-tcp6", action="store_true", help="accept nginx's mixed TCP6 lines")
    decode.set_defaults(run=command_decode)

    relay = commands.add_parser(
        "relay",
        help="forward connections to an upstream with a header (a stand-in for haproxy send-proxy)",
        description="Listen on --listen and forward every connection to --upstream, prefixed with a PROXY header "
        "naming the client's address and the listening address. Stops on SIGINT or SIGTERM.",
    )
    relay.add_argument("--listen", type=parse_endpoint, required=True, metavar="HOST:PORT", help="port 0 picks one")
    relay.add_argument("--upstream", type=parse_endpoint, required=True, metavar="HOST:PORT")
    version = relay.add_mutually_exclusive_group()
    version.add_argument("--v1", action="store_true", help="send v1 headers (haproxy send-proxy)")
    version.add_argument("--v2", action="store_true", help="send v2 headers (send-proxy-v2; the default)")
    relay.add_argument("--checksum", action="store_true", help="add a CRC32C TLV to v2 headers")
    relay.add_argument("--max-connections", type=int, metavar="N", help="exit after N connections have finished")
    relay.add_argument("--once", action="store_true", help="same as --max-connections 1")
    relay.set_defaults(run=command_relay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (argparse exits with 2 on bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except Failure as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
