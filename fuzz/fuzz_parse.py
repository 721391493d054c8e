"""Harness A: ``proxyproto.parse`` over any bytes (options drawn from the input).

Run: ``python fuzz/fuzz_parse.py -atheris_runs=1000000`` (see README.md).
Invariants: fuzz/fuzz_checks.py, ``check_parse``.
"""

from __future__ import annotations

import sys

import _common
import atheris

with atheris.instrument_imports():
    import fuzz_checks

    import proxyproto  # noqa: F401


def test_one_input(data: bytes) -> None:
    fuzz_checks.check_parse(data)


def main() -> None:
    atheris.Setup(_common.argv_with_corpus("parse"), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
    sys.exit(0)
