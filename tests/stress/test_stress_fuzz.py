"""A short, bounded fuzzing pass in the normal suite (issue 5, acceptance 5).

Each atheris harness runs for 20,000 inputs (or 30 s, whichever comes first)
on a temporary corpus seeded from tests/vectors, when atheris is importable;
the pure-Python fallback (same invariants, random mutation) always runs for
20,000 inputs.  The long runs are documented in fuzz/README.md.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
RUNS = 20_000
SECONDS = 30


NO_ATHERIS = importlib.util.find_spec("atheris") is None


@pytest.mark.skipif(NO_ATHERIS, reason="atheris is not installed (pip install atheris)")
@pytest.mark.parametrize("harness", ["fuzz_parse.py", "fuzz_reader.py"])
def test_atheris_harness_short_pass(harness: str, tmp_path: Path) -> None:
    """libFuzzer-driven, coverage-guided: no input breaks an invariant (exit status 0)."""
    corpus = tmp_path / "corpus"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    result = subprocess.run(
        [sys.executable, str(FUZZ / harness), f"-atheris_runs={RUNS}", f"-max_total_time={SECONDS}",
         f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)],
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    tail = result.stderr[-3000:]
    done = [line for line in result.stderr.splitlines() if line.startswith("Done ")]
    print(f"\n[fuzz] {harness}: {done[-1] if done else 'no Done line'}")
    assert result.returncode == 0, tail
    assert not list(artifacts.iterdir()), tail


def test_fallback_fuzzer_short_pass() -> None:
    """The pure-Python random mutation fuzzer: same invariants, no atheris needed."""
    result = subprocess.run(
        [sys.executable, str(FUZZ / "run_fallback.py"), "--runs", str(RUNS), "--seconds", str(SECONDS),
         "--seed", "5"],
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    print(f"\n[fuzz] {result.stdout.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
