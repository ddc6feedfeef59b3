"""Tests for wsss_blocks.data.voc.VOC and the shared transforms, on a miniature fake tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wsss_blocks import ShapeError
from wsss_blocks.constants import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES, VOC_PALETTE
from wsss_blocks.data import (
    VOC,
    EvalTransform,
    TrainTransform,
    collate,
    labels_from_mask,
    normalize,
)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# name -> (H, W, set of classes drawn as mask values v = class + 1)
FAKE = {
    "2007_000001": (30, 40, {1, 15}),
    "2007_000002": (36, 24, {7}),
    "2008_000003": (20, 20, {20}),
    "2011_000004": (28, 44, {3, 9}),
}
TRAIN, VAL, AUG = ["2007_000001", "2007_000002"], ["2008_000003"], list(FAKE)


def _mask(h: int, w: int, values: set[int]) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    for j, v in enumerate(sorted(values)):
        m[2 + 4 * j: 6 + 4 * j, 3: 3 + w // 2] = v
    m[-1, :] = 255  # object boundary / ignore
    return m


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth gradients (JPEG keeps them within a few grey levels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    chans = [np.minimum(yy * 2 + xx * 2 + 20 * seed + 30 * c + 10, 250) for c in range(3)]
    return np.stack(chans, -1).astype(np.uint8)


def make_voc(tmp: Path, *, aug: bool = True, seg: bool = True, lists: tuple = ("train", "val", "train_aug")) -> Path:
    base = tmp / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    if seg:
        (base / "SegmentationClass").mkdir()
    if aug:
        (base / "SegmentationClassAug").mkdir()
    for i, (name, (h, w, vals)) in enumerate(FAKE.items()):
        Image.fromarray(_image(h, w, i)).save(base / "JPEGImages" / f"{name}.jpg", quality=100, subsampling=0)
        m = _mask(h, w, vals)
        if seg and name in TRAIN + VAL:
            p = Image.fromarray(m, mode="P")
            p.putpalette(VOC_PALETTE.ravel().tolist())
            p.save(base / "SegmentationClass" / f"{name}.png")
        if aug:
            Image.fromarray(m, mode="L").save(base / "SegmentationClassAug" / f"{name}.png")
    for split, names in (("train", TRAIN), ("val", VAL), ("train_aug", AUG)):
        if split in lists:
            (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return tmp


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return make_voc(tmp_path)


def _expected_labels(name: str) -> list[float]:
    lab = [0.0] * 20
    for v in FAKE[name][2]:
        lab[v - 1] = 1.0
    return lab


@pytest.mark.parametrize("split, names", [("train", TRAIN), ("val", VAL), ("train_aug", AUG)])
def test_splits_items_labels(voc_root: Path, split: str, names: list[str]) -> None:
    ds = VOC(voc_root, split=split)
    assert ds.names == names and len(ds) == len(names)
    assert ds.num_classes == 20 and ds.class_names == VOC_CLASSES and ds.ignore_index == 255
    for i, name in enumerate(names):
        it = ds[i]
        h, w, _ = FAKE[name]
        assert it["name"] == name and it["index"] == i
        assert it["image"].shape == (3, h, w) and it["image"].dtype == torch.float32
        assert it["mask"].shape == (h, w) and it["mask"].dtype == torch.int64
        assert it["valid"].shape == (h, w) and bool(it["valid"].all())
        assert it["labels"].tolist() == _expected_labels(name)
        # mask values preserved (palette PNG or grey PNG), 255 kept
        assert torch.equal(it["mask"], torch.from_numpy(_mask(h, w, FAKE[name][2]).astype(np.int64)))
        # image = normalised pixels (JPEG is lossy: compare loosely to the source)
        raw = torch.from_numpy(_image(h, w, list(FAKE).index(name))).permute(2, 0, 1)
        assert (it["image"] - normalize(raw)).abs().mean() < 0.03


def test_mask_folder_choice(tmp_path: Path) -> None:
    root = make_voc(tmp_path)
    assert VOC(root, "train_aug").mask_dir.name == "SegmentationClassAug"
    assert VOC(root, "val").mask_dir.name == "SegmentationClass"
    assert repr(VOC(root, "val")).startswith("VOC(root=") and "split='val', n=1" in repr(VOC(root, "val"))
    # fallback: no SegmentationClass -> val reads the Aug folder
    root2 = make_voc(tmp_path / "b", seg=False)
    ds = VOC(root2, "val")
    assert ds.mask_dir.name == "SegmentationClassAug" and ds[0]["labels"][19] == 1


def test_mask_dir_keyword(voc_root: Path, tmp_path: Path) -> None:
    """mask_dir= reads a SegmentationClassAug-style folder from anywhere (e.g. pseudo masks)."""
    from PIL import Image

    from wsss_blocks.constants import VOC_PALETTE

    ds = VOC(voc_root, "train_aug")
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for i, name in enumerate(ds.names):
        h, w = ds[i]["mask"].shape
        arr = np.full((h, w), 255, np.uint8)
        arr[: h // 2] = 3  # class 2 in the top half, ignore below
        im = Image.fromarray(arr, mode="P")
        im.putpalette(VOC_PALETTE.tobytes())
        im.save(pseudo / f"{name}.png")
    alt = VOC(voc_root, "train_aug", mask_dir=pseudo)
    assert alt.mask_dir == pseudo and len(alt) == len(ds)
    item = alt[0]
    assert set(item["mask"].unique().tolist()) == {3, 255}
    assert item["labels"].nonzero().flatten().tolist() == [2]
    (pseudo / f"{ds.names[-1]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks \(mask_dir=.*1 of .* missing"):
        VOC(voc_root, "train_aug", mask_dir=pseudo)
    with pytest.raises(FileNotFoundError, match="mask_dir .* is not a folder"):
        VOC(voc_root, "train_aug", mask_dir=tmp_path / "nope")


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_root_variants(voc_root: Path, sub: str) -> None:
    assert len(VOC(voc_root / sub, "train")) == 2


def test_deeplab_list_and_split_file(voc_root: Path, tmp_path: Path) -> None:
    lst = tmp_path / "custom.txt"
    lst.write_text("/JPEGImages/2011_000004.jpg /SegmentationClassAug/2011_000004.png\n\n")
    ds = VOC(voc_root, "train_aug", split_file=lst)
    assert ds.names == ["2011_000004"]
    assert ds[0]["labels"].nonzero().flatten().tolist() == [2, 8]


@pytest.mark.parametrize("fmt", ["npy", "json_idx", "json_onehot"])
def test_label_file(voc_root: Path, tmp_path: Path, fmt: str) -> None:
    table = {n: np.eye(20, dtype=np.float32)[5] for n in AUG}  # everything is "bus"
    if fmt == "npy":
        path = tmp_path / "labels.npy"
        np.save(path, table, allow_pickle=True)
    else:
        path = tmp_path / "labels.json"
        body = {n: ([5] if fmt == "json_idx" else v.tolist()) for n, v in table.items()}
        path.write_text(json.dumps(body))
    ds = VOC(voc_root, "train_aug", label_file=path)
    assert ds[0]["labels"].nonzero().flatten().tolist() == [5]


def test_label_file_without_masks(tmp_path: Path) -> None:
    root = make_voc(tmp_path, aug=False, seg=False)
    path = tmp_path / "l.json"
    path.write_text(json.dumps({n: [0] for n in AUG}))
    ds = VOC(root, "train_aug", label_file=path)
    it = ds[1]
    assert bool((it["mask"] == 255).all()) and it["labels"][0] == 1


def test_label_file_missing_entry(voc_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    path.write_text(json.dumps({"2007_000001": [0]}))
    with pytest.raises(ValueError, match="no labels for 3 images"):
        VOC(voc_root, "train_aug", label_file=path)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VOC(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOC(tmp_path / "empty")
    root = make_voc(tmp_path / "nolist", lists=("train", "val"))
    with pytest.raises(FileNotFoundError, match="train_aug.txt"):
        VOC(root, "train_aug")
    root = make_voc(tmp_path / "nomask", aug=False, seg=False)
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
        VOC(root, "train_aug")
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        VOC(root, "val")
    with pytest.raises(ValueError, match="split"):
        VOC(root, "test")
    # train_aug falls back to SegmentationClass; a missing mask there names the Aug folder
    root = make_voc(tmp_path / "noaug", aug=False)  # SegmentationClass holds train + val only
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug is missing"):
        VOC(root, "train_aug")


def test_missing_image_and_bad_mask(voc_root: Path) -> None:
    base = voc_root / "VOCdevkit" / "VOC2012"
    # an RGB-coloured mask is rejected with the file name
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(base / "SegmentationClass" / "2007_000001.png")
    with pytest.raises(ValueError, match="2007_000001.png"):
        VOC(voc_root, "train")[0]
    # mask values beyond the classes
    Image.fromarray(np.full((36, 24), 30, np.uint8), mode="L").save(
        base / "SegmentationClassAug" / "2007_000002.png")
    with pytest.raises(ValueError, match="values must be"):
        VOC(voc_root, "train_aug")[1]
    (base / "JPEGImages" / "2008_000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000003.jpg"):
        VOC(voc_root, "val")


def test_train_transform_and_collate(voc_root: Path) -> None:
    t = TrainTransform(crop_size=48, scale_range=(0.5, 1.5), generator=torch.Generator().manual_seed(0))
    ds = VOC(voc_root, "train_aug", transform=t)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 48, 48)
    assert batch["mask"].shape == (4, 48, 48) and batch["valid"].shape == (4, 48, 48)
    assert batch["valid"].dtype == torch.bool and batch["labels"].shape == (4, 20)
    # every image is smaller than 48 -> padding exists; padding is ignore and zero image
    v = batch["valid"]
    assert (~v).any(dim=(1, 2)).all()
    assert (batch["mask"][~v] == 255).all()
    assert (batch["image"].permute(1, 0, 2, 3)[:, ~v] == 0).all()
    # labels stay image-level (from the full mask), not from the crop
    assert batch["labels"][0].tolist() == _expected_labels("2007_000001")


def _oracle_crop(img: torch.Tensor, msk: torch.Tensor, ch: int, cw: int, oy: int, ox: int,
                 cy: int, cx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel canvas: pixel (y, x) of the crop is canvas (cy + y, cx + x)."""
    h, w = msk.shape
    out_i = torch.zeros(3, ch, cw)
    out_m = torch.full((ch, cw), 255, dtype=torch.long)
    val = torch.zeros(ch, cw, dtype=torch.bool)
    for y in range(ch):
        for x in range(cw):
            sy, sx = cy + y - oy, cx + x - ox
            if 0 <= sy < h and 0 <= sx < w:
                out_i[:, y, x] = img[:, sy, sx]
                out_m[y, x] = msk[sy, sx]
                val[y, x] = True
    return out_i, out_m, val


@pytest.mark.parametrize("crop, size", [((16, 20), (30, 40)), ((40, 50), (30, 40)), ((24, 50), (30, 40))])
def test_crop_pad_oracle(crop: tuple[int, int], size: tuple[int, int]) -> None:
    """Scale 1, no flip: the crop equals a per-pixel canvas oracle with the same offsets."""
    h, w = size
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    msk = torch.randint(0, 21, (h, w))
    seed = 3
    t = TrainTransform(crop_size=crop, scale_range=(1.0, 1.0), hflip=0.0,
                       generator=torch.Generator().manual_seed(seed))
    out = t(img, msk)
    # replay the same draws: rand (scale), rand (flip), then 4 randints
    g = torch.Generator().manual_seed(seed)
    torch.rand((), generator=g)
    torch.rand((), generator=g)
    ch, cw = crop
    ph, pw = max(ch, h), max(cw, w)
    oy = int(torch.randint(0, ph - h + 1, (), generator=g))
    ox = int(torch.randint(0, pw - w + 1, (), generator=g))
    cy = int(torch.randint(0, ph - ch + 1, (), generator=g))
    cx = int(torch.randint(0, pw - cw + 1, (), generator=g))
    ref_i, ref_m, ref_v = _oracle_crop(normalize(img), msk, ch, cw, oy, ox, cy, cx)
    assert torch.equal(out["valid"], ref_v) and torch.equal(out["mask"], ref_m)
    torch.testing.assert_close(out["image"], ref_i, atol=1e-5, rtol=0)
    # valid area = visible part of the image
    assert int(out["valid"].sum()) == min(ch, h) * min(cw, w)


def test_flip_and_scale() -> None:
    img = torch.arange(2 * 3, dtype=torch.uint8).view(1, 2, 3).repeat(3, 1, 1)
    msk = torch.tensor([[0, 1, 2], [3, 4, 5]])
    out = TrainTransform(crop_size=(2, 3), scale_range=(1, 1), hflip=1.0)(img, msk)
    assert torch.equal(out["mask"], msk.flip(-1))
    torch.testing.assert_close(out["image"], normalize(img).flip(-1))
    # image, mask and valid move together (pixel value encodes the class), on a padded canvas
    coded = (msk * 40).to(torch.uint8)[None].repeat(3, 1, 1)
    outs = [TrainTransform(crop_size=(4, 5), scale_range=(1, 1), hflip=p,
                           generator=torch.Generator().manual_seed(3))(coded, msk) for p in (0.0, 1.0)]
    for o in outs:
        assert torch.equal(o["valid"], o["mask"] != 255) and int(o["valid"].sum()) == 6
        expect = normalize((o["mask"].clamp(max=5) * 40).to(torch.uint8)[None].repeat(3, 1, 1))
        torch.testing.assert_close(o["image"][:, o["valid"]], expect[:, o["valid"]])
        assert bool((o["image"][:, ~o["valid"]] == 0).all())  # padding = mean colour
    plain, flipped = outs
    assert torch.equal(plain["valid"], flipped["valid"])  # same draws, same placement
    ys, xs = plain["valid"].nonzero(as_tuple=True)
    box = (slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))
    assert torch.equal(plain["mask"][box], msk) and torch.equal(flipped["mask"][box], msk.flip(-1))
    torch.testing.assert_close(flipped["image"][(slice(None), *box)], normalize(coded).flip(-1))
    # rescale x2: mask nearest keeps the label set; long_side fixes the long side
    m = torch.zeros(10, 20, dtype=torch.long)
    m[:, 10:] = 7
    t = TrainTransform(crop_size=(40, 40), scale_range=(2, 2), hflip=0.0)
    out = t(torch.zeros(3, 10, 20, dtype=torch.uint8), m)
    assert int(out["valid"].sum()) == 20 * 40
    assert set(out["mask"].unique().tolist()) == {0, 7, 255}
    t = TrainTransform(crop_size=(64, 64), long_side=(32, 32), hflip=0.0)
    out = t(torch.zeros(3, 10, 20, dtype=torch.uint8), m)
    assert int(out["valid"].sum()) == 16 * 32


def test_transform_validation() -> None:
    t = TrainTransform(crop_size=8)
    with pytest.raises(ShapeError, match="image"):
        t(torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ShapeError, match="mask"):
        t(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(8, 9, dtype=torch.long))
    with pytest.raises(ShapeError, match="mask"):
        EvalTransform()(torch.zeros(3, 8, 8), torch.zeros(8, 8))
    with pytest.raises(ShapeError, match="image"):
        normalize(torch.zeros(3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(crop_size=8, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="long_side"):
        TrainTransform(crop_size=8, long_side=(0, 5))
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=(0, 4))
    with pytest.raises(ValueError, match="hflip"):
        TrainTransform(crop_size=8, hflip=2.0)


@pytest.mark.parametrize("stats", [dict(std=(0, 1, 1)), dict(std=(1, -1, 1)), dict(std=(1, 1, float("nan"))),
                                   dict(mean=(0.5, float("inf"), 0.5)), dict(mean=(0.5, 0.5))])
def test_normalisation_statistics_are_checked(stats: dict) -> None:
    name = next(iter(stats))
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    for build in (lambda: normalize(img, **stats), lambda: EvalTransform(**stats),
                  lambda: TrainTransform(crop_size=4, **stats)):
        with pytest.raises(ValueError, match=f"^{name}: "):
            build()


def test_options_are_keyword_only() -> None:
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError):
        normalize(img, (0.5, 0.5, 0.5))  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainTransform(8)  # type: ignore[misc]


def test_normalize_and_eval() -> None:
    img = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)
    out = EvalTransform()(img, torch.zeros(5, 6, dtype=torch.uint8))
    ref = torch.empty(3, 5, 6)
    for c in range(3):
        ref[c] = (img[c].float() / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    torch.testing.assert_close(out["image"], ref)
    torch.testing.assert_close(normalize(img.float() / 255), ref)


def test_labels_from_mask_oracle() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        m = torch.randint(0, 7, (9, 11), generator=g)
        m[m == 6] = 255
        ref = torch.zeros(5)
        for v in m.flatten().tolist():
            if v not in (0, 255):
                ref[v - 1] = 1
        assert torch.equal(labels_from_mask(m, 5), ref)
    assert labels_from_mask(torch.zeros(3, 3, dtype=torch.long), 4).sum() == 0
