"""Sans-I/O detection: the one place that tells v1 from v2 from neither, and what that means.

Every I/O adapter (the blocking helper, the socketserver mixin, asyncio, UDP,
waitress) asks the same question of the bytes it has so far.  :func:`measure`
answers it in numbers:

* ``n > 0``: a complete header of ``n`` bytes (``data[n:]`` is payload);
* ``-n``: a valid prefix; at least ``n`` more bytes are needed (for a v1
  line, ``1``: where the CRLF is cannot be known in advance);
* an exception: :class:`NoProxyHeader` when the first bytes already differ
  from both signatures, :class:`InvalidHeader` for anything else wrong, as
  early as the bytes show it.

:func:`parse` adds the decoding.  :class:`HeaderScanner` is the one scanner
of a stream (or of one datagram): it holds the bytes of a header still
incomplete and reduces everything that can happen to it (bytes, the end of
the stream, the deadline) to an :class:`Outcome`, with the exception that
says why; no adapter maps an exception to an outcome itself.
:class:`HeaderReader` is its exception-raising face, for code that reads a
stream in pieces and wants the header or an exception.
"""

from __future__ import annotations

import enum
from typing import Union

from . import v1, v2
from .errors import InvalidHeader, NoProxyHeader, ProxyProtocolError
from .header import Command, Protocol, ProxyHeader

__all__ = ["HeaderReader", "HeaderScanner", "Outcome", "measure"]

MAX_V1_LENGTH = v1.MAX_LENGTH
_LAST_CR = MAX_V1_LENGTH - 2  # where the CR of the longest line is
_match_line = v1.match_line
MAX_V2_LENGTH = v2.MAX_LENGTH
V2_SIGNATURE = v2.SIGNATURE

BytesLike = Union[bytes, bytearray, memoryview]


class Outcome(enum.Enum):
    """What the first bytes of a connection (or a datagram) turned out to be.

    The rows of the policy table (DESIGN.md); :func:`proxyproto.policy.decide`
    gives the cell for a policy.  :class:`HeaderScanner` reduces bytes, the
    end of a stream and a deadline to one of them.
    """

    HEADER = "a valid header"
    NO_HEADER = "no PROXY header"
    INVALID = "malformed header"
    SILENT = "nothing before the deadline"
    PARTIAL = "part of a header before the deadline"
    EOF = "closed before its first byte"


def measure(data: bytes, max_size: int | None = None) -> int:
    """How far ``data`` is from holding a complete header; see the module docstring.

    ``max_size`` caps ``16 + len`` of a v2 header (default: the spec's 65551).
    A v1 line is at most 107 bytes, CRLF included, whatever ``max_size`` says.
    """
    if not data:
        return -1
    first = data[0]
    if first == 0x0D:
        return v2.measure(data, MAX_V2_LENGTH if max_size is None else max_size)
    if first != 0x50:  # "P"
        raise NoProxyHeader(f"stream starts with {data[:8]!r}, not a PROXY protocol signature", offset=0)
    lf = data.find(b"\n", 0, MAX_V1_LENGTH)
    if lf > 0 and data[lf - 1] == 0x0D and data.find(b"\r", 0, lf - 1) < 0 and data.startswith(b"PROXY "):
        return lf + 1  # the common case: v1.decode validates the line itself
    # Slow path: report the earliest fault, bytes before the line end first.
    window = lf if lf >= 0 else min(len(data), MAX_V1_LENGTH)
    cr = data.find(b"\r", 0, window)
    stop = cr if cr >= 0 else window
    v1.check_prefix(data[:stop])
    if lf < 0 and cr < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise InvalidHeader(
                f"v1: no CRLF within the first {MAX_V1_LENGTH} bytes", field="line end", offset=MAX_V1_LENGTH
            )
        return -1
    if lf < 0 and cr == len(data) - 1 and len(data) < MAX_V1_LENGTH:
        return -1  # a CR that the next byte may complete
    if stop < 5:
        raise NoProxyHeader(f"stream starts with {data[:8]!r}, not a PROXY protocol signature", offset=stop)
    if cr >= 0 and cr != lf - 1:
        raise InvalidHeader("v1: lone CR inside the line (CRLF required)", field="line end", offset=cr)
    if cr < 0:
        raise InvalidHeader("v1: line ends with a lone LF (CRLF required)", field="line end", offset=lf)
    raise InvalidHeader("v1: line ends after 'PROXY', before the protocol", field="protocol", offset=stop)


def committed(data: bytes) -> bool:
    """Whether the first bytes commit the stream to being a header.

    After ``PROXY`` or the whole 12-byte v2 signature, whatever follows is a
    header or an :class:`InvalidHeader`, never a stream without a header; an
    adapter under an opt-in policy may then consume what it holds.
    """
    return data[:5] == b"PROXY" or data[:12] == V2_SIGNATURE


def parse(
    data: BytesLike,
    *,
    max_size: int | None = None,
    verify_checksum: bool = True,
    allow_v4_in_tcp6: bool = False,
) -> ProxyHeader | None:
    """Parse the header at the start of ``data``.

    Returns the :class:`ProxyHeader` when ``data`` starts with a complete,
    valid header (``data[h.length:]`` is payload), None when ``data`` is a
    valid but incomplete prefix of one.  Raises :class:`NoProxyHeader` when
    the stream is not a PROXY stream at all, :class:`InvalidHeader` (or
    :class:`ChecksumError`) for everything else wrong.  Never raises anything
    else for bytes-like input.

    ``allow_v4_in_tcp6`` accepts the mixed ``TCP6`` lines nginx emits, giving
    the IPv4 side as ``::ffff:a.b.c.d``.
    """
    if type(data) is not bytes:
        data = bytes(data[: MAX_V2_LENGTH if max_size is None else max(max_size, MAX_V1_LENGTH)])
    # Fast paths: a complete v1 line or v2 header that is valid; anything
    # else, incomplete or wrong, goes through measure() and the diagnosis.
    if data[:1] == b"P":
        # The first CRLF, searched without bounds (cheaper than find's start and end); one beyond
        # the 107 bytes of the longest line, or before "PROXY ", is measure()'s to explain.
        end = data.find(b"\r\n")
        if 6 <= end <= _LAST_CR:
            header = _match_line(data, end + 2, allow_v4_in_tcp6)
            if header is not None:
                return header
    else:  # v2.match checks the signature itself
        header = v2.match(data, max_size, verify_checksum)
        if header is not None:
            return header
    size = measure(data, max_size)
    if size < 0:
        return None
    if data[0] == 0x50:
        return v1.decode(data, size, allow_v4_in_tcp6)
    return v2.decode(data, size, verify_checksum)


def decode(data: bytes, size: int, verify_checksum: bool = True, allow_v4_in_tcp6: bool = False) -> ProxyHeader:
    """Decode the complete header of ``size`` bytes that :func:`measure` found at the start of ``data``."""
    if data[0] == 0x50:
        return v1.decode(data, size, allow_v4_in_tcp6)
    return v2.decode(data, size, verify_checksum)


# The members as module constants: on CPython 3.11 each ``Outcome.X`` goes through EnumType's
# slow attribute hook (bench/README.md), and the scanner runs once per connection.
_HEADER = Outcome.HEADER
_NO_HEADER = Outcome.NO_HEADER
_INVALID = Outcome.INVALID
_SILENT = Outcome.SILENT
_PARTIAL = Outcome.PARTIAL
_EOF = Outcome.EOF

_DATAGRAM_PROTOCOLS = {Protocol.UNSPEC: "UNSPEC", Protocol.STREAM: "STREAM (TCP)", Protocol.DGRAM: "DGRAM (UDP)"}


class HeaderScanner:
    """The one scanner: the bytes of one stream so far -> need more / a complete header / an outcome.

    Sans-I/O, as h11 is: the caller reads or peeks, hands the bytes over, and
    acts on the answer; the scanner never blocks, never looks at a socket and
    knows no trust.  Each stream gets its own scanner; the bytes arrive in
    one of two ways, which a stream may mix:

    * :meth:`feed` for bytes the caller has consumed (read) from the stream:
      the scanner keeps those of a header still incomplete (:attr:`held`),
      and after the outcome :attr:`rest` gives back those that belong to the
      application;
    * :meth:`look` for bytes that have arrived but are not consumed (a
      ``MSG_PEEK``, a buffer owned by someone else): :attr:`take` then says
      how many of them the caller may consume now without ever passing the
      header's end, which it does and hands to :meth:`feed`.

    Then :meth:`eof` when the stream ended and :meth:`expire` when the
    deadline passed; :meth:`datagram` scans one whole datagram instead (G8).

    Every method that can decide returns the :class:`Outcome` once it is
    known (and keeps it: later calls return it again and change nothing),
    None while more bytes are needed.  Once decided, :attr:`header` is the
    header (HEADER only) and :attr:`error` the :class:`ProxyProtocolError`
    that says what was wrong (NO_HEADER and INVALID; None for the others,
    whose text :func:`proxyproto.policy.describe` gives from the outcome
    and :attr:`seen`).  Every split of the same bytes, through either
    method, gives the same outcome, header and error as all of them at once.
    """

    __slots__ = (
        "allow_v4_in_tcp6",
        "error",
        "header",
        "held",
        "max_size",
        "need",
        "outcome",
        "required",
        "rest",
        "seen",
        "start",
        "take",
        "verify_checksum",
        "window",
    )

    def __init__(
        self,
        *,
        max_size: int | None = None,
        verify_checksum: bool = True,
        allow_v4_in_tcp6: bool = False,
        required: bool = False,
    ) -> None:
        """The options are those of :func:`parse`, plus ``required``.

        ``required``: every byte before the header's end may be consumed
        even before the bytes commit to a header (:attr:`take`), because the
        caller closes a stream without one (policy REQUIRE) or keeps what it
        consumed to hand it on (:attr:`rest`).  Without it, an ambiguous
        prefix (``PR``) may still be the payload of a stream without a
        header, and is left where it is.
        """
        self.max_size = MAX_V2_LENGTH if max_size is None else max_size
        self.verify_checksum = verify_checksum
        self.allow_v4_in_tcp6 = allow_v4_in_tcp6
        self.required = required
        #: Bytes worth looking at from the start of the stream: no outcome needs more.
        self.window = self.max_size if self.max_size > MAX_V1_LENGTH else MAX_V1_LENGTH
        #: Consumed bytes of a header still incomplete (:meth:`feed`).
        self.held = b""
        #: Bytes of the stream known to have arrived: :attr:`held` plus the last :meth:`look`'s.
        self.seen = 0
        #: While undecided: at least this many bytes beyond :attr:`seen` are needed.
        self.need = 1
        #: After :meth:`look`: bytes of what it was shown that the caller may consume now.
        self.take = 0
        #: After the outcome: the bytes fed that belong to the application (see :meth:`feed`).
        self.rest = b""
        self.outcome: Outcome | None = None
        self.header: ProxyHeader | None = None
        self.error: ProxyProtocolError | None = None
        #: After NO_HEADER: the first bytes the stream starts with instead (for the operator's line).
        self.start = b""

    def look(self, ahead: BytesLike) -> Outcome | None:
        """Scan :attr:`held` followed by ``ahead``: bytes that have arrived but are not consumed.

        Consumes nothing itself.  Sets :attr:`take` to what the caller may
        consume of ``ahead`` now: for HEADER exactly the rest of the header
        (consume exactly that; the bytes after it are never the scanner's);
        while undecided, all of ``ahead`` when every byte of it is certainly
        the header's (the bytes are :func:`committed`, or ``required``), else
        0; 0 after NO_HEADER and INVALID, which leave the stream untouched
        (after NO_HEADER, :attr:`rest` gives back what was fed before).
        Bytes consumed go to :meth:`feed`.  Only the first :attr:`window`
        bytes of the stream are ever looked at (no outcome needs more).
        """
        if self.outcome is not None:
            self.take = 0
            return self.outcome
        held = self.held
        data = held + ahead if held else bytes(ahead)
        if len(data) > self.window:
            data = data[: self.window]
        outcome = self._scan(data)
        if outcome is _HEADER:
            assert self.header is not None
            self.take = self.header.length - len(held)
        elif outcome is None and (self.required or committed(data)):
            self.take = len(data) - len(held)
        else:
            self.take = 0
            if outcome is _NO_HEADER:
                self.rest = held
        return outcome

    def feed(self, data: BytesLike) -> Outcome | None:
        """Add ``data``, the next bytes of the stream, consumed by the caller.

        While undecided they are kept in :attr:`held`.  Once decided,
        :attr:`rest` holds the bytes fed that belong to the application:
        after HEADER those after the header's end, after NO_HEADER every byte
        fed (a stream without a header is served from its first byte where
        the policy serves it), after INVALID none.  Bytes fed after the
        outcome are not looked at: they are the caller's.
        """
        if self.outcome is not None:
            return self.outcome
        held = self.held + data if self.held else bytes(data)
        self.held = held
        outcome = self._scan(held if len(held) <= self.window else held[: self.window])
        if outcome is _HEADER:
            assert self.header is not None
            size = self.header.length
            self.rest = held[size:]
            self.held = held[:size]
        elif outcome is _NO_HEADER:
            self.rest = held
        return outcome

    def eof(self) -> Outcome:
        """The stream ended before the outcome was known.

        EOF when no byte had arrived; INVALID ("header truncated by EOF")
        when some had: a header is never completed by a later connection (T2).
        Returns the outcome already known, unchanged, when there is one.
        """
        if self.outcome is not None:
            return self.outcome
        seen = self.seen
        if not seen:
            self.outcome = _EOF
            return _EOF
        return self._conclude(
            _INVALID, InvalidHeader(f"header truncated by EOF after {seen} byte(s)", field="length", offset=seen)
        )

    def expire(self) -> Outcome:
        """The header deadline passed before the outcome was known: PARTIAL when bytes had arrived, else SILENT.

        Returns the outcome already known, unchanged, when there is one.
        """
        if self.outcome is None:
            self.outcome = _PARTIAL if self.seen else _SILENT
        return self.outcome

    def datagram(self, data: BytesLike) -> Outcome:
        """Scan ``data`` as one whole datagram, never joined with another (G8); call on a fresh scanner.

        A datagram either starts with a complete v2 header for DGRAM (or
        UNSPEC, or LOCAL) or has none: an empty datagram is NO_HEADER, and an
        incomplete header, a v1 line, or a PROXY header for a STREAM
        connection are INVALID.  :attr:`rest` is the payload, as for
        :meth:`feed`.
        """
        size = len(data)
        if not size:
            return self._conclude(_NO_HEADER, NoProxyHeader("empty datagram", offset=0))
        outcome = self.feed(data)
        if outcome is None:
            return self._conclude(
                _INVALID,
                InvalidHeader(
                    f"PROXY header incomplete in a datagram of {size} byte(s) (G8: never split across datagrams)",
                    offset=size,
                ),
            )
        header = self.header
        if header is None:
            return outcome
        if header.version != 2:
            return self._unmake(InvalidHeader("v1 header in a datagram: only v2 applies to UDP (G8)"))
        if header.protocol is Protocol.STREAM and header.command is Command.PROXY:
            byte = header.family << 4 | header.protocol
            return self._unmake(
                InvalidHeader(
                    f"PROXY header for a {_DATAGRAM_PROTOCOLS[header.protocol]} connection "
                    f"(family/protocol byte 0x{byte:02x}) in a datagram: a datagram server takes "
                    "DGRAM (UDP) or UNSPEC headers only (G8)",
                    offset=13,
                )
            )
        return outcome

    # -- the one mapping of parse results to outcomes ------------------------------------

    def _scan(self, data: bytes) -> Outcome | None:
        """Decide on ``data``, the stream's first bytes (at most :attr:`window`); set :attr:`seen` and :attr:`need`."""
        self.seen = len(data)
        try:
            header = parse(
                data,
                max_size=self.max_size,
                verify_checksum=self.verify_checksum,
                allow_v4_in_tcp6=self.allow_v4_in_tcp6,
            )
        except NoProxyHeader as exc:
            self.start = data[:8]
            return self._conclude(_NO_HEADER, exc)
        except ProxyProtocolError as exc:  # InvalidHeader, ChecksumError: parse raises nothing else
            return self._conclude(_INVALID, exc)
        if header is None:
            if data:
                self.need = -measure(data, self.max_size)
            return None
        self.header = header
        self.outcome = _HEADER
        return _HEADER

    def _conclude(self, outcome: Outcome, error: ProxyProtocolError) -> Outcome:
        self.outcome = outcome
        self.error = error
        self.take = 0
        return outcome

    def _unmake(self, error: InvalidHeader) -> Outcome:
        """A header valid on a stream that a datagram may not carry: INVALID, nothing for the application."""
        self.header = None
        self.rest = b""
        return self._conclude(_INVALID, error)


class HeaderReader:
    """Accumulates a stream until its header is complete, raising what is wrong with it.

    Feed it chunks as they arrive; :attr:`header` is set once the header is
    complete, and :attr:`payload` then holds the bytes that came after it in
    the chunks fed so far (never lost, never invented).  Feeding the bytes in
    any split gives the same result as feeding them at once.  A
    :class:`HeaderScanner` does the work; this is its face for code that
    wants the header or an exception.
    """

    __slots__ = ("_scanner", "header", "payload")

    def __init__(
        self,
        *,
        max_size: int | None = None,
        verify_checksum: bool = True,
        allow_v4_in_tcp6: bool = False,
    ) -> None:
        self._scanner = HeaderScanner(
            max_size=max_size, verify_checksum=verify_checksum, allow_v4_in_tcp6=allow_v4_in_tcp6
        )
        self.header: ProxyHeader | None = None
        self.payload = b""

    @property
    def buffered(self) -> int:
        """Bytes held so far that belong to a header still incomplete."""
        return 0 if self.header is not None else len(self._scanner.held)

    def feed(self, chunk: BytesLike) -> ProxyHeader | None:
        """Add ``chunk``; return the header once complete, else None; raise when invalid."""
        if self.header is not None:
            self.payload += bytes(chunk)
            return self.header
        scanner = self._scanner
        outcome = scanner.feed(chunk)
        if outcome is None:
            return None
        if scanner.error is not None:
            raise scanner.error
        self.header = scanner.header
        self.payload = scanner.rest
        return self.header

    def eof(self) -> None:
        """The stream ended: refuse a header that is still incomplete (T2)."""
        if self.header is not None:
            return
        scanner = self._scanner
        if scanner.eof() is _EOF:
            raise NoProxyHeader("stream ended before any byte", offset=0)
        assert scanner.error is not None
        raise scanner.error
