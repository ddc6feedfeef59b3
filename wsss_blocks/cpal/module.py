"""The ``CPAL`` module: projection head, prototype bank, recluster schedule, context buffers."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from wsss_blocks._distributed import broadcast_from_rank0
from wsss_blocks._utils import call_promoted
from wsss_blocks._validate import check_bool, check_int, check_option, check_range, check_shape
from wsss_blocks.cpal._common import check_threshold
from wsss_blocks.cpal.branch import CPALOutput, cpal_forward
from wsss_blocks.cpal.neighbors import SIMILARITIES, WEIGHTINGS, Similarity, Weighting
from wsss_blocks.cpal.prototypes import context_prototypes
from wsss_blocks.prototypes import ClassBank
from wsss_blocks.tokens import features_as_grid

__all__ = ["CPAL"]


class CPAL(nn.Module):
    """Context Prototype-Aware Learning (Tang et al., CVPR 2024) as a plug-in training branch.

    Projects the backbone features (``1x1 D->H, ReLU, 1x1 H->P``), pools per-image class
    prototypes from the CAM, banks them per class (a ``ClassBank``
    of ``capacity`` per class), clusters the bank into ``num_prototypes`` context prototypes
    per class on a schedule, and returns the prototype-aware CAM with the L1 self-supervised
    loss (``loss``, unweighted, also ``terms["self"]``; the paper's total is ``BCE + loss``).

    **State.** ``forward`` never changes the module. A training step calls
    ``update`` with the forward's ``prototypes`` and ``prototype_valid`` after computing
    the loss: it writes them to the bank and counts a step ``s``; ``recluster`` then runs
    when ``recluster_every`` divides ``s`` (use the epoch length: the paper reclusters once per
    epoch) and, with ``warmup_reclusters``, also at ``s = 1, 2, 4, 8, ...`` below
    ``recluster_every`` (any power of two when it is ``None``), so the loss starts after the
    first step instead of after the first epoch. With ``recluster_every=None`` and no warm-up
    the caller calls ``recluster`` itself. Extra forwards of the same step (multi-crop,
    gradient accumulation) simply do not call ``update``. Bank, context and counters
    (``num_steps``, ``num_reclusters``) are buffers, so a ``state_dict`` resume reproduces the
    run; the schedule reads Python mirrors and never waits on the device. ``is_built``
    says whether context prototypes exist; before that the loss is a graph-attached 0 and the
    first such forward warns (``warn_unbuilt=False`` silences it for a planned warm-up).
    ``reset`` empties everything.

    **Distributed.** Under an initialised ``torch.distributed`` with world size > 1
    ``update`` all-gathers the batch (rank order) and ``recluster`` broadcasts rank 0's
    context, so every rank holds identical state. Use equal per-rank batch sizes
    (``drop_last=True``).

    **Choices where the paper is silent**: ``temperature`` is the paper's gamma, a temperature
    inside the positiveness softmax (``None``: ``sqrt(proj_dim)``); the neighbour weights are
    the positiveness renormalised over the top-T (``weighting="uniform"`` is literal eq. 13);
    gradient reaches the backbone through the projected features unless ``detach_features``;
    a present channel without prototype or context adds 0 to the loss.

    Args:
        in_dim: ``D``, channels of the features.
        num_classes: ``K`` foreground classes (the module works on ``C = K + 1`` channels).
        projection: use the projection head (``False``: the features themselves, ``P = D``).
        hidden_dim: ``H`` (``None``: ``D``).
        proj_dim: ``P``.
        detach_features: project ``features.detach()`` (the loss does not train the backbone).
        threshold: CAM threshold of the instance prototypes.
        bg_threshold: CAM threshold of the background prototype (``None``: ``threshold``).
        capacity: ``L``, bank slots per class.
        num_prototypes: ``M``, context prototypes per class.
        top_k: ``T``, soft neighbours per anchor; ``1 <= T <= M <= L``.
        temperature: positiveness temperature (``None``: ``sqrt(P)``).
        similarity: positiveness similarity, ``"dot" | "cosine" | "l2" | "l1"``.
        weighting: ``"positiveness" | "uniform"``.
        align: feature-distribution alignment of the anchors.
        normalize_pacam: max-normalise the PACAM.
        detach_pacam: stop the gradient through the PACAM.
        recluster_every: recluster period in steps (``None``: only warm-up / manual).
        warmup_reclusters: also recluster at powers of two below the period.
        kmeans_iters: Lloyd steps per recluster.
        seed: k-means seed; recluster ``r`` uses ``seed + r``.
        warn_unbuilt: warn (once) when ``forward`` runs before any context exists.
        device: of the head's parameters and the state.
        dtype: of the head's parameters (``float64`` also gives an fp64 bank and context;
            anything else an fp32 one).

    Shape:
        - features: ``(B, D, h, w)`` (a CNN map) or ``(B, h*w, D)`` (a ViT's patch tokens, on
          the grid of ``norm_cams``); norm_cams: ``(B, K, h, w)`` in ``[0, 1]``; labels: ``(B, K)``
        - output ``pacam``, ``cams_with_bg``: ``(B, K+1, h, w)``; ``loss``: ``()``

    Examples:
        >>> cpal = CPAL(32, 3, proj_dim=16, capacity=8, num_prototypes=4, top_k=2, recluster_every=5,
        ...             warn_unbuilt=False)
        >>> feats = torch.randn(2, 32, 4, 6)                       # e.g. a CNN feature map
        >>> cams = torch.rand(2, 3, 4, 6)
        >>> labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
        >>> out = cpal(feats, cams, labels)
        >>> out.loss.item(), cpal.is_built                         # no context yet
        (0.0, False)
        >>> cpal.update(out.prototypes, out.prototype_valid)       # step 1: banked, reclustered
        >>> out = cpal(feats, cams, labels)
        >>> out.loss.backward()
        >>> cpal.update(out.prototypes, out.prototype_valid)
        >>> cpal.is_built, int(cpal.num_steps), int(cpal.num_reclusters)
        (True, 2, 2)

        A timm ViT's patch tokens go in as they are; the grid is the CAM's:

        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1)
        >>> tokens = vit.forward_features(torch.randn(2, 3, 64, 64))[:, vit.num_prefix_tokens:]
        >>> cpal = CPAL(vit.embed_dim, 3, proj_dim=16, capacity=8, num_prototypes=4, top_k=2,
        ...             warn_unbuilt=False)
        >>> cpal(tokens, torch.rand(2, 3, 4, 4), labels).pacam.shape
        torch.Size([2, 4, 4, 4])
    """

    context: Tensor
    context_valid: Tensor
    num_steps: Tensor
    num_reclusters: Tensor

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        projection: bool = True,
        hidden_dim: int | None = None,
        proj_dim: int = 256,
        detach_features: bool = False,
        threshold: float = 0.1,
        bg_threshold: float | None = None,
        capacity: int = 1000,
        num_prototypes: int = 50,
        top_k: int = 20,
        temperature: float | None = None,
        similarity: Similarity = "dot",
        weighting: Weighting = "positiveness",
        align: bool = True,
        normalize_pacam: bool = False,
        detach_pacam: bool = False,
        recluster_every: int | None = None,
        warmup_reclusters: bool = True,
        kmeans_iters: int = 20,
        seed: int = 0,
        warn_unbuilt: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_dim = check_int("in_dim", in_dim, low=1)
        self.num_classes = check_int("num_classes", num_classes, low=1)
        self.capacity = check_int("capacity", capacity, low=1)
        self.num_prototypes = check_int("num_prototypes", num_prototypes, low=1, high=self.capacity)
        self.top_k = check_int("top_k", top_k, low=1, high=self.num_prototypes)
        self.threshold = check_threshold("threshold", threshold)
        self.bg_threshold = None if bg_threshold is None else check_threshold("bg_threshold", bg_threshold)
        self.temperature = None if temperature is None else float(
            check_range("temperature", temperature, 0.0, low_inclusive=False))
        self.similarity = check_option("similarity", similarity, SIMILARITIES)
        self.weighting = check_option("weighting", weighting, WEIGHTINGS)
        self.recluster_every = None if recluster_every is None else check_int(
            "recluster_every", recluster_every, low=1)
        self.kmeans_iters = check_int("kmeans_iters", kmeans_iters, low=0)
        self.seed = check_int("seed", seed)
        self.warmup_reclusters = check_bool("warmup_reclusters", warmup_reclusters)
        self.detach_features = check_bool("detach_features", detach_features)
        self.align = check_bool("align", align)
        self.normalize_pacam = check_bool("normalize_pacam", normalize_pacam)
        self.detach_pacam = check_bool("detach_pacam", detach_pacam)
        self.warn_unbuilt = check_bool("warn_unbuilt", warn_unbuilt)

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if check_bool("projection", projection):
            hidden = self.in_dim if hidden_dim is None else check_int("hidden_dim", hidden_dim, low=1)
            self.proj_dim = check_int("proj_dim", proj_dim, low=1)
            self.head: nn.Module = nn.Sequential(
                nn.Conv2d(self.in_dim, hidden, 1, **factory),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, self.proj_dim, 1, **factory),
            )
        else:
            self.proj_dim = self.in_dim
            self.head = nn.Identity()
        state = torch.float64 if dtype == torch.float64 else torch.float32
        channels = self.num_classes + 1
        self.bank = ClassBank(self.proj_dim, channels, capacity=self.capacity, device=device, dtype=state)
        self.register_buffer("context", torch.zeros(channels, self.num_prototypes, self.proj_dim,
                                                    device=device, dtype=state))
        self.register_buffer("context_valid", torch.zeros(channels, self.num_prototypes, dtype=torch.bool,
                                                          device=device))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("num_reclusters", torch.zeros((), dtype=torch.long, device=device))
        # Python mirrors: the schedule and is_built never read the device on a training step
        self._steps = 0
        self._reclusters = 0
        self._built = False
        self._built_key = self._context_key()
        self._warned = False
        self.register_load_state_dict_post_hook(_refresh_mirrors)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, num_classes={self.num_classes}, proj_dim={self.proj_dim}, "
                f"capacity={self.capacity}, num_prototypes={self.num_prototypes}, top_k={self.top_k}, "
                f"similarity={self.similarity!r}, weighting={self.weighting!r}, "
                f"recluster_every={self.recluster_every}")

    # ------------------------------------------------------------------ state

    def _context_key(self) -> tuple[int, int] | None:
        """Identity and in-place version of ``context_valid`` (``None``: not trackable)."""
        try:
            return self.context_valid.data_ptr(), self.context_valid._version
        except RuntimeError:  # inference tensors track no version
            return None

    def _mark_built(self) -> None:
        self._built = bool(self.context_valid.any())  # sync-ok: recluster / load / changed state only
        self._built_key = self._context_key()

    @property
    def is_built(self) -> bool:
        """Whether context prototypes exist (any ``context_valid``), so the loss can be non-zero.

        Derived from the ``context_valid`` buffer: state loaded from a checkpoint or written
        by hand counts. The answer is cached and re-read from the device only when the buffer
        was replaced or changed in place, so a training step never waits on it.

        Examples:
            >>> cpal = CPAL(4, 1, projection=False, capacity=4, num_prototypes=2, top_k=1)
            >>> cpal.is_built
            False
            >>> cpal.context_valid[1, 0] = True
            >>> cpal.is_built
            True
        """
        key = self._context_key()
        if key is None or key != self._built_key:
            self._mark_built()
        return self._built

    def _due(self, step: int) -> bool:
        every = self.recluster_every
        if every is not None and step % every == 0:
            return True
        power_of_two = step & (step - 1) == 0
        return self.warmup_reclusters and power_of_two and (every is None or step < every)

    @torch.no_grad()
    def update(self, prototypes: Tensor, prototype_valid: Tensor) -> None:
        """Bank a step's prototypes, count the step, recluster when the schedule says so.

        Call it once per training step with ``forward``'s ``prototypes`` and
        ``prototype_valid``, after the loss is computed. Under multi-process
        ``torch.distributed`` the bank all-gathers the batch (rank order). No gradient; no
        host sync except under multi-process ``torch.distributed`` (the gather) and on
        recluster steps.

        Args:
            prototypes: the instance prototypes to bank (detached here).
            prototype_valid: which of them exist.

        Shape:
            - prototypes: ``(B, K+1, P)``; prototype_valid: ``(B, K+1)`` bool

        Examples:
            >>> cpal = CPAL(4, 1, projection=False, capacity=4, num_prototypes=2, top_k=1)
            >>> cpal.update(torch.randn(3, 2, 4), torch.tensor([[True, False]] * 3))
            >>> cpal.bank.count.tolist(), cpal.context_valid.tolist()
            ([3, 0], [[True, True], [False, False]])
        """
        dims = check_shape("prototypes", prototypes, ["B", self.num_classes + 1, self.proj_dim], dtype="float")
        check_shape("prototype_valid", prototype_valid, ["B", self.num_classes + 1], dims, dtype="bool")
        self.bank.update(prototypes.detach(), prototype_valid)
        self.num_steps.add_(1)
        self._steps += 1
        if self._due(self._steps):
            self.recluster()

    @torch.no_grad()
    def recluster(self) -> None:
        """Rebuild the context prototypes from the bank (k-means, seed ``seed + num_reclusters``).

        Under multi-process ``torch.distributed`` rank 0's result is broadcast.

        Examples:
            >>> cpal = CPAL(4, 1, projection=False, capacity=4, num_prototypes=2, top_k=1)
            >>> cpal.recluster()                   # empty bank: every context prototype invalid
            >>> cpal.is_built, int(cpal.num_reclusters)
            (False, 1)
        """
        context, valid = context_prototypes(self.bank.memory, self.bank.count, num_prototypes=self.num_prototypes,
                                            num_iters=self.kmeans_iters, seed=self.seed + self._reclusters)
        self.context.copy_(context)
        self.context_valid.copy_(valid)
        broadcast_from_rank0(self.context, self.context_valid)
        self.num_reclusters.add_(1)
        self._reclusters += 1
        self._mark_built()

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the bank and the context and restart the schedule (parameters are kept).

        Examples:
            >>> cpal = CPAL(4, 1, projection=False, capacity=4, num_prototypes=2, top_k=1)
            >>> cpal.update(torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.bool))
            >>> cpal.reset()
            >>> cpal.is_built, cpal.bank.count.tolist(), int(cpal.num_steps)
            (False, [0, 0], 0)
        """
        self.bank.reset()
        self.context.zero_()
        self.context_valid.zero_()
        self.num_steps.zero_()
        self.num_reclusters.zero_()
        self._steps = 0
        self._reclusters = 0
        self._built = False
        self._built_key = self._context_key()

    # ------------------------------------------------------------------ compute

    def project(self, features: Tensor, *, size: tuple[int, int] | None = None) -> Tensor:
        """The projected features (of ``features.detach()`` when ``detach_features``).

        Args:
            features: a feature map, or tokens with ``size``.
            size: the grid ``(h, w)`` of token input (a map brings its own; a ``size`` that
                disagrees with it is an error).

        Shape:
            - features: ``(B, D, h, w)``, or tokens ``(B, h*w, D)`` with ``size=(h, w)``
            - output: ``(B, P, h, w)``

        Raises:
            ShapeError: a wrong shape, or tokens without ``size``.

        Examples:
            >>> cpal = CPAL(8, 2, proj_dim=4, capacity=4, num_prototypes=2, top_k=1)
            >>> cpal.project(torch.randn(1, 8, 3, 5)).shape
            torch.Size([1, 4, 3, 5])
            >>> cpal.project(torch.randn(1, 15, 8), size=(3, 5)).shape
            torch.Size([1, 4, 3, 5])
        """
        features = features_as_grid("features", features, size, channels=self.in_dim, dtype="float")
        return call_promoted(self.head, features.detach() if self.detach_features else features)

    def forward(self, features: Tensor, norm_cams: Tensor, labels: Tensor) -> CPALOutput:
        """Project the features and compute the PACAM and the loss; changes no state.

        Bank the step with ``update`` (``out.prototypes``, ``out.prototype_valid``) after
        the loss. Before any context exists the loss is a graph-attached 0 (and the first such
        call warns unless ``warn_unbuilt=False``).

        Args:
            features: backbone features on the CAM grid: a map, or tokens (the grid is the
                CAM's).
            norm_cams: foreground CAMs in ``[0, 1]`` (not range-checked: that would sync).
            labels: multi-hot image labels.

        Returns:
            ``CPALOutput`` ``(pacam, cams_with_bg, prototypes,
            prototype_valid, active, loss, terms)``, as ``cpal_forward``. Tokens give exactly
            the result of their ``tokens_to_grid`` map.

        Shape:
            see the class docstring.

        Raises:
            ShapeError: a wrong shape, or features off the grid of ``norm_cams``.
        """
        dims = check_shape("norm_cams", norm_cams, ["B", self.num_classes, "h", "w"], dtype="float")
        features = features_as_grid(
            "features", features, (dims["h"], dims["w"]), dims, channels=self.in_dim, grid_source="norm_cams",
            dtype="float",
        )
        if self.warn_unbuilt and not self._warned and not self.is_built:
            warnings.warn(
                "CPAL: no context prototypes yet, the loss is 0 until the first recluster() "
                "(call update(...) after each training step; warn_unbuilt=False silences this)",
                stacklevel=4,  # the caller of the module (through nn.Module.__call__)
            )
            self._warned = True
        return cpal_forward(
            self.project(features), norm_cams, labels, self.context, self.context_valid,
            threshold=self.threshold, bg_threshold=self.bg_threshold, top_k=self.top_k,
            temperature=self.temperature, similarity=self.similarity, weighting=self.weighting,
            align=self.align, normalize_pacam=self.normalize_pacam, detach_pacam=self.detach_pacam,
        )


def _refresh_mirrors(module: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict post hook: re-read the Python mirrors of the state (one read at load)."""
    if isinstance(module, CPAL):
        module._steps = int(module.num_steps)  # sync-ok: once per load
        module._reclusters = int(module.num_reclusters)  # sync-ok: once per load
        module._mark_built()
