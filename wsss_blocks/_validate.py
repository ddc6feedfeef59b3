"""Input validation shared by every public entry point.

Every public function checks its tensors here, so that a wrong shape fails at the
call with a message that names the argument, the expected layout and the actual
shape, instead of deep inside a ``bmm``.

Shape patterns are sequences whose entries are

* a ``str`` -- a named dimension (``"B"``, ``"K"``, ...). The first tensor that
  binds a name fixes its size in ``dims``; later tensors must agree.
* an ``int`` -- a fixed size.
* ``None`` or ``"*"`` -- any size.

Value checks (labels in ``{0, 1}``) need the values on the host. They run only for
CPU tensors, where reading them costs no device synchronisation; on accelerators
they are skipped so the training path never waits on the device. Setting the
environment variable ``WSSS_BLOCKS_CHECKS=0`` turns off every check.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ShapeError",
    "Dims",
    "check_tensor",
    "check_shape",
    "check_labels",
    "check_option",
    "check_thresholds",
    "check_range",
    "check_size",
    "check_int",
    "check_bool",
    "check_ignore_index",
    "check_instance",
    "check_callable",
    "check_mapping",
    "check_class_values",
    "check_floats",
    "checks_enabled",
]

Pattern = Sequence["str | int | None"]


class ShapeError(ValueError):
    """A tensor argument has the wrong rank, shape or dtype, or wrong label values.

    Examples:
        >>> import torch
        >>> from wsss_blocks._validate import ShapeError, check_shape
        >>> try:
        ...     check_shape("cam", torch.zeros(2, 3), ["B", "K", "h", "w"])
        ... except ShapeError as err:
        ...     print(err)
        cam: expected 4 dims (B, K, h, w), got shape (2, 3)
    """


class Dims(dict[str, int]):
    """Named sizes bound by ``check_shape``, and the argument that bound each (``sources``).

    A plain ``dict`` works too; a ``Dims`` lets a later disagreement name the argument the size
    came from, so the message names both arguments of a mismatch. ``check_shape`` creates one
    when it gets no ``dims``.

    Examples:
        >>> dims = Dims({"K": 3}, sources={"K": "the pool"})
        >>> try:
        ...     check_shape("cams", torch.zeros(2, 4, 5, 5), ["B", "K", "h", "w"], dims)
        ... except ShapeError as err:
        ...     print(err)
        cams: expected shape (B, K=3, h, w), got (2, 4, 5, 5); K=4 disagrees with K=3 from the pool
    """

    def __init__(self, *args: Any, sources: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sources: dict[str, str] = dict(sources or {})


def _source(dims: Mapping[str, int], name: str) -> str | None:
    return dims.sources.get(name) if isinstance(dims, Dims) else None


def checks_enabled() -> bool:
    """Whether validation runs (``WSSS_BLOCKS_CHECKS`` unset or not ``"0"``), and we are not tracing.

    Examples:
        >>> checks_enabled()
        True
    """
    if os.environ.get("WSSS_BLOCKS_CHECKS", "1") == "0":
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    return not torch.jit.is_tracing()


def _fmt_pattern(pattern: Pattern, dims: MutableMapping[str, int]) -> str:
    parts = []
    for p in pattern:
        if p is None or p == "*":
            parts.append("*")
        elif isinstance(p, str):
            parts.append(f"{p}={dims[p]}" if p in dims else p)
        else:
            parts.append(str(p))
    return "(" + ", ".join(parts) + ")"


def check_tensor(name: str, x: Any, *, dtype: str | None = None) -> Tensor:
    """Check that ``x`` is a tensor, optionally of a dtype kind.

    Args:
        name: argument name used in the message.
        x: the value to check.
        dtype: ``"float"`` (floating point), ``"int"`` (integer, not bool), ``"bool"``,
            ``"label"`` (bool, integer or floating) or ``None`` (any).

    Returns:
        ``x`` unchanged.

    Examples:
        >>> check_tensor("x", torch.zeros(2), dtype="float").shape
        torch.Size([2])
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtype is None or not checks_enabled():
        return x
    ok = {
        "float": x.is_floating_point(),
        "int": (not x.is_floating_point()) and (not x.is_complex()) and x.dtype != torch.bool,
        "bool": x.dtype == torch.bool,
        "label": not x.is_complex(),
    }
    if dtype not in ok:
        raise ValueError(f"dtype kind must be one of {sorted(ok)}, got {dtype!r}")
    if not ok[dtype]:
        article = "an" if dtype == "int" else "a"
        raise ShapeError(f"{name}: expected {article} {dtype} tensor, got dtype {x.dtype}")
    return x


def check_shape(
    name: str,
    x: Tensor,
    pattern: Pattern,
    dims: MutableMapping[str, int] | None = None,
    *,
    dtype: str | None = None,
) -> MutableMapping[str, int]:
    """Check ``x`` against a shape pattern and bind its named dimensions.

    Args:
        name: argument name used in the message.
        x: tensor to check.
        pattern: one entry per dimension: a name, a fixed int, or ``None``/``"*"``.
        dims: named sizes bound so far (shared across the arguments of one call);
            new names are added to it. A fresh dict when ``None``.
        dtype: optional dtype kind, see ``check_tensor``.

    Returns:
        ``dims``, with the names of ``pattern`` bound.

    Raises:
        ShapeError: on a rank mismatch, a fixed-size mismatch, or a named dimension
            that disagrees with an earlier binding.

    Examples:
        >>> dims = check_shape("cam", torch.zeros(2, 3, 4, 5), ["B", "K", "h", "w"])
        >>> dims["K"]
        3
        >>> try:
        ...     check_shape("labels", torch.zeros(2, 4), ["B", "K"], dims)
        ... except ShapeError as err:
        ...     print(err)
        labels: expected shape (B=2, K=3), got (2, 4); K=4 disagrees with K=3 from cam
    """
    if dims is None:
        dims = Dims()
    check_tensor(name, x, dtype=dtype)
    shape = tuple(x.shape)
    if not checks_enabled():  # bind the sizes callers read, raise nothing
        if len(shape) == len(pattern):
            dims.update((p, size) for size, p in zip(shape, pattern, strict=True)
                        if isinstance(p, str) and p != "*" and p not in dims)
        return dims
    if len(shape) != len(pattern):
        names = ", ".join("*" if (p is None or p == "*") else str(p) for p in pattern)
        raise ShapeError(
            f"{name}: expected {len(pattern)} dims ({names}), got shape {shape}"
        )
    expected = _fmt_pattern(pattern, dims)
    for size, p in zip(shape, pattern, strict=True):
        if p is None or p == "*":
            continue
        if isinstance(p, str):
            if p in dims and dims[p] != size:
                src = _source(dims, p)
                where = f"from {src}" if src is not None and src != name else "bound earlier"
                raise ShapeError(
                    f"{name}: expected shape {expected}, got {shape}; "
                    f"{p}={size} disagrees with {p}={dims[p]} {where}"
                )
            if p not in dims and isinstance(dims, Dims):
                dims.sources[p] = name
            dims[p] = size
        elif size != p:
            raise ShapeError(f"{name}: expected shape {expected}, got {shape}")
    return dims


def check_labels(
    name: str,
    labels: Tensor,
    dims: MutableMapping[str, int] | None = None,
    *,
    pattern: Pattern = ("B", "K"),
) -> MutableMapping[str, int]:
    """Check multi-hot image labels: shape ``pattern``, values in ``{0, 1}``.

    Bool, integer and floating dtypes are accepted. The values are read only for CPU
    tensors (no device synchronisation); see the module docstring.

    Args:
        name: argument name used in the message.
        labels: the label tensor, ``(B, K)`` by default.
        dims: named sizes bound so far, see ``check_shape``.
        pattern: the expected shape pattern.

    Returns:
        ``dims`` with the pattern's names bound.

    Examples:
        >>> dims = check_labels("labels", torch.tensor([[1, 0, 1]]))
        >>> dims["K"]
        3
        >>> try:
        ...     check_labels("labels", torch.tensor([[0.5, 1.0]]))
        ... except ShapeError as err:
        ...     print(err)
        labels: expected values in {0, 1}, got 0.5
    """
    dims = check_shape(name, labels, pattern, dims, dtype="label")
    if checks_enabled() and labels.device.type == "cpu" and labels.dtype != torch.bool:
        bad = (labels != 0) & (labels != 1)
        if bool(bad.any()):  # CPU tensor: no device sync
            value = labels[bad][0].item()  # sync-ok: CPU tensor, error path
            raise ShapeError(f"{name}: expected values in {{0, 1}}, got {value}")
    return dims


def check_option(name: str, value: Any, allowed: Collection[Any]) -> Any:
    """Check that an option string (or value) is one of ``allowed``.

    Raises:
        ValueError: showing the value and the allowed set.

    Examples:
        >>> check_option("mode", "max", ("max", "minmax"))
        'max'
        >>> try:
        ...     check_option("mode", "mean", ("max", "minmax"))
        ... except ValueError as err:
        ...     print(err)
        mode: expected one of ['max', 'minmax'], got 'mean'
    """
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
    return value


def check_thresholds(
    low_name: str, low: float, high_name: str, high: float, *, bounds: tuple[float, float] | None = None
) -> None:
    """Check that two thresholds are finite numbers (inside ``bounds``) and strictly ordered, ``low < high``.

    Thresholds outside the values they cut are allowed (``high > 1`` on normalised CAMs: no
    foreground); ``bounds`` restricts them where a function needs it.

    Raises:
        TypeError: a threshold that is not a number.
        ValueError: when ``low >= high``, either is not finite or outside ``bounds``.

    Examples:
        >>> check_thresholds("low", 0.25, "high", 0.7)
        >>> try:
        ...     check_thresholds("low", 0.7, "high", 0.25)
        ... except ValueError as err:
        ...     print(err)
        low=0.7 must be smaller than high=0.25
    """
    for n, v in ((low_name, low), (high_name, high)):
        if not math.isfinite(_real(n, v)):
            raise ValueError(f"{n}: expected a finite threshold, got {v}")
        if bounds is not None and not bounds[0] <= float(v) <= bounds[1]:
            raise ValueError(f"{n}: expected a threshold in [{bounds[0]}, {bounds[1]}], got {v}")
    if not low < high:
        raise ValueError(f"{low_name}={low} must be smaller than {high_name}={high}")


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Check that a scalar hyperparameter is finite and inside ``[low, high]``.

    ``None`` bounds are open. Raises ``ValueError`` naming the argument.

    Examples:
        >>> check_range("alpha", 0.35, 0.0, 1.0)
        0.35
        >>> try:
        ...     check_range("temperature", 0.0, 0.0, low_inclusive=False)
        ... except ValueError as err:
        ...     print(err)
        temperature: expected a value in (0.0, inf), got 0.0
    """
    v = _real(name, value)
    lo_ok = low is None or (v >= low if low_inclusive else v > low)
    hi_ok = high is None or (v <= high if high_inclusive else v < high)
    if not (math.isfinite(v) and lo_ok and hi_ok):
        if low is None and high is None:
            raise ValueError(f"{name}: expected a finite number, got {value}")
        lb = "[" if low_inclusive and low is not None else "("
        hb = "]" if high_inclusive and high is not None else ")"
        lo = float("-inf") if low is None else low
        hi = float("inf") if high is None else high
        raise ValueError(f"{name}: expected a value in {lb}{lo}, {hi}{hb}, got {value}")
    return value


def _real(name: str, value: Any) -> float:
    """``value`` as a float; a ``TypeError`` naming ``name`` for anything that is not a real number."""
    if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if isinstance(value, Tensor) and value.numel() != 1:
        raise TypeError(f"{name}: expected a number, got a tensor of shape {tuple(value.shape)}")
    return float(value)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` inside ``[low, high]`` (``None`` bounds are open).

    The one integer validator of the package: it accepts Python ints and integer-like
    objects (``operator.index``: numpy / 0-dim integer tensors) and never truncates, so
    ``2.7`` and ``2.0`` are errors, not 2. Bools are rejected.

    Raises:
        ValueError: naming ``name`` and showing the value and the allowed range (also for a
            non-integral number, NaN, inf and a bool).
        TypeError: naming ``name`` for a value that is not a number (a string, ``None``, a list).

    Examples:
        >>> check_int("iters", 10, low=0)
        10
        >>> try:
        ...     check_int("num_clusters", 2.7, low=1)
        ... except ValueError as err:
        ...     print(err)
        num_clusters: expected an int, got 2.7
        >>> try:
        ...     check_int("num_clusters", 0, low=1)
        ... except ValueError as err:
        ...     print(err)
        num_clusters: expected an int >= 1, got 0
    """
    out: int | None = None
    if not isinstance(value, bool):
        try:
            out = operator.index(value)
        except TypeError:
            out = None
    if out is None:
        if not isinstance(value, bool) and (isinstance(value, (str, bytes)) or not hasattr(value, "__float__")):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
        raise ValueError(f"{name}: expected an int, got {value!r}")
    if low is not None and high is not None and not low <= out <= high:
        raise ValueError(f"{name}: expected an int in [{low}, {high}], got {out}")
    if low is not None and out < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {out}")
    if high is not None and out > high:
        raise ValueError(f"{name}: expected an int <= {high}, got {out}")
    return out


def check_size(name: str, size: Any) -> tuple[int, int]:
    """Check a spatial size given as ``(h, w)`` positive ints; return it as a tuple.

    Entries go through ``check_int``: ``(2.7, 3.2)`` is an error, not ``(2, 3)``.

    Examples:
        >>> check_size("size", [28, 14])
        (28, 14)
        >>> try:
        ...     check_size("size", [2.7, 3.2])
        ... except ValueError as err:
        ...     print(err)
        size[0]: expected an int, got 2.7
    """
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair (h, w) of ints, got {size!r}") from None
    h = check_int(f"{name}[0]", h)
    w = check_int(f"{name}[1]", w)
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: expected positive sizes, got {size!r}")
    return h, w


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a ``bool``: a Python or numpy bool; anything else is a ``TypeError``.

    A switch given as ``"no"`` or ``2`` would be silently true; it is an error instead.

    Examples:
        >>> check_bool("flip", True)
        True
        >>> try:
        ...     check_bool("flip", "no")
        ... except TypeError as err:
        ...     print(err)
        flip: expected a bool, got str 'no'
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def check_ignore_index(value: Any, num_values: int | None = None, *, name: str = "ignore_index") -> int:
    """An ``ignore_index`` as an int; with ``num_values``, outside the label values ``0..num_values-1``.

    A function that writes label maps (``0`` background, ``k + 1`` class ``k``) cannot tell an
    ignored cell from a class when ``ignore_index`` is one of the values it writes.

    Raises:
        ValueError: a non-integer, or a value among the label values.

    Examples:
        >>> check_ignore_index(255, 21)
        255
        >>> try:
        ...     check_ignore_index(1, 21)
        ... except ValueError as err:
        ...     print(err)
        ignore_index: 1 is a label value (0..20); pick a value outside them (255)
    """
    v = check_int(name, value)
    if num_values is not None and 0 <= v < num_values:
        raise ValueError(f"{name}: {v} is a label value (0..{num_values - 1}); pick a value outside them (255)")
    return v


def check_instance(name: str, value: Any, types: type | tuple[type, ...], what: str | None = None) -> Any:
    """``value`` unchanged if it is an instance of ``types``, else a ``TypeError`` naming ``name``.

    Examples:
        >>> try:
        ...     check_instance("model", "vit", torch.nn.Module, "an nn.Module (a timm ViT)")
        ... except TypeError as err:
        ...     print(err)
        model: expected an nn.Module (a timm ViT), got str
    """
    if not isinstance(value, types):
        if what is None:
            names = types if isinstance(types, tuple) else (types,)
            what = " or ".join(t.__name__ for t in names)
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")
    return value


def check_callable(name: str, value: Any) -> Callable[..., Any]:
    """``value`` unchanged if it is callable, else a ``TypeError`` naming ``name``.

    Examples:
        >>> try:
        ...     check_callable("cam_fn", None)
        ... except TypeError as err:
        ...     print(err)
        cam_fn: expected a callable, got NoneType
    """
    if not callable(value):
        raise TypeError(f"{name}: expected a callable, got {type(value).__name__}")
    return value


def check_mapping(name: str, value: Any) -> Mapping[Any, Any]:
    """``value`` unchanged if it is a mapping, else a ``TypeError`` naming ``name``.

    Examples:
        >>> check_mapping("loss_weights", {"a": 1.0})
        {'a': 1.0}
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a mapping, got {type(value).__name__}")
    return value


def check_class_values(
    name: str, x: Tensor, num_values: int | None, *, ignore_index: int | None = None, bound_from: str | None = None
) -> None:
    """Check that an integer label map holds values in ``[0, num_values)`` (or ``ignore_index``).

    ``num_values=None``: only non-negative values (the number of classes is not known).

    Read only for CPU tensors (no device synchronisation), like ``check_labels``. ``bound_from``
    names where ``num_values`` comes from (another argument), for the message.

    Raises:
        ShapeError: naming ``name`` and the first value out of range.

    Examples:
        >>> check_class_values("masks", torch.tensor([0, 2, 255]), 3, ignore_index=255)
        >>> try:
        ...     check_class_values("masks", torch.tensor([0, 7]), 3, ignore_index=255)
        ... except ShapeError as err:
        ...     print(err)
        masks: expected values in [0, 3) or ignore_index=255, got 7
    """
    if not (checks_enabled() and x.device.type == "cpu"):
        return
    bad = x < 0
    if num_values is not None:
        bad |= x >= num_values
    if ignore_index is not None:
        bad &= x != ignore_index
    if bool(bad.any()):  # CPU tensor: no device sync
        value = x[bad][0].item()  # sync-ok: CPU tensor, error path
        upper = "inf" if num_values is None else num_values
        allowed = f"[0, {upper})" + ("" if bound_from is None else f" ({bound_from})")
        allowed += "" if ignore_index is None else f" or ignore_index={ignore_index}"
        raise ShapeError(f"{name}: expected values in {allowed}, got {value}")


def check_floats(
    name: str,
    value: Any,
    *,
    length: int | None = None,
    low: float | None = None,
    low_inclusive: bool = True,
) -> tuple[float, ...]:
    """A sequence of finite numbers (e.g. per-channel ``mean`` / ``std``) as a tuple of floats.

    Args:
        name: argument name used in the message.
        value: the sequence.
        length: the required length, if any.
        low: a lower bound of every entry (``low_inclusive=False``: strictly above it).

    Raises:
        TypeError: not a sequence of numbers.
        ValueError: a wrong length, or an entry that is not finite or below ``low``.

    Examples:
        >>> check_floats("std", [0.2, 0.2, 0.2], length=3, low=0.0, low_inclusive=False)
        (0.2, 0.2, 0.2)
        >>> try:
        ...     check_floats("std", (0.2, 0.0, 0.2), length=3, low=0.0, low_inclusive=False)
        ... except ValueError as err:
        ...     print(err)
        std: expected 3 finite values > 0.0, got (0.2, 0.0, 0.2)
    """
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(value).__name__}")
    items = tuple(value)
    out = tuple(_real(name, v) for v in items)
    ok = all(math.isfinite(v) for v in out) and (length is None or len(out) == length)
    if ok and low is not None:
        ok = all(v >= low if low_inclusive else v > low for v in out)
    if not ok:
        count = "" if length is None else f"{length} "
        bound = "" if low is None else f" {'>=' if low_inclusive else '>'} {low}"
        raise ValueError(f"{name}: expected {count}finite values{bound}, got {items!r}")
    return out
