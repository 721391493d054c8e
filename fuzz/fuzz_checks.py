"""The invariants both fuzz harnesses check, as plain functions of one input.

Shared by the atheris harnesses (``fuzz_parse.py``, ``fuzz_reader.py``), the
pure-Python fallback (``run_fallback.py``) and the regression tests in
``tests/stress/test_fuzz_regressions.py``, so a finding reproduces the same
way everywhere.  No atheris import here.

Input layout (what the fuzzer mutates):

* byte 0: options.  bit 0 set: ``verify_checksum=False``; bit 1 set:
  ``allow_v4_in_tcp6=True``; bits 2-4: index into :data:`MAX_SIZES`.
* byte 1: seed of the chunking used by :func:`check_reader`.
* the rest: the stream handed to the parser.

Putting the options first keeps the seed corpus (captures prefixed with two
zero bytes) meaningful: mutating the stream never shifts the options.
"""

from __future__ import annotations

import random
from typing import Any

import proxyproto
from proxyproto import ProxyHeader, ProxyProtocolError
from proxyproto.reader import HeaderReader

#: ``max_size`` values a fuzz input may choose (None: the spec's 65551).
MAX_SIZES: tuple[int | None, ...] = (None, 16, 28, 52, 107, 232, 4096, 65551)

_SSL_FIELDS = ("client", "verify", "verified", "version", "cn", "cipher", "sig_alg", "key_alg", "group",
               "sig_scheme", "client_cert", "tlvs")
_VIEWS = ("alpn", "authority", "unique_id", "netns", "crc32c", "aws_vpce_id", "azure_linkid", "gcp_psc_id")


class Finding(AssertionError):
    """An invariant broke: the message says which, with the input."""


def split_input(data: bytes) -> tuple[dict[str, Any], int, bytes]:
    """(parse options, chunking seed, stream) for one fuzz input."""
    flags = data[0] if data else 0
    seed = data[1] if len(data) > 1 else 0
    options = {
        "max_size": MAX_SIZES[(flags >> 2) & 7],
        "verify_checksum": not flags & 1,
        "allow_v4_in_tcp6": bool(flags & 2),
    }
    return options, seed, data[2:]


def outcome(stream: bytes, options: dict[str, Any]) -> ProxyHeader | ProxyProtocolError | None:
    """``parse`` of the whole stream: the header, None, or the ProxyProtocolError it raised.

    Anything else escaping ``parse`` propagates: that is a finding by itself.
    """
    try:
        return proxyproto.parse(stream, **options)
    except ProxyProtocolError as exc:
        return exc


def touch_views(header: ProxyHeader) -> None:
    """Every typed view of a parsed header returns without raising (custom TLVs never make it invalid)."""
    _ = (header.version, header.command, header.family, header.protocol, header.source, header.destination)
    _ = repr(header)
    for name in _VIEWS:
        getattr(header, name)
    ssl = header.ssl
    if ssl is not None:
        for name in _SSL_FIELDS:
            getattr(ssl, name)
        repr(ssl)
    for record in header.tlvs:
        header.tlv(record.type)


def check_parse(data: bytes) -> None:
    """Harness A: ``parse`` of any bytes gives a header, None, or a ProxyProtocolError, and a header is sound."""
    options, _, stream = split_input(data)
    result = outcome(stream, options)
    if not isinstance(result, ProxyHeader):
        if result is not None and not isinstance(result, ProxyProtocolError):  # pragma: no cover
            raise Finding(f"parse returned {result!r} for {data!r}")
        return
    header = result
    if not 0 < header.length <= len(stream):
        raise Finding(f"length {header.length} outside 1..{len(stream)} for {data!r}")
    raw = header.to_bytes()
    if raw != stream[: header.length]:
        raise Finding(f"to_bytes() {raw!r} is not the parsed bytes {stream[:header.length]!r}")
    touch_views(header)
    again = outcome(raw, options)
    if again != header:
        raise Finding(f"parse(h.to_bytes()) gave {again!r}, not {header!r}, for {data!r}")
    if isinstance(again, ProxyHeader) and again.length != header.length:
        raise Finding(f"reparsed length {again.length} != {header.length} for {data!r}")
    # The payload after the header never changes what the header is (T3).
    tail = outcome(raw + b"PROXY \r\n\r\n\x00", options)
    if tail != header or not isinstance(tail, ProxyHeader) or tail.length != header.length:
        raise Finding(f"bytes after the header changed it: {tail!r} vs {header!r} for {data!r}")


def chunks(stream: bytes, seed: int) -> list[bytes]:
    """``stream`` cut at points drawn from ``seed`` (one piece, bytes, or random sizes)."""
    rng = random.Random(seed)
    mode = seed % 4
    if mode == 0 or len(stream) < 2:
        return [stream]
    if mode == 1:
        return [stream[i : i + 1] for i in range(len(stream))]
    pieces = []
    i = 0
    while i < len(stream):
        step = rng.randint(1, 64 if mode == 2 else max(1, len(stream) // 2))
        pieces.append(stream[i : i + step])
        i += step
    if rng.random() < 0.3:
        pieces.insert(rng.randint(0, len(pieces)), b"")  # an empty chunk changes nothing
    return pieces


def check_reader(data: bytes) -> None:
    """Harness B: HeaderReader fed in chunks agrees with ``parse`` of everything at once."""
    options, seed, stream = split_input(data)
    whole = outcome(stream, options)
    reader = HeaderReader(**options)
    fed = 0
    raised: ProxyProtocolError | None = None
    got: ProxyHeader | None = None
    for piece in chunks(stream, seed):
        try:
            got = reader.feed(piece)
        except ProxyProtocolError as exc:
            raised = exc
            break
        fed += len(piece)
    if raised is not None:
        # The reader raises as soon as the bytes are invalid; the whole stream must be refused alike.
        if not isinstance(whole, ProxyProtocolError) or type(whole) is not type(raised):
            raise Finding(
                f"reader raised {type(raised).__name__}({raised}) after {fed}+ bytes, "
                f"parse of everything gave {whole!r}, for {data!r}"
            )
        return
    if isinstance(whole, ProxyProtocolError):
        raise Finding(f"reader accepted every chunk, parse raised {type(whole).__name__}({whole}) for {data!r}")
    if whole is None:
        if got is not None or reader.header is not None:
            raise Finding(f"reader found {got!r}, parse said incomplete, for {data!r}")
        if reader.buffered != len(stream):
            raise Finding(f"reader buffered {reader.buffered} of {len(stream)} bytes for {data!r}")
        try:
            reader.eof()
        except ProxyProtocolError:
            return
        raise Finding(f"eof() accepted an incomplete header for {data!r}")
    if reader.header != whole or reader.header is None or reader.header.length != whole.length:
        raise Finding(f"reader header {reader.header!r} != parse {whole!r} for {data!r}")
    if reader.payload != stream[whole.length :]:
        raise Finding(
            f"reader payload {len(reader.payload)} bytes differs from the {len(stream) - whole.length} "
            f"after the header for {data!r}"
        )
    reader.eof()  # complete: never raises


def check_all(data: bytes) -> None:
    """Both harnesses' invariants (what the fallback and the regression tests run)."""
    check_parse(data)
    check_reader(data)
