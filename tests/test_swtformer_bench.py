"""CPU smoke version of benchmarks/bench_swtformer.py at B=2: our V2 block equals SIPE's broadcast form."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_swtformer as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_block_matches_sipe_broadcast_at_b2():
    maps, labels, head, hff = bench.make_inputs(224, 2)
    ours = bench.ours_block(head, hff, maps, labels)
    grads = [p.grad for p in (*head.parameters(), *hff.parameters())]
    assert all(g is None for g in grads)
    ours.backward()
    g_ours = [p.grad.clone() for p in (*head.parameters(), *hff.parameters())]
    g_maps = maps[-1].grad.clone()
    head.zero_grad(set_to_none=True)
    hff.zero_grad(set_to_none=True)
    maps[-1].grad = None
    naive = bench.naive_block(head, hff, maps, labels)
    naive.backward()
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    for a, p in zip(g_ours, (*head.parameters(), *hff.parameters()), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_maps, maps[-1].grad, atol=1e-5, rtol=1e-4)
