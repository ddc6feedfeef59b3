"""Tests for the private attention-capture helpers shared by DOEI and MCT."""

from __future__ import annotations

import pytest
import torch

from wsss_blocks._attention_capture import row_logsumexp


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_row_logsumexp_matches_torch_in_value_and_gradient(chunk_rows):
    gen = torch.Generator().manual_seed(chunk_rows)
    q = torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    got = row_logsumexp(q, k, chunk_rows)
    want = torch.logsumexp(q @ k.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    g_got = torch.autograd.grad((got * weight).sum(), (q, k))
    g_want = torch.autograd.grad((want * weight).sum(), (q, k))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda a, b: row_logsumexp(a, b, chunk_rows), (q, k))


def test_row_logsumexp_is_stable_for_large_logits():
    gen = torch.Generator().manual_seed(0)
    q = 300.0 * torch.randn(1, 2, 5, 8, generator=gen)
    k = torch.randn(1, 2, 6, 8, generator=gen)
    got = row_logsumexp(q, k, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.logsumexp(q @ k.transpose(-1, -2), dim=-1))
