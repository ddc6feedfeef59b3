"""The documentation's examples marked ``<!-- test: run -->`` must run as written.

Every ```python block of ``docs/**/*.md`` that directly follows a line ``<!-- test: run -->``
is executed on its own (a fresh namespace per block), one test per block, named by its page
and its index on that page (``core.md-2``). Unmarked blocks (a CRF that needs the ``crf``
extra, paths to datasets) are shown, not run.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^<!-- test: run -->[ \t]*\n```python\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"^<!-- test: run -->[ \t]*$", re.M)


def _snippets() -> list[tuple[str, str]]:
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        for i, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8"))):
            out.append((f"{name}-{i}", code))
    return out


SNIPPETS = _snippets()


def test_docs_have_runnable_examples():
    assert len(SNIPPETS) >= 10


def test_every_method_page_has_a_runnable_example():
    pages = [p.relative_to(DOCS).as_posix() for p in sorted((DOCS / "methods").glob("*.md"))]
    assert pages, "docs/methods has no pages"
    tested = {name.rsplit("-", 1)[0] for name, _ in SNIPPETS}
    missing = [page for page in pages if page not in tested]
    assert not missing, f"method pages without a '<!-- test: run -->' example: {missing}"


def test_every_marker_precedes_a_python_block():
    """A marker not directly followed by a ```python fence would silently test nothing."""
    bad = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        if len(MARKER.findall(text)) != len(BLOCK.findall(text)):
            bad.append(page.relative_to(DOCS).as_posix())
    assert not bad, f"'<!-- test: run -->' not directly before a ```python fence in: {bad}"


@pytest.mark.parametrize("name,code", SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_docs_example_runs(name, code):
    exec(compile(code, f"docs/{name}", "exec"), {"__name__": "docs_example"})
