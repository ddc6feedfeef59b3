"""Write a PNG grid of SyntheticScenes images with their ground-truth mask overlays.

Each sample shows the image, then the image with the mask overlaid in the dataset palette
(the colour of each class's discriminative part). Needs the ``viz`` extra (matplotlib).

    python examples/show_synthetic.py --out docs/synthetic_scenes.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from wsss_blocks.data import SyntheticScenes, collate
from wsss_blocks.viz import save_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/synthetic_scenes.png"))
    p.add_argument("--num", type=int, default=12, help="number of scenes")
    p.add_argument("--ncols", type=int, default=4, help="scenes per row")
    p.add_argument("--image-size", type=int, nargs="+", default=[64], help="H [W]")
    p.add_argument("--split", choices=["train", "val"], default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=3, help="integer upscaling of each tile")
    p.add_argument("--opacity", type=float, default=0.6, help="mask opacity")
    args = p.parse_args()

    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size[:2])
    ds = SyntheticScenes(split=args.split, length=args.num, image_size=size, seed=args.seed)
    batch = collate([ds[i] for i in range(args.num)])
    save_grid(args.out, batch["image"], masks=batch["mask"], ncols=args.ncols, palette=ds.palette,
              scale=args.scale, opacity=args.opacity)
    names = ", ".join(f"{k}: {', '.join(ds.class_names[c] for c in v)}" for k, v in ds.superclasses.items())
    print(f"wrote {args.out} ({args.num} scenes, {ds.num_classes} classes; groups {names})")
    print(f"labels per image: {batch['labels'].sum(1).tolist()}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
