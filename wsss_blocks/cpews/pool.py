"""CPEWS class-wise prototype pool (Contextual Prototype Module, paper eq. 4-6).

Also imports prototypes built elsewhere: ``PrototypePool.load_prototypes`` takes padded
tensors with validity masks, and ``prototypes_from_cpews_upload`` maps the file the
official CPEWS code saves (``clusters.pth``) to them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from wsss_blocks._distributed import all_gather_rows, broadcast_from_rank0, world_size
from wsss_blocks._validate import (
    Dims,
    ShapeError,
    check_bool,
    check_callable,
    check_int,
    check_labels,
    check_option,
    check_range,
    check_shape,
    checks_enabled,
)
from wsss_blocks.cam import valid_to_grid
from wsss_blocks.cpews.regions import region_embeddings
from wsss_blocks.cpews.tables import superclass_index
from wsss_blocks.prototypes import kmeans

__all__ = ["PrototypePool", "PoolPrototypes", "prototypes_from_cpews_upload"]


class PrototypePool(nn.Module):
    """Per-class positive and negative prototypes (CPEWS Contextual Prototype Module).

    Built in a pass over training data, streaming: ``update`` every batch, then
    ``finalize`` (or ``build`` for the whole loop); refresh by calling
    ``build`` again. The losses read ``pos``, ``pos_valid``, ``neg``, ``neg_valid``
    and ``suppression_mask``; they see the previous prototypes until ``finalize``.
    ``is_built`` says whether there is anything to read. Prototypes built elsewhere come
    in with ``load_prototypes`` (the official CPEWS file through
    ``prototypes_from_cpews_upload``).

    * **Positives**: the region embedding ``A_bc`` (``region_embeddings``) of every
      present class with a non-empty region goes into a per-class store of ``capacity``
      entries, a uniform sample without replacement of all seen (random keys from the
      pool's seeded generator; keeps all when ``capacity`` is large enough).
      ``finalize`` clusters each class's store with seeded k-means++
      (``wsss_blocks.prototypes.kmeans``, ``kmeans_iters`` Lloyd steps) into
      ``num_prototypes`` centres; a class with ``n < M`` entries gets ``n`` valid ones.
    * **Negatives**: for an absent class with a non-empty region, ``A_bc`` competes for
      the class's top-``M`` by score: ``"prob"`` (paper: the predicted probability,
      ``class_probs``, e.g. ``sigmoid(logits_final)``) or ``"cam_mean"`` (official: the
      mean of the raw CAM over valid tokens). The streamed top-``M`` is exact; no re-forward.
      The multi-hot label of each negative's source image is kept (``neg_labels``) for
      the superclass filter.

    * **A class without positive prototypes** (no valid ``pos``) is left out of PDL and SSL
      even when it is present. The official code differs for SSL: its positive distance is
      then a large constant, so every activated token of a present class without positives
      that has a kept negative is flagged and pushed down.

    State: persistent buffers ``pos``/``neg`` ``(K, M, D)``, ``pos_valid``/``neg_valid``/
    ``neg_scores`` ``(K, M)``, ``neg_labels`` ``(K, M, K)`` bool, ``neg_filter`` ``(K, M)``
    bool (negatives an imported superclass filter keeps; all True unless ``load_prototypes``
    got ``neg_keep``), ``superclass_of`` ``(K,)`` (-1 without a table) and ``built`` (set by
    ``finalize`` and ``load_prototypes``); the accumulation stores are non-persistent.
    Everything is fp32 and no-grad; ``.double()`` makes the state fp64, while ``.half()`` /
    ``.to(torch.bfloat16)`` (e.g. of a model holding the pool) leave it fp32. Inputs of any
    float dtype are cast to the state's dtype. Under ``torch.distributed`` every rank
    all-gathers the batch before updating and ``finalize`` broadcasts rank 0's result, so all
    ranks hold the same pool. Store memory is ``K * capacity * D * 4``
    bytes (126 MB for VOC at 2048 x 768).

    Args:
        in_dim: feature dimension ``D``.
        num_classes: ``K``.
        num_prototypes: ``M`` positive (and negative) prototypes per class.
        capacity: positive-store size per class.
        superclasses: ``"voc"``, ``"coco"``, a partition ``name -> classes`` or ``None``
            (no superclass filter).
        score: negative ranking, ``"prob"`` or ``"cam_mean"``.
        threshold: binarise the region weights (official: 0.1); ``None`` = soft.
        kmeans_iters: Lloyd steps.
        seed: seed of the store keys and of k-means.
        device: buffer device.

    Shape:
        - pos, neg: ``(K, M, D)``; pos_valid, neg_valid, neg_scores: ``(K, M)``
        - update: features ``(B, N, D)`` or ``(B, D, h, w)``, cams ``(B, K, h, w)``, labels
          ``(B, K)``

    Examples:
        >>> pool = PrototypePool(4, 2, num_prototypes=1, capacity=8)
        >>> cams = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])     # (1, 2, 1, 2)
        >>> feats = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
        >>> probs = torch.tensor([[0.9, 0.4]])
        >>> pool.update(feats, cams, torch.tensor([[1, 0]]), class_probs=probs)
        >>> pool.finalize()
        >>> pool.is_built, pool.pos_valid.tolist(), pool.neg_valid.tolist()
        (True, [[True], [False]], [[False], [True]])
    """

    pos: Tensor
    neg: Tensor
    pos_valid: Tensor
    neg_valid: Tensor
    neg_scores: Tensor
    neg_labels: Tensor
    neg_filter: Tensor
    superclass_of: Tensor
    built: Tensor
    _store: Tensor
    _store_keys: Tensor
    _seen: Tensor
    _stage: Tensor
    _stage_scores: Tensor
    _stage_labels: Tensor

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        num_prototypes: int = 10,
        capacity: int = 2048,
        superclasses: Literal["voc", "coco"] | Mapping[str, Sequence[int]] | None = None,
        score: Literal["prob", "cam_mean"] = "prob",
        threshold: float | None = None,
        kmeans_iters: int = 10,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        in_dim = check_int("in_dim", in_dim, low=1)
        num_classes = check_int("num_classes", num_classes, low=1)
        num_prototypes = check_int("num_prototypes", num_prototypes, low=1)
        capacity = check_int("capacity", capacity, low=1)
        kmeans_iters = check_int("kmeans_iters", kmeans_iters, low=0)
        if threshold is not None:
            check_range("threshold", threshold, 0.0, 1.0, high_inclusive=False)
        self.in_dim = d = in_dim
        self.num_classes = k = num_classes
        self.num_prototypes = m = num_prototypes
        self.capacity = c = capacity
        self.score = check_option("score", score, ("prob", "cam_mean"))
        self.threshold = threshold
        self.kmeans_iters = kmeans_iters
        self.seed = check_int("seed", seed)
        f32: dict[str, Any] = {"device": device, "dtype": torch.float32}
        b8: dict[str, Any] = {"device": device, "dtype": torch.bool}
        self.register_buffer("pos", torch.zeros(k, m, d, **f32))
        self.register_buffer("pos_valid", torch.zeros(k, m, **b8))
        self.register_buffer("neg", torch.zeros(k, m, d, **f32))
        self.register_buffer("neg_valid", torch.zeros(k, m, **b8))
        self.register_buffer("neg_scores", torch.full((k, m), float("-inf"), **f32))
        self.register_buffer("neg_labels", torch.zeros(k, m, k, **b8))
        self.register_buffer("neg_filter", torch.ones(k, m, **b8))
        self.register_buffer("superclass_of", superclass_index(superclasses, k, device=device))
        self.register_buffer("built", torch.zeros((), **b8))
        # accumulation state (non-persistent); the store has one scratch row at index C
        self.register_buffer("_store", torch.zeros(k, c + 1, d, **f32), persistent=False)
        self.register_buffer(
            "_store_keys", torch.full((k, c + 1), float("-inf"), **f32), persistent=False
        )
        self.register_buffer(
            "_seen", torch.zeros(k, device=device, dtype=torch.long), persistent=False
        )
        self.register_buffer("_stage", torch.zeros(k, m, d, **f32), persistent=False)
        self.register_buffer(
            "_stage_scores", torch.full((k, m), float("-inf"), **f32), persistent=False
        )
        self.register_buffer("_stage_labels", torch.zeros(k, m, k, **b8), persistent=False)
        # is_built, cached against the identity and version counter of the buffers it reads
        self._built_cache: tuple[tuple[tuple[int, int], ...], bool] | None = None
        self._generator: torch.Generator | None = None

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_classes={self.num_classes}, num_prototypes={self.num_prototypes},"
            f" capacity={self.capacity}, score={self.score!r}, threshold={self.threshold}"
        )

    # ------------------------------------------------------------------ state
    def _built_key(self) -> tuple[tuple[int, int], ...] | None:
        """Identity and version counter of the buffers ``is_built`` reads (``None``: untracked)."""
        try:
            return tuple((id(t), t._version) for t in (self.built, self.pos_valid, self.neg_valid))
        except RuntimeError:  # inference-mode tensors track no version: recompute every time
            return None

    def _cached_built(self) -> bool | None:
        key, cache = self._built_key(), self._built_cache
        if key is None or cache is None or cache[0] != key:
            return None
        return cache[1]

    @property
    def is_built(self) -> bool:
        """Whether the pool holds prototypes for the losses to read.

        ``True`` once ``finalize`` or ``load_prototypes`` has run (the persistent ``built``
        flag) or when any prototype is valid, so a pool loaded from a checkpoint or filled by
        hand counts.
        Read from the buffers once after they change (they are tracked by their version
        counters), so a training step that leaves the pool alone costs no device sync.

        Examples:
            >>> pool = PrototypePool(2, 1, num_prototypes=1)
            >>> pool.is_built
            False
            >>> _ = pool.pos_valid.fill_(True)    # prototypes filled by hand
            >>> pool.is_built
            True
        """
        cached = self._cached_built()
        if cached is not None:
            return cached
        # sync-ok: once after the pool's buffers change (finalize, load, a hand edit)
        value = bool(self.built | self.pos_valid.any() | self.neg_valid.any())
        key = self._built_key()
        self._built_cache = None if key is None else (key, value)
        return value

    @property
    def store(self) -> Tensor:
        """The positive store ``(K, capacity, D)`` (a view; see ``store_valid``)."""
        return self._store[:, : self.capacity]

    @property
    def store_valid(self) -> Tensor:
        """Which store entries are filled, ``(K, capacity)`` bool."""
        return self._store_keys[:, : self.capacity] > float("-inf")

    @property
    def seen(self) -> Tensor:
        """Positive candidates seen per class since the last reset, ``(K,)`` int64."""
        return self._seen

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        key = prefix + "neg_filter"
        missing_keys = args[2]
        if key not in state_dict and key in missing_keys:  # a pool saved before neg_filter existed
            missing_keys.remove(key)
            self.neg_filter.fill_(True)
        self._built_cache = None
        _ = self.is_built  # sync-ok: load time, so the first training step does not sync

    def _get_generator(self) -> torch.Generator:
        device = self._store.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def reset(self) -> None:
        """Clear the accumulation stores (not the prototypes) and re-seed the generator.

        Examples:
            >>> pool = PrototypePool(4, 2)
            >>> pool.reset(); int(pool.store_valid.sum())
            0
        """
        self._store.zero_()
        self._store_keys.fill_(float("-inf"))
        self._seen.zero_()
        self._stage.zero_()
        self._stage_scores.fill_(float("-inf"))
        self._stage_labels.zero_()
        self._generator = None

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self,
        features: Tensor,
        cams: Tensor,
        labels: Tensor,
        *,
        class_probs: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        """Add one batch to the stores (no gradient, no host sync outside DDP).

        The prototypes the losses read change only in ``finalize``.

        Args:
            features: tokens on the CAMs' grid (the final tokens in CPEWS).
            cams: raw CAMs of the final classifier.
            labels: multi-hot image labels.
            class_probs: per-class scores for ``score="prob"`` (required there), e.g.
                ``sigmoid(logits_final)``.
            valid: padding mask at any resolution.

        Shape:
            - features: ``(B, N, D)`` or ``(B, D, h, w)``; cams: ``(B, K, h, w)``
            - labels, class_probs: ``(B, K)``; valid: ``(B, H', W')`` bool

        Examples:
            >>> pool = PrototypePool(3, 2, score="cam_mean")
            >>> pool.update(torch.randn(2, 4, 3), torch.ones(2, 2, 2, 2),
            ...             torch.tensor([[1, 0], [1, 1]]))
            >>> pool.seen.tolist()
            [2, 1]
        """
        dims = Dims({"K": self.num_classes}, sources={"K": "the pool's num_classes"})
        check_shape("cams", cams, ["B", "K", "h", "w"], dims, dtype="float")
        check_labels("labels", labels, dims)
        if self.score == "prob":
            if class_probs is None:
                raise ValueError("class_probs: required when score='prob' (e.g. sigmoid(logits))")
            check_shape("class_probs", class_probs, ["B", "K"], dims, dtype="float")
        dev = self._store.device
        region, nonempty = region_embeddings(features, cams, threshold=self.threshold, valid=valid)
        if region.shape[-1] != self.in_dim:
            raise ShapeError(f"features: expected D={self.in_dim}, got shape {tuple(features.shape)}")
        if self.score == "prob":
            assert class_probs is not None
            score = class_probs.detach().float()
        else:
            raw = cams.detach().float().flatten(2)
            if valid is None:
                score = raw.mean(-1)
            else:
                keep = valid_to_grid(valid, (dims["h"], dims["w"])).flatten(1).float()
                score = (raw * keep[:, None]).sum(-1) / keep.sum(-1).clamp_min(1.0)[:, None]
        region = region.detach().to(dev, self._store.dtype)
        y = (labels != 0).to(dev)
        nonempty = nonempty.to(dev)
        score = score.to(dev, self._stage_scores.dtype)
        if world_size() > 1:
            region, nonempty, y, score, real = all_gather_rows(region, nonempty, y, score)
            # drop the padding rows so every rank applies exactly the single-process update
            # of the union batch (sync-ok: the collective has synchronised already)
            region, nonempty, y, score = region[real], nonempty[real], y[real], score[real]
        bsz = region.shape[0]
        if bsz == 0:
            return
        self._add_positives(region, y & nonempty)
        self._add_negatives(region, score, y, ~y & nonempty)

    def _add_positives(self, region: Tensor, take: Tensor) -> None:
        """Reservoir update of the per-class store: keep the top-C random keys."""
        k, c, d = self.num_classes, self.capacity, self.in_dim
        bsz = region.shape[0]
        u = torch.rand((bsz, k), generator=self._get_generator(), device=region.device)
        u = u.to(self._store_keys.dtype)
        new_keys = torch.where(take, u, torch.full_like(u, float("-inf"))).t()  # (K, B)
        all_keys = torch.cat([self._store_keys[:, :c], new_keys], dim=1)  # (K, C+B)
        drop = all_keys.topk(bsz, dim=1, largest=False).indices  # the B smallest go
        dropped = torch.zeros_like(all_keys, dtype=torch.bool).scatter_(1, drop, True)
        old_dropped, new_kept = dropped[:, :c], ~dropped[:, c:]
        # freed slots in ascending order; the r-th kept newcomer fills the r-th freed slot
        order = torch.sort((~old_dropped).to(torch.uint8), dim=1, stable=True).indices
        nfree = min(c, bsz)
        rank = (new_kept.long().cumsum(1) - 1).clamp(0, nfree - 1)
        dest = torch.where(new_kept, order[:, :nfree].gather(1, rank), torch.full_like(rank, c))
        self._store.scatter_(1, dest[:, :, None].expand(k, bsz, d), region.transpose(0, 1))
        self._store_keys.scatter_(1, dest, new_keys)
        self._seen += take.sum(0)

    def _add_negatives(self, region: Tensor, score: Tensor, y: Tensor, take: Tensor) -> None:
        """Exact streamed top-M per class by score (embedding, score, source labels)."""
        k, m = self.num_classes, self.num_prototypes
        bsz = region.shape[0]
        new_scores = torch.where(take, score, torch.full_like(score, float("-inf"))).t()
        all_scores = torch.cat([self._stage_scores, new_scores], dim=1)  # (K, M+B)
        all_feats = torch.cat([self._stage, region.transpose(0, 1)], dim=1)
        all_labels = torch.cat([self._stage_labels, y[None].expand(k, bsz, k)], dim=1)
        top, idx = all_scores.topk(m, dim=1)
        self._stage_scores.copy_(top)
        self._stage.copy_(all_feats.gather(1, idx[:, :, None].expand(k, m, self.in_dim)))
        self._stage_labels.copy_(all_labels.gather(1, idx[:, :, None].expand(k, m, k)))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PrototypePool:
        # Casts follow nn.Module, except that half / bf16 casts leave the state fp32: the
        # stores, the k-means and the streamed top-M scores need the precision.
        built = self._cached_built()
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buf.float()
        key = self._built_key()  # moves and casts keep the values: carry is_built over
        self._built_cache = None if built is None or key is None else (key, built)
        return self

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the stores into the prototype buffers, mark the pool built, then reset.

        Positives: seeded k-means of each class's store. Negatives: the streamed top-M.
        Under ``torch.distributed`` rank 0's result is broadcast. Warns when nothing was
        accumulated (the pool is then built but all-invalid).

        Examples:
            >>> pool = PrototypePool(3, 2)
            >>> import warnings
            >>> with warnings.catch_warnings():
            ...     warnings.simplefilter("ignore")
            ...     pool.finalize()
            >>> pool.is_built, bool(pool.pos_valid.any())
            (True, False)
        """
        centres, centre_valid = kmeans(
            self.store,
            self.num_prototypes,
            point_valid=self.store_valid,
            num_iters=self.kmeans_iters,
            seed=self.seed,
        )
        neg_valid = self._stage_scores > float("-inf")
        self.pos.copy_(centres)
        self.pos_valid.copy_(centre_valid)
        self.neg.copy_(self._stage.where(neg_valid[:, :, None], 0.0))
        self.neg_valid.copy_(neg_valid)
        self.neg_scores.copy_(self._stage_scores)
        self.neg_labels.copy_(self._stage_labels & neg_valid[:, :, None])
        self.neg_filter.fill_(True)
        self.built.fill_(True)
        broadcast_from_rank0(self.pos, self.pos_valid, self.neg, self.neg_valid, self.neg_scores,
                             self.neg_labels)
        key = self._built_key()
        self._built_cache = None if key is None else (key, True)  # built: no read needed
        if not bool(self.pos_valid.any() | self.neg_valid.any()):  # sync-ok: once per build
            warnings.warn(
                "PrototypePool.finalize: nothing was accumulated; all prototypes are invalid",
                stacklevel=2,
            )
        self.reset()

    @torch.no_grad()
    def build(self, model_fn: Callable[[Any], Mapping[str, Tensor]], loader: Iterable[Any]) -> None:
        """Reset, ``update`` with ``model_fn(batch)`` for every batch, ``finalize``.

        Runs under ``torch.no_grad()`` and never changes the model's train/eval mode (put
        it in the mode you want). ``model_fn(batch)`` returns ``update``'s keyword
        arguments (``features``, ``cams``, ``labels`` and optionally ``class_probs``,
        ``valid``); multi-scale features are its business.

        Examples:
            >>> pool = PrototypePool(3, 2, score="cam_mean", num_prototypes=1)
            >>> batches = [(torch.randn(1, 4, 3), torch.tensor([[1, 0]]))] * 2
            >>> fn = lambda b: {"features": b[0], "cams": torch.ones(1, 2, 2, 2), "labels": b[1]}
            >>> pool.build(fn, batches)
            >>> pool.pos_valid.tolist(), pool.neg_valid.tolist()
            ([[True], [False]], [[False], [True]])
        """
        check_callable("model_fn", model_fn)
        if not isinstance(loader, Iterable):
            raise TypeError(f"loader: expected an iterable of batches, got {type(loader).__name__}")
        self.reset()
        for batch in loader:
            kwargs = model_fn(batch)
            if not isinstance(kwargs, Mapping):
                raise TypeError(
                    f"model_fn: expected it to return update()'s keyword arguments as a mapping, got "
                    f"{type(kwargs).__name__}"
                )
            self.update(**kwargs)
        self.finalize()

    @torch.no_grad()
    def load_prototypes(
        self,
        pos: Tensor,
        pos_valid: Tensor,
        neg: Tensor,
        neg_valid: Tensor,
        neg_labels: Tensor | None = None,
        neg_keep: Tensor | None = None,
    ) -> None:
        """Replace the prototypes with ones built elsewhere; the pool is built afterwards.

        Layout (the pool's own): per class ``c``, up to ``M`` (``num_prototypes``) positive
        prototypes ``pos[c]`` with ``pos_valid[c]`` marking the real rows, the same for the
        negatives, padded with invalid rows (any values; they are zeroed). Fewer than ``M``
        slots are padded, more raise. Tensors are validated, copied and moved to the pool's
        device and dtype; ``neg_scores`` (unknown here) become 0 for valid negatives. The
        accumulation stores are left alone. ``is_built`` is True afterwards and the losses
        read the new prototypes at their next call. Under ``torch.distributed`` call it on
        every rank with the same tensors (nothing is broadcast).

        For SSL's superclass filter give either the source-image labels of the negatives
        (``neg_labels``; the pool's table then filters as after its own build) or a fixed
        ``neg_keep`` (negatives already filtered elsewhere, e.g. the official upload's
        ``neg_unshared``), or both (both filters apply). Without either, the table filter
        cannot drop any negative (only ``suppress_singletons=False`` can).

        Args:
            pos: positive prototypes.
            pos_valid: which ``pos`` rows are real.
            neg: negative prototypes.
            neg_valid: which ``neg`` rows are real.
            neg_labels: multi-hot labels of each negative's source image, or ``None``.
            neg_keep: negatives that SSL may use (a fixed superclass filter), or ``None``.

        Shape:
            - pos: ``(K, M_pos, D)``; pos_valid: ``(K, M_pos)``, ``M_pos <= M``
            - neg: ``(K, M_neg, D)``; neg_valid, neg_keep: ``(K, M_neg)``, ``M_neg <= M``;
              neg_labels: ``(K, M_neg, K)`` (bool, int or float in ``{0, 1}``)

        Examples:
            >>> pool = PrototypePool(2, 2, num_prototypes=3)
            >>> pos = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])             # one per class
            >>> neg = torch.tensor([[[0.0, 2.0], [0.0, 3.0]], [[2.0, 0.0], [9.0, 9.0]]])
            >>> pool.load_prototypes(pos, torch.ones(2, 1, dtype=torch.bool),
            ...                      neg, torch.tensor([[True, True], [True, False]]))
            >>> pool.is_built, pool.pos_valid.tolist(), pool.neg_valid.tolist()
            (True, [[True, False, False], [True, False, False]], [[True, True, False], [True, False, False]])
        """
        k, m, d = self.num_classes, self.num_prototypes, self.in_dim
        dims = Dims({"K": k, "D": d}, sources={"K": "the pool's num_classes", "D": "the pool's in_dim"})
        check_shape("pos", pos, ["K", "M_pos", "D"], dims, dtype="float")
        check_shape("pos_valid", pos_valid, ["K", "M_pos"], dims, dtype="bool")
        check_shape("neg", neg, ["K", "M_neg", "D"], dims, dtype="float")
        check_shape("neg_valid", neg_valid, ["K", "M_neg"], dims, dtype="bool")
        if neg_labels is not None:
            check_shape("neg_labels", neg_labels, ["K", "M_neg", "K"], dims, dtype="label")
            check_labels("neg_labels", neg_labels.flatten(0, 1), {"K": k})
        if neg_keep is not None:
            check_shape("neg_keep", neg_keep, ["K", "M_neg"], dims, dtype="bool")
        for name in ("M_pos", "M_neg"):
            if dims[name] > m:
                raise ShapeError(
                    f"{'pos' if name == 'M_pos' else 'neg'}: {dims[name]} prototypes per class, the pool holds "
                    f"num_prototypes={m}; build the pool with num_prototypes>={dims[name]}"
                )
        if checks_enabled() and pos.device.type == "cpu" and neg.device.type == "cpu":
            bad = [n for n, t, ok in (("pos", pos, pos_valid), ("neg", neg, neg_valid))
                   if not bool(torch.isfinite(t[ok]).all())]  # sync-ok: CPU tensors, import time
            if bad:
                raise ValueError(f"{bad[0]}: valid prototypes must be finite")

        def padded(x: Tensor, fill: Any) -> Tensor:
            out = torch.full((k, m, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
            out[:, : x.shape[1]] = x
            return out

        dev, dtype = self.pos.device, self.pos.dtype
        pv = padded(pos_valid, False).to(dev)
        nv = padded(neg_valid, False).to(dev)
        self.pos.copy_(padded(pos.detach(), 0.0).to(dev, dtype).where(pv[:, :, None], 0.0))
        self.pos_valid.copy_(pv)
        self.neg.copy_(padded(neg.detach(), 0.0).to(dev, dtype).where(nv[:, :, None], 0.0))
        self.neg_valid.copy_(nv)
        self.neg_scores.copy_(torch.zeros_like(self.neg_scores).masked_fill(~nv, float("-inf")))
        labels = torch.zeros_like(self.neg_labels) if neg_labels is None else padded(neg_labels != 0, False).to(dev)
        self.neg_labels.copy_(labels & nv[:, :, None])
        keep = torch.ones_like(self.neg_filter) if neg_keep is None else padded(neg_keep, False).to(dev)
        self.neg_filter.copy_(keep)
        self.built.fill_(True)
        key = self._built_key()
        self._built_cache = None if key is None else (key, True)

    # ------------------------------------------------------------------ use
    def suppression_mask(self, *, suppress_singletons: bool = True, source_share: float | None = None) -> Tensor:
        """Negatives that SSL may use for each class after the superclass filter.

        A negative of class ``c`` is dropped when its source image contains a class of
        ``c``'s superclass (e.g. a bus negative cut from an image with a train).
        ``suppress_singletons=False`` (official) also drops every negative of a class
        that is alone in its superclass (person is then never suppressed). Without a
        table (``superclasses=None``) all valid negatives are kept.

        ``source_share=s`` also learns the confusions from the pool itself: a class ``j``
        present in the source images of at least a share ``s`` of ``c``'s valid negatives is
        treated as sharing ``c``'s appearance (as if it were in ``c``'s superclass), and
        every negative of ``c`` whose source contains ``j`` is dropped. The top-``M``
        negatives of a class are the images that activate it most without it; when most of
        them contain one other class, ``c``'s CAM fires on that class's objects, i.e. the
        two look alike, whatever the table says (look-alike classes whose superclasses
        differ). ``None`` (the paper's filter): the table only.

        Negatives imported with a fixed filter (``load_prototypes(..., neg_keep=...)``,
        e.g. the official upload's unshared negatives) are kept only where that filter
        keeps them, on top of the rules above.

        Args:
            suppress_singletons: keep the negatives of singleton superclasses (paper).
            source_share: the share in ``(0, 1]`` that marks a learned confusion, or ``None``.

        Shape:
            - output: ``(K, M)`` bool

        Examples:
            >>> pool = PrototypePool(2, 3, num_prototypes=1, superclasses={"a": (0, 1), "b": (2,)})
            >>> _ = pool.neg_valid.fill_(True)
            >>> pool.neg_labels[0, 0] = torch.tensor([False, True, False])   # source had class 1
            >>> pool.suppression_mask().tolist(), pool.suppression_mask(suppress_singletons=False).tolist()
            ([[False], [True], [True]], [[False], [True], [False]])
            >>> pool.neg_labels[2, 0] = torch.tensor([True, False, False])   # class 2's from class 0
            >>> pool.suppression_mask().tolist(), pool.suppression_mask(source_share=0.5).tolist()
            ([[False], [True], [True]], [[False], [True], [False]])
        """
        suppress_singletons = check_bool("suppress_singletons", suppress_singletons)
        g = self.superclass_of
        grouped = g >= 0
        same = (g[:, None] == g[None, :]) & grouped[:, None]  # (K, K): j in c's group
        if source_share is not None:
            check_range("source_share", source_share, 0.0, 1.0, low_inclusive=False)
            src = self.neg_labels & self.neg_valid[:, :, None]  # (K, M, K)
            share = src.sum(1).float() / self.neg_valid.sum(1, keepdim=True).clamp_min(1).float()  # (K, K)
            same = same | (share >= source_share)
        shared = (self.neg_labels & same[:, None, :]).any(dim=-1)  # (K, M)
        keep = self.neg_valid & self.neg_filter & ~shared
        if not suppress_singletons:
            singleton = grouped & ((g[:, None] == g[None, :]) & grouped[:, None]).sum(dim=1).eq(1)
            keep = keep & ~singleton[:, None]
        return keep


class PoolPrototypes(NamedTuple):
    """Prototypes in the layout of ``PrototypePool.load_prototypes`` (unpack it into that call).

    Attributes:
        pos: positive prototypes ``(K, M, D)``, padded with zero rows.
        pos_valid: which ``pos`` rows are real ``(K, M)``.
        neg: negative prototypes ``(K, M, D)``, padded with zero rows.
        neg_valid: which ``neg`` rows are real ``(K, M)``.
        neg_labels: source-image labels of the negatives ``(K, M, K)``, or ``None`` (unknown).
        neg_keep: negatives SSL may use ``(K, M)`` (a fixed superclass filter), or ``None``.

    Examples:
        >>> t = PoolPrototypes(torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool),
        ...                    torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool), None, None)
        >>> pool = PrototypePool(4, 2, num_prototypes=1)
        >>> pool.load_prototypes(*t); pool.is_built
        True
    """

    pos: Tensor
    pos_valid: Tensor
    neg: Tensor
    neg_valid: Tensor
    neg_labels: Tensor | None
    neg_keep: Tensor | None


def _cpews_rows(name: str, rows: Any, k: int | None) -> list[Tensor]:
    """One ``(n_c, D)`` tensor per class (an empty tensor -> ``(0, D)`` later)."""
    if isinstance(rows, Tensor) or not isinstance(rows, Sequence):
        raise TypeError(f"clusters: {name}: expected a list of per-class tensors, got {type(rows).__name__}")
    if k is not None and len(rows) != k:
        raise ShapeError(f"clusters: {name}: {len(rows)} classes, 'pos' has {k}")
    out = []
    for c, t in enumerate(rows):
        if not isinstance(t, Tensor):
            raise TypeError(f"clusters: {name}[{c}]: expected a tensor, got {type(t).__name__}")
        if t.numel() and (t.dim() != 2 or not t.is_floating_point()):
            raise ShapeError(
                f"clusters: {name}[{c}]: expected a float (n, D) tensor or an empty one, got shape "
                f"{tuple(t.shape)}, dtype {t.dtype}"
            )
        out.append(t.detach().to("cpu"))
    return out


def prototypes_from_cpews_upload(
    clusters: Mapping[str, Any] | Sequence[Any],
    *,
    num_prototypes: int | None = None,
) -> PoolPrototypes:
    """Map the prototypes the official CPEWS code saves to ``PrototypePool.load_prototypes``'s layout.

    The official code builds its pool once before training and saves it with
    ``torch.save`` as ``clusters.pth``: a dict with three lists of ``K`` tensors, one per
    class (its builder returns the same three lists as a tuple):

    * ``"pos"``: the k-means centres of the class, ``(n_c, D)``, ``n_c <= 10``;
    * ``"neg"``: its negatives, ``(n_c, D)``: one mean feature per top-scoring image without
      the class; PDL compares against all of them;
    * ``"neg_unshared"``: the negatives that passed the superclass filter (no class of the
      same superclass in the source image, and a superclass of more than one class), the
      ones SSL uses; the same vectors as in ``"neg"``, in the same order.

    A class with nothing has an empty 1-D tensor. The source-image labels are not saved,
    so ``neg_labels`` is ``None`` and the superclass filter comes as ``neg_keep``: the
    ``"neg"`` rows that reappear in ``"neg_unshared"`` (matched in order, exactly). Tensors
    are moved to the CPU; ``load_prototypes`` moves them to the pool.

    Args:
        clusters: the loaded ``clusters.pth`` dict, or the ``(pos, neg, neg_unshared)`` tuple.
        num_prototypes: slots per class ``M`` (default: the largest count in the file).

    Returns:
        ``PoolPrototypes(pos, pos_valid, neg, neg_valid, None, neg_keep)``.

    Shape:
        - output: pos, neg ``(K, M, D)``; pos_valid, neg_valid, neg_keep ``(K, M)``

    Examples:
        >>> upload = {"pos": [torch.ones(2, 3), torch.Tensor([])],
        ...           "neg": [torch.zeros(1, 3), torch.eye(3)[:2]],
        ...           "neg_unshared": [torch.Tensor([]), torch.eye(3)[1:2]]}
        >>> p = prototypes_from_cpews_upload(upload)
        >>> p.pos.shape, p.pos_valid.tolist(), p.neg_keep.tolist()
        (torch.Size([2, 2, 3]), [[True, True], [False, False]], [[False, False], [False, True]])
        >>> pool = PrototypePool(3, 2, num_prototypes=10, superclasses=None)
        >>> pool.load_prototypes(*p)
        >>> pool.suppression_mask()[:, :2].tolist()
        [[False, False], [False, True]]
    """
    if isinstance(clusters, Mapping):
        missing = [key for key in ("pos", "neg") if key not in clusters]
        if missing:
            raise ValueError(
                f"clusters: expected the keys 'pos', 'neg' and 'neg_unshared' of the CPEWS file, "
                f"missing {missing} (keys: {sorted(map(str, clusters))})"
            )
        parts = [clusters["pos"], clusters["neg"], clusters.get("neg_unshared")]
    elif isinstance(clusters, Sequence) and not isinstance(clusters, (Tensor, str)) and len(clusters) in (2, 3):
        parts = [*clusters, None][:3]
    else:
        raise TypeError(
            f"clusters: expected the CPEWS clusters dict or a (pos, neg, neg_unshared) tuple, "
            f"got {type(clusters).__name__}"
        )
    pos_rows = _cpews_rows("pos", parts[0], None)
    k = len(pos_rows)
    if k == 0:
        raise ShapeError("clusters: pos: no classes")
    neg_rows = _cpews_rows("neg", parts[1], k)
    unshared = None if parts[2] is None else _cpews_rows("neg_unshared", parts[2], k)
    filled = [t for t in pos_rows + neg_rows if t.numel()]
    if not filled:
        raise ShapeError("clusters: every class is empty")
    d = filled[0].shape[1]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in filled) else torch.float32
    for name, rows in (("pos", pos_rows), ("neg", neg_rows), ("neg_unshared", unshared or [])):
        for c, t in enumerate(rows):
            if t.numel() and t.shape[1] != d:
                raise ShapeError(f"clusters: {name}[{c}]: D={t.shape[1]}, expected D={d} (as elsewhere in the file)")
    most = max(t.shape[0] if t.numel() else 0 for t in pos_rows + neg_rows)
    m = max(most, 1) if num_prototypes is None else check_int("num_prototypes", num_prototypes, low=1)
    if most > m:
        raise ShapeError(f"clusters: a class has {most} prototypes, num_prototypes={m}")

    def stack(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
        out = torch.zeros(k, m, d, dtype=dtype)
        ok = torch.zeros(k, m, dtype=torch.bool)
        for c, t in enumerate(rows):
            if t.numel():
                out[c, : t.shape[0]] = t.to(dtype)
                ok[c, : t.shape[0]] = True
        return out, ok

    pos, pos_valid = stack(pos_rows)
    neg, neg_valid = stack(neg_rows)
    neg_keep = None
    if unshared is not None:
        neg_keep = torch.zeros(k, m, dtype=torch.bool)
        for c, kept in enumerate(unshared):
            j, count = 0, int(neg_valid[c].sum())
            for r in range(kept.shape[0] if kept.numel() else 0):
                row = kept[r].to(dtype)
                while j < count and not torch.equal(neg[c, j], row):
                    j += 1
                if j == count:
                    raise ValueError(
                        f"clusters: neg_unshared[{c}]: row {r} is not among the rows of neg[{c}] (in order); "
                        "expected the unshared negatives to be a subset of the negatives"
                    )
                neg_keep[c, j] = True
                j += 1
    return PoolPrototypes(pos, pos_valid, neg, neg_valid, None, neg_keep)
