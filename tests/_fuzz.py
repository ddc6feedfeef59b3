"""The engine of the API fuzz test: perturbations of a valid call, and the contract they are held to.

A ``Call`` is a cheap, valid call of one public callable (built by a factory of the registry in
``tests/_fuzz_registry.py``). ``perturbations`` derives from it, one argument at a time (or one
named dimension across the arguments that share it), the classes of bad or unusual input of
``docs/conventions.md`` "Validation and errors":

* ``rank``: one dim more or less; ``dim``: one dim one larger; ``batch0``: every batched argument
  with batch 0; ``size1``: one shared dim size set to 1 everywhere;
* ``layout``: non-contiguous, transposed and channels-last copies (same values);
* ``dtype``: int64, bool, float16, bfloat16, float64 for one argument (so mixed with the others),
  and float64 for all;
* ``nonfinite``: a NaN / inf element; ``huge``: a large finite element;
* ``pytype``: a list, None, a string or a numpy array in place of a tensor;
* ``option``: negative, zero, NaN, inf, 2.5 for an int, strings, None, out-of-range choices.

``check`` runs one perturbation and returns what breaks the contract (``None`` when it holds):
the call succeeds with finite outputs of the baseline's structure (and equal to the baseline for
``layout``), or it raises ``TypeError`` / ``ValueError`` (``ShapeError``) whose message names a
perturbed argument; no tensor argument is modified in place, and no call takes seconds.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

#: seconds a single call may take before it counts as a hang
SLOW = 3.0
#: the large finite value of the ``huge`` class
HUGE = 1e8


@dataclasses.dataclass(frozen=True)
class Rule:
    """The documented range of a numeric option: ``[low, high]`` (``None``: open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool | None = None  # None: from the baseline value's type

    def admits(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))


#: documented ranges of options by name (a ``Call`` may override one for its function)
RULES: dict[str, Rule] = {
    "eps": Rule(0.0),
    "temperature": Rule(0.0, low_open=True),
    "num_iters": Rule(0), "kmeans_iters": Rule(0),
    "num_clusters": Rule(1), "num_prototypes": Rule(1), "capacity": Rule(1), "top_k": Rule(1),
    "num_classes": Rule(1), "in_dim": Rule(1), "hidden_dim": Rule(1), "out_dim": Rule(1),
    "proj_dim": Rule(1), "patch_size": Rule(1), "kernel_size": Rule(1), "head_kernel_size": Rule(1),
    "num_colors": Rule(1), "ncols": Rule(1), "last_k": Rule(1), "num_class_tokens": Rule(1),
    "chunk_rows": Rule(1), "length": Rule(1), "group_size": Rule(1), "max_objects": Rule(1),
    "hff_out_dim": Rule(1), "num_candidates": Rule(0), "batch_size": Rule(0), "workers": Rule(0),
    "num_prefix_tokens": Rule(0), "t": Rule(0), "t_p2c": Rule(0), "t_c2c": Rule(0),
    "crop": Rule(1), "scale": Rule(0.0, low_open=True), "pad": Rule(0),
    "dropout": Rule(0.0, 1.0, high_open=True), "lstm_dropout": Rule(0.0, 1.0, high_open=True),
    "crop_prob": Rule(0.0, 1.0), "hflip": Rule(0.0, 1.0), "opacity": Rule(0.0, 1.0),
    "alpha": Rule(0.0, 1.0), "co_occurrence": Rule(0.0, 1.0), "context_alone": Rule(0.0, 1.0),
    "part_fraction": Rule(0.0, 1.0), "part_hidden": Rule(0.0, 1.0), "min_visible": Rule(0.0, 1.0),
    "noise": Rule(0.0), "source_share": Rule(0.0, 1.0), "bg_scale": Rule(0.0),
    "threshold": Rule(), "bg_threshold": Rule(), "act_threshold": Rule(),
    "low": Rule(), "high": Rule(), "kernel_width": Rule(0.0, low_open=True),
    "pos_weight": Rule(0.0), "rgb_sigma": Rule(0.0, low_open=True), "count_offset": Rule(0.0),
    "init_std": Rule(0.0), "l2": Rule(0.0), "st": Rule(0.0), "st_p2c": Rule(0.0), "st_c2c": Rule(0.0),
    "af_p2c": Rule(0.0), "sf_p2c": Rule(0.0), "af_c2c": Rule(0.0), "sf_c2c": Rule(0.0),
    "pos_xy_std": Rule(0.0, low_open=True), "bi_xy_std": Rule(0.0, low_open=True),
    "bi_rgb_std": Rule(0.0, low_open=True), "pos_w": Rule(0.0), "bi_w": Rule(0.0),
    "pad_value": Rule(), "offset": Rule(), "scale_range": Rule(0.0, low_open=True),
    "std": Rule(0.0, low_open=True), "mean": Rule(), "image_std": Rule(0.0, low_open=True),
    "image_mean": Rule(), "dilations": Rule(1), "scales": Rule(0.0, low_open=True),
    "long_side": Rule(1), "image_size": Rule(1), "crop_size": Rule(1), "size": Rule(1),
    "in_dims": Rule(1), "seed": Rule(), "index": Rule(), "block_index": Rule(0), "num_blocks": Rule(1),
    "ignore_index": Rule(), "mid_layer": Rule(), "layers": Rule(), "stages": Rule(),
}

ERRORS = (TypeError, ValueError)


@dataclasses.dataclass
class Call:
    """A valid call: ``fn(**args)`` (``positional`` names go first, by position, in order).

    Attributes:
        fn: the callable (a function, a class, or a bound method of a fresh instance).
        args: every argument by its public name.
        batch: the batch size of the batched arguments (``None``: the call has no batch).
        batch_args: which arguments carry the batch at dim 0 (default: the tensors, also in
            lists / tuples, whose dim 0 equals ``batch``).
        observe: what is checked after the call, from its return value (e.g. the state an
            ``update`` wrote).
        nan_ok: the outputs may hold NaN by documentation (IoU of absent classes).
        bounded: arguments whose values have a documented range (probabilities, normalised
            CAMs): a huge value there is out of that range, its output is not checked.
        rules: option ranges of this function that differ from ``RULES``.
        extra: perturbations of this call beyond the generated ones (``Pert``).
        skip: perturbation labels (exact, or ``"name:"`` prefixes) left out, with the reason.
        positional: names passed by position (``*modules``).
        cleanup: run after every call (e.g. undo a patch of a shared model).
        same_rtol: tolerance of the ``layout`` comparison.
        batch_free: output paths that do not depend on the batch (a weight penalty), so an
            empty batch leaves them as they are instead of 0.
        allowed: further exception types this call may raise for a perturbation (naming the
            argument), e.g. ``IndexError`` for an item index out of range (the sequence protocol).
    """

    fn: Callable[..., Any]
    args: dict[str, Any]
    batch: int | None = 2
    batch_args: tuple[str, ...] | None = None
    observe: Callable[[Any], Any] | None = None
    nan_ok: bool = False
    bounded: frozenset[str] = frozenset()
    rules: dict[str, Rule] = dataclasses.field(default_factory=dict)
    extra: list[Pert] = dataclasses.field(default_factory=list)
    skip: dict[str, str] = dataclasses.field(default_factory=dict)
    positional: tuple[str, ...] = ()
    cleanup: Callable[[], None] | None = None
    same_rtol: float = 1e-5
    batch_free: frozenset[str] = frozenset()
    allowed: tuple[type[BaseException], ...] = ()

    def invoke(self, args: Mapping[str, Any]) -> Any:
        pos = [args[n] for n in self.positional]
        kw = {k: v for k, v in args.items() if k not in self.positional}
        torch.manual_seed(0)
        try:
            out = self.fn(*pos, **kw)
            return self.observe(out) if self.observe is not None else out
        finally:
            if self.cleanup is not None:
                self.cleanup()


@dataclasses.dataclass
class Pert:
    """One perturbation of a call.

    ``expect``: ``"either"`` (success, or an error naming a perturbed argument), ``"error"``
    (must raise one), ``"success"`` (must succeed, finite), ``"same"`` (must succeed and equal
    the baseline), ``"batch0"`` (must succeed with the batch dims 0 and zero scalars).
    """

    label: str
    cls: str
    changes: dict[str, Any]
    names: tuple[str, ...]
    expect: str = "either"
    finite_in: bool = True


# ----------------------------------------------------------------------------- flattening


def leaves(x: Any, prefix: str = "out") -> list[tuple[str, Any]]:
    """Tensors, arrays and numbers inside an output, with a path for messages."""
    if isinstance(x, (Tensor, np.ndarray, float, int)) and not isinstance(x, bool):
        return [(prefix, x)]
    if isinstance(x, Mapping):
        return [leaf for k, v in x.items() for leaf in leaves(v, f"{prefix}[{k!r}]")]
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return [leaf for k in x._fields for leaf in leaves(getattr(x, k), f"{prefix}.{k}")]
    if isinstance(x, (list, tuple)):
        return [leaf for i, v in enumerate(x) for leaf in leaves(v, f"{prefix}[{i}]")]
    return []


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, (Tensor, np.ndarray)) else ()


def _nonfinite(x: Any) -> bool:
    if isinstance(x, Tensor):
        return (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all())
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "fc" and not bool(np.isfinite(x).all())
    if isinstance(x, float):
        return not math.isfinite(x)
    return False


def _equal(a: Any, b: Any, rtol: float) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=rtol * 0.1, equal_nan=True))
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, equal_nan=True))
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 0.1)
    return bool(a == b)


def snapshot(args: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(path, object, copy) of every tensor / array inside the arguments (modules excluded)."""
    out: list[tuple[str, Any, Any]] = []
    for name, value in args.items():
        for path, leaf in leaves(value, name):
            if isinstance(leaf, Tensor):
                out.append((path, leaf, leaf.detach().clone()))
            elif isinstance(leaf, np.ndarray):
                out.append((path, leaf, leaf.copy()))
    return out


def modified(snap: list[tuple[str, Any, Any]]) -> list[str]:
    bad = []
    for path, obj, copy in snap:
        now = obj.detach() if isinstance(obj, Tensor) else obj
        if isinstance(now, Tensor):
            same = now.shape == copy.shape and (
                bool(torch.equal(now, copy)) or (now.is_floating_point() and bool(
                    ((now == copy) | (now.isnan() & copy.isnan())).all())))
        else:
            same = now.shape == copy.shape and bool(np.array_equal(now, copy, equal_nan=now.dtype.kind == "f"))
        if not same:
            bad.append(path)
    return bad


# ----------------------------------------------------------------------------- perturbations


def _strided(x: Tensor) -> Tensor:
    """A non-contiguous view with the values of ``x`` (every second element of a wider buffer)."""
    buf = torch.empty(*x.shape, 2, dtype=x.dtype)
    buf[..., 0] = x
    return buf[..., 0]


def _transposed(x: Tensor) -> Tensor:
    """``x`` stored transposed in memory (last two dims), same logical values."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _grow(x: Tensor, dim: int) -> Tensor:
    """``x`` with dim ``dim`` one larger (its first slice repeated)."""
    if x.shape[dim] == 0:
        return torch.cat([x, torch.zeros_like(x.narrow(dim, 0, 0)).expand(
            *[1 if i == dim else s for i, s in enumerate(x.shape)])], dim)
    return torch.cat([x, x.narrow(dim, 0, 1)], dim)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.bool:
        return x != 0
    if not dtype.is_floating_point and x.is_floating_point():
        return x.round().to(dtype)
    return x.to(dtype)


def _inject(x: Tensor, value: float) -> Tensor:
    y = x.detach().clone(memory_format=torch.contiguous_format)
    if y.numel():
        y.view(-1)[y.numel() // 2] = value
    return y.requires_grad_(x.requires_grad)


def _rebuild(value: Any, fn: Callable[[Tensor], Tensor], pred: Callable[[Tensor], bool]) -> Any:
    """``value`` with ``fn`` applied to the tensors (also in lists / tuples / NamedTuples) where ``pred``."""
    if isinstance(value, Tensor):
        return fn(value) if pred(value) else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_rebuild(v, fn, pred) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, fn, pred) for v in value)
    return value


def _tensors_in(value: Any) -> list[Tensor]:
    return [leaf for _, leaf in leaves(value) if isinstance(leaf, Tensor)]


def _is_seq_of_tensors(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and not hasattr(value, "_fields") and bool(value) and all(
        isinstance(v, Tensor) for v in value)


def _rule(call: Call, name: str) -> Rule | None:
    return call.rules.get(name, RULES.get(name))


def _numeric_perts(call: Call, name: str, value: Any, default: Any) -> list[Pert]:
    """Options that are numbers (int or float)."""
    rule = _rule(call, name)
    integer = isinstance(value, int) if rule is None or rule.integer is None else rule.integer
    out = []
    bad = [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("str", "3"), ("list", [value])]
    if integer:
        bad.append(("2.5", 2.5))
    for label, v in bad:
        out.append(Pert(f"{name}={label}", "option", {name: v}, (name,), "error"))
    for label, v in (("-1", -1 if integer else -1.0), ("0", 0 if integer else 0.0)):
        must = rule is not None and not rule.admits(float(v))
        out.append(Pert(f"{name}={label}", "option", {name: v}, (name,), "error" if must else "either"))
    if integer and rule is not None and rule.high is not None and float(rule.high) + 1 < 10**9:
        out.append(Pert(f"{name}=high+1", "option", {name: int(rule.high) + 1}, (name,), "error"))
    if not integer and rule is not None and rule.high is not None:
        out.append(Pert(f"{name}=high+0.5", "option", {name: float(rule.high) + 0.5}, (name,),
                        "error" if not rule.admits(float(rule.high) + 0.5) else "either"))
    if default is not inspect.Parameter.empty and default is not None:
        out.append(Pert(f"{name}=None", "option", {name: None}, (name,), "error"))
    return out


def _sequence_perts(call: Call, name: str, value: Any) -> list[Pert]:
    """Options that are sequences of numbers (``size``, ``scales``, ``mean``...)."""
    rule = _rule(call, name)
    out = [Pert(f"{name}=str", "option", {name: "ab"}, (name,), "error")]
    if not value:
        return out
    integer = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    subs: list[tuple[str, Any, str]] = [("nan", math.nan, "error"), ("str", "a", "error")]
    if integer:
        subs.append(("2.5", 2.5, "error"))
    for label, v in (("-1", -1), ("0", 0)):
        must = rule is not None and not rule.admits(float(v))
        subs.append((label, v if integer else float(v), "error" if must else "either"))
    for label, v, expect in subs:
        new = list(value)
        new[0] = v
        out.append(Pert(f"{name}[0]={label}", "option", {name: type(value)(new) if isinstance(value, tuple)
                                                           else new}, (name,), expect))
    return out


def _tensor_perts(call: Call, name: str, value: Tensor, default: Any, array_like: bool = False) -> list[Pert]:
    out: list[Pert] = []
    x = value
    # rank
    out.append(Pert(f"{name}: rank+1", "rank", {name: x.unsqueeze(0)}, (name,)))
    if x.dim() >= 1:
        out.append(Pert(f"{name}: rank-1", "rank", {name: x.select(0, 0)}, (name,)))
    # size of each dim
    for d in range(x.dim()):
        out.append(Pert(f"{name}: dim{d}+1", "dim", {name: _grow(x, d)}, (name,)))
    # layouts
    if x.dim() >= 1 and x.numel() > 1:
        out.append(Pert(f"{name}: non-contiguous", "layout", {name: _strided(x)}, (name,), "same"))
    if x.dim() >= 2 and x.shape[-1] > 1 and x.shape[-2] > 1:
        out.append(Pert(f"{name}: transposed", "layout", {name: _transposed(x)}, (name,), "same"))
    if x.dim() == 4 and x.shape[1] > 1:
        out.append(Pert(f"{name}: channels_last", "layout",
                        {name: x.contiguous(memory_format=torch.channels_last)}, (name,), "same"))
    # dtypes
    if x.is_floating_point():
        for dt in (torch.float16, torch.bfloat16, torch.float64):
            if dt != x.dtype:
                out.append(Pert(f"{name}: {dt}", "dtype", {name: _cast(x, dt)}, (name,), "success"))
        for dt in (torch.int64, torch.bool):
            out.append(Pert(f"{name}: {dt}", "dtype", {name: _cast(x, dt)}, (name,)))
        out.append(Pert(f"{name}: nan", "nonfinite", {name: _inject(x, math.nan)}, (name,), finite_in=False))
        out.append(Pert(f"{name}: inf", "nonfinite", {name: _inject(x, math.inf)}, (name,), finite_in=False))
        out.append(Pert(f"{name}: huge", "huge", {name: _inject(x, HUGE)}, (name,),
                        finite_in=name not in call.bounded))
    elif x.dtype == torch.bool:
        for dt in (torch.int64, torch.float32):
            out.append(Pert(f"{name}: {dt}", "dtype", {name: _cast(x, dt)}, (name,)))
    else:
        for dt in (torch.int32, torch.uint8, torch.float32, torch.bool):
            if dt != x.dtype:
                out.append(Pert(f"{name}: {dt}", "dtype", {name: _cast(x, dt)}, (name,)))
    # python types
    pytypes: list[tuple[str, Any]] = [("list", x.tolist()), ("str", "x"), ("numpy", x.detach().numpy())]
    pytypes.append(("None", None))
    for label, v in pytypes:
        if label == "None" and default is None:  # a documented value (it may need another option)
            out.append(Pert(f"{name}=None", "pytype", {name: None}, (name,)))
            continue
        accepted = array_like and label in ("list", "numpy")  # documented: tensor or array
        out.append(Pert(f"{name}: {label}", "pytype", {name: v}, (name,), "either" if accepted else "error"))
    return out


def _batch_args(call: Call) -> list[str]:
    if call.batch is None:
        return []
    if call.batch_args is not None:
        return list(call.batch_args)
    return [n for n, v in call.args.items()
            if any(t.dim() >= 1 and t.shape[0] == call.batch for t in _tensors_in(v))]


def perturbations(call: Call, params: Mapping[str, inspect.Parameter]) -> list[Pert]:
    """Every perturbation of ``call`` (generated, then ``call.extra``), minus ``call.skip``."""
    out: list[Pert] = []
    for name, value in call.args.items():
        param = params.get(name)
        default = param.default if param is not None else inspect.Parameter.empty
        if param is not None and "None" in str(param.annotation):
            default = None  # None is a documented value of this argument
        if isinstance(value, Tensor):
            array_like = param is not None and "ArrayLike" in str(param.annotation)
            out.extend(_tensor_perts(call, name, value, default, array_like))
        elif _is_seq_of_tensors(value):
            for i, t in enumerate(value):
                for p in _tensor_perts(call, f"{name}[{i}]", t, inspect.Parameter.empty):
                    if p.cls == "pytype":
                        continue
                    new = list(value)
                    new[i] = p.changes[f"{name}[{i}]"]
                    out.append(dataclasses.replace(p, changes={name: type(value)(new)}, names=(name,)))
            out.append(Pert(f"{name}: str", "pytype", {name: "x"}, (name,), "error"))
            out.append(Pert(f"{name}: empty", "pytype", {name: type(value)()}, (name,)))
        elif isinstance(value, bool):
            out.append(Pert(f"{name}=str", "option", {name: "no"}, (name,), "error"))
            out.append(Pert(f"{name}=2", "option", {name: 2}, (name,), "error"))
        elif isinstance(value, (int, float)):
            out.extend(_numeric_perts(call, name, value, default))
        elif isinstance(value, str):
            out.append(Pert(f"{name}=bad", "option", {name: "no-such-option"}, (name,), "error"))
            out.append(Pert(f"{name}=int", "option", {name: 1}, (name,), "error"))
            if default is not None:
                out.append(Pert(f"{name}=None", "option", {name: None}, (name,), "error"))
        elif isinstance(value, (tuple, list)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out.extend(_sequence_perts(call, name, value))
        elif isinstance(value, torch.dtype):
            out.append(Pert(f"{name}=str", "option", {name: "float32"}, (name,), "error"))
            out.append(Pert(f"{name}=int64", "option", {name: torch.int64}, (name,)))
        elif isinstance(value, nn.Module):
            out.append(Pert(f"{name}=str", "pytype", {name: "vit"}, (name,), "error"))
            out.append(Pert(f"{name}=None", "pytype", {name: None}, (name,),
                            "either" if default is None else "error"))
        elif isinstance(value, Mapping):
            out.append(Pert(f"{name}=str", "option", {name: "ab"}, (name,), "error"))
            for key in list(value)[:1]:
                v = value[key]
                if isinstance(v, float):
                    out.append(Pert(f"{name}[{key}]=nan", "option", {name: {**value, key: math.nan}},
                                    (name,), "error"))
                    out.append(Pert(f"{name}[{key}]=str", "option", {name: {**value, key: "a"}},
                                    (name,), "error"))
            out.append(Pert(f"{name}[unknown]", "option", {name: {**value, "no_such_key": 1.0}}, (name,)))
        elif callable(value) and not isinstance(value, type):
            out.append(Pert(f"{name}=str", "pytype", {name: "f"}, (name,), "error"))
            out.append(Pert(f"{name}=None", "pytype", {name: None}, (name,),
                            "either" if default is None else "error"))
        elif isinstance(value, torch.Generator):
            out.append(Pert(f"{name}=int", "pytype", {name: 3}, (name,), "error"))
    out.extend(_call_level(call))
    out.extend(call.extra)
    return [p for p in out if not _skipped(call, p)]


def _skipped(call: Call, p: Pert) -> bool:
    return any(p.label == k or (k.endswith(":") and p.label.startswith(k)) or k == f"cls:{p.cls}"
               for k in call.skip)


def _call_level(call: Call) -> list[Pert]:
    """Perturbations of several arguments at once: batch 0, a shared dim of size 1, all float64."""
    out: list[Pert] = []
    names = _batch_args(call)
    if names:
        b = call.batch
        changes = {n: _rebuild(call.args[n], lambda t: t[:0],
                               lambda t, b=b: t.dim() >= 1 and t.shape[0] == b) for n in names}
        out.append(Pert("batch 0", "batch0", changes, tuple(names), "batch0"))
    # size 1 of each distinct dim size > 1 shared by tensor arguments (except the batch)
    sizes: dict[int, list[str]] = {}
    for n, v in call.args.items():
        for t in _tensors_in(v):
            for d, s in enumerate(t.shape):
                if s > 1 and not (d == 0 and n in names and s == call.batch):
                    sizes.setdefault(s, [])
                    if n not in sizes[s]:
                        sizes[s].append(n)
    for s, holders in sorted(sizes.items()):
        def shrink(t: Tensor, s: int = s) -> Tensor:
            for d, size in enumerate(t.shape):
                if size == s:
                    t = t.narrow(d, 0, 1)
            return t
        changes = {n: _rebuild(call.args[n], shrink, lambda t, s=s: s in t.shape) for n in holders}
        out.append(Pert(f"size1 (dims of size {s})", "size1", changes, tuple(holders)))
    floats = [n for n, v in call.args.items() if any(t.is_floating_point() for t in _tensors_in(v))]
    if floats:
        changes = {n: _rebuild(call.args[n], lambda t: t.double(), lambda t: t.is_floating_point())
                   for n in floats}
        out.append(Pert("all float64", "dtype", changes, tuple(floats), "success"))
    return out


# ----------------------------------------------------------------------------- the check


def _names(msg: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names)


def run(call: Call, args: Mapping[str, Any]) -> tuple[Any, BaseException | None, float]:
    start = time.perf_counter()
    try:
        out = call.invoke(args)
        err = None
    except Exception as e:  # noqa: BLE001 - classified by the caller
        out, err = None, e
    return out, err, time.perf_counter() - start


def check(call: Call, p: Pert, reference: Any) -> str | None:
    """Run ``p`` on ``call``; a description of what breaks the contract, or ``None``."""
    args = {**call.args, **p.changes}
    snap = snapshot(args)
    out, err, took = run(call, args)
    problems = []
    if took > SLOW:
        problems.append(f"took {took:.1f} s")
    changed = modified(snap)
    if changed:
        problems.append(f"modified its input in place: {', '.join(changed)}")
    if err is not None:
        msg = f"{type(err).__name__}: {err}".replace("\n", " ")
        if len(msg) > 300:
            msg = msg[:300] + "..."
        if not isinstance(err, ERRORS + call.allowed):
            problems.append(f"raised {msg}")
        elif p.expect in ("success", "same", "batch0"):
            problems.append(f"must succeed, raised {msg}")
        elif not _names(str(err), p.names):
            problems.append(f"error does not name {'/'.join(p.names)}: {msg}")
    else:
        if p.expect == "error":
            problems.append("accepted (must raise an error naming it)")
        else:
            problems.extend(_check_output(call, p, out, reference))
    if not problems:
        return None
    return f"[{p.cls}] {p.label}: " + "; ".join(problems)


def _check_output(call: Call, p: Pert, out: Any, reference: Any) -> list[str]:
    problems = []
    got, ref = leaves(out), leaves(reference)
    if p.finite_in and not call.nan_ok:
        bad = [path for path, v in got if _nonfinite(v)]
        if bad:
            problems.append(f"non-finite output from finite input: {', '.join(bad)}")
    if [k for k, _ in got] != [k for k, _ in ref]:
        if p.cls in ("option", "pytype") and p.expect in ("either", "success"):
            return problems  # an option may change what is returned (which taps, which fields)
        problems.append(f"output structure {[k for k, _ in got]} differs from the baseline's "
                        f"{[k for k, _ in ref]}")
        return problems
    for (path, g), (_, r) in zip(got, ref, strict=True):
        gs, rs = _shape(g), _shape(r)
        if p.expect == "same":
            if not _equal(g, r, call.same_rtol):
                problems.append(f"{path} differs from the baseline's")
        elif p.expect == "batch0":
            if rs and call.batch is not None and rs[0] == call.batch and len(gs) == len(rs):
                if gs != (0, *rs[1:]):
                    problems.append(f"{path}: shape {gs}, expected {(0, *rs[1:])}")
            elif len(gs) != len(rs):
                problems.append(f"{path}: rank {len(gs)}, the baseline's is {len(rs)}")
            if (isinstance(g, Tensor) and g.dim() == 0 and g.is_floating_point() and bool(g != 0)
                    and path not in call.batch_free):
                problems.append(f"{path}: {g.item()} on an empty batch (a loss is 0)")
        elif p.expect == "success" and p.cls == "dtype":
            if gs != rs:
                problems.append(f"{path}: shape {gs}, the baseline's is {rs}")
        elif p.cls != "rank" and len(gs) != len(rs):
            problems.append(f"{path}: rank {len(gs)}, the baseline's is {len(rs)}")
    return problems
