"""What ships speaks of the software alone.

Greps the shipped text (README, CHANGELOG, the documentation, the sources of the library, the
examples and the benchmarks, the committed results, the example configurations, ``mkdocs.yml``,
``pyproject.toml``) for words about how the project is developed rather than what the software
does: numbered issues of this project, design-document file names and "the spec", statements
about which machine ran what, and paths into a development checkout. Each hit is reported as
``file:line``. Another project's tracker is cited in words ("reported in ToCo's issue
tracker as #3"), which the patterns allow.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: case-insensitive; each one names something about the development process, not the software
PATTERNS: dict[str, str] = {
    "an issue number of this project": r"\bissues? ?#?\d+",
    "a design-document file": r"\bspecs?/\w+\.md",
    "the spec": r"\bthe spec\b",
    "spec decisions / shapes / target / defaults / form": r"\bspec (?:decisions?|shapes|targets?|defaults|form)\b",
    "whether a machine was lent": r"\bwas (?:not )?lent\b",
    "no GPU was ...": r"\bno gpu was\b",
    "this task": r"\bthis task\b",
    "other agents": r"\bother agents\b",
    "session": r"\bsession\b",
    "a development path": r"/work/",
    "development notes": r"shared/notes",
}
REGEX = re.compile("|".join(f"(?P<p{i}>{p})" for i, p in enumerate(PATTERNS.values())), re.IGNORECASE)
NAMES = list(PATTERNS)



def shipped_files() -> list[Path]:
    files: set[Path] = {ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "mkdocs.yml", ROOT / "pyproject.toml"}
    files |= set((ROOT / "docs").rglob("*.md"))
    for folder in ("wsss_blocks", "examples", "benchmarks"):
        files |= set((ROOT / folder).rglob("*.py"))
    files |= set((ROOT / "benchmarks").glob("*.sh"))
    files |= set((ROOT / "benchmarks" / "results").glob("*.json"))
    files |= set((ROOT / "benchmarks" / "results").glob("*.jsonl"))
    files |= set((ROOT / "examples" / "configs").glob("*.json"))
    files |= set((ROOT / "examples").glob("*.md"))
    return sorted(f for f in files if f.is_file())


def hits(text: str) -> list[tuple[int, str, str]]:
    """``(line number, pattern name, matched text)`` of every hit in ``text``."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in REGEX.finditer(line):
            name = NAMES[int(next(k for k, v in m.groupdict().items() if v is not None)[1:])]
            out.append((n, name, m.group(0)))
    return out


def test_the_file_set_is_what_ships() -> None:
    rel = {f.relative_to(ROOT).as_posix() for f in shipped_files()}
    for must in ("README.md", "CHANGELOG.md", "mkdocs.yml", "pyproject.toml", "docs/index.md",
                 "wsss_blocks/__init__.py", "examples/train.py", "benchmarks/results_tables.py",
                 "benchmarks/results/synthetic_cpu.json", "examples/README.md"):
        assert must in rel, must


@pytest.mark.parametrize("text", [
    "see issue 15", "Issue #13", "issues 13/14", "(issue15)", "specs/doei.md", "spec/cpal.md",
    "as the spec says", "The spec's form", "spec decision D6", "spec decisions 5.2", "spec shapes",
    "spec target", "the spec defaults", "spec form", "no GPU was lent", "a GPU was not lent", "this task",
    "other agents", "one session", "/work/main/x.py", "shared/notes/a.md",
])
def test_patterns_catch(text: str) -> None:
    assert hits(text), text


@pytest.mark.parametrize("text", [
    "spec = importlib.util.spec_from_file_location(name, path)", "mod = importlib.util.module_from_spec(spec)",
    "ModuleSpec", "a Python format spec (``.1f``)", "the paper is silent", "specification", "specs",
    "reported in ToCo's issue tracker as #3, #8 and #15", "Issues = \"https://github.com/o/r/issues\"",
    "the paper's form", "the target shapes", "paper defaults", "excellent", "the sessions' mean",
    "https://example.org/network/", "shared notes",
])
def test_patterns_leave_code_and_plain_words(text: str) -> None:
    assert not hits(text), (text, hits(text))


def test_shipped_text_speaks_of_the_software_alone() -> None:
    found = []
    for path in shipped_files():
        for n, name, match in hits(path.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{path.relative_to(ROOT).as_posix()}:{n}: {match!r} ({name})")
    assert not found, "process words in shipped text:\n" + "\n".join(found)
