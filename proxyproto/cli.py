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
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import __version__
from .cli_decode import command_decode
from .cli_failure import PROG, Failure
from .tlv import TLVType
from .v1 import encode as encode_v1
from .v2 import encode as encode_v2

__all__ = ["main"]

CHUNK = 65536
#: accept() errors that mean "out of descriptors or memory": the listener stays readable,
#: so retrying at once would spin; the relay rests instead (as the server mixin does).
ACCEPT_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: Seconds the relay stops polling its listener after such an error.
ACCEPT_BACKOFF = 0.1


# -- addresses -----------------------------------------------------------------------


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


def endpoint_text(address: Any) -> str:
    """``host:port``, ``[v6]:port``, or a UNIX name, for messages and ``decode``."""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        return "unix:@" + address[1:].decode("utf-8", "backslashreplace")
    return f"unix:{address}"


# -- send ----------------------------------------------------------------------------


def build_header(
    version: int,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    local: bool = False,
    tlvs: Sequence[tuple[int, bytes]] = (),
    checksum: bool = False,
) -> bytes:
    """The header ``send`` and ``relay`` write; ``Failure`` for an impossible combination."""
    try:
        if version == 1:
            if local or tlvs or checksum:
                raise Failure("--local, --tlv, --authority and --checksum need a v2 header (drop --v1)")
            return encode_v1(source, destination)
        if local:
            if source is not None or destination is not None:
                raise Failure("--local: a LOCAL header carries no addresses (drop --source/--destination)")
            return encode_v2(command=0, tlvs=tlvs, checksum=checksum)
        return encode_v2(source, destination, tlvs=tlvs, checksum=checksum)
    except ValueError as exc:
        raise Failure(f"cannot build the header: {exc}") from None


def _pump(source: Any, sink: Any) -> None:
    """Copy one direction until EOF; ``source``/``sink`` are sockets or descriptors."""
    while True:
        data = source.recv(CHUNK) if isinstance(source, socket.socket) else os.read(source, CHUNK)
        if not data:
            return
        if isinstance(sink, socket.socket):
            sink.sendall(data)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(sink, view) :]


def command_send(args: argparse.Namespace) -> int:
    tlvs = list(args.tlv or ())
    if args.authority is not None:
        tlvs.append((TLVType.AUTHORITY, args.authority.encode("utf-8")))
    if (args.source is None) != (args.destination is None):
        raise Failure("give both --source and --destination, or neither (v1 UNKNOWN / v2 UNSPEC)")
    header = build_header(
        1 if args.v1 else 2, args.source, args.destination, local=args.local, tlvs=tlvs, checksum=args.checksum
    )
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as exc:
        raise Failure(f"cannot connect to {endpoint_text((args.host, args.port))}: {exc}") from None
    sock.settimeout(None)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout.flush()

    def upload() -> None:
        try:
            _pump(stdin, sock)
            sock.shutdown(socket.SHUT_WR)  # half-close: the server sees EOF, its answer still arrives
        except OSError:
            pass  # the connection failed: the download side sees it and reports it

    with sock:
        try:
            sock.sendall(header)
        except OSError as exc:
            raise Failure(f"cannot send the header: {exc}") from None
        threading.Thread(target=upload, name="stdin->socket", daemon=True).start()
        try:
            _pump(sock, stdout)
        except BrokenPipeError:
            return 0  # stdout closed early (``| head``): not a failure of the connection
        except OSError as exc:
            raise Failure(f"connection to {endpoint_text((args.host, args.port))} failed: {exc}") from None
    return 0


# -- relay ---------------------------------------------------------------------------


class Relay:
    """Accept connections, forward each to the upstream with a PROXY header first.

    One thread per connection and direction; the main thread accepts and
    watches for the stop signal.  ``max_connections`` bounds the number of
    connections accepted (then the relay waits for them to finish and exits).
    """

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        *,
        version: int = 2,
        checksum: bool = False,
        max_connections: int | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.upstream = upstream
        self.version = version
        self.checksum = checksum
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.stopping = threading.Event()
        self.active: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        try:
            infos = socket.getaddrinfo(listen[0], listen[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, address = infos[0]
            listener = socket.socket(family, kind, proto)
        except OSError as exc:
            raise Failure(f"cannot listen on {endpoint_text(listen)}: {exc}") from None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise Failure(f"cannot listen on {endpoint_text(listen)}: {exc}") from None
        self.listener = listener

    @property
    def address(self) -> tuple[Any, ...]:
        return self.listener.getsockname()  # type: ignore[no-any-return]

    def stop(self, *_: object) -> None:
        """Stop accepting; close every connection still open (signal handler)."""
        self.stopping.set()

    def serve(self) -> None:
        """Accept until stopped (or ``max_connections``), then wait for the connections to end.

        When ``accept()`` runs out of descriptors or memory (EMFILE, ENFILE,
        ENOBUFS, ENOMEM) the pending connection stays in the backlog and the
        listener stays readable: retrying at once would burn a whole core
        until a descriptor is free.  The relay stops polling the listener for
        :data:`ACCEPT_BACKOFF` seconds instead, says so once per episode on
        stderr, and says so again when ``accept()`` works again.
        """
        accepted = 0
        failing = False
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            while not self.stopping.is_set():
                if self.max_connections is not None and accepted >= self.max_connections:
                    break
                if not selector.select(0.1):
                    continue
                try:
                    client, peer = self.listener.accept()
                except OSError as exc:
                    if exc.errno in ACCEPT_RESOURCE_ERRORS:
                        if not failing:
                            failing = True
                            self._say(f"accept() failed: {exc}; pausing the listener until it works again")
                        time.sleep(ACCEPT_BACKOFF)  # not stopping.wait(): stop() runs as a signal handler
                    continue  # ECONNABORTED and the like: that one connection is gone, the next may be fine
                if failing:
                    failing = False
                    self._say("accept() works again")
                accepted += 1
                self.threads = [t for t in self.threads if t.is_alive()]
                thread = threading.Thread(target=self.handle, args=(client, peer), daemon=True)
                self.threads.append(thread)
                thread.start()
        self.listener.close()
        while not self.stopping.is_set() and any(t.is_alive() for t in self.threads):
            time.sleep(0.05)  # not stopping.wait(): an Event's lock taken in a signal handler can deadlock
        with self.lock:
            for sock in list(self.active):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self.threads:
            thread.join(2.0)

    @staticmethod
    def _say(message: str) -> None:
        """One line on stderr, as every relay message."""
        print(f"{PROG} relay: {message}", file=sys.stderr, flush=True)

    def handle(self, client: socket.socket, peer: Any) -> None:
        try:
            local = client.getsockname()
            header = build_header(self.version, peer[:2], local[:2], checksum=self.checksum)
            upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout)
        except (OSError, Failure) as exc:
            self._say(f"{endpoint_text(peer)}: cannot reach {endpoint_text(self.upstream)}: {exc}")
            client.close()
            return
        upstream.settimeout(None)
        with self.lock:
            self.active.update((client, upstream))
        try:
            upstream.sendall(header)
            back = threading.Thread(target=self._direction, args=(upstream, client), daemon=True)
            back.start()
            self._direction(client, upstream)
            back.join()
        except OSError:
            pass
        finally:
            with self.lock:
                self.active.difference_update((client, upstream))
            client.close()
            upstream.close()

    @staticmethod
    def _direction(source: socket.socket, sink: socket.socket) -> None:
        try:
            _pump(source, sink)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            try:
                sink.shutdown(socket.SHUT_RDWR)
                source.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def command_relay(args: argparse.Namespace) -> int:
    if args.v1 and args.checksum:
        raise Failure("--checksum needs a v2 header (drop --v1)")
    limit = 1 if args.once else args.max_connections
    relay = Relay(
        args.listen, args.upstream, version=1 if args.v1 else 2, checksum=args.checksum, max_connections=limit
    )
    previous = {sig: signal.signal(sig, relay.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(
            f"{PROG} relay: listening on {endpoint_text(relay.address)}, forwarding to "
            f"{endpoint_text(args.upstream)} with PROXY v{1 if args.v1 else 2} headers",
            file=sys.stderr,
            flush=True,
        )
        relay.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


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
