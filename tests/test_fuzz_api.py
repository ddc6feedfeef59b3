"""Every public callable against bad and unusual input: the contract of docs/conventions.md, fuzzed.

The walk starts from the package's exports (``tests/test_vocabulary.py``'s ``_callables``:
functions, constructors, ``forward`` and the public methods), so a new public name is covered
automatically; one without a valid baseline call in ``tests/_fuzz_registry.py`` fails here.

For each callable the harness (``tests/_fuzz.py``) perturbs a valid call one argument at a time
(rank, size of a dim, batch 0, size-1 dims, memory layouts, dtypes, NaN / inf / huge values,
wrong Python types, out-of-range and wrong-typed options) and holds every outcome to the
contract: success with finite outputs of the baseline's structure (equal to the baseline for
a mere change of memory layout), or a ``TypeError`` / ``ValueError`` (``ShapeError``) whose
message names the perturbed argument; no input modified in place, no call that takes seconds.

``test_contract`` walks every perturbation of every callable (deterministic). ``test_random``
lets hypothesis (derandomised: the same examples every run) draw the tensor values of the
baseline and one perturbation at a time, a few examples per callable.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from _fuzz import Call, check, perturbations, run
from _fuzz_registry import REGISTRY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_vocabulary import _callables

CALLABLES = _callables()

def _params(qual: str) -> dict[str, inspect.Parameter]:
    """The parameters of ``qual`` (an ``extra_repr`` entry calls the constructor: its parameters)."""
    out: dict[str, inspect.Parameter] = {}
    for name in (qual, qual.replace(".extra_repr", ".__init__")):
        func = CALLABLES.get(name)
        if func is not None:
            out.update((n, p) for n, p in inspect.signature(func).parameters.items() if n not in ("self", "cls"))
    return out


def _baseline(qual: str, seed: int) -> tuple[Call, object]:
    call = REGISTRY[qual](seed)
    out, err, _ = run(call, call.args)
    if err is not None:
        raise AssertionError(f"{qual}: the registered baseline call fails: {type(err).__name__}: {err}") from err
    return call, out


def _report(qual: str, problems: list[str], total: int) -> None:
    assert not problems, f"{qual}: {len(problems)} of {total} perturbations break the contract:\n" + "\n".join(
        problems)


def test_every_public_callable_is_registered():
    missing = sorted(set(CALLABLES) - set(REGISTRY))
    assert not missing, (
        "public callables without a baseline call in tests/_fuzz_registry.py (register one with "
        "@case(...) returning a cheap valid Call): " + ", ".join(missing))
    stale = sorted(set(REGISTRY) - set(CALLABLES))
    assert not stale, f"registry entries for names that are not public (remove them): {stale}"


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("qual", sorted(CALLABLES))
def test_contract(qual):
    if qual not in REGISTRY:
        pytest.fail(f"{qual}: no baseline call registered in tests/_fuzz_registry.py; register one with @case(...)")
    call, reference = _baseline(qual, 0)
    perts = perturbations(call, _params(qual))
    problems = []
    for p in perts:
        fresh = REGISTRY[qual](0)  # a fresh instance: stateful calls must not see earlier ones
        problem = check(fresh, p, reference)
        if problem is not None:
            problems.append(problem)
    _report(qual, problems, len(perts))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("qual", sorted(CALLABLES))
def test_random(qual):
    """Hypothesis draws the baseline's tensor values (a seed) and one perturbation, a few times per callable."""
    if qual not in REGISTRY:
        pytest.fail(f"{qual}: no baseline call registered in tests/_fuzz_registry.py; register one with @case(...)")
    problems: list[str] = []

    @settings(max_examples=5, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def examples(data):  # collects instead of raising: a contract failure is not shrunk, only reported
        seed = data.draw(st.integers(1, 2**16), label="seed")
        call, reference = _baseline(qual, seed)
        perts = perturbations(call, _params(qual))
        if not perts:
            return
        p = perts[data.draw(st.integers(0, len(perts) - 1), label="perturbation")]
        problem = check(REGISTRY[qual](seed), p, reference)
        if problem is not None:
            problems.append(f"seed {seed}: {problem}")

    examples()
    assert not problems, f"{qual}: " + "\n".join(problems)


def test_harness_sees_what_it_must():
    """The checker flags an obscure error, an error that names nobody, NaN output, in-place writes."""
    from _fuzz import Pert

    def f(features, *, eps=1e-5):
        if not isinstance(features, torch.Tensor):
            return features.dim()  # AttributeError
        if eps < 0:
            raise ValueError("bad value")  # does not name eps
        features.add_(0)
        return features / 0.0

    call = Call(f, {"features": torch.ones(2, 3), "eps": 1e-5})
    assert "raised AttributeError" in check(call, Pert("list", "pytype", {"features": [1.0]}, ("features",),
                                                       "error"), None)
    assert "does not name eps" in check(call, Pert("neg", "option", {"eps": -1.0}, ("eps",), "error"), None)
    ref = torch.ones(2, 3)
    assert "non-finite output" in check(call, Pert("id", "layout", {}, ("features",), "success"), ref)

    def g(features):
        features.mul_(2)
        return features

    msg = check(Call(g, {"features": torch.ones(2)}), Pert("id", "layout", {}, ("features",), "success"),
                torch.ones(2))
    assert "modified its input in place" in msg
