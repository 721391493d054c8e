"""No datagram reaches the header's source: replies of any handler go to the proxy.

A trusted peer (127.0.0.1, the "proxy") sends a datagram whose header names a third
address on loopback where the test listens (the "victim", 127.0.0.3).  Handlers written for
plain ``socketserver`` answer ``client_address``; behind the datagram mixin their answers
must reach the proxy (the datagram's real sender, which relays them, as dnsdist does), and
nothing may reach the victim.  Each handler replies with what it saw (JSON), so the reply
also proves ``client_address`` is still the header's source.
"""

from __future__ import annotations

import contextlib
import copy
import json
import select
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from udp_kit import CLASS_NAMES, DEST_V4, DEST_V6, REAL_V4, REPLY_TIMEOUT, proxy_socket, running, udp4, udp6

from proxyproto import udp

#: How long the victim listens after the proxy has its reply.  Generous: on loopback a datagram
#: sent before the reply is queued at the victim before the reply is even received, and one sent
#: after it would come from the same handler call, microseconds later; udp_kit's SILENCE (how long
#: any dropped datagram's reply is awaited) is the same 0.3 s.
VICTIM_WAIT = 0.3


def report(handler: socketserver.BaseRequestHandler) -> bytes:
    payload = handler.request[0]
    return json.dumps({"client_address": list(handler.client_address), "payload": payload.hex()}).encode()


class PlainEcho(socketserver.DatagramRequestHandler):
    """socketserver's own datagram handler, as written without the library: ``finish()`` answers client_address."""

    def handle(self) -> None:
        self.wfile.write(report(self))


class SendtoClientAddress(socketserver.BaseRequestHandler):
    """A ``BaseRequestHandler`` that answers with ``self.request[1].sendto(data, self.client_address)``."""

    def handle(self) -> None:
        self.request[1].sendto(report(self), self.client_address)


PLAIN_HANDLERS = {"DatagramRequestHandler": PlainEcho, "request[1].sendto(client_address)": SendtoClientAddress}


@contextlib.contextmanager
def victim_socket(host: str = "127.0.0.3") -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        yield sock


def datagrams_arriving(sock: socket.socket, wait: float = VICTIM_WAIT) -> int:
    """How many datagrams reach ``sock`` within ``wait`` seconds."""
    count = 0
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            sock.recv(65535)
            count += 1
    return count


def reply_of(proxy: socket.socket, server: Any) -> dict[str, Any]:
    """The next datagram at the proxy: it must come from the server, and it is the handler's JSON."""
    proxy.settimeout(REPLY_TIMEOUT)
    data, sender = proxy.recvfrom(65535)
    assert sender[:2] == server.server_address[:2]
    answer: dict[str, Any] = json.loads(data)
    return answer


@pytest.mark.parametrize("name", CLASS_NAMES)
@pytest.mark.parametrize("handler", sorted(PLAIN_HANDLERS))
def test_plain_handler_reply_reaches_the_proxy_and_nothing_reaches_the_header_source(name: str, handler: str) -> None:
    with victim_socket() as victim, running(name, handler=PLAIN_HANDLERS[handler]) as server:
        with proxy_socket("127.0.0.1") as proxy:
            proxy.sendto(udp4(victim.getsockname(), DEST_V4) + b"amplify me", server.server_address)
            answer = reply_of(proxy, server)
        assert answer["client_address"] == list(victim.getsockname())  # still the real client, for logs and ACLs
        assert bytes.fromhex(answer["payload"]) == b"amplify me"
        assert datagrams_arriving(victim) == 0


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="IPv6 loopback unavailable")
def test_reply_to_an_ipv6_header_source_in_another_spelling_reaches_the_proxy() -> None:
    """``(host, port)`` and ``(host, port, 0, 0)`` name one endpoint: both are the header's source."""

    class TwoTuple(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request[1].sendto(report(self), self.client_address[:2])

    with victim_socket("::1") as victim:
        with running("ThreadingProxyUDPServer", handler=TwoTuple, host="::1") as server, proxy_socket("::1") as proxy:
            proxy.sendto(udp6(victim.getsockname()[:2], DEST_V6) + b"six", server.server_address)
            answer = reply_of(proxy, server)
        assert answer["client_address"] == [*victim.getsockname()[:2], 0, 0]
        assert datagrams_arriving(victim) == 0


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no UNIX sockets")
def test_plain_handler_on_a_unix_datagram_listener_answers_the_proxy(tmp_path: Any) -> None:
    """On a UNIX listener an IP header's source cannot even be sent to: the reply reaches the proxy's path."""

    class UnixServer(udp.ProxyDatagramMixin, socketserver.UnixDatagramServer):
        pass

    server = UnixServer(str(tmp_path / "server.sock"), PlainEcho)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as proxy:
            proxy.bind(str(tmp_path / "proxy.sock"))
            proxy.settimeout(REPLY_TIMEOUT)
            proxy.sendto(udp4() + b"unix", server.server_address)
            data, sender = proxy.recvfrom(65535)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert sender == server.server_address
    assert json.loads(data) == {"client_address": list(REAL_V4), "payload": b"unix".hex()}


def test_every_send_form_to_the_header_source_reaches_the_proxy() -> None:
    """``sendto(data, address)``, ``sendto(data, flags, address)``, ``sendmsg(..., address)``; to the proxy too."""

    class Forms(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request[1]
            sock.sendto(b"two-argument", self.client_address)
            sock.sendto(b"three-argument", 0, self.client_address)
            sock.sendmsg([b"send", b"msg"], (), 0, self.client_address)
            sock.sendto(b"to the proxy", self.request.proxy_address)

    with victim_socket() as victim, running("ProxyUDPServer", handler=Forms) as server:
        with proxy_socket("127.0.0.1") as proxy:
            proxy.sendto(udp4(victim.getsockname(), DEST_V4), server.server_address)
            got = [proxy.recvfrom(65535) for _ in range(4)]
        assert [data for data, _ in got] == [b"two-argument", b"three-argument", b"sendmsg", b"to the proxy"]
        assert all(sender == server.server_address for _, sender in got)
        assert datagrams_arriving(victim) == 0


def test_send_to_any_other_address_through_the_request_socket_is_refused() -> None:
    """A destination that is neither the header's source nor the proxy: PermissionError, nothing sent."""

    class Elsewhere(socketserver.BaseRequestHandler):
        target: Any = None

        def handle(self) -> None:
            sock = self.request[1]
            for attempt in (
                lambda: sock.sendto(b"x", self.target),
                lambda: sock.sendto(b"x", (self.client_address[0], self.client_address[1] + 1)),
                lambda: sock.sendmsg([b"x"], (), 0, self.target),
            ):
                try:
                    attempt()
                except PermissionError as exc:
                    sock.sendto(str(exc).encode(), self.request.proxy_address)
                else:
                    sock.sendto(b"sent", self.request.proxy_address)

    with victim_socket() as victim, victim_socket() as neighbour:
        Elsewhere.target = victim.getsockname()
        with running("ProxyUDPServer", handler=Elsewhere) as server, proxy_socket("127.0.0.1") as proxy:
            proxy.sendto(udp4(neighbour.getsockname(), DEST_V4), server.server_address)
            answers = [proxy.recvfrom(65535)[0].decode() for _ in range(3)]
            own = proxy.getsockname()
        for answer in answers:
            assert "refused" in answer and f"127.0.0.1:{own[1]}" in answer and "self.server.socket" in answer
        assert datagrams_arriving(victim, 0.2) == 0
        assert datagrams_arriving(neighbour, 0.2) == 0


def test_request_socket_is_the_server_socket_for_everything_but_sending() -> None:
    seen: list[Any] = []

    class Inspect(udp.ProxyDatagramRequestHandler):
        def handle(self) -> None:
            sock = self.request[1]
            copied = copy.copy(self.request)[1]
            assert copied is sock and copy.copy(sock).getsockname() == sock.getsockname()
            seen.append((sock.fileno(), sock.getsockname(), sock.family, sock.type, repr(sock)))
            self.wfile.write(b"ok")

    with running("ProxyUDPServer", handler=Inspect) as server, proxy_socket("127.0.0.1") as proxy:
        proxy.sendto(udp4() + b"x", server.server_address)
        assert proxy.recvfrom(65535)[0] == b"ok"
        listener = server.socket
        ((fileno, name, family, kind, text),) = seen
        assert (fileno, name) == (listener.fileno(), listener.getsockname())
        assert (family, kind) == (listener.family, listener.type)
        assert "ReplySocket" in text
