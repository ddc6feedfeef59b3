"""Prototype utilities shared by the prototype-based methods (CPAL, CPEWS).

* ``kmeans`` -- batched, seeded, sync-free k-means (k-means++ init + a fixed number
  of Lloyd steps) over groups of points, e.g. one group per class.
* ``ClassBank`` -- a per-class FIFO ring buffer of feature vectors kept in
  registered buffers (``state_dict`` round-trips it) and identical on every rank under
  ``torch.distributed``.

Both run on the tensors' device and never wait on it (no ``.item()``, no boolean-mask
indexing, no data-dependent Python branches), except ``ClassBank.update`` under a
multi-process ``torch.distributed`` run, which reads the per-rank batch sizes after a
collective that synchronises anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from wsss_blocks._distributed import all_gather_rows, world_size
from wsss_blocks._utils import no_autocast
from wsss_blocks._validate import Dims, check_bool, check_instance, check_int, check_shape

__all__ = ["KMeansOutput", "kmeans", "ClassBank"]


def _kmeans_pp_init(
    x: Tensor, xt: Tensor, valid: Tensor, k: int, generator: torch.Generator
) -> Tensor:
    """Seeded k-means++ picks, batched over groups. Returns indices ``(G, k)`` into ``N``.

    Takes the points ``x`` ``(G, N, D)`` and the same points transposed, ``xt`` ``(G, D, N)``:
    the per-pick matvec as a row vector times ``x^T`` streams memory in order (about 2x faster
    on CPU than ``x`` times a column vector). The first pick is uniform over the valid points;
    each later pick samples a valid point with probability proportional to its squared distance
    to the nearest pick so far, by inverse transform: the first point whose running weight sum
    exceeds ``u * total`` for ``u ~ U[0, 1)`` (all ``k x G`` uniforms are drawn at once). When
    every remaining weight is zero (all points coincide with picks) it falls back to uniform
    over the valid points. Rows without valid points return index ``N - 1`` (the caller
    discards them).
    """
    g, n, d = x.shape
    dtype, device = x.dtype, x.device
    validf = valid.to(dtype)
    valid_cdf = validf.cumsum(1)  # (G,N): the uniform fallback's running sum
    draws = torch.rand((k, g, 1), dtype=dtype, device=device, generator=generator)
    picks = x.new_zeros((g, k), dtype=torch.long)
    # squared distance to the nearest pick so far; invalid points hold 0 throughout, so the
    # running sum over it is the sampling weight of the valid points
    mind = torch.where(valid, float("inf"), 0.0).to(dtype)
    xx = torch.linalg.vector_norm(x, dim=2).square()  # (G,N), no (G,N,D) temporary
    tiny = 8.0 * torch.finfo(dtype).eps
    cdf = valid_cdf
    for j in range(k):
        total = cdf[:, -1:]  # (G,1)
        # u * total, kept strictly below total so that the search lands on a point of
        # positive weight (a zero-weight point repeats the previous running sum)
        target = torch.minimum(draws[j] * total, torch.nextafter(total, torch.zeros_like(total)))
        idx = torch.searchsorted(cdf, target, right=True).clamp_max(n - 1)  # (G,1)
        picks[:, j : j + 1] = idx
        if j + 1 == k:  # the last pick needs no distances
            break
        centre = x.gather(1, idx[:, :, None].expand(g, 1, d))  # (G,1,D)
        # matmul form ||x||^2 + ||c||^2 - 2 c.x (one matvec, no (G,N,D) temporary); values
        # within rounding of 0 are set to 0, so a pick and its duplicates get weight exactly
        # 0 and are never drawn again while other points remain
        base = xx + xx.gather(1, idx)  # (G,N)
        dist = torch.baddbmm(base[:, None, :], centre, xt, alpha=-2.0).squeeze(1)
        mind = torch.minimum(mind, dist.masked_fill_(dist <= tiny * base, 0.0))
        cdf = mind.cumsum(1)
        cdf = torch.where(cdf[:, -1:] > 0, cdf, valid_cdf)
    return picks


class KMeansOutput(NamedTuple):
    """Result of ``kmeans``.

    Attributes:
        centres: ``(G, k, D)`` cluster centres.
        centre_valid: ``(G, k)`` bool, which centres exist (a group with fewer than ``k``
            valid points has fewer).

    Examples:
        >>> out = kmeans(torch.tensor([[[0.0], [1.0]]]), 1)
        >>> out.centres.flatten().tolist(), out.centre_valid.tolist()
        ([0.5], [[True]])
    """

    centres: Tensor
    centre_valid: Tensor


@torch.no_grad()
def kmeans(
    points: Tensor,
    num_clusters: int,
    *,
    point_valid: Tensor | None = None,
    num_iters: int = 10,
    seed: int = 0,
) -> KMeansOutput:
    """Batched Euclidean k-means over groups of points (no gradient, no host sync).

    Every group (e.g. a class) is clustered independently but in one batched pass:

    1. **Init**: seeded k-means++ among the group's valid points, with a
       ``torch.Generator`` on ``points``' device seeded with ``seed`` (first centre uniform,
       then proportional to the squared distance to the nearest chosen centre).
    2. **Lloyd**: exactly ``num_iters`` steps, no early stop. Assignment by the matmul form
       ``||c||^2 - 2 x.c`` (``||x||^2`` is common to all centres of a point; ties go to the
       lower centre index); each centre becomes the mean of its members via a one-hot ``bmm``;
       an empty cluster keeps its centre. Invalid points never influence the centres.
    3. **Few points**: a group with ``n <= num_clusters`` valid points returns those ``n``
       points in slot order as its first ``n`` centres (valid) and zeros (invalid) for the
       rest; ``n = 0`` gives all-invalid zeros. (With ``n == num_clusters`` k-means would
       return the same points, just in another order.) When ``num_clusters >= N`` every group
       is such a group and the answer is known at once: no k-means runs, and the time is that
       of writing the ``(G, k, D)`` output (the output keeps ``k`` slots whatever ``N``, so
       ``k`` must fit in memory as ``G * k * D`` values).

    Note:
        Each group is clustered around its valid mean (subtracted before, added back
        after), so points that share a large offset (e.g. clusters 0.05 apart around
        1000) keep their fp32 precision in the matmul distance form.

    The computation runs in fp32 (fp64 when ``points`` is fp64) with autocast disabled. Same
    inputs, ``seed`` and device give identical output. It never raises on data values,
    only on bad shapes/arguments.

    Args:
        points: points, batched over groups.
        num_clusters: ``k >= 1``, centres per group.
        point_valid: which points take part; ``None`` means all.
        num_iters: number of Lloyd steps (``>= 0``).
        seed: seed of the k-means++ generator.

    Returns:
        ``KMeansOutput`` ``(centres, centre_valid)``: centres ``(G, k, D)`` and a bool
        mask ``(G, k)``.
        For a group with more than ``k`` valid points every centre is valid.

    Shape:
        - points: ``(G, N, D)`` floating.
        - point_valid: ``(G, N)`` bool.
        - centres: ``(G, k, D)`` fp32 (fp64 for fp64 input); centre_valid: ``(G, k)`` bool.

    Raises:
        ShapeError: wrong rank/shape/dtype of ``points`` or ``point_valid``.
        ValueError: ``num_clusters < 1``, ``num_iters < 0`` or a non-int ``seed``.

    Examples:
        >>> x = torch.tensor([[[0.0], [0.1], [10.0], [10.2]]])
        >>> c, ok = kmeans(x, 2, num_iters=5)
        >>> c.squeeze(-1).sort(dim=1).values
        tensor([[ 0.0500, 10.1000]])
        >>> ok
        tensor([[True, True]])
        >>> c, ok = kmeans(x, 3, point_valid=torch.tensor([[True, False, False, True]]))
        >>> c.squeeze(-1), ok
        (tensor([[ 0.0000, 10.2000,  0.0000]]), tensor([[ True,  True, False]]))
    """
    dims = check_shape("points", points, ["G", "N", "D"], dtype="float")
    valid = point_valid
    if valid is not None:
        check_shape("point_valid", valid, ["G", "N"], dims, dtype="bool")
    k = check_int("num_clusters", num_clusters, low=1)
    iters = check_int("num_iters", num_iters, low=0)
    seed = check_int("seed", seed)

    dtype = torch.float64 if points.dtype == torch.float64 else torch.float32
    g, n, d = points.shape
    device = points.device
    with no_autocast(device.type):
        x = points.to(dtype)
        if valid is None:
            valid = torch.ones((g, n), dtype=torch.bool, device=device)
        if n == 0:  # static shape, not data
            return KMeansOutput(x.new_zeros((g, k, d)), torch.zeros((g, k), dtype=torch.bool, device=device))

        # --- few-points path: valid points in slot order (scratch slot k drops the rest) ---
        rank = valid.long().cumsum(1) - 1  # (G,N)
        num = valid.sum(1)  # (G,)
        slot = torch.where(valid & (rank < k), rank, torch.full_like(rank, k))
        # index of the point in each slot (only the scratch slot k receives several), then
        # one gather of k rows instead of scattering all N rows of x
        source = torch.zeros((g, k + 1), dtype=torch.long, device=device)
        source.scatter_(1, slot, torch.arange(n, device=device).expand(g, n))
        small_valid = torch.arange(k, device=device)[None, :] < num[:, None]
        small = x.gather(1, source[:, :k, None].expand(g, k, d))
        small = torch.where(small_valid[:, :, None], small, torch.zeros_like(small))
        if k >= n:  # static shapes: every group has at most k valid points
            return KMeansOutput(small, small_valid)

        # --- k-means path, on points centred at their group's valid mean: the matmul
        # distance form cancels catastrophically when points share a large offset ---
        validf = valid.to(dtype)
        offset = torch.bmm(validf[:, None, :], x) / num.clamp_min(1)[:, None, None].to(dtype)
        raw, x = x, x - offset  # (G,N,D)
        # (G,D,N) layout for the matmuls that run over the points (seeding matvecs,
        # assignment), written by the centring subtraction itself
        xt = torch.sub(raw.transpose(1, 2), offset.transpose(1, 2), out=x.new_empty((g, d, n)))
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        picks = _kmeans_pp_init(x, xt, valid, k, generator)
        initial = raw.gather(1, picks[:, :, None].expand(g, k, d))  # (G,k,D), exact picks
        centres = initial - offset
        scratch = torch.full((g, n), k, dtype=torch.long, device=device)
        # buffers reused by every step (a fresh multi-MB tensor per step costs page faults)
        dist2 = x.new_empty((g, k, n))
        onehot_k1 = x.new_empty((g, k + 1, n))
        for _ in range(iters):
            cc = (centres * centres).sum(-1)[:, :, None]  # (G,k,1)
            # ||x||^2 is the same for every centre of a point: argmin needs ||c||^2 - 2 c.x;
            # (G,k,N) layout: a faster matmul on CPU and a min over k that runs along N
            torch.baddbmm(cc, centres, xt, alpha=-2.0, out=dist2)
            nearest = dist2.min(dim=1).indices  # (G,N), first index on ties
            member = torch.where(valid, nearest, scratch)  # invalid -> k
            # one-hot (G,k,N) written by a scatter (row k, the invalid points, is dropped),
            # then one bmm: deterministic on every device and well threaded (index_add_ is
            # serial over points on CPU and uses atomics on CUDA)
            onehot = onehot_k1.zero_().scatter_(1, member[:, None, :], 1.0)[:, :k]
            sums = torch.bmm(onehot, x)  # (G,k,D)
            counts = onehot.sum(2)  # (G,k)
            means = sums.div_(counts.clamp_min(1.0)[:, :, None])
            centres = torch.where(counts[:, :, None] > 0, means, centres)

        use_small = (num <= k)[:, None]
        centres = centres + offset if iters else initial
        out = torch.where(use_small[:, :, None], small, centres)
        out_valid = torch.where(use_small, small_valid, torch.ones_like(small_valid))
    return KMeansOutput(out, out_valid)


class ClassBank(nn.Module):
    """Per-class FIFO ring buffer of feature vectors (e.g. CPAL's prototype memory).

    Each class ``c`` owns ``capacity`` (``L``) slots. ``update`` appends the valid
    items of a batch, in batch order, at ``ptr[c]`` and advances ``ptr[c]`` modulo ``L``;
    once a class is full the oldest entries are overwritten. ``count[c] = min(seen, L)``.
    Because ``ptr`` starts at 0, slots ``[0, count[c])`` are exactly the filled ones, and
    when full the oldest entry sits at ``ptr[c]``. If one update brings more than ``L``
    items of a class, only its last ``L`` are kept (as if appended one by one).

    State lives in persistent buffers, so ``state_dict()`` / ``load_state_dict()``
    round-trip it: ``memory (C, L, D)``, ``ptr (C,)`` int64, ``count (C,)`` int64.

    Under an initialised ``torch.distributed`` with world size > 1, ``update``
    first all-gathers ``items`` and ``item_valid`` from every rank (ranks may have different
    batch sizes; they are padded to the largest) and applies the gathered batch in rank
    order, so every rank holds the same bank.

    Args:
        in_dim: ``D``, the width of the stored vectors.
        num_classes: ``C``, number of classes (rows).
        capacity: ``L``, slots per class.
        device: device of the buffers.
        dtype: floating dtype of ``memory`` (fp32 by default).

    Shape:
        - memory: ``(C, L, D)``; ptr, count: ``(C,)`` int64.

    Examples:
        >>> bank = ClassBank(1, 2, capacity=3)
        >>> items = torch.arange(8.0).view(4, 2, 1)
        >>> valid = torch.tensor([[True, False], [True, True], [True, False], [True, False]])
        >>> bank.update(items, valid)
        >>> bank.memory.squeeze(-1)
        tensor([[6., 2., 4.],
                [3., 0., 0.]])
        >>> bank.ptr, bank.count
        (tensor([1, 1]), tensor([3, 1]))
        >>> bank.filled()
        tensor([[ True,  True,  True],
                [ True, False, False]])
    """

    memory: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, low=1)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.capacity = check_int("capacity", capacity, low=1)
        check_instance("dtype", dtype, torch.dtype, "a torch.dtype")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        self.register_buffer(
            "memory", torch.zeros(num_classes, capacity, in_dim, device=device, dtype=dtype)
        )
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}, capacity={self.capacity}"

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the bank (zero memory, ``ptr`` and ``count``).

        Examples:
            >>> bank = ClassBank(1, 1, capacity=2)
            >>> bank.update(torch.ones(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))
            >>> bank.reset()
            >>> bank.count, bank.memory.sum()
            (tensor([0]), tensor(0.))
        """
        self.memory.zero_()
        self.ptr.zero_()
        self.count.zero_()

    def filled(self) -> Tensor:
        """Bool mask of filled slots, ``slot < count[c]``.

        Shape:
            - output: ``(C, L)`` bool.

        Examples:
            >>> ClassBank(4, 2, capacity=3).filled().shape
            torch.Size([2, 3])
        """
        slots = torch.arange(self.capacity, device=self.count.device)
        return slots[None, :] < self.count[:, None]

    @torch.no_grad()
    def update(self, items: Tensor, item_valid: Tensor, *, distributed: bool = True) -> None:
        """Append the valid items of a batch to their classes (no gradient, no host sync).

        For each class ``c``: with ``r`` the running index of the valid rows (cumsum over
        the batch) and ``n`` their number, valid rows with ``r >= n - L`` are written at
        slot ``(ptr[c] + r) % L``; then ``ptr[c] = (ptr[c] + n) % L`` and
        ``count[c] = min(count[c] + n, L)``. Invalid rows are never written. Rows that are
        not written are redirected to a write that is already happening (the class's last
        kept item, or its ``ptr`` slot rewritten with its own value), so one
        ``index_put_`` does the update without boolean indexing.

        Args:
            items: one candidate vector per (image, class); cast to the bank's dtype.
            item_valid: which candidates to store.
            distributed: all-gather across ranks first when ``torch.distributed`` is
                initialised with world size > 1 (set ``False`` if the caller already
                gathered).

        Shape:
            - items: ``(B, C, D)``; item_valid: ``(B, C)`` bool.

        Examples:
            >>> bank = ClassBank(1, 1, capacity=2)
            >>> bank.update(torch.arange(5.0).view(5, 1, 1), torch.ones(5, 1, dtype=torch.bool))
            >>> bank.memory.flatten().tolist(), bank.ptr.tolist(), bank.count.tolist()
            ([4.0, 3.0], [1], [2])
        """
        dims = Dims({"C": self.num_classes, "D": self.in_dim},
                    sources={"C": "the bank's num_classes", "D": "the bank's in_dim"})
        check_shape("items", items, ["B", "C", "D"], dims, dtype="float")
        check_shape("item_valid", item_valid, ["B", "C"], dims, dtype="bool")
        distributed = check_bool("distributed", distributed)
        items = items.detach().to(device=self.memory.device, dtype=self.memory.dtype)
        valid = item_valid.to(self.memory.device)
        if distributed and world_size() > 1:
            items, valid, real = all_gather_rows(items, valid)
            valid = valid & real[:, None]
        if items.shape[0] == 0:
            return
        cap = self.capacity
        ncls = self.num_classes
        rank = valid.long().cumsum(0) - 1  # (B,C)
        num = valid.sum(0)  # (C,)
        keep = valid & (rank >= (num - cap)[None, :])
        slot = (self.ptr[None, :] + rank) % cap  # (B,C)
        # default write per class: its last kept item (same slot & value as a real write),
        # or, when nothing is written, its ptr slot rewritten with its current value
        bidx = torch.arange(items.shape[0], device=items.device)[:, None]
        last_b = torch.where(valid, bidx, torch.full_like(bidx, -1)).amax(0)  # (C,)
        cls = torch.arange(ncls, device=items.device)
        has = num > 0
        last_item = items[last_b.clamp_min(0), cls]  # (C,dim)
        cur = self.memory[cls, self.ptr]  # (C,dim)
        def_slot = torch.where(has, (self.ptr + num - 1) % cap, self.ptr)
        def_val = torch.where(has[:, None], last_item, cur)
        dst = torch.where(keep, slot, def_slot[None, :])
        val = torch.where(keep[:, :, None], items, def_val[None])
        self.memory.index_put_((cls[None, :].expand_as(dst), dst), val)
        self.ptr.copy_((self.ptr + num) % cap)
        self.count.copy_(torch.clamp(self.count + num, max=cap))
