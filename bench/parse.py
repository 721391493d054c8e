"""Parse and encode throughput of proxyproto, side by side with the peers.

Why this exists: a PROXY header is parsed once per connection, before the
service does anything, so its cost is paid by every client.  This script
measures ``proxyproto.parse`` and the encoders on six representative headers,
runs the same headers through the Python peers that are installed
(``pip install proxyproto[bench]``: proxy-protocol, Twisted, gunicorn) in the
same process and the same run, and prints a "floor" row per case: the least
work any parser must do for that header, so the distance to the limit shows.

Method: every case cycles through 64 distinct headers (addresses and ports
differ) so no cache can help; each implementation is timed in runs of about
0.5 s with the garbage collector off (as ``timeit`` does), the runs of all
implementations of a case are interleaved (so a noisy neighbour hurts all of
them alike), and the median of 5 runs is reported.  Every implementation is
first checked to return the right addresses for every input; one that raises
or returns something else is reported as "fails", one that has no such
feature as "n/a".  Loop overhead (about 30 ns per call) is included in every
row alike.

Run from the repository root::

    python bench/parse.py            # full run, about 3 minutes
    python bench/parse.py --quick    # 3 runs of 0.1 s, about 30 s
    python bench/parse.py --json out.json

Nothing here is part of the test suite's pass/fail.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import ipaddress
import json
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import TYPE_CHECKING, Any

# Run from a checkout without installing: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import proxyproto
except ImportError as exc:  # the core may not exist yet while it is written
    proxyproto = None  # type: ignore[assignment]
    PROXYPROTO_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    PROXYPROTO_ERROR = None

try:
    import google_crc32c
except ImportError:
    google_crc32c = None  # type: ignore[assignment]

N_DISTINCT = 64


def have(*names: str) -> bool:
    """True when proxyproto imports and exports all these public names yet."""
    return proxyproto is not None and all(hasattr(proxyproto, n) for n in names)
SIG = b"\r\n\r\n\x00\r\nQUIT\n"

if TYPE_CHECKING:  # annotations only, so the script still runs on 3.9
    Addr = tuple[str, int]
    Pair = tuple[Addr | None, Addr | None]


# --------------------------------------------------------------------------
# The headers


def v1_tcp4_addrs(i: int) -> tuple[Addr, Addr]:
    """Address pair number ``i`` of cases (a) and (c): 64 distinct pairs."""
    return (f"192.168.{1 + i // 16}.{12 + i}", 58472 - 3 * i), (f"192.168.1.{20 + i}", 27654 + i)


def v1_tcp6_addrs(i: int) -> tuple[Addr, Addr]:
    """Address pair number ``i`` of cases (b) and (d), in inet_ntop form."""
    return (f"2001:db8:0:{1 + i:x}::12", 58472 - 3 * i), (f"2001:db8:0:1::{0x20 + i:x}", 27654 + i)


def tlv(t: int, value: bytes) -> bytes:
    """One type-length-value record as on the wire (also the SSL sub-TLVs)."""
    return struct.pack("!BH", t, len(value)) + value


# SSL TLV value by hand (SPEC-NOTES 2.2.6): client 0x07, verify 0, then
# sub-TLVs VERSION (0x21), CN (0x22), CIPHER (0x23) in haproxy's order.
SSL_VALUE = (
    struct.pack("!BI", 0x07, 0)
    + tlv(0x21, b"TLSv1.3")
    + tlv(0x22, b"client.example.com")
    + tlv(0x23, b"TLS_AES_256_GCM_SHA384")
)


def unique_id(i: int) -> bytes:
    """A 32-byte UNIQUE_ID that differs per header, so the CRCs differ too."""
    return hashlib.sha256(b"unique-%d" % i).digest()


def case_d_tlvs(i: int) -> list[tuple[int, bytes]]:
    """The TLVs of case (d), without the CRC (the encoder adds it)."""
    return [(0x01, b"h2"), (0x02, b"example.com"), (0x05, unique_id(i)), (0x20, SSL_VALUE)]


def own_encode_v2(src: Addr | None, dst: Addr | None, tlvs: Sequence[tuple[int, bytes]] = (),
                  crc: bool = False, local: bool = False) -> bytes:
    """A tiny independent v2 encoder, used only when proxyproto is missing.

    The CRC TLV goes first (haproxy's order); its value is computed over the
    whole header with the value zeroed (CRC-R1).
    """
    if local:
        return SIG + b"\x20\x00\x00\x00"
    assert src is not None and dst is not None
    if ":" in src[0]:
        fam, addr = 0x21, struct.pack("!16s16sHH", inet_pton(AF_INET6, src[0]), inet_pton(AF_INET6, dst[0]),
                                      src[1], dst[1])
    else:
        fam, addr = 0x11, struct.pack("!4s4sHH", inet_pton(AF_INET, src[0]), inet_pton(AF_INET, dst[0]),
                                      src[1], dst[1])
    body = b"".join(tlv(t, v) for t, v in tlvs)
    if crc:
        body = tlv(0x03, b"\0\0\0\0") + body
    head = SIG + struct.pack("!BBH", 0x21, fam, len(addr) + len(body))
    data = head + addr + body
    if crc:
        assert google_crc32c is not None, "the fallback builder needs google_crc32c for case (d)"
        value = struct.pack("!I", google_crc32c.value(data))
        at = len(head) + len(addr) + 3
        data = data[:at] + value + data[at + 4:]
    return data


def build_inputs() -> dict[str, list[bytes]]:
    """The 64 wire headers of each case, from proxyproto's encoders when present."""
    out: dict[str, list[bytes]] = {"a": [], "b": [], "c": [], "d": [], "e": [], "f": []}
    for i in range(N_DISTINCT):
        s4, d4 = v1_tcp4_addrs(i)
        s6, d6 = v1_tcp6_addrs(i)
        out["a"].append(b"PROXY TCP4 %s %s %d %d\r\n" % (s4[0].encode(), d4[0].encode(), s4[1], d4[1]))
        out["b"].append(b"PROXY TCP6 %s %s %d %d\r\n" % (s6[0].encode(), d6[0].encode(), s6[1], d6[1]))
        out["e"].append(b"PROXY UNKNOWN\r\n")
        if have("encode_v2", "TLV", "Command"):
            out["c"].append(proxyproto.encode_v2(s4, d4))
            tl = [proxyproto.TLV(t, v) for t, v in case_d_tlvs(i)]
            out["d"].append(proxyproto.encode_v2(s6, d6, tlvs=tl, checksum=True))
            out["f"].append(proxyproto.encode_v2(command=proxyproto.Command.LOCAL))
        else:
            out["c"].append(own_encode_v2(s4, d4))
            out["d"].append(own_encode_v2(s6, d6, case_d_tlvs(i), crc=True))
            out["f"].append(own_encode_v2(None, None, local=True))
    return out


def expected_pairs() -> dict[str, list[Pair]]:
    """What every parser must return per case: (source, destination)."""
    a = [v1_tcp4_addrs(i) for i in range(N_DISTINCT)]
    b = [v1_tcp6_addrs(i) for i in range(N_DISTINCT)]
    none: list[Pair] = [(None, None)] * N_DISTINCT
    return {"a": a, "b": b, "c": a, "d": b, "e": none, "f": none}  # type: ignore[dict-item]


CASES = {
    "a": "(a) v1 TCP4",
    "b": "(b) v1 TCP6",
    "c": "(c) v2 TCP4, no TLV",
    "d": "(d) v2 TCP6+TLVs+CRC",
    "e": "(e) v1 UNKNOWN",
    "f": "(f) v2 LOCAL",
}


# --------------------------------------------------------------------------
# Implementations under test


@dataclass
class Impl:
    """One implementation of one case: a callable and the inputs it takes.

    ``extract`` turns the callable's result into (source, destination) for the
    correctness check; ``status`` is set to "n/a" or "fails: ..." when the
    implementation cannot run the case.
    """

    name: str
    fn: Callable[[Any], Any] | None
    inputs: list[Any] = field(default_factory=list)
    extract: Callable[[Any], Pair] | None = None
    status: str = "ok"
    note: str = ""
    runs: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        """Median headers per second, or None when not measured."""
        return statistics.median(self.runs) if self.runs else None


def norm_host(host: Any) -> str:
    """Canonical text of an address, so peers' spellings compare equal."""
    return str(ipaddress.ip_address(host if isinstance(host, str) else str(host)))


def norm_pair(pair: Pair) -> Pair:
    """Canonicalise both addresses of a (source, destination) pair."""
    src, dst = pair
    return (None if src is None else (norm_host(src[0]), int(src[1])),
            None if dst is None else (norm_host(dst[0]), int(dst[1])))


def ours_parse(case: str, data: list[bytes]) -> Impl:
    """``proxyproto.parse`` with its defaults (CRC verified when present)."""
    if not have("parse"):
        return Impl("proxyproto", None, status=f"fails: {PROXYPROTO_ERROR or 'no proxyproto.parse yet'}")

    parse = proxyproto.parse

    def run(d: bytes) -> Any:
        h = parse(d)
        return h, h.source, h.destination  # what a server reads of every header

    def extract(r: Any) -> Pair:
        return (r[1], r[2])
    return Impl("proxyproto", run, data, extract, note="parse + .source/.destination")


def ours_parse_only(case: str, data: list[bytes]) -> Impl:
    """``proxyproto.parse`` alone (it decodes the addresses; the row above also reads them)."""
    if not have("parse"):
        return Impl("proxyproto parse only", None, status="n/a")

    def extract(h: Any) -> Pair:
        return (h.source, h.destination)
    return Impl("proxyproto parse only", proxyproto.parse, data, extract)


def pp_parse(case: str, data: list[bytes]) -> Impl:
    """proxy-protocol (icgood): the version-specific parser's ``unpack``.

    The version-specific class is a little cheaper than ProxyProtocolDetect,
    so this favours the peer.  Its CRC check needs the ``crc32c`` module; when
    that is absent it skips the check silently, which the note says.
    """
    try:
        from proxyprotocol import checksum
        from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
        from proxyprotocol.v1 import ProxyProtocolV1
        from proxyprotocol.v2 import ProxyProtocolV2
    except ImportError as exc:
        return Impl("proxy-protocol", None, status=f"n/a ({exc})")
    parser = ProxyProtocolV1() if case in "abe" else ProxyProtocolV2()

    def extract(r: Any) -> Pair:
        if isinstance(r, (ProxyResultIPv4, ProxyResultIPv6)):
            return ((str(r.source[0]), r.source[1]), (str(r.dest[0]), r.dest[1]))
        return (None, None)
    note = ""
    if case == "d" and checksum.crc32c is None:
        note = "CRC not verified (no crc32c module)"
    return Impl("proxy-protocol", parser.unpack, data, extract, note=note)


def twisted_parse(case: str, data: list[bytes]) -> Impl:
    """Twisted's ``V1Parser.parse`` / ``V2Parser.parse`` (classmethods).

    V1Parser.parse takes the line without its CRLF; the stripped lines are
    prepared outside the timed loop (Twisted's ``feed`` finds the CRLF), so
    this favours the peer.  It does not validate addresses, nor TLVs.
    """
    try:
        from twisted.protocols.haproxy._v1parser import V1Parser
        from twisted.protocols.haproxy._v2parser import V2Parser
    except ImportError as exc:
        return Impl("twisted", None, status=f"n/a ({exc})")

    def extract(info: Any) -> Pair:
        if info.source is None:
            return (None, None)
        return ((info.source.host, info.source.port), (info.destination.host, info.destination.port))
    if case in "abe":
        return Impl("twisted", V1Parser.parse, [d[:-2] for d in data], extract,
                    note="no address validation; CRLF stripped outside the loop")
    note = "TLVs and CRC ignored" if case == "d" else ""
    return Impl("twisted", V2Parser.parse, data, extract, note=note)


def gunicorn_parse(case: str, data: list[bytes]) -> Impl:
    """gunicorn's PROXY detection and parsing, without a socket.

    ``Request._handle_proxy_protocol(unreader, buf, mode)`` only reads from
    the unreader when ``buf`` is short, and its access check only looks at a
    tuple peer address, so it is called on a bare instance (no ``__init__``,
    ``peer_addr = None``) with the complete header in a bytearray, which is
    what gunicorn holds at that point.  The result lands in
    ``proxy_protocol_info``.
    """
    try:
        from gunicorn.http.message import Request
    except ImportError as exc:
        return Impl("gunicorn", None, status=f"n/a ({exc})")
    req = Request.__new__(Request)
    req.peer_addr = None
    req.proxy_protocol_info = None
    handle = Request._handle_proxy_protocol

    def run(buf: bytearray) -> Any:
        req.proxy_protocol_info = None
        handle(req, None, buf, "auto")
        return req.proxy_protocol_info

    def extract(info: Any) -> Pair:
        if info is None:
            raise ValueError("no proxy_protocol_info set")
        if info["client_addr"] is None:
            return (None, None)
        return ((info["client_addr"], info["client_port"]), (info["proxy_addr"], info["proxy_port"]))
    note = "TLVs and CRC ignored" if case == "d" else ""
    return Impl("gunicorn", run, [bytearray(d) for d in data], extract, note=note)


# Floors: the least work any parser must do for the case, producing the
# (source, destination) tuples a caller needs.

def floor_v1(family: int) -> Callable[[bytes], Pair]:
    """Split the line, validate both addresses with inet_pton, int the ports."""
    def floor(data: bytes) -> Pair:
        p = data[:data.index(b"\r\n")].split(b" ")
        s = p[2].decode()
        d = p[3].decode()
        inet_pton(family, s)
        inet_pton(family, d)
        return ((s, int(p[4])), (d, int(p[5])))
    return floor


_V2_TCP4 = struct.Struct("!12sBBH4s4sHH")
_V2_TCP6 = struct.Struct("!12sBBH16s16sHH")
_V2_HEAD = struct.Struct("!12sBBH")
_TLV_HEAD = struct.Struct("!BH")


def floor_v2_tcp4(data: bytes) -> Pair:
    """One struct.unpack_from plus two inet_ntop."""
    _, _, _, _, s, d, sp, dp = _V2_TCP4.unpack_from(data)
    return ((inet_ntop(AF_INET, s), sp), (inet_ntop(AF_INET, d), dp))


def floor_v2_tcp6_crc(data: bytes) -> Pair:
    """Unpack, two inet_ntop, walk the top-level TLVs, verify the CRC (C)."""
    _, _, _, n, s, d, sp, dp = _V2_TCP6.unpack_from(data)
    end = 16 + n
    off = 52
    crc_at = -1
    while off < end:
        t, ln = _TLV_HEAD.unpack_from(data, off)
        if t == 3:
            crc_at = off + 3
        off += 3 + ln
    crc = google_crc32c.value(data[:crc_at])
    crc = google_crc32c.extend(crc, b"\0\0\0\0")
    crc = google_crc32c.extend(crc, data[crc_at + 4:end])
    if crc != int.from_bytes(data[crc_at:crc_at + 4], "big"):
        raise ValueError("bad crc")
    return ((inet_ntop(AF_INET6, s), sp), (inet_ntop(AF_INET6, d), dp))


def floor_v1_unknown(data: bytes) -> Pair:
    """Find the CRLF and compare the prefix."""
    if data.find(b"\r\n", 0, 107) < 0 or not data.startswith(b"PROXY UNKNOWN"):
        raise ValueError
    return (None, None)


def floor_v2_local(data: bytes) -> Pair:
    """One struct.unpack_from and a signature comparison."""
    sig, vc, _, _ = _V2_HEAD.unpack_from(data)
    if sig != SIG or vc != 0x20:
        raise ValueError
    return (None, None)


def floor_parse(case: str, data: list[bytes]) -> Impl:
    """The floor row of a parse case."""
    fn: Callable[[bytes], Pair] | None = {
        "a": floor_v1(AF_INET), "b": floor_v1(AF_INET6), "c": floor_v2_tcp4,
        "d": floor_v2_tcp6_crc if google_crc32c is not None else None,
        "e": floor_v1_unknown, "f": floor_v2_local,
    }[case]
    if fn is None:
        return Impl("floor", None, status="n/a (google_crc32c missing)")
    return Impl("floor", fn, data, lambda r: r)


PARSE_IMPLS = [ours_parse, ours_parse_only, pp_parse, twisted_parse, gunicorn_parse, floor_parse]


# --------------------------------------------------------------------------
# Encoding


def encode_impls(case: str) -> list[Impl]:
    """Encoders of one case: ours (two entry points), proxy-protocol (two), floor.

    "encode_v*", "ProxyHeader+to_bytes" and "build+pack" start from (host,
    port) tuples, as a proxy holding the socket's addresses does; "pack"
    encodes a result object built outside the loop.  ``to_bytes`` of a header
    already encoded returns the cached bytes, so ours is always timed from a
    fresh ProxyHeader.  Outputs are checked by parsing them back.
    """
    idx = range(N_DISTINCT)
    if case in "ac":
        addrs = [v1_tcp4_addrs(i) for i in idx]
    elif case in "bd":
        addrs = [v1_tcp6_addrs(i) for i in idx]
    else:
        addrs = [(None, None) for i in idx]  # type: ignore[misc]
    v1 = case in "abe"
    impls: list[Impl] = []

    # ours
    if not have("encode_v1", "encode_v2", "ProxyHeader", "TLV", "Command", "Family", "Protocol"):
        why = f"fails: {PROXYPROTO_ERROR or 'encoders not exported yet'}"
        impls.append(Impl("proxyproto encode_v*", None, status=why))
        impls.append(Impl("proxyproto ProxyHeader+to_bytes", None, status=why))
    else:
        P = proxyproto
        tlvsets = [[P.TLV(t, v) for t, v in case_d_tlvs(i)] for i in idx]
        if case in "ab":
            impls.append(Impl("proxyproto encode_v*", lambda a: P.encode_v1(a[0], a[1]), addrs))
        elif case == "e":
            impls.append(Impl("proxyproto encode_v*", lambda a: P.encode_v1(None, None), addrs))
        elif case == "c":
            impls.append(Impl("proxyproto encode_v*", lambda a: P.encode_v2(a[0], a[1]), addrs))
        elif case == "d":
            impls.append(Impl("proxyproto encode_v*",
                              lambda a: P.encode_v2(a[0][0], a[0][1], tlvs=a[1], checksum=True),
                              list(zip(addrs, tlvsets)), note="with CRC"))
        else:
            impls.append(Impl("proxyproto encode_v*", lambda a: P.encode_v2(command=P.Command.LOCAL), addrs))
        if case == "e":
            def mk(a: Any) -> Any:
                return P.ProxyHeader(1, P.Command.PROXY, P.Family.UNSPEC, P.Protocol.UNSPEC)
        elif case == "f":
            def mk(a: Any) -> Any:
                return P.ProxyHeader(2, P.Command.LOCAL, P.Family.UNSPEC, P.Protocol.UNSPEC)
        else:
            fam = P.Family.INET if case in "ac" else P.Family.INET6
            ver = 1 if v1 else 2

            def mk(a: Any) -> Any:
                return P.ProxyHeader(ver, P.Command.PROXY, fam, P.Protocol.STREAM, a[0], a[1], a[2])
        args3 = [(s, d, tlvsets[i] if case == "d" else ()) for i, (s, d) in enumerate(addrs)]
        impls.append(Impl("proxyproto ProxyHeader+to_bytes", lambda a: mk(a).to_bytes(), args3,
                          note="no CRC TLV" if case == "d" else ""))

    # proxy-protocol
    try:
        import socket as _s
        from ipaddress import IPv4Address, IPv6Address

        from proxyprotocol import checksum
        from proxyprotocol.result import (
            ProxyResultIPv4,
            ProxyResultIPv6,
            ProxyResultLocal,
            ProxyResultUnknown,
        )
        from proxyprotocol.tlv import ProxyProtocolSSLTLV, ProxyProtocolTLV
        from proxyprotocol.v1 import ProxyProtocolV1
        from proxyprotocol.v2 import ProxyProtocolV2
    except ImportError as exc:
        impls.append(Impl("proxy-protocol pack", None, status=f"n/a ({exc})"))
    else:
        pk = ProxyProtocolV1().pack if v1 else ProxyProtocolV2().pack
        kw: dict[str, Any] = {} if v1 else {"protocol": _s.SOCK_STREAM}

        def build(a: Any) -> Any:
            s, d = a[0], a[1]
            if case in "ac":
                return ProxyResultIPv4((IPv4Address(s[0]), s[1]), (IPv4Address(d[0]), d[1]), **kw)
            if case == "b":
                return ProxyResultIPv6((IPv6Address(s[0]), s[1]), (IPv6Address(d[0]), d[1]))
            if case == "d":
                ssl = ProxyProtocolSSLTLV(has_ssl=True, has_cert_conn=True, has_cert_sess=True,
                                          verified=True, version="TLSv1.3", cn="client.example.com",
                                          cipher="TLS_AES_256_GCM_SHA384")
                t = ProxyProtocolTLV(alpn=b"h2", authority="example.com", unique_id=a[2], ssl=ssl,
                                     auto_crc32c=True)
                return ProxyResultIPv6((IPv6Address(s[0]), s[1]), (IPv6Address(d[0]), d[1]), tlv=t, **kw)
            if case == "e":
                return ProxyResultUnknown()
            return ProxyResultLocal()
        args = [(s, d, unique_id(i)) for i, (s, d) in enumerate(addrs)]
        note = ""
        if case == "d" and checksum.crc32c is None:
            note = "no CRC (no crc32c module)"
        if case == "e":
            note = "emits 'PROXY UNKNOWN    \\r\\n'"
        impls.append(Impl("proxy-protocol pack", pk, [build(a) for a in args], note=note))
        impls.append(Impl("proxy-protocol build+pack", lambda a: pk(build(a)), args, note=note))

    # floor: validate the text addresses and lay out the bytes
    if case == "a":
        def fl(a: Any) -> bytes:
            s, d = a
            inet_pton(AF_INET, s[0])
            inet_pton(AF_INET, d[0])
            return b"PROXY TCP4 %s %s %d %d\r\n" % (s[0].encode(), d[0].encode(), s[1], d[1])
    elif case == "b":
        def fl(a: Any) -> bytes:
            s, d = a
            inet_pton(AF_INET6, s[0])
            inet_pton(AF_INET6, d[0])
            return b"PROXY TCP6 %s %s %d %d\r\n" % (s[0].encode(), d[0].encode(), s[1], d[1])
    elif case == "c":
        def fl(a: Any) -> bytes:
            s, d = a
            return _V2_TCP4.pack(SIG, 0x21, 0x11, 12, inet_pton(AF_INET, s[0]), inet_pton(AF_INET, d[0]),
                                 s[1], d[1])
    elif case == "d":
        tl_bytes = [b"".join(tlv(t, v) for t, v in case_d_tlvs(i)) for i in idx]
        addrs = [(s, d, tl_bytes[i]) for i, (s, d) in enumerate(addrs)]  # type: ignore[misc]

        def fl(a: Any) -> bytes:
            s, d, body = a
            head = _V2_TCP6.pack(SIG, 0x21, 0x21, 36 + 7 + len(body), inet_pton(AF_INET6, s[0]),
                                 inet_pton(AF_INET6, d[0]), s[1], d[1])
            crc = google_crc32c.extend(google_crc32c.value(head), b"\x03\x00\x04\0\0\0\0")
            crc = google_crc32c.extend(crc, body)
            return head + b"\x03\x00\x04" + crc.to_bytes(4, "big") + body
    elif case == "e":
        def fl(a: Any) -> bytes:
            return b"PROXY UNKNOWN\r\n"
    else:
        def fl(a: Any) -> bytes:
            return SIG + b"\x20\x00\x00\x00"
    if case == "d" and google_crc32c is None:
        impls.append(Impl("floor", None, status="n/a (google_crc32c missing)"))
    else:
        impls.append(Impl("floor", fl, addrs))
    return impls


# --------------------------------------------------------------------------
# Checking and timing


def check(impl: Impl, expected: list[Pair] | None) -> None:
    """Run every input once; mark the implementation "fails" when it is wrong."""
    if impl.fn is None:
        return
    try:
        results = [impl.fn(x) for x in impl.inputs]
        if expected is not None and impl.extract is not None:
            for i, (r, e) in enumerate(zip(results, expected)):
                got = norm_pair(impl.extract(r))
                if got != norm_pair(e):
                    impl.status = f"fails: header {i} gave {got}, expected {norm_pair(e)}"
                    return
        elif expected is None and have("parse") and impl.name != "proxy-protocol pack" \
                and "build" not in impl.name:
            # encoders: what they emit must parse back
            for r in results:
                if proxyproto.parse(r) is None:
                    raise ValueError("incomplete header emitted")
    except Exception as exc:  # a peer may raise anything: report it as "fails"
        msg = str(exc).splitlines()[0] if str(exc) else ""
        impl.status = f"fails: {type(exc).__name__}: {msg}"[:90]


def make_runner(impl: Impl) -> Callable[[int], float]:
    """A function that runs ``n`` passes over 1,024 inputs and returns seconds."""
    fn = impl.fn
    assert fn is not None
    seq = impl.inputs * (1024 // len(impl.inputs))
    perf = time.perf_counter

    def run(n: int) -> float:
        gc_was = gc.isenabled()
        gc.disable()
        try:
            t0 = perf()
            for _ in range(n):
                for x in seq:
                    fn(x)
            return perf() - t0
        finally:
            if gc_was:
                gc.enable()
    return run


SLICES = 10


def measure(impls: list[Impl], runs: int, seconds: float) -> None:
    """Calibrate each implementation to ``seconds`` per run, then interleave finely.

    Each run of each implementation is cut into 10 slices, and the slices of
    all the implementations of a case alternate, so a neighbour's load that
    comes and goes within seconds hits every implementation alike and the
    ratios stay meaningful on a shared machine.
    """
    live = [i for i in impls if i.fn is not None and i.status == "ok"]
    plan = []
    for impl in live:
        run = make_runner(impl)
        n = 1
        while True:
            t = run(n)
            if t > seconds / 5 or n > 1 << 20:
                break
            n *= 2
        n = max(1, int(n * seconds / t))
        k = min(SLICES, n)
        plan.append((impl, run, n // k, k))
    for _ in range(runs):
        spent = [0.0] * len(plan)
        for slice_no in range(SLICES):
            for j, (_impl, run, m, k) in enumerate(plan):
                if slice_no < k:
                    spent[j] += run(m)
        for j, (impl, _run, m, k) in enumerate(plan):
            impl.runs.append(m * k * 1024 / spent[j])


# --------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    """Where the figures were taken: cpu model, cores, Python, C CRC-32C."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    native = None
    if proxyproto is not None:
        try:
            from proxyproto import crc32c as ppcrc
            native = ppcrc.crc32c_native is not None
        except (ImportError, AttributeError):
            native = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "proxyproto_crc32c_native": native,
        "google_crc32c_importable": google_crc32c is not None,
    }


def fmt_rate(r: float | None) -> str:
    """Headers per second, in thousands, with the time per header."""
    if r is None:
        return ""
    return f"{r / 1e3:8.1f}k {1e6 / r:6.2f}us"


def table(title: str, rows: list[tuple[str, list[Impl]]], ours_name: str,
          peer_filter: Callable[[str], bool], pairs: Sequence[tuple[str, str]] = ()) -> str:
    """Plain aligned text: one block per case, one line per implementation."""
    out = [title, ""]
    hdr = f"  {'implementation':<34}{'per second':>10}{'per call':>9}  {'ours/this':>9}  note"
    for label, impls in rows:
        out.append(label)
        out.append(hdr)
        ours = next((i for i in impls if i.name == ours_name), None)
        o = ours.rate if ours else None
        for impl in impls:
            if impl.rate is None:
                out.append(f"  {impl.name:<34}{impl.status}")
                continue
            ratio = f"{o / impl.rate:8.2f}x" if o else ""
            out.append(f"  {impl.name:<34}{fmt_rate(impl.rate)}  {ratio:>9}  {impl.note}")
        peers = [i for i in impls if peer_filter(i.name) and i.rate]
        if o and peers:
            fast = max(peers, key=lambda i: i.rate or 0)
            out.append(f"  ours / fastest peer: {o / fast.rate:.2f}x ({fast.name})")  # type: ignore[operator]
        elif peers:
            out.append("  ours / fastest peer: n/a (ours did not run)")
        else:
            out.append("  ours / fastest peer: n/a (no peer handles this case)")
        by = {i.name: i.rate for i in impls}
        for a, b in pairs:
            ra, rb = by.get(a), by.get(b)
            text = f"{ra / rb:.2f}x" if ra and rb else "n/a"
            out.append(f"  {a} / {b}: {text}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run every case, print the tables, write JSON if asked."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 runs of 0.1 s per implementation")
    ap.add_argument("--runs", type=int, default=None, help="runs per implementation (default 5)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per run (default 0.5)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--only", choices=["parse", "encode"], help="run only one half")
    ap.add_argument("--cases", default="abcdef", help="subset of cases, e.g. 'ad'")
    args = ap.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    seconds = args.seconds or (0.1 if args.quick else 0.5)

    m = machine()
    head = [
        f"machine: {m['cpu']} ({m['cores']} cores), {m['platform']}",
        f"python:  {m['python']}",
        (f"C CRC-32C used by proxyproto: {m['proxyproto_crc32c_native']}"
         f" (google_crc32c importable: {m['google_crc32c_importable']})"),
        (f"method:  median of {runs} runs of ~{seconds} s, 64 distinct headers per case, gc off,"
         f" implementations interleaved in {SLICES} slices per run"),
        f"command: python bench/parse.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
    ]
    if proxyproto is None:
        head.append(f"proxyproto not importable: {PROXYPROTO_ERROR}")
    print("\n".join(head), flush=True)
    print()

    inputs = build_inputs()
    expect = expected_pairs()
    result: dict[str, Any] = {"machine": m, "runs": runs, "seconds": seconds, "parse": {}, "encode": {}}

    if args.only != "encode":
        rows = []
        for case in args.cases:
            impls = [mk(case, inputs[case]) for mk in PARSE_IMPLS]
            for impl in impls:
                check(impl, expect[case])
            measure(impls, runs, seconds)
            label = f"{CASES[case]}  ({len(inputs[case][0])} bytes)"
            rows.append((label, impls))
            result["parse"][case] = {i.name: {"rate": i.rate, "runs": i.runs, "status": i.status,
                                              "note": i.note} for i in impls}
        print(table("PARSE: headers per second (median), per-call time, ratio ours/this", rows,
                    "proxyproto", lambda n: not n.startswith("proxyproto") and n != "floor"), flush=True)

    if args.only != "parse":
        rows = []
        for case in args.cases:
            impls = encode_impls(case)
            for impl in impls:
                check(impl, None)
            measure(impls, runs, seconds)
            rows.append((CASES[case], impls))
            result["encode"][case] = {i.name: {"rate": i.rate, "runs": i.runs, "status": i.status,
                                               "note": i.note} for i in impls}
        print(table("ENCODE: headers per second (median), ratio ours (encode_v*)/this", rows,
                    "proxyproto encode_v*", lambda n: n.startswith("proxy-protocol"),
                    [("proxyproto encode_v*", "proxy-protocol build+pack"),
                     ("proxyproto ProxyHeader+to_bytes", "proxy-protocol build+pack")]), flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
