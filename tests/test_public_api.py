"""docs/api.rst is the public surface: each name it lists is importable where it says, and nothing else is exported.

docs/api.rst lists every public name as an entry: a definition-list term holding only the
literal ``proxyproto.<module>.<name>`` (``proxyproto.<name>`` for the package itself), then one
line and a link.  A module that an entry names is public, and its ``__all__`` is exactly its
entries.  Every other module of the package is private: its ``__all__`` may hold only names that
are public elsewhere as the same object (the core modules name what ``proxyproto`` re-exports),
plus the few listed in REEXPORTED_FOR_THE_PACKAGE.  DESIGN.md's fixed names are importable from
``proxyproto``, and ``proxyproto.__all__`` names each public object once.

The page is parsed with docutils (in the ``[test]`` extra), as a reader's renderer sees it; the
``__all__`` lists are read from the source (``ast``), so the comparisons run without the optional
web servers, and only the imports of their modules skip.
"""

from __future__ import annotations

import ast
import importlib
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from doc_examples import DOCS
from support import require_module

require_module("docutils")

from docutils import nodes  # noqa: E402  (after the skip: docutils is optional outside [test])
from docutils.core import publish_doctree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "proxyproto"
API_PAGE = DOCS / "api.rst"

#: DESIGN.md, "Public names (fixed: tests outside the project use them)": each is importable from
#: ``proxyproto`` itself.  DESIGN.md is kept outside this repository; this is its list.
DESIGN_NAMES = (
    "parse",
    "ProxyHeader",
    "Command",
    "Family",
    "Protocol",
    "TLV",
    "TLVType",
    "SSLInfo",
    "SSLClient",
    "encode_v1",
    "encode_v2",
    "create_connection",
    "ProxyProtocolError",
    "InvalidHeader",
    "NoProxyHeader",
    "ChecksumError",
    "HeaderRejected",
    "HeaderTimeout",
    "read_header",
    "Policy",
    "ProxyProtocolMixin",
    "ProxyTCPServer",
    "ThreadingProxyTCPServer",
    "ForkingProxyTCPServer",
    "ProxyUnixStreamServer",
    "ThreadingProxyUnixStreamServer",
    "ForkingProxyUnixStreamServer",
)

#: Private names that stay in a module's ``__all__`` only because the package's own code needs
#: them there: ``mypy --strict`` accepts ``from .aio_protocol import HeaderProtocol`` only when
#: aio_protocol lists it, and ruff (F401) flags an import that nothing but ``__all__`` uses.  Each
#: goes once the code imports the name from the module that defines it.
REEXPORTED_FOR_THE_PACKAGE = {
    "proxyproto.addresses.inet_ntop": "v1 and v2 import it from addresses (mypy --strict)",
    "proxyproto.addresses.inet_pton": "v1 and v2 import it from addresses (mypy --strict)",
}

#: One object public under two names, with the reason.  DESIGN.md requires none, so none.
DOCUMENTED_ALIASES: dict[str, str] = {}

#: Modules with no ``__all__`` to check: ``python -m proxyproto`` runs it, nothing imports from it.
NOT_IMPORTED = {"proxyproto.__main__"}

_ENTRY = re.compile(r"proxyproto(?:\.[a-z_][a-z0-9_]*)*\.[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Entry:
    """One public name of docs/api.rst, and the links of its description."""

    module: str
    name: str
    links: tuple[str, ...]

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _doctree(path: Path) -> nodes.document:
    return publish_doctree(
        path.read_text(),
        source_path=str(path),
        settings_overrides={"report_level": 5, "halt_level": 5, "syntax_highlight": "none"},
    )


def _entries() -> list[Entry]:
    found = []
    for item in _doctree(API_PAGE).findall(nodes.definition_list_item):
        term = item.next_node(nodes.term)
        text = term.astext()
        if len(term.children) != 1 or not isinstance(term[0], nodes.literal) or not text.startswith("proxyproto."):
            continue  # not an entry: the signatures of the detail sections (``parse(data, ...)``)
        if "(" in text:
            continue
        assert _ENTRY.fullmatch(text), f"docs/api.rst: {text!r} looks like an entry but is not a dotted name"
        module, _, name = text.rpartition(".")
        links = tuple(_target(ref) for ref in item.next_node(nodes.definition).findall(nodes.reference))
        found.append(Entry(module, name, links))
    return found


def _target(reference: nodes.reference) -> str:
    """Where a link goes: ``page.rst#anchor``, or ``#id`` for a section of this page."""
    if "refuri" in reference:
        return str(reference["refuri"])
    # `Exceptions`_: resolved to the section's id; an unresolved name keeps it, and fails below.
    return "#" + str(reference.get("refid") or reference.get("refname", ""))


ENTRIES = _entries()
QUALNAMES = [e.qualname for e in ENTRIES]
PUBLIC_MODULES = sorted({e.module for e in ENTRIES})
MODULES = sorted(
    "proxyproto" if path.stem == "__init__" else f"proxyproto.{path.stem}" for path in PACKAGE.glob("*.py")
)
PRIVATE_MODULES = [m for m in MODULES if m not in PUBLIC_MODULES and m not in NOT_IMPORTED]


def static_all(module: str) -> list[str] | None:
    """``module.__all__`` as written in its source (no import), or None when it has none."""
    path = PACKAGE / ("__init__.py" if module == "proxyproto" else f"{module.split('.', 1)[1]}.py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "__all__":
            assert isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
            value = ast.literal_eval(node.value)
            assert isinstance(value, list), f"{module}.__all__ is not a list literal"
            return value
    return None


def load(module: str) -> types.ModuleType:
    """Import ``module``; skip (fail under CI=true) when the server it plugs into is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "proxyproto":
            raise
        require_module(exc.name)
        raise


def entries_of(module: str) -> list[Entry]:
    return [e for e in ENTRIES if e.module == module]


def listed(entry: Entry) -> Any:
    return getattr(load(entry.module), entry.name)


# --------------------------------------------------------------------------- the page


def test_api_page_lists_each_public_name_once_with_a_link() -> None:
    assert len(ENTRIES) > 50, "docs/api.rst: the entries were not found (is the term format still ``proxyproto.x``?)"
    duplicates = sorted({q for q in QUALNAMES if QUALNAMES.count(q) > 1})
    assert duplicates == [], f"docs/api.rst lists these more than once: {duplicates}"
    unlinked = [e.qualname for e in ENTRIES if not e.links]
    assert unlinked == [], f"docs/api.rst: these entries link to no page that explains them: {unlinked}"


def _section_ids(path: Path) -> set[str]:
    return {i for section in _doctree(path).findall(nodes.section) for i in section["ids"]}


def test_api_page_links_reach_existing_pages_and_sections() -> None:
    own = _section_ids(API_PAGE)
    broken = []
    for entry in ENTRIES:
        for link in entry.links:
            if "://" in link:
                continue
            page, _, anchor = link.partition("#")
            if not page:
                ok = anchor in own
            else:
                target = (API_PAGE.parent / page).resolve()
                ok = target.exists() and (not anchor or anchor in _section_ids(target))
            if not ok:
                broken.append(f"{entry.qualname} -> {link}")
    assert broken == []


# --------------------------------------------------------------------------- public modules


@pytest.mark.parametrize("qualname", QUALNAMES)
def test_every_listed_name_is_importable_from_the_module_it_names(qualname: str) -> None:
    entry = ENTRIES[QUALNAMES.index(qualname)]
    module = load(entry.module)
    assert hasattr(module, entry.name), f"docs/api.rst lists {qualname}, which does not exist"


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_public_module_exports_exactly_the_names_api_rst_lists(module: str) -> None:
    exported = static_all(module)
    assert exported is not None, f"{module} is public (docs/api.rst names it) but has no __all__"
    assert len(exported) == len(set(exported)), f"{module}.__all__ names something twice"
    # A dunder (``__version__``) is a module attribute that ``__all__`` never lists.
    documented = {e.name for e in entries_of(module) if not e.name.startswith("__")}
    allowed = {q.rpartition(".")[2] for q in REEXPORTED_FOR_THE_PACKAGE if q.rpartition(".")[0] == module}
    unlisted = sorted(set(exported) - documented - allowed)
    assert unlisted == [], f"{module}.__all__ exports {unlisted}: list them in docs/api.rst, or make them private"
    missing = sorted(documented - set(exported))
    assert missing == [], f"docs/api.rst lists {missing} under {module}, whose __all__ leaves them out"


# --------------------------------------------------------------------------- private modules


@pytest.mark.parametrize("module", [m for m in MODULES if m not in NOT_IMPORTED])
def test_every_module_states_its_public_names_in_all(module: str) -> None:
    """Without ``__all__`` every name is implicitly public; a private module says ``__all__ = []``."""
    assert static_all(module) is not None, f"{module} has no __all__ (private: [] ; public: its docs/api.rst entries)"


@pytest.mark.parametrize("module", PRIVATE_MODULES)
def test_private_module_exports_only_names_public_elsewhere(module: str) -> None:
    exported = static_all(module) or []
    loaded = load(module)
    strays = []
    for name in exported:
        if f"{module}.{name}" in REEXPORTED_FOR_THE_PACKAGE:
            continue
        homes = [e for e in ENTRIES if e.name == name]
        if not any(listed(e) is getattr(loaded, name) for e in homes):
            strays.append(name)
    assert strays == [], (
        f"{module} is private (docs/api.rst names no entry in it), yet its __all__ exports {strays}, "
        "which are not public elsewhere as the same object: remove them from __all__"
    )


def test_allowances_name_private_names_still_exported() -> None:
    for qualname, reason in REEXPORTED_FOR_THE_PACKAGE.items():
        module, _, name = qualname.rpartition(".")
        assert name in (static_all(module) or []), f"{qualname} left {module}.__all__: drop it from the allowance"
        assert qualname not in QUALNAMES, f"{qualname} is listed in docs/api.rst now: drop it from the allowance"
        assert reason


# --------------------------------------------------------------------------- the package


def test_package_all_names_each_public_object_once() -> None:
    import proxyproto

    names = proxyproto.__all__
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    by_object: dict[int, list[str]] = {}
    for name in names:
        by_object.setdefault(id(getattr(proxyproto, name)), []).append(name)
    aliases = [sorted(group) for group in by_object.values() if len(group) > 1]
    assert [g for g in aliases if not all(n in DOCUMENTED_ALIASES for n in g)] == []
    assert sorted(dir(proxyproto)) == sorted(names)


def test_no_object_is_public_under_two_entries() -> None:
    """``proxyproto.encode_v1`` is not also ``proxyproto.v1.encode``, a UDP server not also a top-level name."""
    seen: dict[int, str] = {}
    clashes = []
    for entry in ENTRIES:
        if entry.name.startswith("__"):
            continue
        try:
            module = importlib.import_module(entry.module)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.startswith("proxyproto"):
                raise
            continue  # its server is not installed: checked where it is (CI installs every extra)
        key = id(getattr(module, entry.name))
        if key in seen and entry.qualname not in DOCUMENTED_ALIASES:
            clashes.append(f"{seen[key]} is {entry.qualname}")
        seen.setdefault(key, entry.qualname)
    assert clashes == []


@pytest.mark.parametrize("name", DESIGN_NAMES)
def test_design_md_public_names_are_listed_and_importable_from_proxyproto(name: str) -> None:
    import proxyproto

    assert name in proxyproto.__all__
    assert f"proxyproto.{name}" in QUALNAMES
    assert getattr(proxyproto, name) is not None
