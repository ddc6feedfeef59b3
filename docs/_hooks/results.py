"""mkdocs hook: results tables and numbers generated at build time from ``benchmarks/results/*.json``.

Markers in any page (the syntax is documented in ``benchmarks/results_tables.py``):

* ``<!-- results: NAME -->`` or ``<!-- results: NAME FILE.json -->``: a table with its data
  configuration, seeds, device and source;
* ``<!-- value: EXPR -->`` or ``<!-- value: EXPR | FORMAT -->``: one number read from the JSON,
  e.g. ``<!-- value: synthetic.summary.cpews.cam_miou_best.mean | pct -->``.

An unknown table, a missing file or a missing key raises, which stops the build.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "benchmarks" / "results_tables.py"


def load_tables():
    """``benchmarks/results_tables.py``, imported by path (``benchmarks`` is not a package)."""
    mod = sys.modules.get("_wsss_results_tables")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_wsss_results_tables", MODULE)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_wsss_results_tables"] = mod
        spec.loader.exec_module(mod)
    return mod


def render(markdown: str, where: str = "") -> str:
    """``markdown`` with every results / value marker replaced (raises on a broken marker)."""
    return load_tables().render(markdown, where)


def on_config(config: Any) -> Any:
    sys.modules.pop("_wsss_results_tables", None)  # `mkdocs serve`: pick up edits of the table code
    # `mkdocs serve` rebuilds when a result file or the table code changes
    for path in (ROOT / "benchmarks" / "results", MODULE):
        if str(path) not in config["watch"]:
            config["watch"].append(str(path))
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render(markdown, page.file.src_uri)
