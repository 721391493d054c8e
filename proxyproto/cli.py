"""``proxyproto`` on the command line: send, decode and relay PROXY protocol headers.

* ``proxyproto send HOST PORT --source IP:PORT --destination IP:PORT``:
  connect, send a v1 or v2 header, then relay stdin to the socket and the
  socket to stdout, like ``nc`` (half-closing the socket at the end of stdin).
  With ``--udp``: one datagram, a v2 header and stdin, and print the reply.
* ``proxyproto decode [FILE|-] [--hex] [--json]``: print the header at the
  start of a capture, and the length of the payload after it.
* ``proxyproto relay --listen HOST:PORT --upstream HOST:PORT``: a local
  stand-in for haproxy's ``send-proxy`` / ``send-proxy-v2``: forward each
  connection to the upstream, prefixed with a header carrying the client's
  address and the listening address.  With ``--udp``, a stand-in for
  dnsdist's ``useProxyProtocol``: a header in front of every datagram.
* ``proxyproto --version``: the package's version.

Exit codes: 0 success; 1 bad input or a network failure; 2 bad usage.
Either error is one line on stderr, ``proxyproto COMMAND: error: MESSAGE``;
a usage error's message names the option at fault.  Each command's
``--help`` ends with the codes it uses (:data:`EXIT_STATUS`).

This module holds the command line's syntax: the parser, its argument types,
and the checks of options that cannot go together (run before any socket is
opened); and :func:`main`, which runs a command and turns its outcome into
the exit code.  The commands themselves are in :mod:`proxyproto.cli_relay`
(send, relay over TCP), :mod:`proxyproto.cli_udp` (their ``--udp`` forms)
and :mod:`proxyproto.cli_decode`; :mod:`proxyproto.cli_failure` holds the
errors they raise.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .cli_decode import command_decode
from .cli_failure import PROG, Failure, UsageError
from .cli_relay import command_relay, command_send
from .cli_udp import command_relay_udp, command_send_udp
from .tlv import TLVType

__all__ = ["main"]

#: What each command's ``--help`` says about exit codes (``""``: the top-level help).
#: "CODE meaning" items separated by "; ": tests/cli reads them back and runs a case of each.
EXIT_STATUS = {
    "": "0 success; 1 bad input or a network failure; 2 bad usage",
    "send": "0 the exchange ended; 1 a network failure (cannot connect, the connection broke, "
    "with --udp no reply within --timeout); 2 bad usage",
    "decode": "0 a header was decoded; 1 bad input (not one complete, valid header, or a FILE that cannot be "
    "read); 2 bad usage",
    "relay": "0 stopped by SIGINT or SIGTERM, or after --max-connections; 1 a network failure "
    "(cannot listen: the port is taken, or not permitted); 2 bad usage",
}
#: The sentence after the codes: what "bad usage" means.
USAGE_NOTE = (
    "Bad usage is a bad or conflicting option, or an address that cannot exist here (a name that does not "
    "resolve, an address family or a listening address this host lacks); one line on stderr names the option."
)


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


def parse_remote_endpoint(text: str) -> tuple[str, int]:
    """Like :func:`parse_endpoint`, for an address to send to: port 0 is refused."""
    host, port = parse_endpoint(text)
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: port 0 cannot be sent to (1-65535)")
    return host, port


def parse_ip_endpoint(text: str) -> tuple[str, int]:
    """Like :func:`parse_endpoint`, but the host must be an IP address (header fields)."""
    host, port = parse_endpoint(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not an IP address") from None
    return host, port


def parse_port(text: str) -> int:
    """A port to send to: 1-65535."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is out of range 1-65535")
    return number


def parse_seconds(text: str) -> float:
    """A duration: a finite number of seconds above 0."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return seconds


def parse_count(text: str) -> int:
    """A count: a whole number from 1."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number}: give 1 or more")
    return number


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


# -- options that cannot go together -------------------------------------------------------


def _endpoint_text(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_send(args: argparse.Namespace) -> None:
    """Refuse option combinations ``send`` cannot carry out (:class:`UsageError`, naming the options)."""
    if args.udp and args.v1:
        raise UsageError("--udp: the PROXY protocol has no v1 for datagrams (drop --v1)")
    if args.v1:
        v2_only = [
            name
            for name, given in (
                ("--local", args.local),
                ("--tlv", args.tlv),
                ("--authority", args.authority is not None),
                ("--checksum", args.checksum),
            )
            if given
        ]
        if v2_only:
            raise UsageError(f"{', '.join(v2_only)}: only a v2 header carries it (drop --v1)")
    if (args.source is None) != (args.destination is None):
        given, missing = ("--source", "--destination") if args.destination is None else ("--destination", "--source")
        raise UsageError(f"{given} without {missing}: give both, or neither (a v2 UNSPEC / v1 UNKNOWN header)")
    if args.local and args.source is not None:
        raise UsageError("--local: a LOCAL header carries no addresses (drop --source and --destination)")
    if args.source is not None:
        check_families(args.source, args.destination)


def check_families(source: tuple[str, int], destination: tuple[str, int]) -> None:
    """Refuse an IPv4 and an IPv6 address in one header (the encoders would map the IPv4 side silently)."""
    versions = ipaddress.ip_address(source[0]).version, ipaddress.ip_address(destination[0]).version
    if versions[0] == versions[1]:
        return
    v4 = destination if versions[0] == 6 else source
    raise UsageError(
        f"--source {_endpoint_text(source)} is IPv{versions[0]} but --destination {_endpoint_text(destination)} "
        f"is IPv{versions[1]}: give both in one family (or, if a v4-mapped address is really meant, "
        f"write the IPv4 side as [::ffff:{v4[0]}]:{v4[1]})"
    )


def check_relay(args: argparse.Namespace) -> None:
    """Refuse option combinations ``relay`` cannot carry out (:class:`UsageError`, naming the options)."""
    if args.udp and args.v1:
        raise UsageError("--udp: the PROXY protocol has no v1 for datagrams (drop --v1)")
    if args.v1 and args.checksum:
        raise UsageError("--checksum: only a v2 header carries it (drop --v1)")
    if args.udp:
        counted = [
            name for name, value in (("--once", args.once), ("--max-connections", args.max_connections)) if value
        ]
        if counted:
            raise UsageError(
                f"{', '.join(counted)}: a UDP relay has no connections to count (stop it with SIGINT or SIGTERM)"
            )
    else:
        udp_only = [
            name
            for name, value in (("--idle-timeout", args.idle_timeout), ("--max-clients", args.max_clients))
            if value is not None
        ]
        if udp_only:
            raise UsageError(f"{', '.join(udp_only)}: only a UDP relay has clients to map (add --udp)")


def check_nothing(args: argparse.Namespace) -> None:
    """``decode``: its options all go together."""


def run_send(args: argparse.Namespace) -> int:
    return command_send_udp(args) if args.udp else command_send(args)


def run_relay(args: argparse.Namespace) -> int:
    return command_relay_udp(args) if args.udp else command_relay(args)


# -- entry point -----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are :class:`UsageError` (one line, exit 2), never usage text and SystemExit."""

    def error(self, message: str) -> NoReturn:
        raise _ParserUsageError(self.prog, message)


class _ParserUsageError(UsageError):
    """A usage error argparse found; ``prog`` names the (sub)command whose parser found it."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


def _epilog(command: str, before: str = "") -> str:
    return f"{before} Exit status: {EXIT_STATUS[command]}. {USAGE_NOTE}".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Send, decode and relay HAProxy PROXY protocol (v1/v2) headers, over TCP or UDP.",
        epilog=_epilog(""),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    send = commands.add_parser(
        "send",
        help="connect, send a header, then relay stdin/stdout like nc (--udp: one datagram and its reply)",
        description="Connect to HOST PORT, send a PROXY header, then copy stdin to the connection and the "
        "connection to stdout; at the end of stdin, half-close (the answer still arrives). With --udp: send one "
        "datagram, a v2 header (protocol DGRAM) followed by stdin read to its end, and print the first datagram "
        "that comes back.",
        epilog=_epilog(
            "send",
            "Without --source and --destination the header carries no addresses: v2 sends a PROXY command "
            "with family and protocol UNSPEC (bytes 0x21 0x00), v1 sends 'PROXY UNKNOWN'. A receiver then keeps the "
            "connection's own address, or may refuse the header (the spec allows both; go-proxyproto refuses it). "
            "--local sends a v2 LOCAL command instead, as haproxy's health checks do, which every receiver must "
            "accept. --source and --destination must be of one family: write an IPv4 address as [::ffff:a.b.c.d] "
            "to pair it with an IPv6 one.",
        ),
    )
    send.add_argument("host", metavar="HOST")
    send.add_argument("port", metavar="PORT", type=parse_port)
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
        help="the address the client connected to (with --source, of the same family)",
    )
    version = send.add_mutually_exclusive_group()
    version.add_argument("--v1", action="store_true", help="send a v1 text header (not with --udp)")
    version.add_argument("--v2", action="store_true", help="send a v2 binary header (the default)")
    send.add_argument("--udp", action="store_true", help="send one UDP datagram (v2, protocol DGRAM), print the reply")
    send.add_argument("--local", action="store_true", help="v2 LOCAL command (no addresses), as health checks send")
    send.add_argument(
        "--tlv", action="append", type=parse_tlv, metavar="TYPE=HEX", help="add a v2 TLV (repeatable), e.g. 0xE0=0102"
    )
    send.add_argument("--authority", metavar="NAME", help="add a PP2_TYPE_AUTHORITY TLV (the SNI host name)")
    send.add_argument("--checksum", action="store_true", help="add a PP2_TYPE_CRC32C TLV")
    send.add_argument(
        "--timeout",
        type=parse_seconds,
        default=10.0,
        metavar="SECONDS",
        help="seconds to connect, or with --udp to wait for the reply (default: 10)",
    )
    send.set_defaults(run=run_send, check=check_send)

    decode = commands.add_parser(
        "decode",
        help="print the header at the start of a capture",
        description="Decode the PROXY header at the start of FILE (or stdin) and print it, with the payload length.",
        epilog=_epilog("decode"),
    )
    decode.add_argument("file", nargs="?", default="-", metavar="FILE", help="capture file, or - for stdin (default)")
    decode.add_argument("--hex", action="store_true", help="the input is hex text (whitespace ignored)")
    decode.add_argument("--json", action="store_true", help="print JSON instead of text")
    decode.add_argument("--no-verify-checksum", action="store_true", help="do not verify a CRC32C TLV")
    decode.add_argument("--allow-v4-in-tcp6", action="store_true", help="accept nginx's mixed TCP6 lines")
    decode.set_defaults(run=command_decode, check=check_nothing)

    relay = commands.add_parser(
        "relay",
        help="forward connections (--udp: datagrams) to an upstream with a header (haproxy send-proxy, dnsdist)",
        description="Listen on --listen and forward every connection to --upstream, prefixed with a PROXY header "
        "naming the client's address and the listening address. With --udp, forward every datagram instead, each "
        "prefixed with its own v2 header (protocol DGRAM), from one socket per client so that the upstream's replies "
        "are relayed back to that client, as dnsdist's useProxyProtocol does. Stops on SIGINT or SIGTERM.",
        epilog=_epilog(
            "relay",
            "The header's addresses are the client's and the one it reached, as the listening socket sees them: on "
            "a dual-stack [::] listener an IPv4 client is ::ffff:a.b.c.d on both sides (TCP6/UDP6), as haproxy "
            "sends it.",
        ),
    )
    relay.add_argument("--listen", type=parse_endpoint, required=True, metavar="HOST:PORT", help="port 0 picks one")
    relay.add_argument("--upstream", type=parse_remote_endpoint, required=True, metavar="HOST:PORT")
    version = relay.add_mutually_exclusive_group()
    version.add_argument("--v1", action="store_true", help="send v1 headers (haproxy send-proxy; not with --udp)")
    version.add_argument("--v2", action="store_true", help="send v2 headers (send-proxy-v2; the default)")
    relay.add_argument("--udp", action="store_true", help="relay UDP datagrams, one v2 header (DGRAM) in front of each")
    relay.add_argument("--checksum", action="store_true", help="add a CRC32C TLV to v2 headers")
    count = relay.add_mutually_exclusive_group()
    count.add_argument("--max-connections", type=parse_count, metavar="N", help="exit after N connections (TCP)")
    count.add_argument("--once", action="store_true", help="same as --max-connections 1")
    relay.add_argument(
        "--idle-timeout",
        type=parse_seconds,
        metavar="SECONDS",
        help="with --udp: forget a client after this long without a datagram either way (default: 30)",
    )
    relay.add_argument(
        "--max-clients",
        type=parse_count,
        metavar="N",
        help="with --udp: clients mapped at once, one socket each; beyond it the least recently active one is "
        "forgotten (default: 256)",
    )
    relay.set_defaults(run=run_relay, check=check_relay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1, or 2 for bad usage; ``--help`` exits 0)."""
    prog = PROG
    try:
        args, extra = build_parser().parse_known_args(argv)
        prog = f"{PROG} {args.command}"
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        args.check(args)
        return int(args.run(args))
    except Failure as exc:
        print(f"{getattr(exc, 'prog', prog)}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
