#!/usr/bin/env python
"""Why CPEWS's SSL collapses CAMs when shared appearance crosses the superclass table.

For the ``default`` synthetic scenes (superclass = body pair) and the ``crossed`` ones (partners
in different superclasses), train the cpews recipe (paper preset) up to the prototype-pool
build (step 60 of 200, the matrix's schedule), then on 128 validation scenes:

* classify every token SSL would suppress (with the superclass table alone, the paper's form, and
  with the learned confusions of ``suppression_mask(source_share=0.5)``) (``Phi``) by what it really is: the class's own
  discriminative part, its own body, another object, its own context texture, or other
  background (ground truth from :meth:`SyntheticScenes.scene`);
* the share of the class's own object tokens that pass the activation gate and land in ``Phi``;
* on one training batch, the gradient norm each term sends to the backbone and the heads
  (``train.grad_norms``) for SSL in the paper's form (raw CAM logits, mean over ``Phi``) and the
  alternatives (``cam_scale="max"``, ``denominator="gate"``), against the classification term.

Writes ``benchmarks/results/ssl_mechanism_cpu.json``. ~2 minutes on one CPU core.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train  # noqa: E402
from _config import parse_config  # noqa: E402
from _data import build_datasets, eval_loader  # noqa: E402
from recipes.base import LossTerm  # noqa: E402

from wsss_blocks.cam import normalize_cam, token_pseudo_labels  # noqa: E402
from wsss_blocks.cpews import ssl_loss  # noqa: E402
from wsss_blocks.cpews.ssl import _suppression_set  # noqa: E402
from wsss_blocks.data import collate  # noqa: E402

TINY = ["--model", "vit_tiny_patch16_224", "--patch-size", "8", "--depth", "4", "--embed-dim", "96",
        "--num-heads", "3", "--batch-size", "16", "--lr", "1e-3", "--warmup", "30", "--img-size", "64",
        "--cam-threshold", "0.3", "--eval-images", "128", "--eval-batch-size", "32", "--workers", "0",
        "--threads", "1", "--iterations", "200", "--eval-every", "200", "--stop-after", "60", "--recipe", "cpews",
        "--baseline", "off", "--device", "cpu", "--no-plots", "--no-progress", "--quiet"]
SCENES = {"default": [], "crossed": ["--scene", "num_classes=8", "--scene", "superclass_layout=crossed",
                                     "--scene", "context_alone=0.3"],
          "k12": ["--scene", "num_classes=12", "--scene", "group_size=3", "--scene", "co_occurrence=0.95",
                  "--scene", "context_alone=0.2"]}
CATEGORIES = ("own_part", "own_body", "other_object", "own_context", "other_background")
VARIANTS = {"paper form (raw CAM logits, mean over Phi)": {}, "cam_scale=max": {"cam_scale": "max"},
            "denominator=gate": {"denominator": "gate"}, "max + gate": {"cam_scale": "max", "denominator": "gate"}}


def _token_majority(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, H, W)`` int -> ``(B, N)`` the most frequent value in each patch."""
    b, h, w = x.shape
    t = x.reshape(b, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).reshape(b, -1, patch * patch)
    return t.mode(-1).values


def analyse(name: str, extra: list[str], tmp: Path, seed: int) -> dict[str, Any]:
    out = tmp / f"{name}_{seed}"
    argv = [*TINY, *extra, "--seed", str(seed), "--output", str(out)]
    train.main(argv)
    cfg = parse_config(argv)
    _, val_ds, info = build_datasets(cfg)
    net, _ = train._build_net(cfg, info)
    net.load_state_dict(torch.load(out / "last.pt", weights_only=False)["model"])
    net.eval()
    recipe, backbone, pool = net.recipe, net.backbone, net.recipe.pool
    assert pool.is_built
    filters = {"superclass table (paper)": None, "table + learned confusions (source_share=0.5)": 0.5}
    counts = {f: torch.zeros(len(CATEGORIES)) for f in filters}
    own_obj_gate = dict.fromkeys(filters, 0.0)
    own_obj_phi = dict.fromkeys(filters, 0.0)
    k, patch = info["num_classes"], 8
    for batch, fname in ((b, f) for b in eval_loader(val_ds, 128, 32, rank=0, world=1) for f in filters):
        with torch.no_grad():
            taps, o = recipe._heads(backbone, batch["image"])
        labels = batch["labels"]
        keep = pool.suppression_mask(suppress_singletons=True, source_share=filters[fname])
        phi, gate = _suppression_set(taps.final, o.cams_final.float(), labels != 0, None, pool.pos, pool.pos_valid,
                                     pool.neg, keep, 0.1, None)
        scenes = [val_ds.scene(int(i)) for i in batch["index"]]
        mask = _token_majority(batch["mask"], patch)  # (B, N): 0 bg, c+1
        part = _token_majority(torch.stack([torch.from_numpy(s["part"]).long() for s in scenes]), patch)
        ctx = _token_majority(torch.stack([torch.from_numpy(s["context_map"]) for s in scenes]), patch)
        cls = torch.arange(k)[None, :, None]  # (1, K, 1)
        own = mask[:, None] == cls + 1  # (B, K, N)
        cat = torch.full(phi.shape, 4)
        cat = torch.where((mask[:, None] == 0) & (ctx[:, None] == cls + 1), 3, cat)
        cat = torch.where((mask[:, None] > 0) & ~own, 2, cat)
        cat = torch.where(own & (part[:, None] == 0), 1, cat)
        cat = torch.where(own & (part[:, None] == 1), 0, cat)
        counts[fname] += torch.bincount(cat[phi], minlength=len(CATEGORIES)).float()
        own_obj_gate[fname] += float((gate & own).sum())
        own_obj_phi[fname] += float((phi & own).sum())
    # gradients on one training batch at the pool step
    train_ds, _, _ = build_datasets(cfg)
    batch = collate([train_ds.base[i] for i in range(16)])
    net.train()
    grads: dict[str, Any] = {}
    taps, o = recipe._heads(backbone, batch["image"])
    masks_mid = token_pseudo_labels(normalize_cam(o.cams_mid.detach().float()), batch["labels"], taps.size,
                                    low=0.25, high=0.7, valid=batch["valid"])
    terms = recipe.loss(logits_mid=o.logits_mid, logits_final=o.logits_final, features_final=taps.final,
                        cams_final=o.cams_final, masks_mid=masks_mid, labels=batch["labels"],
                        valid=batch["valid"]).terms
    groups = train._grad_groups(net)
    base = {"cls_final": LossTerm(1.0, terms["cls_final"]), "cls_mid": LossTerm(1.0, terms["cls_mid"])}
    for vname, kw in VARIANTS.items():
        value = ssl_loss(taps.final, o.cams_final, batch["labels"], pool.pos, pool.pos_valid, pool.neg,
                         pool.suppression_mask(suppress_singletons=True), act_threshold=0.1, **kw)
        g = train.grad_norms({**base, "ssl": LossTerm(0.2, value)}, groups)
        grads[vname] = {"ssl_value": float(value), **{key: float(v) for key, v in g.items()}}
    per_filter = {}
    for f in filters:
        total = float(counts[f].sum())
        per_filter[f] = {
            "kept_negatives_per_class": pool.suppression_mask(suppress_singletons=True,
                                                              source_share=filters[f]).sum(1).tolist(),
            "phi_tokens": total,
            "phi_share": {c: float(n) / max(total, 1.0) for c, n in zip(CATEGORIES, counts[f], strict=True)},
            "own_object_tokens_in_gate": own_obj_gate[f],
            "own_object_share_suppressed": own_obj_phi[f] / max(own_obj_gate[f], 1.0),
        }
    return {
        "suppression_set": per_filter,
        "grad_norms_at_pool_step (ssl weight 0.2)": grads,
        "superclasses": info["superclasses"],
    }


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="ssl_mech_"))
    seeds = [int(s) for s in os.environ.get("SSL_MECH_SEEDS", "0").split(",")]
    result = {name: {str(s): analyse(name, extra, tmp, s) for s in seeds} for name, extra in SCENES.items()}
    payload = {"what": __doc__.split("\n")[0], "steps": "cpews paper preset, pool built at step 60 of 200",
               "categories": CATEGORIES, "results": result, "torch": torch.__version__}
    path = ROOT / "benchmarks" / "results" / "ssl_mechanism_cpu.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
