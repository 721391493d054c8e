"""The user docs (README.rst and docs/*.rst) stand on their own and say each thing once.

* nothing points to files users do not have (DESIGN.md is kept outside the repository) or
  to commits (a commit hash tells a user nothing; the docs say what the behaviour is);
* every relative link reaches an existing file, and its anchor an existing section;
* the README stays a README: under 15 KB, install before the quick start, one table of
  the integrations (each with its one line and its page), the two commands a newcomer
  needs, and no figures (they live in docs/performance.rst, docs/testing.rst, bench/);
* each knob of docs/configuration.rst's settings table, and each policy, is described in
  exactly one place: that page.  The others name the knob and link to it.

Pages are read as a renderer reads them (docutils), so that a phrase wrapped across the
lines of a table cell is still one phrase.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from doc_examples import DOCS, README, ROOT, code_blocks
from support import require_module

PAGES = [README, *sorted(DOCS.glob("*.rst"))]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]
CONFIGURATION = DOCS / "configuration.rst"


@functools.cache
def doctree(path: Path) -> Any:
    """The page as docutils parses it (warnings are tests/test_docs.py's and test_readme.py's business)."""
    core = require_module("docutils.core")
    return core.publish_doctree(  # type: ignore[attr-defined]
        path.read_text(), source_path=str(path), settings_overrides={"report_level": 5, "halt_level": 5}
    )


def docutils_nodes() -> Any:
    return require_module("docutils.nodes")


@functools.cache
def rendered(path: Path) -> str:
    """The page's text as a reader sees it, markup gone, whitespace runs as one space."""
    return " ".join(doctree(path).astext().split())


# --- no internal files, no commit hashes --------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_user_doc_does_not_mention_design_md(page: Path) -> None:
    """DESIGN.md is an internal file outside the repository: a user cannot open it."""
    assert "design.md" not in page.read_text().lower()


#: Hex runs that look like commit hashes and are not: data in the pages' examples.
ALLOWED_HEX = {
    "0d0a0d0a000d0a515549540a20000000": "a whole v2 LOCAL header: the signature, 0x20, no addresses",
    "9709ac2d": "a CRC-32C value in udp-asyncio-cli.rst's decoded header",
    "6578616d706c652e636f6d": "b'example.com' in hex (udp-asyncio-cli.rst)",
}
#: 7 to 40 lower-case hex digits, with at least one digit and one letter, not inside a longer word
#: (so 0x... literals, long hex dumps and words such as "defaced" are not candidates).
_HEX = re.compile(r"(?<![0-9A-Za-z])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![0-9A-Za-z])")


def hex_runs(page: Path) -> set[str]:
    return set(_HEX.findall(page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_user_doc_cites_no_commit_hash(page: Path) -> None:
    """A hex run that may be a commit hash is either known data (ALLOWED_HEX) or a mistake."""
    unknown = sorted(hex_runs(page) - set(ALLOWED_HEX))
    assert unknown == [], (
        f"{page.name} has {unknown}: say what the behaviour is instead of citing a commit; "
        "if it is data (a CRC, a test vector), add it to ALLOWED_HEX with what it is"
    )


def test_no_hex_run_in_the_user_docs_is_a_git_object() -> None:
    """The allowed data is not a commit either: git knows none of the pages' hex runs."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    runs = sorted(set().union(*(hex_runs(p) for p in PAGES)))
    result = subprocess.run(
        ["git", "cat-file", "--batch-check"],
        cwd=ROOT,
        input="".join(f"{r}\n" for r in runs),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    objects = [line for line in result.stdout.splitlines() if not line.endswith(" missing")]
    assert objects == []


# --- links ---------------------------------------------------------------------------------------


def link_targets(page: Path) -> list[str]:
    """Every link of the page that is not a URL: ``docs/x.rst``, ``x.rst#anchor``, ``#anchor``."""
    nodes = docutils_nodes()
    tree = doctree(page)
    uris = [n["refuri"] for n in tree.findall(nodes.reference) if "refuri" in n]
    uris += [n["refuri"] for n in tree.findall(nodes.target) if "refuri" in n]
    return sorted({u for u in uris if not re.match(r"^[a-z][a-z0-9+.-]*:", u)})


def rst_anchors(path: Path) -> set[str]:
    """The ids a renderer gives the page's sections and explicit targets."""
    nodes = docutils_nodes()
    return {i for node in doctree(path).findall(nodes.Element) for i in node["ids"]}


def md_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    headings = re.findall(r"^#+\s+(.*?)\s*#*$", path.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_reaches_an_existing_file_and_anchor(page: Path) -> None:
    broken = []
    for target in link_targets(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".rst" and anchor not in rst_anchors(file):
            broken.append(f"{target}: no section or target {anchor!r} in {file.name}")
        elif anchor and file.suffix == ".md" and anchor not in md_anchors(file):
            broken.append(f"{target}: no heading {anchor!r} in {file.name}")
    assert broken == []


# --- the README ----------------------------------------------------------------------------------


# Its size (under 15 KB) and its order (Install, Quick start, Integrations) are tested in test_readme.py.


#: Each integration the README's table must list: words of its first cell, words of its one line.
INTEGRATIONS = {
    "socketserver": ("socketserver", "ThreadingProxyTCPServer("),
    "http.server / wsgiref / xmlrpc retrofit": ("http.server, wsgiref, xmlrpc", "ProxyProtocolMixin"),
    "UDP": ("UDP", "proxyproto.udp."),
    "asyncio streams": ("asyncio streams", "proxyproto.aio.start_server("),
    "asyncio protocol wrapper": ("asyncio protocols", "wrap_protocol_factory("),
    "uvicorn": ("uvicorn (FastAPI, Starlette)", "uvicorn app:app --http proxyproto.uvicorn:HttpTools"),
    "aiohttp": ("aiohttp", "proxyproto.aiohttp.run_app(app"),
    "hypercorn": ("hypercorn", "proxyproto.hypercorn.serve("),
    "waitress": ("waitress", "proxyproto.waitress.serve("),
    "Tornado": ("Tornado", "proxyproto.tornado.ProxyHTTPServer("),
    "gunicorn": ("gunicorn", "gunicorn -k proxyproto.gunicorn.UvicornWorker"),
    "Sanic": ("Sanic", "proxyproto.sanic.HttpProtocol"),
    "Twisted and Daphne": ("Twisted, Daphne (Channels)", "daphne -e proxyproto:tcp:8000"),
    "command line": ("command line", "proxyproto decode"),
}


def integration_rows() -> dict[str, tuple[str, str, list[str]]]:
    """The README's integration table: first cell's text -> (that text, the one line, the cell's links)."""
    nodes = docutils_nodes()
    tables = [t for t in doctree(README).findall(nodes.table) if "the one line" in t.astext()]
    assert len(tables) == 1, "one table of integrations"
    rows = {}
    for row in tables[0].findall(nodes.row):
        if row.parent.tagname == "thead":
            continue
        first, line = (e for e in row.children if isinstance(e, nodes.entry))
        links = [r["refuri"] for r in first.findall(nodes.reference) if "refuri" in r]
        rows[first.astext()] = (first.astext(), line.astext(), links)
    return rows


@pytest.mark.parametrize("integration", list(INTEGRATIONS))
def test_readme_table_lists_the_integration_with_its_one_line_and_its_page(integration: str) -> None:
    name, one_line = INTEGRATIONS[integration]
    rows = integration_rows()
    assert name in rows, f"no row {name!r} in {sorted(rows)}"
    _, line, links = rows[name]
    assert one_line in line, (name, line)
    assert len(links) == 1, f"the row {name!r} must link to its page"


def defined_names(module: str) -> set[str]:
    """Top-level names a module of the package defines or exports, read from its source (nothing imported)."""
    path = ROOT / "proxyproto" / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / "proxyproto" / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                names.update(ast.literal_eval(node.value))  # the package's lazily imported names
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def test_readme_table_names_only_things_the_package_defines() -> None:
    """``proxyproto.udp.ThreadingProxyUDPServer``, ``proxyproto.uvicorn:HttpTools``... exist where the line says."""
    missing = []
    for _, line, _ in integration_rows().values():
        for dotted in re.findall(r"\b((?:proxyproto|aio_protocol)[.:][\w.:]+)", line):
            parts = re.split(r"[.:]", dotted)
            if parts[0] == "aio_protocol":
                parts.insert(0, "proxyproto")
            module, name = ".".join(parts[1:-1]) or "__init__", parts[-1]
            if not name.isidentifier():  # an endpoint string (proxyproto:tcp:8000), not a Python name
                continue
            if name not in defined_names(module):
                missing.append(dotted)
    assert missing == []


def test_readme_gives_two_commands_the_demo_and_the_test_command_ci_runs() -> None:
    """Development's block: run the demo; install and run the tests, the command .ci/run runs too."""
    (block,) = [b.source for b in code_blocks(README, "sh") if "demo_echo_server.py" in b.source]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == [
        "python3 demo_echo_server.py",
        "python3 -m pip install -e '.[test]' && python3 -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"python3 -m pip install -q -e '\.\[test[],]", ci)
    assert re.search(r"^python3 -m pytest$", ci, re.MULTILINE)


def test_readme_states_the_trust_default_before_the_first_section() -> None:
    """Loopback only, the UNIX-socket rule and "*", before Install: the first thing to get right."""
    text = README.read_text()
    intro = text[: text.index("\nInstall\n===")]
    for fact in ('``"127.0.0.1,::1"``', "UNIX", "not world-writable", '``"*"``', "proxy_trusted"):
        assert fact in intro, fact


def test_readme_holds_no_figures() -> None:
    """Ratios and timings go stale; they live in docs/performance.rst, docs/testing.rst and bench/."""
    text = rendered(README)
    ratios = re.findall(r"\b\d+(?:\.\d+)?x\b", text)
    timings = re.findall(r"\b\d+(?:\.\d+)? ?(?:minutes|seconds|ms|us)\b", text)
    assert ratios == [] and timings == []


# --- one place for each knob and each policy -----------------------------------------------------


def settings_meanings() -> dict[str, str]:
    """docs/configuration.rst's settings table: knob -> its meaning cell, as rendered."""
    nodes = docutils_nodes()
    (table,) = [t for t in doctree(CONFIGURATION).findall(nodes.table) if "socketserver attribute" in t.astext()]
    meanings = {}
    for row in table.findall(nodes.row):
        if row.parent.tagname == "thead":
            continue
        entries = [e for e in row.children if isinstance(e, nodes.entry)]
        meanings[entries[0].astext().strip()] = " ".join(entries[-1].astext().split())
    return meanings


def defining_phrase(meaning: str) -> str:
    """The start of a meaning cell: up to its first ';', '. ' or '(see', at most ten words."""
    clause = re.split(r";|\.\s|\s\(see\b", meaning)[0]
    return " ".join(clause.split()[:10])


#: Wordings the other pages used to give for a knob (they now link to the table instead).
PARAPHRASES = {
    "policy": [r"what (a connection from )?a trusted peer must (do|send)"],
    "trusted": [r"peers (allowed|trusted) to send (a )?headers?\b"],
    "untrusted_policy": [r"what (the other peers|peers outside trusted) get"],
    "policy_for": [r"replaces the three above"],
    "header_timeout": [r"seconds for the whole header"],
    "max_header_size": [r"cap on a v2 header"],
    "verify_checksum": [r"verify a CRC-32C TLV when present"],
    "allow_v4_in_tcp6": [r"accept nginx's mixed TCP6 lines"],
    "max_pending": [r"connections whose header is still incomplete", r"past (it|that),? the oldest is closed"],
    "log_rate": [r"refusal log lines per second"],
    "ssl": [r"negotiated after the header"],
    "ssl_handshake_timeout": [r"seconds for that handshake", r"handshake gets ssl_handshake_timeout seconds"],
    "ssl_before_header": [r"negotiated before the header"],
}


def places(patterns: list[str]) -> list[str]:
    """Each match of any pattern in any page, as 'page: matched text'."""
    either = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    return [f"{page.name}: {m.group()}" for page in PAGES for m in either.finditer(rendered(page))]


def elsewhere(found: list[str]) -> list[str]:
    return [f for f in found if not f.startswith(f"{CONFIGURATION.name}: ")]


@pytest.mark.parametrize("knob", list(PARAPHRASES))
def test_knob_is_described_once_in_the_settings_table(knob: str) -> None:
    """The start of its meaning cell is written once in all the docs; no other page words it its own way."""
    meanings = settings_meanings()
    assert knob in meanings, f"{knob} is not in configuration.rst's settings table"
    phrase = defining_phrase(meanings[knob])
    assert len(phrase.split()) >= 4, (knob, phrase)
    assert places([re.escape(phrase)]) == [f"{CONFIGURATION.name}: {phrase}"]
    assert elsewhere(places(PARAPHRASES[knob])) == [], "keep the meaning in configuration.rst's table and link there"


def test_every_knob_of_the_settings_table_is_checked() -> None:
    assert set(settings_meanings()) == set(PARAPHRASES)


#: Each policy's line in configuration.rst's Policies, then the wordings other pages used to give it.
POLICIES = {
    "REQUIRE": [r"A header is mandatory: a connection without one is closed", r"REQUIRE \(default: a header"],
    "USE": [r"A header is optional; when there is one", r"USE \(header optional\)"],
    "IGNORE": [r"A header is read and removed when there is one", r"IGNORE \(read it, keep"],
    "REJECT": [r"No header allowed: a connection that starts with one is closed", r"REJECT \(no header allowed\)"],
    "SKIP": [r"Never look: the bytes reach the application untouched", r"SKIP: never look\)"],
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_is_described_once_in_configuration_rst(policy: str) -> None:
    definition, *paraphrases = POLICIES[policy]
    found = places([definition])
    assert len(found) == 1 and not elsewhere(found), f"{policy}'s line is in {found}"
    assert elsewhere(places(paraphrases)) == [], "keep the policies in configuration.rst and link there"
