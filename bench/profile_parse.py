"""Where ``proxyproto.parse`` spends its time, case by case (cProfile).

Why: the throughput table says how fast; this says where to look.  Each case
of ``bench/parse.py`` is parsed (and its addresses read, as a server does)
``--passes`` times over its 64 headers under cProfile, and the functions are
listed by their own time.  Profiling inflates the cost of small Python
functions, so read the shares, not the absolute figures.

    python bench/profile_parse.py            # all six cases, top 12 each
    python bench/profile_parse.py --cases bd --top 20
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parse as bench  # bench/parse.py, next to this file


def main(argv: list[str] | None = None) -> int:
    """Profile each requested case and print the top functions by own time."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="abcdef")
    ap.add_argument("--passes", type=int, default=100)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    if not bench.have("parse"):
        print("proxyproto.parse is not importable")
        return 1
    inputs = bench.build_inputs()
    parse = bench.proxyproto.parse
    for case in args.cases:
        data = inputs[case] * args.passes
        prof = cProfile.Profile()
        prof.enable()
        for d in data:
            h = parse(d)
            h.source  # noqa: B018 -- the server reads them; v2 decodes them lazily
            h.destination  # noqa: B018
        prof.disable()
        print(f"===== {bench.CASES[case]}: {len(data)} headers")
        pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
