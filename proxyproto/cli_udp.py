"""``proxyproto send --udp`` and ``proxyproto relay --udp``: a PROXY v2 header in front of every datagram.

The spec has no v1 for datagrams, and every datagram carries its own header
(rule G8), whose protocol is DGRAM: family byte 0x12 for UDP over IPv4, 0x22
over IPv6.  The receiver strips it and answers without one, to the address
the datagram came from.

* :func:`command_send_udp` sends one datagram, the header and stdin read to
  its end, from a socket connected to HOST PORT, and prints the first
  datagram that comes back.
* :class:`UDPRelay` (run by :func:`command_relay_udp`) does for UDP what
  dnsdist's ``useProxyProtocol`` does for DNS: each client datagram goes to
  the upstream behind a header naming the client and the address it wrote
  to, from a socket of that client's, so that what the upstream answers on
  that socket can only be for that client and is sent back to it.

The header and the addresses are checked as for TCP (:mod:`proxyproto.cli`);
the sockets and messages come from :mod:`proxyproto.cli_relay`.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import selectors
import socket
import struct
import sys
import time
from collections import OrderedDict
from typing import Any

from .cli_failure import PROG, Failure, UsageError
from .cli_relay import (
    build_header,
    connect_failure,
    endpoint_text,
    listening_socket,
    resolve,
    send_header,
    serve_until_signal,
)
from .header import Protocol

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst

#: Bytes read per datagram: the largest UDP payload there is.
DATAGRAM = 65535
#: Seconds between two looks at the stop flag and at the idle clients.
POLL_INTERVAL = 0.1
#: Defaults of ``--idle-timeout`` and ``--max-clients``.
IDLE_TIMEOUT = 30.0
MAX_CLIENTS = 256
#: Seconds between two lines on stderr about the same kind of trouble.
SAY_INTERVAL = 1.0
#: Linux's IP_PKTINFO, for the Pythons whose socket module does not name it (before 3.12).
IP_PKTINFO: int | None = getattr(socket, "IP_PKTINFO", 8 if sys.platform.startswith("linux") else None)


# -- send --udp ---------------------------------------------------------------------------


def datagram_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A UDP socket connected to ``host port``, its timeout ``timeout``; usage error for a name that does not exist.

    Connected, so that a datagram from anyone else is never taken for the
    reply, and an ICMP "port unreachable" is reported as such.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise connect_failure(host, port, exc) from None
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except OSError as exc:
        sock.close()
        raise connect_failure(host, port, exc) from None
    return sock


def exchange(sock: socket.socket, datagram: bytes) -> bytes:
    """Send ``datagram`` on the connected ``sock``; return the first datagram that comes back.

    :class:`Failure` when none comes within the socket's timeout, when the
    peer's port is unreachable, or when the datagram is too large for UDP.
    """
    where = endpoint_text(sock.getpeername())
    try:
        sock.send(datagram)
        return sock.recv(DATAGRAM)
    except socket.timeout:
        raise Failure(f"no reply from {where} within {sock.gettimeout():g} s (--timeout)") from None
    except ConnectionRefusedError:
        raise Failure(f"{where} refused the datagram: nothing listens on that UDP port") from None
    except OSError as exc:
        if exc.errno == errno.EMSGSIZE:
            raise Failure(f"the datagram, {len(datagram)} bytes with the header, is too large for UDP") from None
        raise Failure(f"cannot send to {where}: {exc.strerror or exc}") from None


def command_send_udp(args: argparse.Namespace) -> int:
    """``send --udp``: one datagram (header + stdin, read to its end), the reply on stdout as it came."""
    header = send_header(args)
    with datagram_socket(args.host, args.port, args.timeout) as sock:
        reply = exchange(sock, header + sys.stdin.buffer.read())
    sys.stdout.buffer.write(reply)
    sys.stdout.buffer.flush()
    return 0


# -- which local address a datagram was sent to -------------------------------------------


def ask_destinations(sock: socket.socket, where: str) -> None:
    """Have ``recvmsg`` on ``sock`` report the local address of each datagram (a wildcard listener needs it)."""
    try:
        if not hasattr(sock, "recvmsg"):
            raise OSError(errno.EOPNOTSUPP, "no recvmsg on this platform")
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        elif IP_PKTINFO is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        else:
            raise OSError(errno.EOPNOTSUPP, "no IP_PKTINFO on this platform")
    except (OSError, AttributeError) as exc:
        sock.close()
        raise UsageError(
            f"{where}: cannot tell which address a datagram was sent to ({exc}): listen on one address"
        ) from None


def destination_of(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The local address in a datagram's IP_PKTINFO / IPV6_PKTINFO record, if there is one."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            return socket.inet_ntop(socket.AF_INET6, data[:16])  # struct in6_pktinfo: the address first
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])  # struct in_pktinfo: ifindex, spec_dst, addr
    return None


def source_record(family: int, host: str) -> tuple[int, int, bytes]:
    """The ``sendmsg`` record that sends a datagram from local address ``host``."""
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", 0)
    assert IP_PKTINFO is not None  # ask_destinations refused the listener otherwise
    return socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, socket.inet_pton(socket.AF_INET, host), bytes(4))


# -- relay --udp ---------------------------------------------------------------------------


class Client:
    """One client of the relay: the header its datagrams get, and its socket towards the upstream."""

    __slots__ = ("address", "header", "last_active", "local", "upstream")

    def __init__(self, address: Any, local: tuple[str, int], header: bytes, upstream: socket.socket) -> None:
        self.address = address  # as recvfrom gave it: where replies go
        self.local = local  # the relay's address the client wrote to: where replies come from
        self.header = header
        self.upstream = upstream
        self.last_active = time.monotonic()


class UDPRelay:
    """Relay datagrams to the upstream, each behind its own v2 header; relay the replies back.

    One thread and one selector.  The first datagram of a client (an address
    and port, and the local address it wrote to) opens a socket connected to
    the upstream; that datagram and the client's next ones go out on it,
    each prefixed with the client's header (source: the client; destination:
    the relay's address it wrote to), and every datagram the upstream sends
    back on it goes to that client, from that address, without a header.

    Bounded: a client with no datagram either way for ``idle_timeout``
    seconds is forgotten (its socket closed); at most ``max_clients`` are
    mapped, and a new one beyond that makes the least recently active give
    way.  A listener on a wildcard address (``0.0.0.0``, ``[::]``) learns
    each datagram's local address from IP_PKTINFO / IPV6_PKTINFO, and
    answers from it.  ``stop()`` (the signal handler) ends :meth:`serve`
    within :data:`POLL_INTERVAL`, which closes every socket.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        *,
        checksum: bool = False,
        idle_timeout: float = IDLE_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.upstream_family, self.upstream = resolve("--upstream", upstream, socket.SOCK_DGRAM)
        self.upstream_text = endpoint_text(upstream)
        self.checksum = checksum
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.listener = listening_socket(listen, socket.SOCK_DGRAM)
        self.bound: tuple[str, int] = self.listener.getsockname()[:2]
        self.wildcard = ipaddress.ip_address(self.bound[0]).is_unspecified
        if self.wildcard:
            ask_destinations(self.listener, f"--listen {endpoint_text(listen)}")
        self.listener.setblocking(False)
        self.clients: OrderedDict[tuple[Any, tuple[str, int]], Client] = OrderedDict()  # least recently active first
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.stopping = False
        self.full = False  # the table is full and it was said; said again once it has room
        self.said: dict[str, float] = {}

    @property
    def address(self) -> tuple[Any, ...]:
        return self.listener.getsockname()  # type: ignore[no-any-return]

    def stop(self, *_: object) -> None:
        """Stop relaying (signal handler): :meth:`serve` returns within :data:`POLL_INTERVAL`."""
        self.stopping = True

    def serve(self) -> None:
        """Relay until :meth:`stop`; then close every socket."""
        try:
            while not self.stopping:
                for key, _ in self.selector.select(POLL_INTERVAL):
                    if key.data is None:
                        self._from_client()
                    else:
                        self._from_upstream(key.data)
                self._expire(time.monotonic())
        finally:
            for client in list(self.clients.values()):
                self._forget(client)
            self.selector.close()
            self.listener.close()

    def _say(self, kind: str, message: str) -> None:
        """One line on stderr, at most one per :data:`SAY_INTERVAL` for each ``kind`` (datagrams cost nothing)."""
        now = time.monotonic()
        if now - self.said.get(kind, -SAY_INTERVAL) >= SAY_INTERVAL:
            self.said[kind] = now
            print(f"{PROG} relay: {message}", file=sys.stderr, flush=True)

    def _receive(self) -> tuple[bytes, Any, tuple[str, int]]:
        """A client datagram, its source, and the relay's address it was sent to."""
        if not self.wildcard:
            data, source = self.listener.recvfrom(DATAGRAM)
            return data, source, self.bound
        data, ancdata, _, source = self.listener.recvmsg(DATAGRAM, socket.CMSG_SPACE(20))
        return data, source, (destination_of(ancdata) or self.bound[0], self.bound[1])

    def _from_client(self) -> None:
        try:
            data, source, local = self._receive()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._say("receive", f"cannot receive on {endpoint_text(self.bound)}: {exc}")
            return
        client = self.clients.get((source, local)) or self._map(source, local)
        if client is None:
            return
        self._touch(client)
        try:
            client.upstream.send(client.header + data)
        except OSError as exc:  # ICMP unreachable for an earlier datagram, a datagram too large, a full buffer
            self._say("upstream", f"{endpoint_text(source)}: cannot send to {self.upstream_text}: {exc}")

    def _map(self, source: Any, local: tuple[str, int]) -> Client | None:
        """A new client: its header and upstream socket, room made for it first."""
        if len(self.clients) >= self.max_clients:
            self._forget(next(iter(self.clients.values())))
            if not self.full:
                self.full = True
                self._say(
                    "full",
                    f"{self.max_clients} clients mapped (--max-clients): the least recently active give way",
                )
        try:
            header = build_header(2, source[:2], local, checksum=self.checksum, protocol=Protocol.DGRAM)
            upstream = socket.socket(self.upstream_family, socket.SOCK_DGRAM)
        except (OSError, ValueError) as exc:
            self._say("map", f"{endpoint_text(source)}: cannot relay its datagrams: {exc}")
            return None
        try:
            upstream.setblocking(False)
            upstream.connect(self.upstream)  # only the upstream's datagrams arrive on it
        except OSError as exc:
            upstream.close()
            self._say("map", f"{endpoint_text(source)}: cannot reach {self.upstream_text}: {exc}")
            return None
        client = Client(source, local, header, upstream)
        self.clients[(source, local)] = client
        self.selector.register(upstream, selectors.EVENT_READ, client)
        return client

    def _from_upstream(self, client: Client) -> None:
        if self.clients.get((client.address, client.local)) is not client:
            return  # forgotten to make room, after select() found its socket readable
        try:
            data = client.upstream.recv(DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ConnectionRefusedError: an ICMP "port unreachable" for a datagram sent before
            reason = exc.strerror or exc
            self._say("upstream", f"{endpoint_text(client.address)}: {self.upstream_text} did not take it: {reason}")
            return
        self._touch(client)
        try:
            if self.wildcard:
                record = source_record(self.listener.family, client.local[0])
                self.listener.sendmsg([data], [record], 0, client.address)
            else:
                self.listener.sendto(data, client.address)
        except OSError as exc:
            self._say("reply", f"{endpoint_text(client.address)}: cannot send it the reply: {exc}")

    def _touch(self, client: Client) -> None:
        client.last_active = time.monotonic()
        self.clients.move_to_end((client.address, client.local))

    def _expire(self, now: float) -> None:
        """Forget the clients idle for ``idle_timeout`` (the oldest come first)."""
        while self.clients:
            oldest = next(iter(self.clients.values()))
            if now - oldest.last_active < self.idle_timeout:
                break
            self._forget(oldest)
        if self.full and len(self.clients) < self.max_clients:
            self.full = False

    def _forget(self, client: Client) -> None:
        del self.clients[(client.address, client.local)]
        self.selector.unregister(client.upstream)
        client.upstream.close()


def command_relay_udp(args: argparse.Namespace) -> int:
    """``relay --udp``: until SIGINT or SIGTERM; exit status 0."""
    relay = UDPRelay(
        args.listen,
        args.upstream,
        checksum=args.checksum,
        idle_timeout=IDLE_TIMEOUT if args.idle_timeout is None else args.idle_timeout,
        max_clients=MAX_CLIENTS if args.max_clients is None else args.max_clients,
    )
    banner = (
        f"listening on {endpoint_text(relay.address)} (UDP), forwarding datagrams to {relay.upstream_text} "
        "with PROXY v2 headers (protocol DGRAM)"
    )
    serve_until_signal(relay, banner)
    return 0
