"""``proxyproto send`` and ``proxyproto relay``: a PROXY header on a connection, then its bytes both ways.

* :func:`command_send` connects to a server, sends one header built from the
  options, then copies stdin to the socket and the socket to stdout, like
  ``nc``, half-closing the socket at the end of stdin.
* :class:`Relay` (run by :func:`command_relay`) is a local stand-in for
  haproxy's ``send-proxy`` / ``send-proxy-v2``: it accepts connections and
  forwards each to an upstream, prefixed with a header carrying the client's
  address and the listening address.

With ``--udp`` both hand over to :mod:`proxyproto.cli_udp`, after the same
header is built and the same addresses checked.  Both write the header
:func:`build_header` makes and copy bytes with the same loop;
:func:`endpoint_text` writes addresses in their messages, and
:func:`listening_socket` opens the relays' listeners.

The options are valid here (:mod:`proxyproto.cli` checked them): what can
still go wrong is a name that does not resolve, an address that cannot be
bound, a header the options make too large (usage errors, exit 2), or the
network (exit 1).
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .cli_failure import PROG, Failure, UsageError, address_failure
from .header import Protocol
from .parking import ACCEPT_BACKOFF, ACCEPT_RESOURCE_ERRORS
from .tlv import TLVType
from .v1 import encode as encode_v1
from .v2 import encode as encode_v2

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

CHUNK = 65536


def endpoint_text(address: Any) -> str:
    """``host:port``, ``[v6]:port``, or a UNIX name, for the messages of ``send`` and ``relay``."""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        return "unix:@" + address[1:].decode("utf-8", "backslashreplace")
    return f"unix:{address}"


def build_header(
    version: int,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    local: bool = False,
    tlvs: Sequence[tuple[int, bytes]] = (),
    checksum: bool = False,
    protocol: Protocol = Protocol.STREAM,
) -> bytes:
    """The header ``send`` and ``relay`` write (v2 ``protocol`` STREAM, or DGRAM for UDP).

    The combination is one :mod:`proxyproto.cli` accepted (v1 only without
    TLVs, checksum, LOCAL); ``ValueError`` from the encoders (a header
    too large, an address they refuse) passes through for the caller to
    report.
    """
    if version == 1:
        return encode_v1(source, destination)
    if local:
        return encode_v2(command=0, tlvs=tlvs, checksum=checksum)
    return encode_v2(source, destination, protocol=protocol, tlvs=tlvs, checksum=checksum)


def listening_socket(listen: tuple[str, int], kind: int) -> socket.socket:
    """A socket of ``kind`` (STREAM or DGRAM) bound to ``--listen``; usage error or Failure, as it fails.

    ``[::]`` (and ``::``) is dual-stack whatever the host's default, so IPv4
    clients reach it too, as ``::ffff:a.b.c.d``.
    """
    where = f"--listen {endpoint_text(listen)}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(listen[0], listen[1], type=kind, flags=socket.AI_PASSIVE)[
            0
        ]
    except OSError as exc:
        raise address_failure(exc)(f"{where}: cannot resolve it: {exc.strerror or exc}") from None
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise address_failure(exc, binding=True)(f"{where}: cannot listen there: {exc.strerror or exc}") from None
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::" and hasattr(socket, "IPV6_V6ONLY"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise address_failure(exc, binding=True)(f"{where}: cannot listen there: {exc.strerror or exc}") from None
    return sock


def resolve(option: str, endpoint: tuple[str, int], kind: int) -> tuple[int, Any]:
    """``(family, sockaddr)`` of the first address ``endpoint`` resolves to; a name that does not exist is usage."""
    try:
        family, _, _, _, address = socket.getaddrinfo(endpoint[0], endpoint[1], type=kind)[0]
    except OSError as exc:
        reason = exc.strerror or exc
        raise address_failure(exc)(f"{option} {endpoint_text(endpoint)}: cannot resolve it: {reason}") from None
    return family, address


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


# -- send ----------------------------------------------------------------------------


def send_header(args: argparse.Namespace) -> bytes:
    """The header the options of ``send`` describe (STREAM, or DGRAM with ``--udp``); too large is a usage error."""
    tlvs = list(args.tlv or ())
    if args.authority is not None:
        tlvs.append((TLVType.AUTHORITY, args.authority.encode("utf-8")))
    try:
        return build_header(
            1 if args.v1 else 2,
            args.source,
            args.destination,
            local=args.local,
            tlvs=tlvs,
            checksum=args.checksum,
            protocol=Protocol.DGRAM if args.udp else Protocol.STREAM,
        )
    except ValueError as exc:
        raise UsageError(f"--tlv, --authority: cannot build the header: {exc}") from None


def connect_failure(host: str, port: int, exc: OSError) -> Failure:
    """The error for a failed connect (or, for UDP, send) to ``HOST PORT``: a name that does not exist is usage."""
    kind = address_failure(exc)
    where = endpoint_text((host, port))
    if isinstance(exc, socket.gaierror):
        return kind(f"HOST {host!r}: cannot resolve it: {exc.strerror or exc}")
    return kind(f"cannot connect to {where}: {exc.strerror or exc}")


def command_send(args: argparse.Namespace) -> int:
    """``send`` over TCP: the header, then stdin to the connection and the connection to stdout."""
    header = send_header(args)
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as exc:
        raise connect_failure(args.host, args.port, exc) from None
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
        listener = listening_socket(listen, socket.SOCK_STREAM)
        try:
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise Failure(f"--listen {endpoint_text(listen)}: cannot listen there: {exc.strerror or exc}") from None
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
        failing = ""  # what ran out ("accept()", "starting a thread"), said once until it works again
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
                        failing = self._pause(failing, "accept()", exc)
                    continue  # ECONNABORTED and the like: that one connection is gone, the next may be fine
                self.threads = [t for t in self.threads if t.is_alive()]
                thread = threading.Thread(target=self.handle, args=(client, peer), daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # out of threads (a pids limit, TasksMax, memory): that one is closed
                    client.close()
                    failing = self._pause(failing, "starting a thread", exc)
                    continue
                if failing:
                    self._say(f"{failing} works again")
                    failing = ""
                accepted += 1
                self.threads.append(thread)
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

    def _pause(self, failing: str, what: str, exc: Exception) -> str:
        """``what`` failed for lack of resources: say so once per episode, rest :data:`ACCEPT_BACKOFF`; the episode."""
        if failing != what:
            self._say(f"{what} failed: {exc}; pausing the listener until it works again")
        time.sleep(ACCEPT_BACKOFF)  # not stopping.wait(): stop() runs as a signal handler
        return what

    @staticmethod
    def _say(message: str) -> None:
        """One line on stderr, as every relay message."""
        print(f"{PROG} relay: {message}", file=sys.stderr, flush=True)

    def handle(self, client: socket.socket, peer: Any) -> None:
        try:
            local = client.getsockname()
            header = build_header(self.version, peer[:2], local[:2], checksum=self.checksum)
            upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout)
        except (OSError, ValueError) as exc:
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
        except RuntimeError as exc:  # no thread for the way back (out of threads): this connection ends
            self._say(f"{endpoint_text(peer)}: closed: cannot start a thread: {exc}")
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
    """``relay`` over TCP: until SIGINT, SIGTERM or ``--max-connections``; exit status 0."""
    resolve("--upstream", args.upstream, socket.SOCK_STREAM)  # a name that does not exist: say so now, not per client
    limit = 1 if args.once else args.max_connections
    relay = Relay(
        args.listen, args.upstream, version=1 if args.v1 else 2, checksum=args.checksum, max_connections=limit
    )
    banner = (
        f"listening on {endpoint_text(relay.address)}, forwarding to {endpoint_text(args.upstream)} "
        f"with PROXY v{1 if args.v1 else 2} headers"
    )
    serve_until_signal(relay, banner)
    return 0


def serve_until_signal(relay: Any, banner: str) -> None:
    """Say ``banner`` on stderr, then ``relay.serve()`` with SIGINT and SIGTERM calling ``relay.stop``.

    The previous handlers are back when it returns.
    """
    previous = {sig: signal.signal(sig, relay.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"{PROG} relay: {banner}", file=sys.stderr, flush=True)
        relay.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
