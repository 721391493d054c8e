"""Address text and binary forms, strict and without the socket module.

The core must not import ``socket`` (it does no I/O), and ``ipaddress`` is
both slow and more lenient than the PROXY grammar, so the conversions the
protocol needs live here: dotted quads without leading zeros, IPv6 text as
``inet_pton`` accepts it (no zone ids), canonical IPv6 text exactly as
``inet_ntop`` writes it (so addresses compare equal to what the ``socket``
module reports), and AF_UNIX names as the ``socket`` module gives them.

``inet_pton``/``inet_ntop`` are the C library's, through ``_socket`` (pure
functions: no descriptor, no I/O), when that extension exists, and the
pure-Python versions below otherwise, with the same signatures and errors;
both agree on every input (a property test checks it).
"""

from __future__ import annotations

import os
import re
import struct
from typing import Union

# Private module.  v1 and v2 import these two from here, and mypy --strict accepts that
# only for names listed in __all__ (tests/test_public_api.py allows exactly these).
__all__ = ["inet_ntop", "inet_pton"]

UnixAddress = Union[str, bytes]

_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: A dotted quad as the v1 grammar allows it: decimal, 0..255, no leading zeros.
IPV4_TEXT = rb"(?:" + _OCTET + rb"\.){3}" + _OCTET
_IPV4_RE = re.compile(IPV4_TEXT.decode("ascii"))
_HEX_GROUP_RE = re.compile("[0-9A-Fa-f]{1,4}")
_UNPACK_8H = struct.Struct(">8H").unpack
_PACK_8H = struct.Struct(">8H").pack


def _pack_ipv4_python(text: str) -> bytes | None:
    """The 4 bytes of a strict dotted quad, or None when ``text`` is not one."""
    if not _IPV4_RE.fullmatch(text):
        return None
    a, b, c, d = text.split(".")
    return bytes((int(a), int(b), int(c), int(d)))


def _ipv4_text_python(packed: bytes) -> str:
    """Dotted-quad text of 4 bytes."""
    return "%d.%d.%d.%d" % (packed[0], packed[1], packed[2], packed[3])


def _pack_ipv6_python(text: str) -> bytes | None:
    """The 16 bytes of an IPv6 address in any form ``inet_pton`` accepts, else None.

    Accepted: 1 to 4 hex digits per group, at most one ``::`` standing for at
    least one zero group, an optional dotted-quad tail.  Refused: zone ids,
    brackets, empty groups, more than 8 groups, leading zeros in the tail.
    """
    if not text or len(text) > 45:
        return None
    if "." in text:
        head, colon, quad = text.rpartition(":")
        packed4 = _pack_ipv4_python(quad) if colon else None
        if packed4 is None:
            return None
        text = "%s:%x:%x" % (head, packed4[0] << 8 | packed4[1], packed4[2] << 8 | packed4[3])
    if "::" in text:
        left, _sep, right = text.partition("::")
        if "::" in right:
            return None
        left_groups = left.split(":") if left else []
        right_groups = right.split(":") if right else []
        missing = 8 - len(left_groups) - len(right_groups)
        if missing < 1:
            return None
        groups = left_groups + ["0"] * missing + right_groups
    else:
        groups = text.split(":")
        if len(groups) != 8:
            return None
    match = _HEX_GROUP_RE.fullmatch
    for group in groups:
        if not match(group):
            return None
    return _PACK_8H(*[int(group, 16) for group in groups])


def _ipv6_text_python(packed: bytes) -> str:
    """Canonical text of 16 bytes, character for character as glibc ``inet_ntop``.

    The longest run of two or more zero groups (the first, on a tie) becomes
    ``::``; hex is lower case without leading zeros; IPv4-mapped
    (``::ffff:a.b.c.d``) and IPv4-compatible (``::a.b.c.d``) addresses keep
    their dotted tail.
    """
    words = _UNPACK_8H(packed)
    best_base = best_len = 0
    run_base = run_len = 0
    for index, word in enumerate(words):
        if word:
            run_len = 0
            continue
        if run_len == 0:
            run_base = index
        run_len += 1
        if run_len > best_len:
            best_base, best_len = run_base, run_len
    if best_len < 2:
        return "%x:%x:%x:%x:%x:%x:%x:%x" % words
    if best_base == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
        prefix = "::ffff:" if best_len == 5 else "::"
        return prefix + _ipv4_text_python(packed[12:])
    head = ":".join(["%x" % word for word in words[:best_base]])
    tail = ":".join(["%x" % word for word in words[best_base + best_len :]])
    return head + "::" + tail


# Address families as ``inet_pton``/``inet_ntop`` take them: the platform's
# numbers when ``_socket`` exists (below), these for the pure-Python pair.
AF_INET = 2
AF_INET6 = 10


def _inet_pton_python(family: int, text: str) -> bytes:
    """``socket.inet_pton`` in Python: OSError for text that is no address of ``family``."""
    packed = _pack_ipv4_python(text) if family == AF_INET else _pack_ipv6_python(text)
    if packed is None:
        raise OSError("illegal IP address string passed to inet_pton")
    return packed


def _inet_ntop_python(family: int, packed: bytes) -> str:
    """``socket.inet_ntop`` in Python: ValueError for a packed address of the wrong size."""
    if len(packed) != (4 if family == AF_INET else 16):
        raise ValueError("invalid length of packed IP address string")
    return _ipv4_text_python(packed) if family == AF_INET else _ipv6_text_python(packed)


# The hot paths of v1 and v2 call these two directly, inside one ``try``
# catching (OSError, ValueError): a Python wrapper per call would cost more
# than the conversion itself.
try:
    from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton
except ImportError:  # pragma: no cover - interpreters without the _socket extension
    inet_pton = _inet_pton_python
    inet_ntop = _inet_ntop_python  # type: ignore[assignment]  # bytes, not any Buffer


def pack_ipv4(text: str) -> bytes | None:
    """The 4 bytes of a strict dotted quad, or None when ``text`` is not one."""
    try:
        return inet_pton(AF_INET, text)
    except (OSError, ValueError):
        return None


def ipv4_text(packed: bytes) -> str:
    """Dotted-quad text of 4 bytes."""
    return inet_ntop(AF_INET, packed)


def pack_ipv6(text: str) -> bytes | None:
    """The 16 bytes of an IPv6 address as ``inet_pton`` reads it (no zone ids), else None."""
    try:
        return inet_pton(AF_INET6, text)
    except (OSError, ValueError):
        return None


def ipv6_text(packed: bytes) -> str:
    """Canonical ``inet_ntop`` text of 16 bytes."""
    return inet_ntop(AF_INET6, packed)


def unix_name(raw: bytes) -> UnixAddress:
    """An AF_UNIX address block field (108 bytes) as the socket module gives it.

    A pathname is ``os.fsdecode``'d up to its first NUL; an abstract name
    (first byte NUL) stays bytes, trailing NUL padding removed; an all-zero
    field is the unnamed address ``""``.
    """
    if raw[:1] == b"\0":
        name = raw.rstrip(b"\0")
        return name if name else ""
    end = raw.find(b"\0")
    return os.fsdecode(raw if end < 0 else raw[:end])


def pack_unix(name: UnixAddress, field: str) -> bytes:
    """The 108-byte NUL-padded address block field of an AF_UNIX name."""
    raw = os.fsencode(name) if isinstance(name, str) else bytes(name)
    if len(raw) > 108:
        raise ValueError(f"{field}: AF_UNIX name of {len(raw)} bytes exceeds 108")
    if raw[:1] != b"\0" and b"\0" in raw:
        raise ValueError(f"{field}: AF_UNIX pathname contains a NUL byte")
    return raw.ljust(108, b"\0")


def split_host_port(address: object, field: str) -> tuple[str, int]:
    """Validate a ``(host, port)`` or socket-module 4-tuple; return ``(host, port)``."""
    if not isinstance(address, tuple) or len(address) not in (2, 4):
        raise ValueError(f"{field}: expected (host, port), got {address!r}")
    host, port = address[0], address[1]
    if not isinstance(host, str):
        raise ValueError(f"{field}: host must be str, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"{field}: port must be an int in 0..65535, got {port!r}")
    return host, port
