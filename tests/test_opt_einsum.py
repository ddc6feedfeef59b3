"""opt_einsum's role: torch orders the contraction of einsums with three or more operands.

``torch.einsum`` hands any contraction of >= 3 operands to opt_einsum (when installed, a core
dependency of this package) to pick the pairwise order (``torch.backends.opt_einsum.enabled`` /
``.strategy``); without it torch contracts left to right. The order changes the cost, never the
value. DOEI's HFA affinity ``relu(X^ X^_patch^T R)`` is such a three-operand product; the
library writes it as two matmuls in the order opt_einsum's flop model picks (an einsum measured
1.5-2x slower on CPU for the C-row case, so the matmuls stay), and these tests check the
einsum form of the public ``hybrid_attention`` against the library under every setting.
"""

from __future__ import annotations

import opt_einsum
import pytest
import torch
import torch.nn.functional as F

from wsss_blocks.doei import hybrid_attention


@pytest.fixture
def restore_opt_einsum():
    enabled, strategy = torch.backends.opt_einsum.enabled, torch.backends.opt_einsum.strategy
    yield
    torch.backends.opt_einsum.enabled = enabled
    torch.backends.opt_einsum.strategy = strategy


def _hfa_einsum(tokens: torch.Tensor, r: torch.Tensor, p0: int) -> torch.Tensor:
    """``G = rownorm(relu(d_emb blockdiag(I_P0, R)))`` with the patch block as one 3-operand einsum."""
    xh = F.normalize(tokens, dim=-1, eps=1e-6)
    g_pre = torch.relu(xh @ xh[:, :p0].transpose(1, 2))
    g_pat = torch.relu(torch.einsum("bid,bnd,bnm->bim", xh, xh[:, p0:], r))
    g = torch.cat([g_pre, g_pat], dim=-1)
    return g / g.sum(-1, keepdim=True).clamp_min(1e-6)


def test_opt_einsum_is_available():
    assert torch.backends.opt_einsum.is_available()
    assert torch.backends.opt_einsum.get_opt_einsum() is opt_einsum


# n < d: (X^ X^T) R is cheaper; n > d: X^ (X^T R) is cheaper (opt_einsum picks a different order)
@pytest.mark.parametrize("n, d", [(9, 16), (36, 4)])
@pytest.mark.parametrize("setting", [(False, "auto"), (True, "auto"), (True, "greedy"), (True, "optimal")])
def test_three_operand_einsum_same_with_and_without_opt_einsum(restore_opt_einsum, n, d, setting):
    gen = torch.Generator().manual_seed(n)
    b, p0 = 2, 1
    tokens = torch.randn(b, p0 + n, d, generator=gen, dtype=torch.float64)
    r = torch.rand(b, n, n, generator=gen, dtype=torch.float64)
    r = (r + r.transpose(1, 2)) / 2
    want = hybrid_attention(tokens, torch.zeros(b, p0 + n, p0 + n, dtype=torch.float64), r,
                            num_prefix_tokens=p0, alpha=1.0)
    torch.backends.opt_einsum.enabled, torch.backends.opt_einsum.strategy = setting
    got = _hfa_einsum(tokens, r, p0)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert (want[:, :, p0:] > 0).any() and (want[:, :, p0:] == 0).any()  # relu active both ways


def test_opt_einsum_orders_the_hfa_product_by_shape():
    """The two regimes really differ: opt_einsum's optimal first pair flips with n vs d."""
    def first_pair(n: int, d: int, rows: int) -> tuple[int, ...]:
        shapes = [(2, rows, d), (2, n, d), (2, n, n)]
        path, _ = opt_einsum.contract_path("bid,bnd,bnm->bim", *shapes, shapes=True, optimize="optimal")
        return tuple(path[0])

    assert first_pair(n=196, d=384, rows=20) == (0, 1)  # (X^_rows X^T) first
    assert first_pair(n=1024, d=64, rows=1024) == (1, 2)  # (X^T R) first
