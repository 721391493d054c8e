"""The sans-I/O core stays free of I/O, and the package is mypy --strict and ruff clean.

DESIGN.md: the core (errors, header, v1, v2, crc32c, reader) does no I/O and
imports nothing from the I/O layer.  Checked two ways: statically, from each
core file's own import statements (``ast``), following proxyproto-internal
imports so helper modules the core uses are covered too; and dynamically, in a
fresh interpreter, by looking at ``sys.modules`` after the import.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxyproto"
CORE = ["errors", "header", "v1", "v2", "crc32c", "reader"]
FORBIDDEN = {"socket", "socketserver", "selectors", "ssl", "asyncio", "proxyproto.sock", "proxyproto.server"}
IO_MODULES = ["socket", "socketserver", "selectors", "ssl", "asyncio"]


def _imports(module: str) -> set[str]:
    """Absolute names of every module ``proxyproto.<module>`` imports, anywhere in the file."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "proxyproto"  # flat package: one dot is the package itself
                target = f"{base}.{node.module}" if node.module else base
                if node.module is None:
                    names.update(f"{base}.{alias.name}" for alias in node.names)
                else:
                    names.add(target)
            else:
                assert node.module is not None
                names.add(node.module)
                if node.module == "proxyproto":
                    names.update(f"proxyproto.{alias.name}" for alias in node.names)
    return names


def _closure() -> dict[str, set[str]]:
    """Core modules plus every proxyproto module they import, with their imports."""
    seen: dict[str, set[str]] = {}
    todo = list(CORE)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen[mod] = _imports(mod)
        for name in seen[mod]:
            if name.startswith("proxyproto.") and (PACKAGE / f"{name.split('.')[1]}.py").exists():
                todo.append(name.split(".")[1])
    return seen


@pytest.mark.parametrize("module", CORE)
def test_core_module_exists(module: str) -> None:
    """Each core module of DESIGN.md's layout is present."""
    assert (PACKAGE / f"{module}.py").is_file()


def test_core_imports_no_io_module() -> None:
    """No core module (nor any proxyproto module the core pulls in) imports an I/O module."""
    for mod, names in _closure().items():
        bad = {n for n in names if n in FORBIDDEN or n.split(".")[0] in FORBIDDEN}
        assert not bad, f"proxyproto.{mod} imports {sorted(bad)}"


def _fresh(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter from the repository root; return the I/O modules loaded."""
    script = code + f"\nimport sys\nprint(','.join(m for m in {IO_MODULES!r} if m in sys.modules))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    return [m for m in out.split(",") if m]


def test_baseline_interpreter_loads_no_io_module() -> None:
    """Sanity check for the next tests: a bare interpreter has none of these loaded."""
    assert _fresh("pass") == []


@pytest.mark.parametrize("module", CORE)
def test_core_module_alone_loads_no_io_module(module: str) -> None:
    """Importing a core module, without the package __init__, loads no I/O module at all."""
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('proxyproto')\n"
        f"pkg.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['proxyproto'] = pkg\n"
        f"import proxyproto.{module}\n"
    )
    assert _fresh(code) == []


def test_import_v2_leaves_server_modules_out() -> None:
    """``import proxyproto.v2`` (package __init__ included) does not load socketserver or selectors."""
    loaded = _fresh("import proxyproto.v2")
    assert "socketserver" not in loaded
    assert "selectors" not in loaded


#: The servers the adapters plug into: optional extras, imported only by their adapter's module.
SERVERS = ["uvicorn", "gunicorn", "aiohttp", "hypercorn", "waitress", "tornado", "twisted", "daphne", "sanic"]


def test_the_package_and_every_engine_module_import_no_server() -> None:
    """``import proxyproto`` (and the engine under every adapter) loads none of the servers, installed or not."""
    engine = ["settings", "policy", "reader", "aio", "aio_protocol", "server", "udp", "sock", "advice"]
    code = "import proxyproto, " + ", ".join(f"proxyproto.{m}" for m in engine) + "\nimport sys\n"
    code += f"print(','.join(m for m in {SERVERS!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert out == "", f"imported: {out}"


def test_ipaddress_does_not_import_socket() -> None:
    """The core may use ipaddress: on this interpreter it does not drag socket in."""
    assert "socket" not in _fresh("import ipaddress")


def _tool(name: str) -> list[str]:
    """Command line for a checker, or skip (fail under CI=true) when it is not installed."""
    if importlib.util.find_spec(name) is not None:
        return [sys.executable, "-m", name]
    exe = shutil.which(name)
    if exe is not None:
        return [exe]
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not installed, and CI=true requires it")
    pytest.skip(f"{name} is not installed")


def test_mypy_strict_is_clean() -> None:
    """``mypy --strict proxyproto`` reports nothing."""
    cmd = [*_tool("mypy"), "--strict", "--no-error-summary", "proxyproto"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    """``ruff check proxyproto tests`` reports nothing."""
    cmd = [*_tool("ruff"), "check", "proxyproto", "tests"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_names_and_exception_hierarchy() -> None:
    """The fixed public names exist, and the exceptions nest as DESIGN.md says."""
    import proxyproto as pp

    for name in (
        "parse", "ProxyHeader", "encode_v1", "encode_v2", "TLV", "TLVType", "SSLInfo", "SSLClient",
        "Command", "Family", "Protocol", "ProxyProtocolError", "InvalidHeader", "NoProxyHeader",
        "ChecksumError", "HeaderRejected", "HeaderTimeout",
    ):
        assert hasattr(pp, name), name
    assert issubclass(pp.ProxyProtocolError, ValueError)
    assert issubclass(pp.InvalidHeader, pp.ProxyProtocolError)
    assert issubclass(pp.NoProxyHeader, pp.InvalidHeader)
    assert issubclass(pp.ChecksumError, pp.InvalidHeader)
    assert issubclass(pp.HeaderRejected, pp.ProxyProtocolError)
    assert not issubclass(pp.HeaderRejected, pp.InvalidHeader)
    assert issubclass(pp.HeaderTimeout, pp.ProxyProtocolError)
    assert issubclass(pp.HeaderTimeout, TimeoutError)
    assert [int(c) for c in (pp.Command.LOCAL, pp.Command.PROXY)] == [0, 1]
    assert [int(f) for f in (pp.Family.UNSPEC, pp.Family.INET, pp.Family.INET6, pp.Family.UNIX)] == [0, 1, 2, 3]
    assert [int(p) for p in (pp.Protocol.UNSPEC, pp.Protocol.STREAM, pp.Protocol.DGRAM)] == [0, 1, 2]
