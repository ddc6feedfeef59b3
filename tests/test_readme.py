"""The README's examples run, and the main job's table it shows is what the main job prints."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCK = re.compile(r"<!-- test: run -->\s*```python\n(.*?)```", re.S)
EXAMPLES = BLOCK.findall(TEXT)
TABLE = re.compile(r"<!-- main-job-table -->\n(.*?)<!-- /main-job-table -->", re.S)


def test_readme_has_a_runnable_example():
    assert len(EXAMPLES) >= 1


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {"__name__": "readme"})


def _rows(markdown: str) -> dict[str, list[str]]:
    """``| recipe | a | b | ... |`` table rows -> {recipe: [a, b, ...]} (header and rule skipped)."""
    rows = {}
    for line in markdown.strip().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("recipe", "") or set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = cells[1:]
    return rows


def test_readme_is_under_200_lines():
    assert len(TEXT.splitlines()) < 200


def test_main_job_table_matches_a_real_run(tmp_path):
    """``python examples/train.py`` (seed 0, the defaults) prints the table the README shows.

    The README leaves out the time column; every other cell must agree to within 0.2 points,
    the slack for summation order on another CPU.
    """
    (shown,) = TABLE.findall(TEXT)
    readme = _rows(shown)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), "--output", str(tmp_path / "run"),
         "--no-progress", "--no-plots", "--quiet"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = _rows((tmp_path / "run" / "comparison.md").read_text())
    assert list(printed) == list(readme), f"recipes: README {list(readme)}, run {list(printed)}"
    for recipe, cells in readme.items():
        run = printed[recipe][: len(cells)]
        for shown_cell, run_cell in zip(cells, run, strict=True):
            assert abs(float(shown_cell) - float(run_cell)) <= 0.2 + 1e-9, (
                f"{recipe}: README shows {cells}, the main job printed {printed[recipe]}"
            )
