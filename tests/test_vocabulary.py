"""The public API speaks one vocabulary: the tables of ``docs/conventions.md``, enforced.

Every public callable reachable from the package's exports (functions, classes' constructors,
``forward`` and public methods) and every field of an exported NamedTuple is checked:

* each parameter / field name is in the vocabulary tables;
* an option (a name from an option table) is keyword-only;
* positional data arguments come before structure arguments, and the shared data arguments
  in the order of their table.

A new public name is covered automatically because the walk starts from ``__all__``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import types
from pathlib import Path
from typing import Any

import pytest

import wsss_blocks

CONVENTIONS = Path(__file__).resolve().parents[1] / "docs" / "conventions.md"

#: (qualified callable, parameter) pairs allowed to break the kind rule, with the reason.
EXEMPT = {
    # the padding mask is what this function resamples: its subject, not an option
    ("wsss_blocks.cam.valid_to_grid", "valid"),
}


def _tables(text: str) -> dict[str, list[list[str]]]:
    """``<!-- vocabulary:KIND [ordered] -->`` markers -> rows of names (one list per table row)."""
    out: dict[str, list[list[str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"<!-- vocabulary:(\w+)( ordered)? -->", line.strip())
        if not m:
            continue
        key = m.group(1) + (" ordered" if m.group(2) else "")
        rows = out.setdefault(key, [])
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                if rows or row.strip():
                    break
                continue
            first = row.split("|")[1]
            names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", first)
            if names:
                rows.append(names)
    return out


TABLES = _tables(CONVENTIONS.read_text())
ORDERED = TABLES.get("data ordered", [])
RANK = {name: r for r, row in enumerate(ORDERED) for name in row}
DATA = set(RANK) | {n for row in TABLES.get("data", []) for n in row}
STRUCTURE = {n for row in TABLES.get("structure", []) for n in row}
OPTIONS = {n for row in TABLES.get("option", []) for n in row}
FIELDS = {n for row in TABLES.get("field", []) for n in row} | DATA | STRUCTURE
VOCABULARY = DATA | STRUCTURE | OPTIONS


def _modules() -> list[types.ModuleType]:
    seen: dict[str, types.ModuleType] = {}
    todo = [wsss_blocks]
    while todo:
        mod = todo.pop()
        if mod.__name__ in seen:
            continue
        seen[mod.__name__] = mod
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if isinstance(obj, types.ModuleType) and obj.__name__.startswith("wsss_blocks"):
                todo.append(obj)
    for name in ("wsss_blocks.viz",):  # optional-extra modules not imported by the package
        try:
            seen.setdefault(name, importlib.import_module(name))
        except ImportError:  # pragma: no cover - extra not installed
            pass
    return list(seen.values())


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def _public_objects() -> dict[str, Any]:
    """qualified name -> exported object (functions and classes defined in the package)."""
    out: dict[str, Any] = {}
    for mod in _modules():
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            home = getattr(obj, "__module__", "") or ""
            if isinstance(obj, types.ModuleType) or not home.startswith("wsss_blocks"):
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.setdefault(f"{home}.{obj.__qualname__}", obj)
    return dict(sorted(out.items()))


def _callables() -> dict[str, Any]:
    """qualified name -> function whose signature is checked."""
    out: dict[str, Any] = {}
    for qual, obj in _public_objects().items():
        if inspect.isfunction(obj):
            out[qual] = obj
            continue
        if _is_namedtuple(obj) or issubclass(obj, BaseException):
            continue
        init = obj.__dict__.get("__init__")
        if init is not None or dataclasses.is_dataclass(obj):
            out[f"{qual}.__init__"] = obj.__init__
        for name, member in vars(obj).items():
            if name.startswith("_") and name not in ("__call__",):
                continue
            func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if inspect.isfunction(func):
                out[f"{qual}.{name}"] = func
    return out


def _violations(qual: str, func: Any) -> list[str]:
    bad: list[str] = []
    params = [p for p in inspect.signature(func).parameters.values() if p.name not in ("self", "cls")]
    seen_structure = None
    last_rank, last_name = -1, ""
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name in ("args", "kwargs"):
            bad.append(f"{p.name}: *args / **kwargs hide the options; name them")
            continue
        if p.name not in VOCABULARY:
            bad.append(f"{p.name}: not in the vocabulary of docs/conventions.md")
            continue
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if not positional:
            continue
        if p.name in OPTIONS and p.name not in DATA | STRUCTURE and (qual, p.name) not in EXEMPT:
            bad.append(f"{p.name}: an option must be keyword-only")
        if p.name in STRUCTURE:
            seen_structure = seen_structure or p.name
        elif p.name in DATA and seen_structure is not None:
            bad.append(f"{p.name}: a data argument after the structure argument {seen_structure}")
        if p.name in RANK:
            if RANK[p.name] < last_rank:
                bad.append(f"{p.name}: comes after {last_name}; the shared data order puts it first")
            last_rank, last_name = RANK[p.name], p.name
    return bad


def test_the_tables_are_read():
    assert {"data ordered", "data", "structure", "option", "field"} <= set(TABLES)
    assert RANK["images"] < RANK["features"] < RANK["cams"] < RANK["labels"]
    assert {"valid", "ignore_index", "temperature"} <= OPTIONS and "in_dim" in STRUCTURE


def test_the_checker_finds_what_it_must():
    def bad(x, images, labels, features, num_classes, cams, eps=1e-5, *, valid=None):  # noqa: ARG001
        pass

    found = "\n".join(_violations("test.bad", bad))
    assert "x: not in the vocabulary" in found
    assert "features: comes after labels" in found
    assert "cams: a data argument after the structure argument num_classes" in found
    assert "eps: an option must be keyword-only" in found
    assert "valid" not in found

    def good(model, images, features, labels, size, *, eps=1e-5, valid=None):  # noqa: ARG001
        pass

    assert _violations("test.good", good) == []


CALLABLES = _callables()


def test_the_walk_sees_the_api():
    names = set(CALLABLES)
    assert "wsss_blocks.cam.pseudo_labels" in names
    assert any(n.endswith("CPEWSLoss.forward") for n in names)
    assert any(n.endswith("PrototypePool.__init__") for n in names)
    assert len(names) > 150


@pytest.mark.parametrize("qual", sorted(CALLABLES))
def test_signature_speaks_the_vocabulary(qual):
    assert _violations(qual, CALLABLES[qual]) == []


NAMEDTUPLES = {q: o for q, o in _public_objects().items() if _is_namedtuple(o)}


@pytest.mark.parametrize("qual", sorted(NAMEDTUPLES))
def test_output_fields_speak_the_vocabulary(qual):
    unknown = [f for f in NAMEDTUPLES[qual]._fields if f not in FIELDS]
    assert unknown == [], f"fields not in the vocabulary of docs/conventions.md: {unknown}"
