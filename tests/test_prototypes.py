"""Tests for wsss_blocks.prototypes: kmeans and ClassBank."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from _runtime_helpers import no_host_sync, run_gloo

from wsss_blocks import ShapeError
from wsss_blocks.prototypes import ClassBank, kmeans

# ----------------------------------------------------------------------------- helpers


def blobs(g: int, k: int, per: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated blobs: centres on a far-apart lattice, tiny spread. Returns x, labels."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(g, k, d, generator=gen) + 20.0 * torch.arange(k).view(1, k, 1)
    x = means[:, :, None, :] + 0.1 * torch.randn(g, k, per, d, generator=gen)
    perm = torch.randperm(k * per, generator=gen)
    x = x.reshape(g, k * per, d)[:, perm]
    lab = torch.arange(k).repeat_interleave(per)[perm]
    return x, lab


def lloyd_oracle(x: torch.Tensor, valid: torch.Tensor, init: torch.Tensor, iters: int):
    """Per-group loop reference of Lloyd steps from given initial centres."""
    out = init.clone().double()
    xd = x.double()
    g, n, _ = x.shape
    k = init.shape[1]
    for gi in range(g):
        c = out[gi].clone()
        for _ in range(iters):
            sums = torch.zeros_like(c)
            cnt = [0] * k
            for i in range(n):
                if not valid[gi, i]:
                    continue
                dists = [float(((xd[gi, i] - c[j]) ** 2).sum()) for j in range(k)]
                j = min(range(k), key=lambda jj: (dists[jj], jj))
                sums[j] += xd[gi, i]
                cnt[j] += 1
            for j in range(k):
                if cnt[j] > 0:
                    c[j] = sums[j] / cnt[j]
        out[gi] = c
    return out


def kmeanspp_oracle(x: torch.Tensor, valid: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Loop reference of the seeded k-means++ picks (same random stream as the package).

    Pick ``j`` of group ``g`` is the first point whose running weight sum exceeds
    ``u[j, g] * total`` (weights: 1 for valid points at the first pick or when every weight
    is 0, else the squared distance to the nearest pick so far, in fp64 by differences).
    """
    g, n, _ = x.shape
    gen = torch.Generator(device=x.device).manual_seed(seed)
    draws = torch.rand((k, g, 1), dtype=x.dtype, generator=gen)
    picks = torch.zeros(g, k, dtype=torch.long)
    for gi in range(g):
        chosen: list[int] = []
        for j in range(k):
            if not chosen:
                w = [1.0 if valid[gi, i] else 0.0 for i in range(n)]
            else:
                w = []
                for i in range(n):
                    if not valid[gi, i]:
                        w.append(0.0)
                        continue
                    w.append(min(float(((x[gi, i].double() - x[gi, c].double()) ** 2).sum()) for c in chosen))
                if sum(w) == 0:
                    w = [1.0 if valid[gi, i] else 0.0 for i in range(n)]
            target = float(draws[j, gi, 0]) * sum(w)
            running = 0.0
            for i in range(n):
                running += w[i]
                if w[i] > 0 and running > target:
                    break
            chosen.append(i)
            picks[gi, j] = i
    return picks


# ----------------------------------------------------------------------------- kmeans


def test_kmeans_shapes_dtype_nograd():
    x = torch.randn(4, 12, 5, requires_grad=True)
    c, ok = kmeans(x, 3, num_iters=2)
    assert c.shape == (4, 3, 5) and c.dtype == torch.float32
    assert ok.shape == (4, 3) and ok.dtype == torch.bool and bool(ok.all())
    assert c.requires_grad is False
    assert c.device == x.device


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_recovers_separated_blobs(seed):
    x, lab = blobs(3, 3, 15, 4, seed)
    c, ok = kmeans(x, 3, num_iters=10, seed=seed)
    assert bool(ok.all())
    for gi in range(3):
        ref = torch.stack([x[gi, lab == j].mean(0) for j in range(3)])
        got = c[gi][c[gi, :, 0].argsort()]
        ref = ref[ref[:, 0].argsort()]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_kmeans_init_matches_kmeanspp_oracle():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 2, generator=gen)
    valid = torch.rand(3, 9, generator=gen) > 0.3
    valid[:, :5] = True  # at least 5 > k valid points per group
    x[1, 3] = x[1, 4]  # duplicate points
    k = 4
    init, ok = kmeans(x, k, point_valid=valid, num_iters=0, seed=7)
    picks = kmeanspp_oracle(x, valid, k, seed=7)
    ref = torch.stack([x[gi, picks[gi]] for gi in range(3)])
    torch.testing.assert_close(init, ref, atol=0, rtol=0)
    assert bool(ok.all())
    for gi in range(3):  # picks are valid, distinct points
        assert all(bool(valid[gi, p]) for p in picks[gi])
        assert len(set(picks[gi].tolist())) == k


def test_kmeans_pp_all_identical_points_falls_back():
    x = torch.ones(2, 6, 3)
    c, ok = kmeans(x, 3, num_iters=3)
    torch.testing.assert_close(c, torch.ones(2, 3, 3))
    assert bool(ok.all())


@pytest.mark.parametrize("iters", [1, 3, 7])
def test_kmeans_lloyd_matches_loop_oracle(iters):
    gen = torch.Generator().manual_seed(iters)
    x = torch.randn(3, 20, 3, generator=gen)
    valid = torch.rand(3, 20, generator=gen) > 0.25
    valid[:, :6] = True
    init, _ = kmeans(x, 4, point_valid=valid, num_iters=0, seed=3)
    got, ok = kmeans(x, 4, point_valid=valid, num_iters=iters, seed=3)
    ref = lloyd_oracle(x, valid, init, iters)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    assert bool(ok.all())


def test_kmeans_empty_cluster_keeps_centre():
    # only 3 distinct values and k=4: the 4th k-means++ pick falls back to a duplicate point;
    # its cluster is empty (ties go to the lower index) and must keep its centre.
    x = torch.tensor([[[0.0], [0.0], [5.0], [5.0], [9.0]]])
    init, _ = kmeans(x, 4, num_iters=0, seed=0)
    got, ok = kmeans(x, 4, num_iters=2, seed=0)
    ref = lloyd_oracle(x, torch.ones(1, 5, dtype=torch.bool), init, 2)
    torch.testing.assert_close(got.double(), ref)
    assert bool(ok.all())
    # 3 distinct values, 4 centres: one centre is a duplicate whose cluster is empty
    # (ties go to the lower index) and it kept its (non-zero) value
    assert len(set(got.flatten().tolist())) == 3
    assert torch.equal(got, init)


def test_kmeans_few_points_and_empty_rows():
    x = torch.randn(3, 8, 2)
    valid = torch.zeros(3, 8, dtype=torch.bool)
    valid[0, [1, 6]] = True  # n=2 < k
    valid[2] = True  # n=8 > k
    valid[2, 0] = False
    c, ok = kmeans(x, 3, point_valid=valid, num_iters=4)
    torch.testing.assert_close(c[0, :2], x[0, [1, 6]], atol=0, rtol=0)
    assert c[0, 2].abs().sum() == 0
    assert ok[0].tolist() == [True, True, False]
    assert c[1].abs().sum() == 0 and not bool(ok[1].any())
    assert bool(ok[2].all())
    assert torch.isfinite(c).all()


def test_kmeans_n_equals_k_returns_slot_order():
    x = torch.randn(2, 5, 3)
    valid = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    c, ok = kmeans(x, 3, point_valid=valid)
    torch.testing.assert_close(c[0], x[0, [0, 2, 3]], atol=0, rtol=0)
    torch.testing.assert_close(c[1], x[1, [0, 1, 2]], atol=0, rtol=0)
    assert bool(ok.all())


def test_kmeans_edge_sizes():
    c, ok = kmeans(torch.zeros(2, 0, 3), 4)
    assert c.shape == (2, 4, 3) and not bool(ok.any())
    c, ok = kmeans(torch.zeros(0, 5, 3), 2)
    assert c.shape == (0, 2, 3) and ok.shape == (0, 2)
    x = torch.randn(2, 7, 3)
    c, ok = kmeans(x, 1, num_iters=3)  # k=1 -> the mean
    torch.testing.assert_close(c[:, 0], x.mean(1), atol=1e-6, rtol=0)


def test_kmeans_deterministic_and_seeded():
    x = torch.randn(4, 30, 6)
    valid = torch.rand(4, 30) > 0.2
    a = kmeans(x, 5, point_valid=valid, num_iters=6, seed=11)
    b = kmeans(x, 5, point_valid=valid, num_iters=6, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    i0 = kmeans(x, 5, point_valid=valid, num_iters=0, seed=11)[0]
    i1 = kmeans(x, 5, point_valid=valid, num_iters=0, seed=12)[0]
    assert not torch.equal(i0, i1)


def test_kmeans_invalid_points_never_influence():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 25, 4, generator=gen)
    valid = torch.rand(3, 25, generator=gen) > 0.4
    valid[:, :6] = True
    y = x.clone()
    y[~valid] = 1e6 * torch.randn(int((~valid).sum()), 4, generator=gen)
    a = kmeans(x, 4, point_valid=valid, num_iters=5)
    b = kmeans(y, 4, point_valid=valid, num_iters=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert b[0].abs().max() < 100


def test_kmeans_fp64_and_low_precision():
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    c, _ = kmeans(x, 3)
    assert c.dtype == torch.float64
    c16, _ = kmeans(x.to(torch.bfloat16), 3)
    assert c16.dtype == torch.float32


def test_kmeans_autocast_bf16():
    x, _ = blobs(2, 3, 10, 4, 0)
    ref = kmeans(x, 3, num_iters=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kmeans(x, 3, num_iters=5)
    assert got[0].dtype == torch.float32
    assert torch.equal(got[0], ref[0])


def test_kmeans_no_host_sync_cpu():
    x = torch.randn(3, 10, 4)
    valid = torch.rand(3, 10) > 0.5
    ref = kmeans(x, 3, point_valid=valid, num_iters=3)
    with no_host_sync():
        got = kmeans(x, 3, point_valid=valid, num_iters=3)
    assert torch.equal(ref[0], got[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kmeans_no_host_sync_cuda():
    x = torch.randn(3, 50, 8, device="cuda")
    valid = torch.rand(3, 50, device="cuda") > 0.5
    kmeans(x, 4, point_valid=valid, num_iters=2)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        c, ok = kmeans(x, 4, point_valid=valid, num_iters=3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert c.device.type == "cuda"


def test_kmeans_validation():
    with pytest.raises(ShapeError, match="x"):
        kmeans(torch.randn(5, 3), 2)
    with pytest.raises(ShapeError, match="x"):
        kmeans(torch.ones(2, 5, 3, dtype=torch.long), 2)
    with pytest.raises(ShapeError, match="valid"):
        kmeans(torch.randn(2, 5, 3), 2, point_valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="valid"):
        kmeans(torch.randn(2, 5, 3), 2, point_valid=torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(torch.randn(2, 5, 3), 0)
    with pytest.raises(ValueError, match="iters"):
        kmeans(torch.randn(2, 5, 3), 2, num_iters=-1)
    with pytest.raises(ValueError, match="seed"):
        kmeans(torch.randn(2, 5, 3), 2, seed=1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- ClassBank


class BankOracle:
    """Per-class ring buffer written one item at a time (plus a deque of the contents)."""

    def __init__(self, c: int, cap: int, dim: int):
        self.cap = cap
        self.mem = [[[0.0] * dim for _ in range(cap)] for _ in range(c)]
        self.ptr = [0] * c
        self.count = [0] * c
        self.fifo = [deque(maxlen=cap) for _ in range(c)]

    def update(self, items: torch.Tensor, valid: torch.Tensor):
        b, c, _ = items.shape
        for ci in range(c):
            for bi in range(b):
                if valid[bi, ci]:
                    v = items[bi, ci].tolist()
                    self.mem[ci][self.ptr[ci]] = v
                    self.ptr[ci] = (self.ptr[ci] + 1) % self.cap
                    self.count[ci] = min(self.count[ci] + 1, self.cap)
                    self.fifo[ci].append(v)

    def check(self, bank: ClassBank):
        assert bank.memory.tolist() == self.mem
        assert bank.ptr.tolist() == self.ptr
        assert bank.count.tolist() == self.count
        for ci, q in enumerate(self.fifo):  # oldest..newest order starting at ptr when full
            cnt = self.count[ci]
            start = self.ptr[ci] if cnt == self.cap else 0
            order = [(start + j) % self.cap for j in range(cnt)]
            assert [bank.memory[ci, s].tolist() for s in order] == list(q)


@pytest.mark.parametrize("cap", [1, 3, 4])
def test_classbank_matches_loop_oracle(cap):
    gen = torch.Generator().manual_seed(cap)
    c, dim = 3, 2
    bank = ClassBank(dim, c, capacity=cap)
    oracle = BankOracle(c, cap, dim)
    step = 0
    for b in [0, 1, 2, 5, 3, 7, 1, 4]:
        items = torch.randint(0, 1000, (b, c, dim), generator=gen).float() + 1000 * step
        valid = torch.rand(b, c, generator=gen) > 0.4
        if b == 7:
            valid[:, 0] = True  # > cap items of class 0 in one update
        bank.update(items, valid)
        oracle.update(items, valid)
        oracle.check(bank)
        step += 1
    filled = torch.arange(cap)[None] < torch.tensor(oracle.count)[:, None]
    assert torch.equal(bank.filled(), filled)


def test_classbank_five_rows_keep_last_three():
    bank = ClassBank(1, 2, capacity=3)
    items = torch.arange(10.0).view(5, 2, 1)
    valid = torch.zeros(5, 2, dtype=torch.bool)
    valid[:, 0] = True
    bank.update(items, valid)
    # items of class 0 are 0,2,4,6,8; ring written at slots 0,1,2,0,1 -> [6, 8, 4]
    assert bank.memory[0, :, 0].tolist() == [6.0, 8.0, 4.0]
    assert bank.ptr.tolist() == [2, 0] and bank.count.tolist() == [3, 0]
    assert bank.memory[1].abs().sum() == 0  # invalid rows never written


def test_classbank_state_dict_round_trip_and_reset():
    bank = ClassBank(2, 3, capacity=4)
    bank.update(torch.randn(6, 3, 2), torch.rand(6, 3) > 0.3)
    sd = bank.state_dict()
    assert set(sd) == {"memory", "ptr", "count"}
    other = ClassBank(2, 3, capacity=4)
    other.load_state_dict(sd)
    for k in sd:
        assert torch.equal(getattr(other, k), getattr(bank, k))
    items, valid = torch.randn(2, 3, 2), torch.ones(2, 3, dtype=torch.bool)
    bank.update(items, valid)
    other.update(items, valid)
    assert torch.equal(other.memory, bank.memory)
    bank.reset()
    assert bank.memory.abs().sum() == 0 and bank.ptr.sum() == 0 and bank.count.sum() == 0
    assert not bool(bank.filled().any())


def test_classbank_dtype_device_grad():
    bank = ClassBank(4, 2, capacity=3, dtype=torch.float64)
    assert bank.memory.dtype == torch.float64 and bank.ptr.dtype == torch.long
    items = torch.randn(2, 2, 4, requires_grad=True)
    bank.update(items, torch.ones(2, 2, dtype=torch.bool))
    assert bank.memory.requires_grad is False
    torch.testing.assert_close(bank.memory[:, :2].transpose(0, 1), items.detach().double())
    bank = ClassBank(4, 2, capacity=3)
    bank.update(torch.randn(2, 2, 4, dtype=torch.bfloat16), torch.ones(2, 2, dtype=torch.bool))
    assert bank.memory.dtype == torch.float32


def test_classbank_no_host_sync():
    bank = ClassBank(2, 3, capacity=4)
    items, valid = torch.randn(6, 3, 2), torch.rand(6, 3) > 0.3
    ref = ClassBank(2, 3, capacity=4)
    ref.update(items, valid)
    with no_host_sync():
        bank.update(items, valid)
    assert torch.equal(bank.memory, ref.memory)


def test_classbank_validation():
    bank = ClassBank(2, 3, capacity=4)
    with pytest.raises(ShapeError, match="items"):
        bank.update(torch.randn(2, 4, 2), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ShapeError, match="items"):
        bank.update(torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match="items"):
        bank.update(torch.ones(2, 3, 2, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match="valid"):
        bank.update(torch.randn(2, 3, 2), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match="valid"):
        bank.update(torch.randn(2, 3, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="capacity"):
        ClassBank(2, 3, capacity=0)
    with pytest.raises(ValueError, match="dtype"):
        ClassBank(2, 3, capacity=2, dtype=torch.long)
    assert "capacity=4" in repr(bank)


# ----------------------------------------------------------------------------- distributed


def _batches(rank: int):
    """Deterministic per-rank batches with unequal B (rank 0: 2,4; rank 1: 5,1)."""
    sizes = {0: [2, 4], 1: [5, 1]}[rank]
    out = []
    for step, b in enumerate(sizes):
        gen = torch.Generator().manual_seed(100 * rank + step)
        items = torch.randn(b, 3, 2, generator=gen)
        valid = torch.rand(b, 3, generator=gen) > 0.3
        out.append((items, valid))
    return out


def _rank_bank(rank: int) -> dict:
    bank = ClassBank(2, 3, capacity=4)
    for items, valid in _batches(rank):
        bank.update(items, valid)
    return bank.state_dict()


def test_classbank_distributed_gloo_two_ranks():
    sd0, sd1 = run_gloo(_rank_bank)
    ref = ClassBank(2, 3, capacity=4)
    b0, b1 = _batches(0), _batches(1)
    for (i0, v0), (i1, v1) in zip(b0, b1, strict=True):
        ref.update(torch.cat([i0, i1]), torch.cat([v0, v1]))
    for k in ("memory", "ptr", "count"):
        assert torch.equal(sd0[k], sd1[k])
        assert torch.equal(sd0[k], getattr(ref, k))
    assert int(ref.count.sum()) > 0


def test_kmeans_keeps_precision_under_a_large_shared_offset():
    """Two clusters 0.05 apart around 1000 stay apart in fp32 (matmul form cancellation)."""
    gen = torch.Generator().manual_seed(0)
    a = 1000.0 + 0.002 * torch.randn(1, 20, 3, generator=gen)
    b = a.clone()
    b[..., 0] += 0.05
    x = torch.cat([a, b], dim=1)
    centres, ok = kmeans(x, 2, num_iters=10)
    assert ok.all()
    gap = (centres[0, 0] - centres[0, 1]).abs()[0]
    assert gap.item() == pytest.approx(0.05, abs=0.005)
    ref, _ = kmeans(x.double(), 2, num_iters=10)
    torch.testing.assert_close(centres[0].sort(0).values.double(), ref[0].sort(0).values, atol=1e-3, rtol=0)
