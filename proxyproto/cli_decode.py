"""``proxyproto decode``: the PROXY header at the start of a capture, for people or as JSON.

The capture (a file, or stdin; raw bytes or hex text) goes to a
:class:`proxyproto.reader.HeaderScanner`.  :func:`describe` turns the header
it finds into JSON-ready data, with the same keys as the ``expected`` blocks of
``tests/vectors``; :func:`render_text` writes that data as ``name: value``
lines.  Both give the length of the payload after the header.  Input that is
not a whole, valid header is a :class:`~proxyproto.cli_failure.Failure`.
"""

from __future__ import annotations

import argparse
import binascii
import json
import sys
from typing import Any

from . import reader
from .cli_failure import Failure
from .header import ProxyHeader
from .tlv import TLVType

__all__: list[str] = []  # private module: the public names are listed in docs/api.rst


def _read_input(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        with open(name, "rb") as f:
            return f.read()
    except OSError as exc:
        raise Failure(f"cannot read {name}: {exc.strerror or exc}") from None


def _from_hex(data: bytes) -> bytes:
    text = b"".join(data.split()).decode("ascii", "replace")
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError) as exc:
        raise Failure(f"--hex: input is not hex ({exc})") from None


def _tlv_name(tlv_type: int, ssl_sub: bool = False) -> str | None:
    try:
        name = TLVType(tlv_type).name
    except ValueError:
        return None
    if name.startswith("SSL_") and ssl_sub:
        return "PP2_SUBTYPE_" + name
    if name.startswith("SSL_") or ssl_sub:
        return None
    return "PP2_TYPE_" + name


def _text_value(value: bytes) -> str | None:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _host_port(address: Any) -> tuple[Any, Any]:
    if address is None:
        return None, None
    if isinstance(address, tuple):
        return address[0], address[1]
    if isinstance(address, bytes):
        return "@" + address[1:].decode("utf-8", "backslashreplace"), None
    return address, None


def describe(header: ProxyHeader, payload_length: int) -> dict[str, Any]:
    """The header as JSON-ready data; keys as in the ``expected`` blocks of ``tests/vectors``."""
    src_addr, src_port = _host_port(header.source)
    dst_addr, dst_port = _host_port(header.destination)
    tlvs = []
    for record in header.tlvs:
        item: dict[str, Any] = {
            "type": record.type,
            "type_hex": f"0x{record.type:02x}",
            "name": _tlv_name(record.type),
            "length": len(record.value),
            "value_hex": record.value.hex(),
        }
        text = (
            _text_value(record.value) if record.type in (TLVType.ALPN, TLVType.AUTHORITY, TLVType.UNIQUE_ID) else None
        )
        if text is not None:
            item["value_text"] = text
        tlvs.append(item)
    out: dict[str, Any] = {
        "version": header.version,
        "command": header.command.name,
        "family": "AF_" + header.family.name,
        "protocol": header.protocol.name,
        "header_length": header.length,
        "src_addr": src_addr,
        "src_port": src_port,
        "dst_addr": dst_addr,
        "dst_port": dst_port,
        "tlvs": tlvs,
    }
    ssl = header.ssl
    if ssl is not None:
        out["ssl"] = {
            "client": int(ssl.client),
            "verify": ssl.verify,
            "verified": ssl.verified,
            "sub_tlvs": [
                {
                    "type": sub.type,
                    "type_hex": f"0x{sub.type:02x}",
                    "name": _tlv_name(sub.type, ssl_sub=True),
                    "length": len(sub.value),
                    "value_hex": sub.value.hex(),
                    **(
                        {"value_text": t}
                        if sub.type != TLVType.SSL_CLIENT_CERT and (t := _text_value(sub.value))
                        else {}
                    ),
                }
                for sub in ssl.tlvs
            ],
        }
    if header.crc32c is not None:
        out["crc32c"] = f"{header.crc32c:08x}"
    out["payload_length"] = payload_length
    out["header_hex"] = header.to_bytes().hex()
    return out


def render_text(info: dict[str, Any], checksum_verified: bool = True) -> str:
    """The ``decode`` output for people: one ``name: value`` per line."""

    def where(addr: Any, port: Any) -> str:
        if addr is None:
            return "-"
        if port is None:
            return f"unix:{addr}"
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

    lines = [
        f"version: {info['version']}",
        f"command: {info['command']}",
        f"family: {info['family']}",
        f"protocol: {info['protocol']}",
        f"source: {where(info['src_addr'], info['src_port'])}",
        f"destination: {where(info['dst_addr'], info['dst_port'])}",
        f"header length: {info['header_length']}",
    ]
    for tlv in info["tlvs"]:
        text = f' "{tlv["value_text"]}"' if "value_text" in tlv else ""
        lines.append(
            f"tlv {tlv['type_hex']} {tlv['name'] or 'custom'} ({tlv['length']} bytes): {tlv['value_hex']}{text}"
        )
    ssl = info.get("ssl")
    if ssl is not None:
        lines.append(f"ssl: client=0x{ssl['client']:02x} verify={ssl['verify']} verified={ssl['verified']}")
        for sub in ssl["sub_tlvs"]:
            shown = f'"{sub["value_text"]}"' if "value_text" in sub else sub["value_hex"]
            lines.append(f"  ssl {sub['type_hex']} {sub['name'] or 'custom'} ({sub['length']} bytes): {shown}")
    if "crc32c" in info:
        lines.append(f"crc32c: {info['crc32c']}" + (" (verified)" if checksum_verified else " (not verified)"))
    lines.append(f"payload length: {info['payload_length']}")
    return "\n".join(lines)


def command_decode(args: argparse.Namespace) -> int:
    data = _read_input(args.file)
    if args.hex:
        data = _from_hex(data)
    scanner = reader.HeaderScanner(verify_checksum=not args.no_verify_checksum, allow_v4_in_tcp6=args.allow_v4_in_tcp6)
    outcome = scanner.feed(data)
    header = scanner.header
    if outcome is None:
        raise Failure(f"incomplete PROXY header: the {len(data)} byte(s) given are only the start of one")
    if header is None:
        kind = "not a PROXY protocol header" if outcome is reader.Outcome.NO_HEADER else "invalid PROXY header"
        raise Failure(f"{kind}: {scanner.error}")
    info = describe(header, len(data) - header.length)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render_text(info, checksum_verified=not args.no_verify_checksum))
    return 0
