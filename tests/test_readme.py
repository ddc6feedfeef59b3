"""The README's examples marked ``<!-- test: run -->`` must run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- test: run -->\s*```python\n(.*?)```", re.S)
EXAMPLES = BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_runnable_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {"__name__": "readme"})
