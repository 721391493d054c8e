"""Harness B: ``HeaderReader`` fed the same bytes in chunks agrees with ``parse`` of everything.

Run: ``python fuzz/fuzz_reader.py -atheris_runs=1000000`` (see README.md).
Invariants: fuzz/fuzz_checks.py, ``check_reader``.
"""

from __future__ import annotations

import sys

import _common
import atheris

with atheris.instrument_imports():
    import fuzz_checks

    import proxyproto  # noqa: F401


def test_one_input(data: bytes) -> None:
    fuzz_checks.check_reader(data)


def main() -> None:
    atheris.Setup(_common.argv_with_corpus("reader"), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
    sys.exit(0)
