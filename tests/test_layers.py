"""The layer rule, checked by reading every module's imports (docs/conventions.md, "Package layout").

Core modules import no method and no ``data``; a method imports the core only (never another
method or ``data``); ``data`` and ``viz`` import the core. Only the package ``__init__`` and
``functional`` (the re-export hubs) see everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsss_blocks"
METHODS = {"cpews", "cpal", "pcm", "doei", "mct", "swtformer"}
HUBS = {"__init__", "functional"}


def _layer(top: str) -> str:
    if top in METHODS:
        return "method"
    if top in {"data", "viz"}:
        return top
    return "core"


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "wsss_blocks" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(PACKAGE).with_suffix("")
    here = ["wsss_blocks", *rel.parts[:-1]]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            if mod == "wsss_blocks":  # from wsss_blocks import cam, data, ...
                found.update(f"wsss_blocks.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("wsss_blocks")}


def _edges() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        src_top = rel.parts[0].removesuffix(".py")
        if src_top in HUBS:
            continue
        for mod in _imports(path):
            dst_top = _top(mod)
            if dst_top is not None and dst_top != src_top:
                out.append((str(rel), src_top, dst_top))
    return out


def test_the_scanner_sees_imports():
    edges = _edges()
    assert ("cpews/pool.py", "cpews", "prototypes") in edges  # a known arrow: method -> core
    assert any(e[1] == "data" and e[2] == "constants" for e in edges)


@pytest.mark.parametrize("rel,src,dst", _edges())
def test_layers_point_one_way(rel, src, dst):
    src_layer, dst_layer = _layer(src), _layer(dst)
    if src_layer == "core":
        assert dst_layer == "core", f"{rel}: the core imports {dst} ({dst_layer})"
    elif src_layer == "method":
        assert dst_layer == "core", f"{rel}: a method imports {dst} ({dst_layer})"
    else:  # data, viz
        assert dst_layer == "core", f"{rel}: {src_layer} imports {dst} ({dst_layer})"


def _packages() -> list[str]:
    return ["wsss_blocks"] + sorted(
        f"wsss_blocks.{p.parent.relative_to(PACKAGE).as_posix().replace('/', '.')}"
        for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE
    )


@pytest.mark.parametrize("package", _packages())
def test_no_module_is_shadowed_by_a_name_its_package_exports(package):
    """``import wsss_blocks.refine.par`` must give the module, not a function of that name."""
    import importlib
    import pkgutil
    import types

    pkg = importlib.import_module(package)
    for sub in pkgutil.iter_modules(pkg.__path__):
        attr = getattr(pkg, sub.name, None)
        assert attr is None or isinstance(attr, types.ModuleType), (
            f"{package}.{sub.name} is a module, but {package} exports a {type(attr).__name__} of that name"
        )
