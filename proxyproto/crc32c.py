"""CRC-32C (Castagnoli, RFC 4960 appendix B), the checksum of PP2_TYPE_CRC32C.

``zlib.crc32`` is a different polynomial and the standard library has no
CRC-32C, so this module uses ``google_crc32c`` (C, installed by the ``fast``
extra) when it is importable and a table-driven implementation otherwise.
Both give identical results; only speed differs.
"""

from __future__ import annotations

from typing import Protocol

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


class CRC32CFunction(Protocol):
    """The signature both implementations share."""

    def __call__(self, data: bytes, value: int = 0) -> int: ...


def crc32c_python(data: bytes, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``value`` (the CRC of earlier bytes)."""
    table = _TABLE
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c_native: CRC32CFunction | None
try:
    import google_crc32c as _google_crc32c
except ImportError:  # pragma: no cover - depends on the environment
    crc32c_native = None
else:
    if _google_crc32c.implementation == "c":

        def crc32c_native(data: bytes, value: int = 0) -> int:
            """CRC-32C through google_crc32c's C extension."""
            return int(_google_crc32c.extend(value, data))

    else:  # its own pure-Python fallback is slower than ours
        crc32c_native = None

#: The CRC-32C function in use: the C one when available, else the table.
crc32c: CRC32CFunction = crc32c_native or crc32c_python
