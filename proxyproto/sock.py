"""Reading a header from a plain socket, and sending one.

:class:`HeaderAttempt` is the per-connection state machine every socket
adapter shares: it peeks at what has arrived, asks the core's
:class:`~proxyproto.reader.HeaderScanner` what it is, and consumes exactly
the header bytes, never one byte more (T3: the payload stays in the kernel
for the handler).  It never blocks: the
socketserver mixin calls :meth:`HeaderAttempt.step` when a parked socket is
readable, :func:`read_header` when ``poll`` says so.

Under REQUIRE every byte before the header's end is header (or garbage), so
an incomplete header is consumed into a small buffer.  Under the opt-in
policies an ambiguous prefix (``PR``) may still be payload and must stay in
the kernel, so the attempt waits for one more byte with ``SO_RCVLOWAT``
(Linux TCP) rather than spin on peeks; elsewhere it asks to be polled again
after a short delay.
"""

from __future__ import annotations

import logging
import select
import socket
import sys
import time
import weakref
from collections.abc import Sequence
from typing import Any, Callable

from . import reader
from .advice import SIGNATURE_PEEK as _SIGNATURE_PEEK
from .errors import ProxyProtocolError
from .header import AddressInput, ProxyHeader
from .policy import Attempt, Policy, decide
from .reader import HeaderScanner, Outcome
from .v1 import encode as encode_v1
from .v2 import encode as encode_v2

__all__ = ["create_connection", "read_header"]

_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_SO_RCVLOWAT = getattr(socket, "SO_RCVLOWAT", None)
# Linux TCP honours SO_RCVLOWAT in poll/epoll; elsewhere (and for AF_UNIX) it may not.
_LOWAT_FAMILIES = (socket.AF_INET, socket.AF_INET6) if sys.platform.startswith("linux") else ()
#: Bytes of the first peek: without TLVs every header fits in 536 (G4); larger ones are peeked again whole.
FIRST_PEEK = 536
#: Seconds between peeks where SO_RCVLOWAT does not make poll wait for more bytes.
RETRY_DELAY = 0.02


def take_complete_header(
    sock: socket.socket, max_size: int | None, verify_checksum: bool, allow_v4_in_tcp6: bool
) -> ProxyHeader | None:
    """One peek: when it holds a complete, valid header, consume exactly that and return it.

    Otherwise (nothing yet, incomplete, not a header, malformed) consume
    nothing and return None: the caller then runs a :class:`HeaderAttempt`,
    whose scanner says what arrived, and the policy what to make of it.
    This is the path of every connection whose proxy sent the header at
    once, as real proxies do, so it asks :func:`reader.parse` alone and
    builds no :class:`~proxyproto.reader.HeaderScanner` (bench/README.md):
    any answer but a complete header is the scanner's, on the long way.
    """
    try:
        data = sock.recv(FIRST_PEEK, _PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    try:
        header = (
            reader.parse(data, max_size=max_size, verify_checksum=verify_checksum, allow_v4_in_tcp6=allow_v4_in_tcp6)
            if data
            else None
        )
    except ProxyProtocolError:
        return None
    if header is not None and len(sock.recv(header.length, _DONTWAIT)) != header.length:  # pragma: no cover
        raise OSError("PROXY header bytes vanished between peek and read")
    return header


def read_complete_header(
    sock: socket.socket, size: int, max_size: int | None, verify_checksum: bool, allow_v4_in_tcp6: bool
) -> tuple[ProxyHeader | None, bytes | None]:
    """One read of up to ``size`` bytes: ``(header, the bytes after it)`` when they start with a complete, valid header.

    Unlike :func:`take_complete_header` this consumes what it reads, the
    header and whatever came after it, in one system call, for a caller that
    hands the bytes after the header to its server's own reader (gunicorn's
    sync worker: the request that came in the header's segment).  Otherwise
    it returns ``(None, data)``: ``data`` the bytes read (``b""`` at the end
    of the stream), which the caller must keep (the scanner of a
    :class:`~proxyproto.waiting.ParkedConnections` takes them:
    ``park(..., first=data)``), or None when nothing has arrived (nothing
    was consumed).  Never blocks; ``OSError`` from the socket propagates.
    Like :func:`take_complete_header` it asks :func:`reader.parse` alone:
    any answer but a complete header is the scanner's, on the long way.
    """
    try:
        data = sock.recv(size, _DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None, None
    if not data:
        return None, data
    try:
        header = reader.parse(
            data, max_size=max_size, verify_checksum=verify_checksum, allow_v4_in_tcp6=allow_v4_in_tcp6
        )
    except ProxyProtocolError:
        return None, data
    if header is None:
        return None, data
    return header, data[header.length :]


class HeaderAttempt(Attempt):
    """One connection's header, read without blocking: peek, decide, consume exactly.

    The socket half of a :class:`~proxyproto.reader.HeaderScanner`: this
    class peeks and reads, the scanner says what the bytes are.  After
    :meth:`step` returns True, :attr:`outcome` says what arrived and
    :attr:`header` / :attr:`error` hold the details.  ``waiting`` is set
    while an opt-in policy holds an ambiguous prefix in the kernel; then
    ``needs_retry`` says the socket cannot be polled for more (no
    ``SO_RCVLOWAT``) and the caller must call :meth:`step` again later.
    """

    __slots__ = ("lowat", "needs_retry", "sock", "waiting")

    def __init__(
        self,
        sock: socket.socket,
        policy: Policy = Policy.REQUIRE,
        *,
        max_size: int | None = None,
        verify_checksum: bool = True,
        allow_v4_in_tcp6: bool = False,
    ) -> None:
        # Under REQUIRE every byte before the header's end is header (or garbage to refuse):
        # the scanner lets it be taken out of the kernel, so a sender writing in small pieces
        # never stalls.  Under the opt-in policies an ambiguous prefix stays where it is.
        scanner = HeaderScanner(
            max_size=max_size,
            verify_checksum=verify_checksum,
            allow_v4_in_tcp6=allow_v4_in_tcp6,
            required=policy is Policy.REQUIRE,
        )
        super().__init__(policy, scanner)
        self.sock = sock
        self.waiting = 0  # bytes of an ambiguous prefix left in the kernel (opt-in)
        self.lowat = False
        self.needs_retry = False

    @property
    def started(self) -> bool:
        """Some bytes of a header have arrived."""
        return self.scanner.seen > 0

    def step(self) -> bool:
        """Make whatever progress the socket allows now; True once the outcome is known.

        ``OSError`` from the socket (a reset, say) propagates unchanged.
        """
        sock = self.sock
        scanner = self.scanner
        window = scanner.window - len(scanner.held)
        request = window if self.waiting else min(window, FIRST_PEEK)
        while True:
            try:
                data = sock.recv(request, _PEEK)
            except (BlockingIOError, InterruptedError):
                return False
            if not data:
                scanner.eof()
                return True
            if self.waiting and len(data) <= self.waiting:
                if self.lowat or peer_closed(sock):  # readable, yet nothing new: the peer closed
                    scanner.eof()
                    return True
                return False
            outcome = scanner.look(data)
            if outcome is None and len(data) == request < window:  # more may be waiting already: look at all
                request = window
                continue
            break
        if outcome is Outcome.HEADER:
            take = scanner.take
            if len(sock.recv(take, _DONTWAIT)) != take:  # pragma: no cover - the kernel gave back less
                raise OSError("PROXY header bytes vanished between peek and read")
            return True
        if outcome is not None:
            return True  # NO_HEADER or INVALID: nothing is consumed
        if scanner.take:  # every byte peeked is the header's: take it out of the kernel
            scanner.feed(sock.recv(scanner.take, _DONTWAIT))
            if self.waiting:
                self.waiting = 0
                self.needs_retry = False
                self.release()
        else:
            self._wait_for_more(len(data))
        return False

    def _wait_for_more(self, have: int) -> None:
        self.waiting = have
        if _SO_RCVLOWAT is not None and self.sock.family in _LOWAT_FAMILIES:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, have + 1)
            self.lowat = True
        else:
            self.needs_retry = True

    def release(self) -> None:
        """Undo what waiting changed on the socket (SO_RCVLOWAT) before handing it on."""
        if self.lowat:
            self.lowat = False
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, 1)  # type: ignore[arg-type]


_POLLRDHUP = getattr(select, "POLLRDHUP", 0)


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has shut down its side, even with bytes still queued (Linux POLLRDHUP).

    A peek cannot tell: it returns the queued bytes either way.  Without
    POLLRDHUP this answers False, and such a connection waits for its deadline.
    """
    if not _POLLRDHUP or not hasattr(select, "poll"):
        return False
    poller = select.poll()
    poller.register(sock.fileno(), _POLLRDHUP)
    return bool(poller.poll(0))


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``sock`` to be readable (poll, or select where poll is missing)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(max(1, int(timeout * 1000 + 0.999))))
    return bool(select.select([sock], [], [], timeout)[0])  # pragma: no cover - Windows


def wait_for_outcome(attempt: HeaderAttempt, deadline: float) -> None:
    """Drive ``attempt`` to an outcome, blocking until ``deadline`` (monotonic) at most.

    The socket is stepped only when it is reported readable (or, without
    SO_RCVLOWAT, after a short sleep): a step after a timed-out wait would read
    "nothing new" as the peer having closed.
    """
    while not attempt.step():
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attempt.timed_out()
                return
            if attempt.needs_retry:
                time.sleep(min(remaining, RETRY_DELAY))
                break
            if _readable(attempt.sock, remaining):
                break


def read_header(
    sock: socket.socket,
    *,
    timeout: float = 10.0,
    policy: Policy | str = Policy.REQUIRE,
    **parse_options: Any,
) -> ProxyHeader | None:
    """Read the PROXY header at the start of ``sock``, blocking at most ``timeout`` seconds in all.

    Consumes exactly the header bytes and nothing after them, and restores
    the socket's timeout.  Returns the header, or None where the policy
    serves a connection without one (SKIP never reads).  Raises, where the
    policy closes: :class:`NoProxyHeader`, :class:`InvalidHeader`,
    :class:`ChecksumError`, :class:`HeaderRejected`, :class:`HeaderTimeout`.
    ``OSError`` from the socket passes through.  ``parse_options`` are those
    of :func:`proxyproto.parse`.
    """
    policy = Policy(policy)
    if policy is Policy.SKIP:
        return None
    attempt = HeaderAttempt(sock, policy, **parse_options)
    saved = sock.gettimeout()
    deadline = time.monotonic() + timeout
    if saved != 0.0:
        sock.settimeout(0.0)
    try:
        wait_for_outcome(attempt, deadline)
    finally:
        attempt.release()
        if saved != 0.0:
            sock.settimeout(saved)
    assert attempt.outcome is not None
    if not decide(policy, attempt.outcome).serve:
        raise attempt.exception(timeout)
    return attempt.header


def create_connection(
    address: tuple[str, int] | str,
    *,
    source: AddressInput | None,
    destination: AddressInput | None,
    version: int = 2,
    tlvs: Sequence[tuple[int, bytes]] = (),
    timeout: float | None = None,
) -> socket.socket:
    """``socket.create_connection`` that sends a PROXY header first, in one write.

    ``address`` is ``(host, port)`` or a UNIX socket path.  The header is
    built before connecting, so bad addresses raise ``ValueError`` without
    touching the network.  For tests, clients and proxies.
    """
    if version == 1:
        if tlvs:
            raise ValueError("tlvs: a v1 header carries no TLVs")
        header = encode_v1(source, destination)
    elif version == 2:
        header = encode_v2(source, destination, tlvs=tlvs)
    else:
        raise ValueError(f"version: must be 1 or 2, got {version!r}")
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(address, timeout=socket.getdefaulttimeout() if timeout is None else timeout)
    try:
        sock.sendall(header)
    except BaseException:
        sock.close()
        raise
    return sock


# -- showing a connection's first read to a look -----------------------------------------------------

#: The look of each connection whose class is a first-read class (until its first read).
_LOOKS: weakref.WeakKeyDictionary[socket.socket, Callable[[bytes], None]] = weakref.WeakKeyDictionary()
#: The first-read class made for each socket class.
_FIRST_READ: dict[type, type] = {}


# -- bytes read with the header, given back to the server's reader ------------------------------------

_SOCKET: Any = socket.socket  # (the class a preloaded socket gets back)
_MSG_PEEK = int(socket.MSG_PEEK)  # (an int: the flag itself is an enum, whose ``&`` runs Python code)

#: Bytes a connection's first read took out of the socket after the header, until the server reads them.
_PRELOADED: dict[socket.socket, bytes] = {}


class _Preloaded(socket.socket):
    """A connection whose next reads return :data:`_PRELOADED`'s bytes first (see :func:`preload`).

    Reading them all gives the socket its class back: from then on every
    read is the socket's own.  ``MSG_PEEK`` looks without consuming.
    """

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = _PRELOADED.get(self)
        if data is None:  # pragma: no cover - (the class goes back with the last byte given)
            self.__class__ = _SOCKET
            return socket.socket.recv(self, bufsize, flags)
        if bufsize <= 0:
            return b""
        given = data[:bufsize]
        if not flags & _MSG_PEEK:
            self._took(data, len(given))
        return given

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        data = _PRELOADED.get(self)
        if data is None:  # pragma: no cover - (the class goes back with the last byte given)
            self.__class__ = _SOCKET
            return socket.socket.recv_into(self, buffer, nbytes, flags)
        view = memoryview(buffer).cast("B")
        size = min(len(data), nbytes or len(view), len(view))
        view[:size] = data[:size]
        if not flags & _MSG_PEEK:
            self._took(data, size)
        return size

    def _took(self, data: bytes, size: int) -> None:
        if size < len(data):
            _PRELOADED[self] = data[size:]
        else:
            del _PRELOADED[self]
            self.__class__ = _SOCKET


def preload(sock: socket.socket, data: bytes) -> None:
    """Make ``data`` the next bytes read from ``sock`` (``recv``, ``recv_into``), before the socket's own.

    For the bytes a connection's first read took out of the kernel after
    the PROXY header (the request, often whole; :func:`read_complete_header`):
    a server's reader (gunicorn's ``SocketUnreader``, which calls
    ``sock.recv``) reads them as if they had stayed in the socket; not a
    byte is lost or invented.  :func:`unload` drops what is left when the
    connection ends before they are all read.  The
    socket's class is swapped for :class:`_Preloaded` until they are read
    (only ``socket.socket`` itself, what ``accept()`` gives).
    """
    _PRELOADED[sock] = data
    sock.__class__ = _Preloaded


def unload(sock: socket.socket) -> None:
    """Forget what :func:`preload` gave ``sock`` and was not read (the connection ended first)."""
    if _PRELOADED.pop(sock, None) is not None:
        sock.__class__ = _SOCKET


def look_at_first_read(sock: socket.socket, look: Callable[[bytes], None]) -> None:
    """Show ``sock``'s first read (its first ``SIGNATURE_PEEK`` bytes) to ``look``; then ``sock`` is as before.

    For the diagnosis of an untrusted peer served under SKIP (does its
    stream start with a PROXY header?) without reading a byte the server
    would not: the server's own first ``recv`` or ``recv_into`` (a
    ``makefile`` reads through it) is the look's.  ``sock``'s class is
    swapped for a subclass that overrides those two methods, and swapped back
    at the first read that returns, so only such connections pay for it,
    once.  A look that raises is logged at DEBUG: the read keeps its bytes.
    """
    base = type(sock)
    swapped = _FIRST_READ.get(base)
    if swapped is None:
        swapped = _FIRST_READ[base] = type(f"FirstRead{base.__name__}", (_FirstRead, base), {"__slots__": ()})
    _LOOKS[sock] = look
    sock.__class__ = swapped


class _FirstRead(socket.socket):
    """The methods of :func:`look_at_first_read`'s classes (mixed in before the socket's own class)."""

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self._first(data[:_SIGNATURE_PEEK])
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        size = super().recv_into(buffer, nbytes, flags)
        self._first(bytes(memoryview(buffer)[: min(size, _SIGNATURE_PEEK)]))
        return size

    def _first(self, start: bytes) -> None:
        self.__class__ = type(self).__mro__[2]  # the class it had: (swapped, _FirstRead, base, ...)
        look = _LOOKS.pop(self, None)
        if look is not None:
            try:
                look(start)
            except Exception:  # a diagnosis must never cost the read its bytes
                logging.getLogger("proxyproto").debug("the first-read look failed", exc_info=True)

