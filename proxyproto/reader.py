"""Sans-I/O detection: the one place that tells v1 from v2 from neither.

Every I/O adapter (the blocking helper, the socketserver mixin, asyncio, UDP)
asks the same question of the bytes it has so far, and gets one of three
answers from :func:`measure`:

* ``n > 0``: a complete header of ``n`` bytes (``data[n:]`` is payload);
* ``-n``: a valid prefix; at least ``n`` more bytes are needed (for a v1
  line, ``1``: where the CRLF is cannot be known in advance);
* an exception: :class:`NoProxyHeader` when the first bytes already differ
  from both signatures, :class:`InvalidHeader` for anything else wrong, as
  early as the bytes show it.

:func:`parse` adds the decoding.  :class:`HeaderReader` keeps the bytes of a
stream that arrives in pieces, for adapters that cannot peek.
"""

from __future__ import annotations

from typing import Union

from . import v1, v2
from .errors import InvalidHeader, NoProxyHeader
from .header import ProxyHeader

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "HeaderReader",
    "committed",
    "measure",
    "parse",
]

MAX_V1_LENGTH = v1.MAX_LENGTH
MAX_V2_LENGTH = v2.MAX_LENGTH
V2_SIGNATURE = v2.SIGNATURE

BytesLike = Union[bytes, bytearray, memoryview]


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
    head = data[:1]
    if head == b"P":
        end = data.find(b"\r\n", 6, MAX_V1_LENGTH)
        if end > 0:
            header = v1.match_line(data, end + 2, allow_v4_in_tcp6)
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


class HeaderReader:
    """Accumulates a stream until its header is complete, for adapters that cannot peek.

    Feed it chunks as they arrive; :attr:`header` is set once the header is
    complete, and :attr:`payload` then holds the bytes that came after it in
    the chunks fed so far (never lost, never invented).  Feeding the bytes in
    any split gives the same result as feeding them at once.
    """

    __slots__ = ("_buffer", "_options", "header", "payload")

    def __init__(
        self,
        *,
        max_size: int | None = None,
        verify_checksum: bool = True,
        allow_v4_in_tcp6: bool = False,
    ) -> None:
        self._buffer = bytearray()
        self._options = {
            "max_size": max_size,
            "verify_checksum": verify_checksum,
            "allow_v4_in_tcp6": allow_v4_in_tcp6,
        }
        self.header: ProxyHeader | None = None
        self.payload = b""

    @property
    def buffered(self) -> int:
        """Bytes held so far that belong to a header still incomplete."""
        return len(self._buffer)

    def feed(self, chunk: BytesLike) -> ProxyHeader | None:
        """Add ``chunk``; return the header once complete, else None; raise when invalid."""
        if self.header is not None:
            self.payload += bytes(chunk)
            return self.header
        self._buffer += chunk
        header = parse(bytes(self._buffer), **self._options)  # type: ignore[arg-type]
        if header is not None:
            self.header = header
            self.payload = bytes(self._buffer[header.length :])
            self._buffer = bytearray()
        return header

    def eof(self) -> None:
        """The stream ended: refuse a header that is still incomplete (T2)."""
        if self.header is not None:
            return
        if not self._buffer:
            raise NoProxyHeader("stream ended before any byte", offset=0)
        raise InvalidHeader(
            f"header truncated by EOF after {len(self._buffer)} byte(s)", field="length", offset=len(self._buffer)
        )
