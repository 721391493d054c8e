"""A ``PROXYPROTO_*`` variable that is no knob's stops the server at start, naming it and the closest one.

A misspelled variable (``PROXYPROTO_TRUSTED`` for ``PROXYPROTO_ALLOW_IPS``,
``PROXYPROTO_TIMEOUT`` for ``PROXYPROTO_HEADER_TIMEOUT``) would otherwise leave
its knob at the default without a word.  ``settings_from_environment``, the one
place the adapters read the environment, refuses it with the ``ValueError`` a
bad value gets, so each server reports it where it reports a bad value: the
real ``uvicorn`` and ``gunicorn`` commands stop at start with one line.  The
project's own variables that share the prefix (``NOT_KNOBS``) are never refused.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port, require_module

from proxyproto.settings import NOT_KNOBS, VARIABLES, Settings, settings_from_environment, unknown_variables

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MISSPELLED = [
    ("PROXYPROTO_TRUSTED", "PROXYPROTO_ALLOW_IPS"),
    ("PROXYPROTO_TIMEOUT", "PROXYPROTO_HEADER_TIMEOUT"),
    ("PROXYPROTO_UNTRUSTED", "PROXYPROTO_UNTRUSTED_POLICY"),
    ("PROXYPROTO_MAXPENDING", "PROXYPROTO_MAX_PENDING"),
    ("PROXYPROTO_HEADER_TIMOUT", "PROXYPROTO_HEADER_TIMEOUT"),
    ("PROXYPROTO_ALLOW_IP", "PROXYPROTO_ALLOW_IPS"),
]


@pytest.mark.parametrize(("name", "meant"), MISSPELLED)
def test_a_misspelled_variable_is_refused_naming_the_closest_one(name: str, meant: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} is not a proxyproto variable \(did you mean {meant}\?\)"):
        settings_from_environment({name: "2", "PROXYPROTO_POLICY": "REQUIRE"})


def test_a_variable_like_no_knob_is_refused_with_the_list_of_variables() -> None:
    with pytest.raises(ValueError) as caught:
        settings_from_environment({"PROXYPROTO_COLOUR": "blue"})
    text = str(caught.value)
    assert text.startswith("PROXYPROTO_COLOUR is not a proxyproto variable; the variables are: "), text
    assert all(variable in text for variable in VARIABLES.values()), text


def test_the_projects_own_variables_with_the_prefix_are_not_refused() -> None:
    assert settings_from_environment(dict.fromkeys(NOT_KNOBS, "1")) == Settings()
    assert settings_from_environment({"PROXYPROTO_MINIMAL_INSTALL": "1"}) == Settings()


def test_variables_without_the_prefix_or_in_another_case_are_not_ours() -> None:
    assert unknown_variables({"PATH": "/bin", "proxyproto_trusted": "x", "XPROXYPROTO_A": "1"}) == []


def test_every_proxyproto_variable_the_project_names_is_a_knob_or_listed_as_not_one() -> None:
    """What the docs, CI, benchmarks and tests set or read is accepted (this module's misspellings aside)."""
    named = re.compile(r"[\"']?(PROXYPROTO_[A-Z0-9_]+)(?:[\"']|=)")
    found = set()
    for path in [*ROOT.glob("*.rst"), *ROOT.glob("docs/*.rst"), *ROOT.glob(".ci/*"), *ROOT.glob("bench/*")]:
        if path.is_file():  # (bench/__pycache__ once a benchmark ran)
            found.update(named.findall(path.read_text(errors="replace")))
    for path in [*ROOT.glob("proxyproto/*.py"), *ROOT.glob("tests/**/*.py")]:
        if path.name != Path(__file__).name:
            found.update(named.findall(path.read_text(errors="replace")))
    assert "PROXYPROTO_MINIMAL_INSTALL" in found and "PROXYPROTO_ALLOW_IPS" in found
    assert unknown_variables(dict.fromkeys(found, "")) == []


def test_uvicorn_command_with_a_misspelled_variable_stops_at_start_naming_it() -> None:
    require_module("uvicorn")
    command = [sys.executable, "-m", "uvicorn", "web_kit:app", "--http", "proxyproto.uvicorn:H11"]
    done = subprocess.run(
        [*command, "--port", str(free_port())],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{HERE / 'web'}", "PROXYPROTO_TRUSTED": "10.0.0.0/8"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0, done.stderr
    assert "PROXYPROTO_TRUSTED is not a proxyproto variable (did you mean PROXYPROTO_ALLOW_IPS?)" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(("worker", "app"), [("Sync", "wsgi_app"), ("UvicornH11Worker", "asgi_app")])
def test_gunicorn_with_a_misspelled_variable_stops_at_start_naming_it(worker: str, app: str, tmp_path: Path) -> None:
    require_module("gunicorn")
    if worker.startswith("Uvicorn"):
        require_module("uvicorn")
    command = [sys.executable, "-m", "gunicorn", "--no-control-socket", "-k", f"proxyproto.gunicorn.{worker}"]
    done = subprocess.run(
        [*command, "-w", "1", "-b", f"127.0.0.1:{free_port()}", f"gunicorn_kit:{app}"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{HERE / 'web'}:{HERE}", "PROXYPROTO_TIMEOUT": "2"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode != 0, done.stderr
    assert "PROXYPROTO_TIMEOUT is not a proxyproto variable (did you mean PROXYPROTO_HEADER_TIMEOUT?)" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
