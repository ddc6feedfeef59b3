"""The documentation's examples marked ``<!-- test: run -->`` must run as written.

Every ``docs/**/*.md`` page is searched for a ``<!-- test: run -->`` line directly before a
Python code fence; each such block is one test, named by its page and its index on that page
(``methods/cpews.md[0]``), and runs in a fresh namespace, as ``tests/test_readme.py`` does for
the README.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARKER = re.compile(r"^<!-- test: run -->[ \t]*$", re.M)
BLOCK = re.compile(r"^<!-- test: run -->[ \t]*\n```python[ \t]*\n(.*?)^```", re.S | re.M)


def _examples() -> list[tuple[str, str]]:
    """``(id, code)`` of every marked block, pages in path order, blocks in page order."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        name = page.relative_to(DOCS).as_posix()
        for index, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8"))):
            found.append((f"{name}[{index}]", code))
    return found


EXAMPLES = _examples()


def test_every_method_page_has_a_runnable_example():
    pages = sorted((DOCS / "methods").glob("*.md"))
    assert pages, "docs/methods has no pages"
    ids = {name.rsplit("[", 1)[0] for name, _ in EXAMPLES}
    missing = [p.relative_to(DOCS).as_posix() for p in pages if p.relative_to(DOCS).as_posix() not in ids]
    assert not missing, f"method pages without a '<!-- test: run -->' example: {missing}"


def test_marker_is_always_followed_by_a_python_fence():
    """A marker that is not directly followed by a Python fence would silently test nothing."""
    bad = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        if len(MARKER.findall(text)) != len(BLOCK.findall(text)):
            bad.append(page.relative_to(DOCS).as_posix())
    assert not bad, f"'<!-- test: run -->' not directly before a ```python fence in: {bad}"


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_docs_example_runs(name, code):
    exec(compile(code, f"docs/{name}", "exec"), {"__name__": "docs"})
