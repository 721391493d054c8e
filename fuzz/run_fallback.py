"""Pure-Python random-mutation fuzzing of both harnesses, for machines without atheris.

Usage: ``python fuzz/run_fallback.py [--runs N] [--seconds S] [--seed K]``.

It mutates the seed corpus (captures from tests/vectors and hand-made headers,
see ``_common.py``) with the usual byte-level moves (flip, set, insert, erase,
duplicate, splice, interesting integers in the v2 length field) and runs
``fuzz_checks.check_all`` on every input: the same invariants as the atheris
harnesses, without coverage guidance.  A finding is written to
``fuzz/artifacts/fallback-<sha1>`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
import traceback

import _common
import fuzz_checks

INTERESTING_16 = (0, 1, 12, 15, 16, 36, 107, 216, 232, 4080, 4081, 4096, 32767, 32768, 65519, 65535)


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One input derived from ``data`` by one to four random moves."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        move = rng.randrange(8)
        pos = rng.randrange(len(out) + 1)
        if move == 0 and out:
            out[pos % len(out)] ^= 1 << rng.randrange(8)
        elif move == 1 and out:
            out[pos % len(out)] = rng.randrange(256)
        elif move == 2:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif move == 3 and out:
            del out[pos : pos + rng.randint(1, 16)]
        elif move == 4 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start : start + rng.randint(1, 32)]
        elif move == 5:
            other = rng.choice(pool)
            out = out[:pos] + other[rng.randrange(len(other) + 1) :]
        elif move == 6 and len(out) >= 18:
            # The v2 length field sits at stream offset 14 (input offset 16).
            value = rng.choice(INTERESTING_16)
            out[16:18] = value.to_bytes(2, "big")
        elif move == 7 and len(out) >= 2:
            out[rng.randrange(2)] = rng.randrange(256)  # the option bytes
    return bytes(out)


def run(runs: int, seconds: float, seed: int) -> int:
    """Fuzz until ``runs`` inputs or ``seconds`` pass; the number of inputs tried (raises on a finding)."""
    rng = random.Random(seed)
    pool = _common.seed_inputs()
    for data in pool:
        fuzz_checks.check_all(data)
    deadline = time.monotonic() + seconds
    done = len(pool)
    while done < runs and time.monotonic() < deadline:
        data = mutate(rng, rng.choice(pool), pool)
        try:
            fuzz_checks.check_all(data)
        except Exception:
            artifact = _common.HERE / "artifacts" / f"fallback-{hashlib.sha1(data).hexdigest()}"
            artifact.parent.mkdir(exist_ok=True)
            artifact.write_bytes(data)
            print(f"finding after {done} inputs, saved to {artifact}: {data!r}", file=sys.stderr)
            raise
        done += 1
        if rng.random() < 0.01 and len(pool) < 5000:
            pool.append(data)  # keep some mutants as parents: cheap depth without coverage
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.monotonic()
    try:
        done = run(args.runs, args.seconds, args.seed)
    except Exception:
        traceback.print_exc()
        return 1
    print(f"fallback: {done} inputs, no finding, {time.monotonic() - start:.1f}s (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
