"""The pages of docs/ this suite owns render cleanly, link to real files, and their examples run.

docs/udp-asyncio-cli.rst's examples are run by tests/cli/test_cli_beyond_docs.py
(console sessions included); the README's by tests/test_readme.py and
tests/interop/test_interop_readme_walkthrough.py.
"""

from __future__ import annotations

import pytest
from doc_examples import DOCS, code_blocks, exec_block, missing_link_targets, rendering_warnings, run_doctests

PAGES = ["api", "configuration", "performance", "platforms", "security", "testing", "udp-asyncio-cli"]
#: Pages whose examples this module runs (udp-asyncio-cli.rst: see the module docstring).
EXAMPLE_PAGES = [p for p in PAGES if p != "udp-asyncio-cli"]
#: Every page, for rendering and links: the server pages' examples run in tests/web and
#: tests/interop (they serve until stopped), but every page must render and link cleanly.
ALL_PAGES = sorted(p.stem for p in DOCS.glob("*.rst"))


def test_pages_exist() -> None:
    assert set(PAGES) | {"interop", "uvicorn", "web-servers"} <= set(ALL_PAGES)


@pytest.mark.parametrize("page", ALL_PAGES)
def test_page_renders_without_docutils_warnings(page: str) -> None:
    assert rendering_warnings(DOCS / f"{page}.rst") == ""


@pytest.mark.parametrize("page", ALL_PAGES)
def test_page_links_point_to_existing_files(page: str) -> None:
    assert missing_link_targets(DOCS / f"{page}.rst") == []


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_page_doctests_pass(page: str) -> None:
    failures, _ = run_doctests(DOCS / f"{page}.rst")
    assert failures == 0


PYTHON_BLOCKS = [
    (page, block)
    for page in EXAMPLE_PAGES
    for block in code_blocks(DOCS / f"{page}.rst", "python")
    if not block.source.startswith(">>>")
]


@pytest.mark.parametrize(("page", "block"), PYTHON_BLOCKS, ids=[f"{p}:{b.line}" for p, b in PYTHON_BLOCKS])
def test_page_python_block_runs(page: str, block: object) -> None:
    exec_block(block.source, f"docs/{page}.rst {block.name}")  # type: ignore[attr-defined]


def test_api_page_has_doctests() -> None:
    assert run_doctests(DOCS / "api.rst").attempted >= 5
