"""The one scanner (``reader.HeaderScanner``): bytes so far -> need more / a header / an outcome.

Every adapter hands it the bytes it reads (``feed``) or peeks (``look``), the
end of the stream (``eof``) and the deadline (``expire``), and acts on the
outcome; these tests pin its contract without any I/O:

- any split of the same bytes, fed or peeked, gives the same outcome, header,
  error and payload as all of them at once;
- a peeking caller that consumes what ``take`` allows never consumes a byte
  past the header's end, and never a byte of a stream that turns out to have
  no header unless the header is ``required``;
- the end of the stream and the deadline map to EOF / INVALID ("truncated by
  EOF") and SILENT / PARTIAL, and never change an outcome already known;
- a datagram is scanned on its own (G8).

The number of hypothesis examples comes from the profile in ``conftest.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyproto import TLV, Command, Protocol, encode_v1, encode_v2, policy, reader
from proxyproto.errors import ChecksumError, InvalidHeader, NoProxyHeader
from proxyproto.reader import HeaderReader, HeaderScanner, Outcome

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

SEEDS = [
    encode_v1(("192.0.2.1", 56324), ("198.51.100.7", 443)),
    encode_v1(("2001:db8::1", 1), ("2001:db8::2", 2)),
    encode_v1(None, None),
    encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443)),
    encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2), tlvs=[TLV(0x01, b"h2"), TLV(0x04, b"")]),
    encode_v2(("192.0.2.1", 53), ("198.51.100.7", 53), protocol=Protocol.DGRAM, checksum=True),
    encode_v2(command=Command.LOCAL),
    encode_v2("/run/a.sock", "/run/b.sock"),
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    b"PR",
    SIG + b"\x31\x11\x00\x0c" + bytes(12),
    SIG + b"\x21\x11\xff\xff",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
]


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """A seed (header or not), often mutated, followed by payload."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["flip", "truncate", "set"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0x0A, 0x0D, 0x20, 0x50, 0xFF]))
        elif op == "truncate":
            del data[pos:]
    return bytes(data) + draw(st.binary(max_size=40))


options = st.fixed_dictionaries(
    {},
    optional={
        "verify_checksum": st.booleans(),
        "allow_v4_in_tcp6": st.booleans(),
        "max_size": st.sampled_from([16, 28, 40, 4096]),
    },
)


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut into consecutive pieces (some possibly empty)."""
    return st.lists(st.integers(0, len(data)), max_size=8).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)])]
    )


def same_conclusion(a: HeaderScanner, b: HeaderScanner) -> None:
    assert a.outcome is b.outcome
    assert a.header == b.header
    assert (a.header and a.header.length) == (b.header and b.header.length)
    # The same kind of fault; its text and offset may differ when fewer bytes had arrived (a whole
    # v1 line names its bad token, a prefix the first bad byte in it; a prefix quotes fewer bytes).
    assert type(a.error) is type(b.error)


@given(st.data(), streams(), options)
def test_any_split_fed_gives_the_outcome_of_all_at_once(
    data: st.DataObject, stream: bytes, opts: dict[str, Any]
) -> None:
    """Feeding the stream in pieces concludes as feeding it whole; no byte of payload is lost or invented."""
    whole = HeaderScanner(**opts)
    whole.feed(stream)
    pieces = data.draw(splits(stream))
    split = HeaderScanner(**opts)
    unfed: list[bytes] = []
    for i, piece in enumerate(pieces):
        if split.feed(piece) is not None:
            unfed = pieces[i + 1 :]
            break
    same_conclusion(whole, split)
    if whole.outcome is None:
        assert split.held == whole.held == stream
        assert whole.need >= 1
    elif whole.outcome is Outcome.HEADER:
        assert whole.header is not None and whole.rest == stream[whole.header.length :]
        assert split.rest + b"".join(unfed) == whole.rest
    elif whole.outcome is Outcome.NO_HEADER:
        assert whole.rest == stream and split.rest + b"".join(unfed) == whole.rest
    else:
        assert whole.rest == split.rest == b""


@given(st.data(), streams(), options, st.booleans())
def test_peeking_caller_never_consumes_past_the_header(
    data: st.DataObject, stream: bytes, opts: dict[str, Any], required: bool
) -> None:
    """A caller that peeks as bytes arrive and consumes only ``take`` ends exactly at the header's end.

    It concludes as feeding the stream whole would; it leaves a stream
    without a header untouched unless the header is required; it never looks
    at more than ``window`` bytes.
    """
    whole = HeaderScanner(**opts)
    whole.feed(stream)
    scanner = HeaderScanner(required=required, **opts)
    consumed = 0
    for piece_end in [*sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6))), len(stream)]:
        ahead = stream[consumed:piece_end][: scanner.window - consumed]
        outcome = scanner.look(ahead)
        take = scanner.take
        assert 0 <= take <= len(ahead)
        if outcome is None and take:
            assert scanner.feed(ahead[:take]) is None
        consumed += take
        if outcome is not None:
            break
    same_conclusion(whole, scanner)
    if scanner.outcome is Outcome.HEADER:
        assert scanner.header is not None and consumed == scanner.header.length
    elif scanner.outcome is Outcome.NO_HEADER:
        assert consumed == 0 or required
        assert scanner.rest == stream[:consumed]  # what was taken out is given back
    elif scanner.outcome is None:
        assert consumed == len(scanner.held) and consumed in (0, scanner.seen)
        assert scanner.seen == min(len(stream), scanner.window) and not whole.outcome


@given(streams(), st.integers(0, 200), options)
def test_eof_before_the_outcome_is_eof_or_truncated(stream: bytes, cut: int, opts: dict[str, Any]) -> None:
    """The end of the stream: EOF with no byte, else INVALID naming how many bytes arrived; a known outcome stays."""
    prefix = stream[:cut]
    scanner = HeaderScanner(**opts)
    before = scanner.feed(prefix) if prefix else None
    outcome = scanner.eof()
    if before is not None:
        assert outcome is before
    elif not prefix:
        assert outcome is Outcome.EOF and scanner.error is None
    else:
        assert outcome is Outcome.INVALID
        assert type(scanner.error) is InvalidHeader
        assert scanner.error.message == f"header truncated by EOF after {len(prefix)} byte(s)"
        assert scanner.error.offset == len(prefix)
    assert scanner.eof() is outcome and scanner.expire() is outcome


def test_eof_after_a_peeked_prefix_counts_the_bytes_seen() -> None:
    """Bytes only peeked (left in the kernel) count as arrived: the stream was truncated, not empty."""
    scanner = HeaderScanner()
    assert scanner.look(b"PR") is None and scanner.take == 0
    assert scanner.eof() is Outcome.INVALID
    assert str(scanner.error) == "header truncated by EOF after 2 byte(s) (at byte 2)"


def test_deadline_is_silent_without_bytes_and_partial_with_some() -> None:
    silent = HeaderScanner()
    assert silent.expire() is Outcome.SILENT and silent.error is None
    partial = HeaderScanner()
    partial.feed(b"PROXY TCP4 ")
    assert partial.expire() is Outcome.PARTIAL and partial.seen == 11
    assert partial.feed(b"1.2.3.4 5.6.7.8 1 2\r\n") is Outcome.PARTIAL  # decided: later bytes are the caller's
    peeked = HeaderScanner()
    peeked.look(b"P")
    assert peeked.expire() is Outcome.PARTIAL


def test_deadline_text_and_exception_come_from_the_outcome() -> None:
    """describe/refusal turn a deadline outcome and the bytes seen into the log line and exception."""
    scanner = HeaderScanner()
    scanner.look(SIG)
    outcome = scanner.expire()
    line = policy.describe(policy.Policy.REQUIRE, outcome, scanner.error, scanner.seen, 0.5)
    assert line == "incomplete PROXY header (12 byte(s)) after 0.5 s"
    assert isinstance(policy.refusal(policy.Policy.REQUIRE, outcome, None, scanner.seen, 0.5), TimeoutError)


@pytest.mark.parametrize(
    ("data", "outcome", "error"),
    [
        (b"GET / HTTP/1.1\r\n", Outcome.NO_HEADER, NoProxyHeader),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", Outcome.INVALID, InvalidHeader),
        (b"PROXYZ", Outcome.INVALID, InvalidHeader),
        (SIG + b"\x31", Outcome.INVALID, InvalidHeader),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", Outcome.INVALID, InvalidHeader),
        (b"PROXY " + b"x" * 120, Outcome.INVALID, InvalidHeader),
    ],
)
def test_bytes_decide_as_early_as_they_show_it(data: bytes, outcome: Outcome, error: type) -> None:
    scanner = HeaderScanner()
    assert scanner.look(data) is outcome and scanner.take == 0
    assert type(scanner.error) is error and scanner.header is None


def test_a_flipped_checksummed_byte_is_invalid_with_its_checksum_error() -> None:
    data = bytearray(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), checksum=True))
    data[17] ^= 1
    scanner = HeaderScanner()
    assert scanner.feed(bytes(data)) is Outcome.INVALID and type(scanner.error) is ChecksumError
    assert HeaderScanner(verify_checksum=False).feed(bytes(data)) is Outcome.HEADER


def test_header_over_max_size_is_invalid_from_its_first_16_bytes() -> None:
    data = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[TLV(0xE0, bytes(100))])
    scanner = HeaderScanner(max_size=64)
    assert scanner.look(data[:16]) is Outcome.INVALID
    assert scanner.window == reader.MAX_V1_LENGTH  # a v1 line may still need 107 bytes


def test_take_is_the_rest_of_the_header_after_held_bytes() -> None:
    """Part of the header consumed (held), the rest peeked: take is exactly what is left of the header."""
    header = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    scanner = HeaderScanner(required=True)
    assert scanner.look(header[:10]) is None and scanner.take == 10
    scanner.feed(header[:10])
    assert scanner.need == 6
    assert scanner.look(header[10:] + b"payload") is Outcome.HEADER
    assert scanner.take == len(header) - 10 and scanner.header is not None


def test_an_ambiguous_prefix_stays_unless_required_or_committed() -> None:
    """'PR' may be payload under the opt-in policies; 'PROXY' and the v2 signature commit the stream."""
    assert HeaderScanner().look(b"PR") is None
    assert (HeaderScanner().take, HeaderScanner(required=True).look(b"PR")) == (0, None)
    opt_in = HeaderScanner()
    opt_in.look(b"PR")
    assert opt_in.take == 0
    required = HeaderScanner(required=True)
    required.look(b"PR")
    assert required.take == 2
    committed = HeaderScanner()
    committed.look(b"PROXY T")
    assert committed.take == 7
    v2 = HeaderScanner()
    v2.look(SIG)
    assert v2.take == 12 and v2.need == 4


def test_bytes_consumed_before_no_header_is_known_are_given_back() -> None:
    """A caller that took an ambiguous prefix out of the stream gets it back as the application's bytes."""
    scanner = HeaderScanner(required=True)
    scanner.look(b"PR")
    scanner.feed(b"PR")
    assert scanner.look(b"GET") is Outcome.NO_HEADER
    assert scanner.rest == b"PR" and scanner.take == 0


def test_need_is_what_the_length_field_says() -> None:
    header = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    scanner = HeaderScanner()
    assert scanner.need == 1
    scanner.feed(header[:16])
    assert scanner.need == len(header) - 16


@pytest.mark.parametrize(
    ("data", "outcome", "text"),
    [
        (b"", Outcome.NO_HEADER, "empty datagram"),
        (b"payload", Outcome.NO_HEADER, "not a PROXY protocol signature"),
        (encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), protocol=Protocol.DGRAM)[:20], Outcome.INVALID, "incomplete"),
        (encode_v1(("192.0.2.1", 1), ("192.0.2.2", 2)), Outcome.INVALID, "v1 header in a datagram"),
        (encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)), Outcome.INVALID, "STREAM (TCP)"),
    ],
)
def test_a_datagram_is_scanned_on_its_own_G8(data: bytes, outcome: Outcome, text: str) -> None:
    scanner = HeaderScanner()
    assert scanner.datagram(data) is outcome
    assert scanner.header is None and text in str(scanner.error)


@pytest.mark.parametrize(
    "header",
    [
        encode_v2(("192.0.2.1", 53), ("192.0.2.2", 53), protocol=Protocol.DGRAM),
        encode_v2(command=Command.LOCAL),
        encode_v2(None, None, protocol=Protocol.UNSPEC),
    ],
    ids=["dgram", "local", "unspec"],
)
def test_a_datagram_header_leaves_the_payload(header: bytes) -> None:
    scanner = HeaderScanner()
    assert scanner.datagram(header + b"query") is Outcome.HEADER
    assert scanner.header is not None and scanner.rest == b"query" and scanner.error is None


@given(st.data(), streams(), options)
def test_header_reader_raises_what_the_scanner_concludes(
    data: st.DataObject, stream: bytes, opts: dict[str, Any]
) -> None:
    """HeaderReader: the header and its payload, or the scanner's exception, whatever the split."""
    whole = HeaderScanner(**opts)
    whole.feed(stream)
    hr = HeaderReader(**opts)
    got: Any = None
    try:
        for piece in data.draw(splits(stream)):
            got = hr.feed(piece)
        hr.eof()
    except InvalidHeader as exc:
        got = exc
    if whole.outcome is Outcome.HEADER:
        assert got == whole.header and hr.payload == whole.rest and hr.buffered == 0
    elif whole.outcome is None:
        assert isinstance(got, InvalidHeader)
        assert "truncated by EOF" in str(got) if stream else str(got).startswith("stream ended before any byte")
    else:
        assert whole.error is not None and type(got) is type(whole.error)


def test_outcome_is_the_cores_and_still_importable_from_policy() -> None:
    assert policy.Outcome is reader.Outcome is Outcome
