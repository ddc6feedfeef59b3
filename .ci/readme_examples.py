"""Run the README's examples marked ``<!-- test: run -->`` against the installed package."""

import re
import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text(encoding="utf-8")
blocks = re.findall(r"<!-- test: run -->\s*```python\n(.*?)```", text, re.S)
assert blocks, "README.md has no runnable example"
for i, code in enumerate(blocks):
    exec(compile(code, f"README.md example {i}", "exec"), {"__name__": "readme"})
print(f"README.md: {len(blocks)} examples ran against the installed package")
