"""Seed corpus and argument handling shared by the atheris harnesses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VECTORS = ROOT / "tests" / "vectors"
if str(ROOT) not in sys.path:  # run from anywhere: the package is the checkout's
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Hand-made seeds beside the captures: each class of header the parser knows.
_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
EXTRA_SEEDS = (
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n",
    b"PROXY TCP6 2001:db8::1 192.0.2.1 1 2\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
    _SIG + b"\x20\x00\x00\x00",
    _SIG + b"\x21\x11\x00\x0c" + bytes(range(12)),
    _SIG + b"\x20\x11\x00\x0c" + bytes(range(12)),
    _SIG + b"\x21\x21\x00\x24" + bytes(range(36)),
    _SIG + b"\x21\x31\x00\xd8" + b"/tmp/a".ljust(108, b"\0") + b"\0abstract".ljust(108, b"\0"),
    _SIG + b"\x21\x11\x00\x13" + bytes(12) + b"\x03\x00\x04\x00\x00\x00\x00",
    _SIG + b"\x21\x11\x00\x1a" + bytes(12) + b"\x20\x00\x0b\x07\x00\x00\x00\x00\x21\x00\x03TLS",
    _SIG + b"\x21\x11\x00\x1e" + bytes(12) + b"\xea\x00\x0f\x01vpce-0123456789",
    _SIG + b"\x21\x00\x00\x07" + b"\x02\x00\x04host",
)


def seed(corpus: Path) -> Path:
    """Fill an empty ``corpus`` with the seeds: each capture and hand-made header, behind option bytes."""
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, data in enumerate(seed_inputs()):
            (corpus / f"seed-{i:03d}").write_bytes(data)
    return corpus


def seed_inputs() -> list[bytes]:
    """Every seed as a whole fuzz input (two option bytes, then the stream)."""
    streams = [path.read_bytes() for path in sorted(VECTORS.glob("*.bin"))]
    streams.extend(EXTRA_SEEDS)
    return [options + stream for stream in streams for options in (b"\x00\x00", b"\x03\x01", b"\x18\x02")]


def argv_with_corpus(name: str) -> list[str]:
    """sys.argv, with ``fuzz/corpus/<name>`` appended unless a corpus directory is named; seeds it if empty."""
    args = list(sys.argv)
    dirs = [arg for arg in args[1:] if not arg.startswith("-")]
    if not dirs:
        dirs = [os.fspath(HERE / "corpus" / name)]
        args.append(dirs[0])
    seed(Path(dirs[0]))
    return args
