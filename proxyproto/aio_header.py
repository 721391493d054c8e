"""One asyncio connection until its PROXY header is decided: :class:`HeaderProtocol`.

How it reads: it never reads a byte past the header, so what follows it (a
request, a ClientHello, the end of the stream) reaches the inner protocol
from the transport itself, in the order and on the loop turns it would
without the wrapper.  A header that is already in the socket when the
connection is made (the case of every real proxy: the header leaves with, or
before, the first segment) is taken in ``connection_made``, before the
transport reads anything: one ``recv`` with ``MSG_PEEK`` (as HAProxy's
receiver does) shows it, a second ``recv`` takes exactly its bytes
(:func:`peek_header`).  A header still on its way gets a buffer that grows
with it (the protocol is a ``BufferedProtocol``: the transport reads into the
buffer it gives, sized to what the header still needs: :class:`WaitingReads`),
a deadline and a parking slot.  Where the socket cannot be peeked, the reads
are sized by what the bytes read so far show (the scanner's ``need``: a v2
header's fixed part, then what its length field says; a v1 line byte by
byte).  Every decision is a :class:`proxyproto.reader.HeaderScanner`'s: this
module only peeks, reads, and acts on the outcome.
"""

from __future__ import annotations

import _socket
import asyncio
import enum
import socket
from typing import TYPE_CHECKING, Any, Callable

from .advice import handed_on, refusal_line
from .aio_tls import TLSHandOver
from .aio_transport import NOT_GIVEN, deliver_in_turn, hand_over, proxy_extra
from .header import ProxyHeader
from .policy import Outcome, Policy, decide, peer_text, pins_the_client
from .reader import HeaderScanner
from .refusal_log import kind_of

if TYPE_CHECKING:
    from .aio_protocol import ProxyProtocolFactory

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst


PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
READ_FLAGS = getattr(socket, "MSG_DONTWAIT", 0)
#: Whether a socket can be peeked without blocking (MSG_DONTWAIT exists).
CAN_PEEK = hasattr(socket, "MSG_DONTWAIT")
_AF_INET, _AF_INET6, _AF_UNIX, _SOCK_STREAM = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.SOCK_STREAM
#: The policies under which a valid header is served (the table's first row), looked up once.
#: A tuple, not a set: ``in`` finds a member by identity, where a set would call Enum's Python ``__hash__``.
_SERVES_A_HEADER = tuple(policy for policy in Policy if decide(policy, Outcome.HEADER).serve)
# Enum members as module constants for the per-connection code: on CPython 3.11 an enum member's
# attribute access goes through EnumType's slow attribute hook, a global is one lookup.
_REQUIRE, _SKIP = Policy.REQUIRE, Policy.SKIP
_HEADER, _NO_HEADER, _EOF, _SILENT = Outcome.HEADER, Outcome.NO_HEADER, Outcome.EOF, Outcome.SILENT
#: The buffer for bytes read after the decision, before ``start_tls`` takes the transport: a TLS record.
_LATE_READ = 16384


class State(enum.Enum):
    """Where a :class:`HeaderProtocol` is; each transition is made in one method, named here."""

    #: Made; ``connection_made`` serves, closes or waits.
    NEW = "new"
    #: Parked with a deadline, reading the header through ``get_buffer`` (:meth:`HeaderProtocol.wait`).
    WAITING = "waiting"
    #: Served with ``ssl=``: what the transport reads before ``start_tls`` takes it is kept for the
    #: TLS layer (:meth:`HeaderProtocol.serve`, until :meth:`HeaderProtocol.handed_to_tls`).
    HANDSHAKING = "handshaking"
    #: The transport is another protocol's: the inner's, or the TLS layer's on its way to it
    #: (:meth:`HeaderProtocol.serve`, :meth:`HeaderProtocol.handed_to_tls`).
    SERVED = "served"
    #: Not served: closed, or closing (:meth:`HeaderProtocol.drop`; ``connection_lost``, or a
    #: decision on a transport already closing).
    CLOSED = "closed"


_NEW, _WAITING, _HANDSHAKING, _SERVED, _CLOSED = State.NEW, State.WAITING, State.HANDSHAKING, State.SERVED, State.CLOSED


def borrow(peer: Any, sock: Any) -> Any:
    """A socket object on ``sock``'s descriptor, for one ``recv``; detach it after, it never closes it.

    The family is only a label (``recv`` does not look at it): the peer's
    shape gives it without the enum conversions of ``sock.family``.
    """
    family = _AF_UNIX if type(peer) is not tuple else _AF_INET6 if len(peer) == 4 else _AF_INET
    return _socket.socket(family, _SOCK_STREAM, 0, sock.fileno())


def peek_header(factory: ProxyProtocolFactory, peek: Any) -> HeaderScanner:
    """The scanner of the stream under ``peek``, after one peek at what it starts with.

    One peek, and a ``recv`` of exactly the header's bytes when the peek
    holds all of them, leave the stream on the first byte after the header.
    The scanner's outcome is HEADER (the header taken), NO_HEADER or INVALID
    (nothing taken), or None when undecided (a prefix, nothing yet, the end
    of the stream, a socket error): its :attr:`~HeaderScanner.held` is then
    what a short ``recv`` took, to be kept.
    """
    scanner = factory.scanner()
    try:
        ahead = peek.recv(scanner.window, PEEK_FLAGS)
    except OSError:
        return scanner  # nothing yet, or an error the transport will report
    if not ahead:
        return scanner  # the end of the stream, which the transport reports (eof_received)
    if scanner.look(ahead) is not _HEADER:
        return scanner
    size = scanner.take
    try:
        got = peek.recv(size, READ_FLAGS)
    except OSError:
        got = b""
    if len(got) == size:
        return scanner
    # A stream socket gives what it just showed; should it not, start over with what it gave.
    scanner = factory.scanner()
    scanner.feed(got)
    return scanner


def peek_complete_header(reading: HeaderProtocol, peer: Any, sock: Any) -> bool:
    """Decide ``reading``'s connection at once from what is in the socket (:func:`peek_header`); True when decided.

    Called from :meth:`HeaderProtocol.connection_made` before the transport
    has read anything (asyncio registers its reader after
    ``connection_made``, uvloop starts reading when it returns, and neither
    reads before the loop polls again), so the bytes after the header stay
    in the kernel for the transport (and with ``ssl=``, for the TLS layer).
    Decided, the connection goes through ``reading``'s own transitions: a
    stream that is no header is served with nothing consumed where the
    policy serves it, and closed where it does not, as a malformed header
    always is.  Undecided: False, with ``reading.reads`` holding the peek
    socket and anything taken, for :meth:`HeaderProtocol.wait`.
    """
    peek = borrow(peer, sock)
    scanner = peek_header(reading.factory, peek)
    outcome = scanner.outcome
    if outcome is None:
        reading.reads = WaitingReads(scanner, peek)
        return False
    peek.detach()
    if outcome is _HEADER:
        if reading.policy in _SERVES_A_HEADER:
            reading.serve(scanner.header, b"", sock)
        else:
            reading.conclude(_HEADER, scanner, header=scanner.header)
    elif outcome is _NO_HEADER and decide(reading.policy, _NO_HEADER).serve:
        reading.serve(None, b"", sock)  # nothing was read: every byte is the inner protocol's
    else:
        reading.conclude(outcome, scanner)  # closed, whatever the policy: nothing to keep
    return True


class WaitingReads:
    """The bytes of a header still on its way, read into buffers that end where the header ends.

    ``buf[:held]`` holds what was read; it grows with what the header needs
    (never beyond the scanner's window), so a parked connection holds no
    more memory than the bytes its peer sent.  ``scanner``: the stream's
    :class:`HeaderScanner`, which has been fed every byte read so far (they
    start ``buf``) and decides (:meth:`read` tells when).  ``peek``: a
    borrowed socket (:func:`borrow`) that shows what is in the kernel, or
    None where the socket cannot be peeked (reads are then sized by the
    scanner's ``need`` alone).
    """

    __slots__ = ("buf", "held", "peek", "rest", "scanner")

    def __init__(self, scanner: HeaderScanner, peek: Any) -> None:
        self.scanner = scanner
        self.peek = peek
        self.buf = bytearray(scanner.held)
        self.held = len(scanner.held)
        #: Once :meth:`read` returns an outcome: the bytes read that are the inner protocol's.
        self.rest = b""

    def window(self) -> memoryview:
        """The buffer for the transport's next read: never empty, never past the header's end."""
        held = self.held
        end = held + max(self.wanted(held), 1)
        buf = self.buf
        if len(buf) < end:
            # A new buffer, not a resize: the transport may still hold a view of the old one.
            grown = bytearray(end)
            grown[:held] = buf[:held]
            self.buf = buf = grown
        return memoryview(buf)[held:end]

    def wanted(self, held: int) -> int:
        """How many more bytes belong to the header, as far as the socket (a peek) or the bytes held show.

        With a peek, a valid prefix takes all that is there (every byte of it
        is the header's: the scanner is ``required``), a complete header
        exactly its rest, and a stream the peek shows to be wrong nothing
        (the one byte :meth:`window` still gives concludes it).
        """
        scanner = self.scanner
        header = scanner.header
        if header is not None:  # a peek found it: its bytes not read yet
            return header.length - held
        peek = self.peek
        if peek is None:
            return scanner.need
        try:
            ahead = peek.recv(scanner.window - held, PEEK_FLAGS)
        except OSError:
            ahead = b""  # nothing yet, or an error the transport's own read will report
        if not ahead:
            return 1
        scanner.look(ahead)
        return scanner.take

    def read(self, nbytes: int) -> Outcome | None:
        """Count ``nbytes`` read into :meth:`window`; the outcome once the bytes read decide it, else None.

        Decided, :attr:`rest` holds the bytes read after the header (HEADER),
        or every byte read (NO_HEADER), for the inner protocol; nothing for
        the outcomes that close.
        """
        held = self.held
        self.held = held + nbytes
        new = bytes(self.buf[held : held + nbytes])
        scanner = self.scanner
        outcome = scanner.outcome
        if outcome is None:  # undecided until these bytes
            outcome = scanner.feed(new)
            if outcome is not None:
                self.rest = scanner.rest
        elif outcome is _HEADER:  # a peek found the header: these bytes are (the end of) it
            header = scanner.header
            assert header is not None
            if self.held < header.length:
                return None  # a short read; the next window asks for the rest
        elif outcome is _NO_HEADER:  # a peek showed a wrong stream: concluded on this read
            self.rest = scanner.rest + new  # every byte read is the application's
        return outcome

    def stop(self) -> None:
        """Give the borrowed socket back (detached, never closed)."""
        if self.peek is not None:
            self.peek.detach()
            self.peek = None


class HeaderProtocol(asyncio.BufferedProtocol):
    """One connection until its header is in: exact reads, then the inner protocol takes the transport.

    The common case costs two system calls of its own and no waiting state:
    a header that arrived with the connection is peeked at and taken in
    :meth:`connection_made` (:func:`peek_complete_header`), and the inner
    protocol is served there.  Only a connection whose header is not
    complete yet gets :class:`WaitingReads`, a parking slot and a deadline,
    and reads through :meth:`get_buffer`.  :attr:`state` says where it is
    (:class:`State`).
    """

    # Class defaults, so that a connection served at once sets only what it uses.
    state = _NEW
    transport: asyncio.Transport | None = None
    peer: Any = None
    policy = Policy.REQUIRE
    #: Whether the peer is trusted: only then does its header reach the inner protocol.
    trusted = False
    #: The reads of a header not complete on arrival (from WAITING until it is decided), else None.
    reads: WaitingReads | None = None
    timer: asyncio.TimerHandle | None = None
    #: The TLS hand-over, from HANDSHAKING on; else None.
    tls: TLSHandOver | None = None
    spare = bytearray()  # replaced, never mutated
    #: The inner protocol when it was made before the header (:meth:`ProxyProtocolFactory.header_first`),
    #: else None: ``factory.factory()`` makes it once the connection is to be served.
    inner: asyncio.BaseProtocol | None = None
    #: The function ``connection_made`` of ``inner``'s original class when header_first replaced
    #: it (called with ``inner`` and the view), else None.
    connect: Callable[[Any, asyncio.BaseTransport], None] | None = None

    def __init__(
        self,
        factory: ProxyProtocolFactory,
        inner: asyncio.BaseProtocol | None = None,
        connect: Callable[[Any, asyncio.BaseTransport], None] | None = None,
    ) -> None:
        self.factory = factory
        if inner is not None:
            self.inner = inner
            self.connect = connect

    def __del__(self) -> None:
        if self.transport is None:  # made for a connection that never reached it (see the factory)
            try:
                self.factory.lost_before_connection()
            except Exception:  # a finalizer never raises (the interpreter may be shutting down)
                pass

    # -- asyncio.BaseProtocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw: Any = transport  # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        factory = self.factory
        self.transport = raw
        self.peer = peer = raw.get_extra_info("peername")
        if factory.closed:
            self.drop()
            return
        trust = factory.admit(peer, raw)
        if trust is None:
            self.drop()
            return
        policy, self.trusted = trust
        self.policy = policy
        if policy is _SKIP:
            # With ssl=, the handshake starts on the next iteration.  asyncio honours the pause
            # serve() asks for here; uvloop starts reading once connection_made returns and may
            # read (the ClientHello) first: get_buffer keeps those bytes for the TLS layer.
            inner = self.serve(None, b"")
            if inner is not None and not self.trusted and factory.ssl is None:
                factory.look_for_untrusted_header(peer, raw, inner)
            return
        sock = raw.get_extra_info("socket") if CAN_PEEK else None
        if sock is not None and peek_complete_header(self, peer, sock):
            return
        self.wait()

    def wait(self) -> None:
        """NEW -> WAITING: the header is not all there yet; wait for it, with a deadline, reading it here."""
        raw: Any = self.transport
        factory = self.factory
        if raw.get_protocol() is not self:
            raw.set_protocol(self)  # header_first's inner has the transport until now
        if self.reads is None:
            self.reads = WaitingReads(factory.scanner(), None)  # no peek: reads sized by the scanner alone
        self.state = _WAITING
        factory.park(self)
        self.timer = asyncio.get_running_loop().call_later(factory.settings.header_timeout, self.expire)

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self.state = _CLOSED

    def eof_received(self) -> bool | None:
        tls = self.tls
        if self.state is _HANDSHAKING and tls is not None:
            return tls.eof_received()
        reads = self.reads
        if reads is not None:
            scanner = reads.scanner
            outcome = scanner.eof()
            if outcome is not _EOF:  # bytes of a header, then the end: INVALID, truncated
                self.conclude(outcome, scanner, header=scanner.header)
                return None
        inner = self.conclude(_EOF)
        if inner is None or self.transport is None or self.transport.is_closing():
            return None
        if isinstance(inner, (asyncio.Protocol, asyncio.BufferedProtocol)):  # no subclass of each other
            return inner.eof_received()
        return None

    def data_received(self, data: bytes) -> None:
        """``data`` as a transport would give it through :meth:`get_buffer` and :meth:`buffer_updated`.

        Neither loop calls this on a ``BufferedProtocol``, but uvloop looks
        the attribute up on every protocol it is given, and a missing one
        costs it an ``AttributeError`` per connection.  So it exists, and is
        correct: the bytes after a decision go to the protocol that took the
        transport.
        """
        deliver_in_turn(self, self.transport, data)

    # -- reading exactly the header -------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never an empty buffer: uvloop treats one as a fatal error and resets the connection.
        reads = self.reads
        if self.state is not _WAITING or reads is None:
            # The header is decided (or never looked for) and the transport still reads into
            # this protocol: with ssl=, uvloop in the iteration before start_tls takes over.
            self.spare = bytearray(_LATE_READ)
            return memoryview(self.spare)
        return reads.window()

    def buffer_updated(self, nbytes: int) -> None:
        reads = self.reads
        if self.state is not _WAITING or reads is None:
            spare, self.spare = self.spare, bytearray()
            tls = self.tls
            if self.state is _HANDSHAKING and tls is not None:
                tls.keep(spare[:nbytes])
            return  # else the connection is closing: nothing more is read for anyone
        outcome = reads.read(nbytes)
        if outcome is not None:
            scanner = reads.scanner
            self.conclude(outcome, scanner, header=scanner.header, rest=reads.rest)

    def expire(self) -> None:
        self.timer = None
        reads = self.reads
        if reads is None:
            self.conclude(_SILENT)
        else:
            self.conclude(reads.scanner.expire(), reads.scanner)

    # -- deciding ---------------------------------------------------------------------------

    def release(self) -> None:
        """Forget the waiting state: deadline, parking slot, peek socket."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.reads is not None:
            self.reads.stop()
        self.factory.unpark(self)

    def shutdown(self) -> None:
        """Close a connection whose header is not in (server shutdown); nothing was served on it."""
        self.factory.unpark(self)
        self.abort()

    def abort(self) -> None:
        self.release()
        self.drop()

    def sockname(self) -> Any:
        """The address of this connection's listener (its socket's ``getsockname()``), for a refusal line."""
        transport = self.transport
        return None if transport is None else transport.get_extra_info("sockname")

    def drop(self, abort: bool = True) -> None:
        """-> CLOSED: a connection that is not served closes (``abort``: at once, else after its writes).

        A :meth:`ProxyProtocolFactory.header_first` inner holds the transport
        from the start; it was never told of the connection, so it must not
        be told of its end either (uvicorn's ``connection_lost`` would fail
        on a transport it never got): this protocol takes the transport back
        first.  Only from that inner: a TLS protocol mid-handshake keeps the
        transport, and learns of the close itself.
        """
        self.state = _CLOSED
        transport = self.transport
        if transport is None:
            return
        inner = self.inner
        if inner is not None and transport.get_protocol() is inner:
            transport.set_protocol(self)
        if abort:
            transport.abort()
        else:
            transport.close()

    def conclude(
        self,
        outcome: Outcome,
        scanner: HeaderScanner | None = None,
        *,
        header: ProxyHeader | None = None,
        rest: bytes = b"",
    ) -> asyncio.BaseProtocol | None:
        """Close or serve, as the policy table says; the inner protocol when served.

        ``scanner``: what decided (its error and bytes word the refusal
        line); ``rest``: the bytes read after the header (HEADER), or every
        byte read (NO_HEADER), for the inner protocol.
        """
        self.release()
        transport = self.transport
        if transport is None or transport.is_closing():
            self.state = _CLOSED
            return None
        factory = self.factory
        policy = self.policy
        verdict = decide(policy, outcome)
        if not verdict.serve:
            factory.refusals.log(
                verdict.level,
                "%s: closed: %s",
                peer_text(self.peer),
                refusal_line(factory.settings, policy, outcome, scanner, self.trusted, factory.hooked, self.peer),
                kind=kind_of(outcome),
                listener=transport.get_extra_info("sockname"),
            )
            self.drop(abort=False)
            return None
        self.reads = None
        return self.serve(header, rest)

    def serve(self, header: ProxyHeader | None, rest: bytes, sock: Any = NOT_GIVEN) -> asyncio.BaseProtocol | None:
        """-> SERVED (or HANDSHAKING with ``ssl=``): the inner protocol; ``header`` only from a trusted peer."""
        factory = self.factory
        transport = self.transport
        assert transport is not None
        # The listener is asked of the transport only for the line of an untrusted peer's header.
        where = None if self.trusted or header is None else transport.get_extra_info("sockname")
        header = handed_on(
            factory.refusals, factory.settings, self.peer, self.policy, header, self.trusted, factory.hooked, where
        )
        inner = self.inner
        if inner is None:
            inner = factory.make_inner(self.peer)
            if inner is None:
                self.drop()
                return None
        if pins_the_client(self.policy, self.trusted):
            for name, value in factory.trusted_overrides:
                setattr(inner, name, value)
        if factory.ssl is not None:
            self.state = _HANDSHAKING
            tls = self.tls = TLSHandOver(self)
            tls.start(inner, header)
            return None
        self.state = _SERVED
        hand_over(transport, inner, self.connect, proxy_extra(transport, self.policy, header, self.peer, sock), rest)
        return inner

    def handed_to_tls(self) -> None:
        """HANDSHAKING -> SERVED: the TLS layer has the transport (or ``start_tls`` failed, and closes it)."""
        if self.state is _HANDSHAKING:
            self.state = _SERVED
