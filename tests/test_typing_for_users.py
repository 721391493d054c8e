"""A user's type checker sees proxyproto's types after ``pip install -e .``.

setuptools' default editable install of a flat layout is an import hook (a meta path finder
written into site-packages), which mypy and pyright never run: a user's ``import proxyproto``
was ``import-not-found`` and every name ``Any``.  setup.cfg's ``package_dir = =.`` makes the
same default install a plain path entry in a ``.pth`` file, which type checkers read.

The test does what a user does: a fresh venv, ``pip install -e`` of the project (its
packaging files and package copied to tmp, so the checkout is not written to), and
``mypy --strict --python-executable <venv python>`` on a short script outside the checkout.
It skips when no venv can be made or the build backend cannot be fetched (offline).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_SCRIPT = """\
import proxyproto

header = proxyproto.parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 51234 443\\r\\n")
assert header is not None
reveal_type(header)
source = header.source_address
if source is not None:
    host, port = source
    reveal_type(host)
    reveal_type(port)
reveal_type(header.destination_address)
wire: bytes = proxyproto.encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
wrong: int = proxyproto.encode_v1(None, None)
"""


def _copy_project(destination: Path) -> Path:
    """The files ``pip install -e`` reads: every top-level file (setup.py, setup.cfg, README...), the package
    and the Twisted plugin drop-in (setup.cfg's ``twisted.plugins``)."""
    project = destination / "project"
    project.mkdir()
    for entry in ROOT.iterdir():
        if entry.is_file():
            shutil.copy2(entry, project / entry.name)
    for package in ("proxyproto", "twisted"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__", "*.cache"))
    return project


def _venv_python(where: Path) -> Path:
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(where)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create a venv here: {exc}")
    python = where / ("Scripts" if os.name == "nt" else "bin") / "python"
    if not python.exists():
        pytest.skip("the venv has no python")
    return python


_OFFLINE = re.compile(r"Could not find a version|No matching distribution|connection|Temporary failure|resolve", re.I)


def test_editable_install_type_checks_for_users(tmp_path: Path) -> None:
    python = _venv_python(tmp_path / "venv")
    project = _copy_project(tmp_path)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-e", str(project)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if install.returncode != 0:
        if _OFFLINE.search(install.stdout + install.stderr):
            pytest.skip(f"pip cannot fetch the build backend (offline?): {install.stderr.strip()[-300:]}")
        pytest.fail(f"pip install -e failed:\n{install.stdout}\n{install.stderr}")

    user = tmp_path / "user"  # outside the checkout: python -c and mypy must not find it through the cwd
    user.mkdir()
    (user / "app.py").write_text(USER_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key not in ("MYPYPATH", "PYTHONPATH")}
    site = subprocess.run(
        [str(python), "-c", "import proxyproto; print(proxyproto.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=user,
        env=env,
        check=True,
    )
    assert Path(site.stdout.strip()).is_relative_to(project), site.stdout  # the editable install, nothing else
    check = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--hide-error-context",
            "--python-executable", str(python), "--cache-dir", str(tmp_path / "mypy-cache"), "app.py",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=user,
        env=env,
        check=False,
    )  # fmt: skip
    out = check.stdout
    assert "import-not-found" not in out and "import-untyped" not in out, out
    notes = [note.replace("builtins.", "") for note in re.findall(r'Revealed type is "([^"]+)"', out)]
    assert notes == ["proxyproto.header.ProxyHeader", "str", "int", "tuple[str, int] | None"], out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1, out  # the deliberate one: the types are real, not Any
    assert errors[0].startswith("app.py:13:") and "[assignment]" in errors[0], out
    assert check.returncode == 1, (check.returncode, out, check.stderr)


@pytest.mark.parametrize(
    ("data", "source", "destination"),
    [
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 51234 443\r\n", ("192.0.2.1", 51234), ("192.0.2.2", 443)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 443\r\n", ("2001:db8::7", 4242), ("2001:db8::1", 443)),
        (b"PROXY UNKNOWN\r\n", None, None),
        (b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00", None, None),  # LOCAL
    ],
)
def test_source_address_is_the_ip_pair_or_none(
    data: bytes, source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> None:
    import proxyproto

    header = proxyproto.parse(data)
    assert header is not None
    assert header.source_address == source and header.destination_address == destination
    if source is not None:
        assert header.source_address is header.source  # the same value, typed for the IP case


def test_source_address_is_none_for_unix_names() -> None:
    import proxyproto

    header = proxyproto.parse(proxyproto.encode_v2("/run/client.sock", b"\0abstract"))
    assert header is not None and header.source == "/run/client.sock" and header.destination == b"\0abstract"
    assert header.source_address is None and header.destination_address is None
