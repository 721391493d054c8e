"""Fuzz findings kept as regression tests, plus the whole seed corpus through both invariants.

Inputs use the fuzz layout (fuzz/fuzz_checks.py): option byte, chunking seed, stream.
The runs recorded in fuzz/README.md (one million inputs per atheris harness)
found nothing; a future finding is added to ``FINDINGS`` with the date and the
command that found it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

import _common
import fuzz_checks

#: (id, fuzz input) for every finding of a fuzz run (none so far).
FINDINGS: list[tuple[str, bytes]] = []

#: Inputs at the edges of the layout and of the limits, checked alongside the seeds.
EDGES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("options-only", b"\x00\x00"),
    ("v2-signature-only", b"\x00\x00" + b"\r\n\r\n\x00\r\nQUIT\n"),
    ("v2-len-max-with-cap-16", b"\x04\x01" + b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff"),
    ("v2-local-cap-16", b"\x04\x01" + b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"),
    ("v1-107-bytes-cap-16", b"\x04\x00" + b"PROXY UNKNOWN " + b"a" * 91 + b"\r\n"),
    ("v1-cr-at-end-bytewise", b"\x00\x01" + b"PROXY UNKNOWN\r"),
    ("v1-mixed-opt-in", b"\x02\x02" + b"PROXY TCP6 2001:db8::1 192.0.2.1 1 2\r\npayload"),
]


@pytest.mark.parametrize(("ident", "data"), FINDINGS + EDGES, ids=[i for i, _ in FINDINGS + EDGES])
def test_fuzz_regression_keeps_every_invariant(ident: str, data: bytes) -> None:
    fuzz_checks.check_all(data)


def test_seed_corpus_keeps_every_invariant() -> None:
    """Every capture of tests/vectors and every hand-made seed, under three option settings."""
    seeds = _common.seed_inputs()
    assert len(seeds) >= 3 * 10
    for data in seeds:
        fuzz_checks.check_all(data)
